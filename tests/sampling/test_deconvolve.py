"""deconvolve() through the real physics operator, with an analytic Gaussian galaxy prior.

The prior (``galaxy_prior``) is Gaussian with smooth (DCT) modes, so its ε is exact and a
truth drawn from it is a fair test object; the data are simulated with the physics
``ForwardOperator`` at known amplitude, background and noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d4a_batch.config import FlagThresholds, SamplerConfig
from d4a_batch.physics.operator import ObservationBatch
from d4a_batch.physics.stretch import inverse_stretch
from d4a_batch.sampling.deconvolve import deconvolve
from d4a_batch.sampling.dps import dps_sample
from d4a_batch.sampling.rows import row_generators
from tests.sampling.conftest import galaxy_prior, gaussian_psf, observe

Z = 0.3


@pytest.fixture(scope="module")
def prior():
    return galaxy_prior(n=16, bands=2)


@pytest.fixture(scope="module")
def truth(prior):
    x = dps_sample(prior, None, row_generators(1, [0], 1), steps=100, guidance=0.0)
    return x[0]


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


@pytest.mark.parametrize(("rule", "zeta"), [("rms", 0.02), ("raw", 0.003)])
def test_bright_resolved_galaxy_is_recovered_with_low_variance_ratio(prior, truth, rule, zeta):
    rng = np.random.default_rng(3)
    alpha = 2000.0
    obs, _ = observe(truth, prior, Z, alpha, 1.0, rng)
    cfg = SamplerConfig(sampler="dps", steps=100, samples=24, guidance=zeta, guidance_rule=rule)
    s = deconvolve(obs, [Z], prior, cfg, [101])
    t = truth.numpy()
    true_flux = alpha * inverse_stretch(t).sum((1, 2))
    err, err_prior = _rmse(s.mean_x[0], t), _rmse(prior.stats_mean.numpy(), t)
    print(
        f"\n[deconvolve] bright, {rule} zeta={zeta}: rmse(mean, truth) {err:.3f} (prior mean"
        f" {err_prior:.3f}), chi2 {s.chi2[0]:.2f}, hallucination {s.hallucination[0]:.2f},"
        f" variance ratio mean {s.variance_ratio_mean[0]:.2f}, flux {s.flux[0].round(0)}"
        f" +- {s.flux_err[0].round(0)} (true {true_flux.round(0)}), alpha {s.alpha[0].round(0)}"
    )
    assert err < 0.6 * err_prior
    assert s.hallucination[0] < 0.5
    assert s.chi2[0] < 3.0
    np.testing.assert_allclose(s.flux[0], true_flux, rtol=0.05)
    assert np.all(np.isfinite(s.mag[0])) and np.all(s.mag_err[0] > 0)


def _pure_noise(b: int = 3, c: int = 2, h: int = 24, sigma: float = 1e6) -> ObservationBatch:
    rng = np.random.default_rng(4)
    img = sigma * rng.standard_normal((b, c, h, h))
    psf = np.broadcast_to(gaussian_psf(11, 1.2), (b, c, 11, 11)).copy()
    var = np.full(img.shape, sigma**2)
    return ObservationBatch.from_arrays(img, var, np.ones(img.shape, bool), psf, np.zeros((b, 2)))


def _noise_run(prior, rule: str, zeta: float):
    cfg = SamplerConfig(
        sampler="dps", steps=100, samples=32, guidance=zeta, guidance_rule=rule,
        aperture_radius_frac=0.25,
    )  # fmt: skip
    s = deconvolve(_pure_noise(), [Z] * 3, prior, cfg, [1, 2, 3])
    print(
        f"\n[deconvolve] pure noise, {rule} zeta={zeta}: variance ratio mean"
        f" {s.variance_ratio_mean.round(2)}, hallucination {s.hallucination.round(2)},"
        f" chi2 {s.chi2.round(2)}"
    )
    return s


@pytest.mark.parametrize(("rule", "zeta"), [("raw", 0.003), ("rms", 0.005)])
def test_pure_noise_leaves_the_prior_variance(prior, rule, zeta):
    """No information (huge variance, no source): the variance ratio stays near 1."""
    s = _noise_run(prior, rule, zeta)
    # 32 samples: one pixel's ratio scatters by sqrt(2/31) = 0.25; the maps average it down
    assert np.all(np.abs(s.variance_ratio_mean - 1) < 0.25)
    assert np.all(np.abs(s.hallucination - 1) < 0.35)
    assert np.all(np.abs(s.chi2 - 1) < 0.2)


def test_pure_noise_with_a_large_unit_rms_step_is_still_flagged(prior):
    """The "rms" rule steps ζ per pixel however little the data say: at ζ = 0.02 it moves
    pure-noise samples (variance ratio 0.7-1.7 measured), but the core stays prior-like
    enough for the PRIOR_DOMINATED flag to fire."""
    s = _noise_run(prior, "rms", 0.02)
    assert np.all(s.hallucination > FlagThresholds().hallucination_max)


def test_photoz_marginalisation_gives_each_sample_its_own_scale(prior, truth):
    rng = np.random.default_rng(5)
    obs, _ = observe(truth, prior, Z, 300.0, 1.0, rng)
    base = SamplerConfig(sampler="dps", steps=20, samples=4, keep_samples=4, guidance=0.02)
    marg = SamplerConfig(**{**base.__dict__, "marginalise_photoz": True})
    plain = deconvolve(obs, [Z], prior, base, [9]).samples_x
    point = deconvolve(obs, [Z], prior, marg, [9], photoz_err=[[Z, Z]]).samples_x
    wide = deconvolve(obs, [Z], prior, marg, [9], photoz_err=[[0.2, 0.45]])
    np.testing.assert_array_equal(point, plain)  # a zero-width interval keeps z
    assert np.abs(wide.samples_x - plain).mean() > 1e-3
    assert wide.redshift[0] == Z and np.isclose(wide.upsampling[0], 1 / (wide.footprint[0] / 16))


def test_invalid_inputs_are_refused(prior, truth):
    obs, _ = observe(truth, prior, Z, 300.0, 1.0, np.random.default_rng(0))
    cfg = SamplerConfig(steps=2, samples=2)
    for z in (np.nan, -0.1, 0.0):
        with pytest.raises(ValueError, match="redshifts must be finite"):
            deconvolve(obs, [z], prior, cfg, [1])
    with pytest.raises(ValueError, match="1 observations, 2 redshifts"):
        deconvolve(obs, [Z, Z], prior, cfg, [1])
    three = galaxy_prior(n=16, bands=3)
    with pytest.raises(ValueError, match="2 bands"):
        deconvolve(obs, [Z], three, cfg, [1])
    assert torch.isfinite(torch.as_tensor(deconvolve(obs, [Z], prior, cfg, [1]).chi2)).all()
