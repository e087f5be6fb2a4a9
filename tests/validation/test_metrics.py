"""Metrics on constructed cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from d4a_batch.physics.operator import ForwardOperator, ObservationBatch
from d4a_batch.physics.stretch import inverse_stretch
from d4a_batch.validation.metrics import (
    aperture_snr,
    core_mask,
    coverage,
    image_scores,
    interval_coverage,
    psnr,
    reconvolve,
    reduced_chi2,
    ssim,
    stamp_disc,
    truth_range,
)
from d4a_batch.validation.samples import flux_samples


def gaussian_psf(size: int = 11, sigma: float = 1.3) -> np.ndarray:
    p = np.arange(size) - size // 2
    k = np.exp(-(p[:, None] ** 2 + p[None] ** 2) / (2 * sigma**2))
    return k / k.sum()


def blob(n: int = 16, c: int = 3, width: float = 2.5) -> np.ndarray:
    """A smooth positive galaxy-like truth [c, n, n] (counts per model pixel)."""
    r = np.arange(n) + 0.5 - n / 2
    prof = np.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * width**2))
    return np.stack([(5.0 + 2 * b) * prof for b in range(c)])


def test_psnr_of_a_constant_offset_is_analytic():
    truth = blob()
    d = 0.05
    expect = 20 * math.log10(truth_range(truth) / d)
    assert psnr(truth + d, truth) == pytest.approx(expect, abs=1e-9)
    assert truth_range(truth) == pytest.approx(truth.max() - truth.min())


def test_ssim_is_one_for_the_truth_and_lower_for_a_noisy_copy(rng):
    truth = blob()
    assert ssim(truth, truth) == pytest.approx(1.0)
    noise = rng.standard_normal(truth.shape)
    noisy = truth + 1.0 * noise
    assert ssim(noisy, truth) < ssim(truth + 0.3 * noise, truth) < 1.0
    scores = image_scores(noisy, truth)
    assert scores["psnr"] == pytest.approx(psnr(noisy, truth))
    assert np.isfinite(scores["psnr_asinh"]) and scores["ssim_asinh"] < 1.0


def test_metrics_reject_a_constant_truth_and_shape_mismatch():
    with pytest.raises(ValueError, match="constant"):
        psnr(np.ones((3, 8, 8)), np.ones((3, 8, 8)))
    with pytest.raises(ValueError, match=r"\[C, N, N\]"):
        psnr(np.ones((3, 8, 8)), np.ones((3, 8, 9)))


@pytest.mark.parametrize("level", [0.68, 0.95])
def test_coverage_of_a_calibrated_gaussian_posterior(rng, level):
    mu = blob(16)
    sd = 0.2 + 0.1 * mu
    samples = mu + sd * rng.standard_normal((400, *mu.shape))
    truth = mu + sd * rng.standard_normal(mu.shape)  # the truth is one more draw
    assert interval_coverage(samples, truth, level) == pytest.approx(level, abs=0.03)


def test_a_too_narrow_posterior_has_low_coverage(rng):
    mu = blob(16)
    truth = mu + 0.5 * rng.standard_normal(mu.shape)
    samples = mu + 0.1 * rng.standard_normal((400, *mu.shape))  # 5x too narrow
    cov = coverage(samples, truth)
    # truth inside mu ± 0.1·z_p: probability 2Φ(0.2 z_p) − 1
    for p, got in cov.items():
        expect = 2 * norm.cdf(0.2 * norm.ppf((1 + p) / 2)) - 1
        assert got == pytest.approx(expect, abs=0.04)
    assert cov[0.68] < 0.2 and cov[0.95] < 0.35


def test_coverage_counts_only_the_masked_pixels(rng):
    samples = rng.standard_normal((100, 2, 8, 8))
    truth = np.zeros((2, 8, 8))
    core = core_mask(8, 0.25)
    truth[:, ~core] = 50.0  # far outside the interval, but not scored
    assert interval_coverage(samples, truth, 0.95, mask=core) == 1.0
    assert interval_coverage(samples, truth, 0.95) == pytest.approx(core.mean())
    with pytest.raises(ValueError, match="S>=2"):
        interval_coverage(samples[:1], truth, 0.68)


def test_aperture_snr_of_a_flat_source():
    model = np.full((3, 20, 20), 2.0)
    var = np.full((3, 20, 20), 0.25)
    valid = np.ones((3, 20, 20), bool)
    snr, per_band = aperture_snr(model, var, valid, (0.3, -0.2), 4.0)
    assert snr == pytest.approx(4.0) and np.allclose(per_band, 4.0)
    disc = stamp_disc((20, 20), (0.0, 0.0), 4.0)
    assert disc.sum() == sum(
        1 for y in range(20) for x in range(20) if (y + 0.5 - 10) ** 2 + (x + 0.5 - 10) ** 2 <= 16
    )


def _obs(truth: np.ndarray, scale: float, sigma: float, rng, beta: float = 0.7):
    """One observation of truth[C,N,N] through the real operator; returns (obs, noiseless)."""
    c = truth.shape[0]
    psf = np.broadcast_to(gaussian_psf(), (1, c, 11, 11)).copy()
    offset = np.array([[0.25, -0.3]])
    op = ForwardOperator(
        torch.as_tensor(psf), torch.tensor([scale], dtype=torch.float64),
        torch.as_tensor(offset), (24, 24),
    )  # fmt: skip
    clean = op.linear(torch.as_tensor(truth[None], dtype=torch.float64)).numpy() + beta
    noisy = clean + sigma * rng.standard_normal(clean.shape)
    obs = ObservationBatch.from_arrays(
        noisy, np.full(clean.shape, sigma**2), np.ones(clean.shape, bool), psf, offset,
        dtype=torch.float64,
    )  # fmt: skip
    return obs, clean


def test_reduced_chi2_of_the_truth_is_one_and_reconvolve_restores_the_data(rng):
    truth = blob()
    obs, clean = _obs(truth, 0.6, 0.05, rng)
    chi = reduced_chi2(truth[None], obs, np.array([0.6]))
    dof = 3 * (24 * 24 - 2)  # alpha and beta per band
    assert chi[0] == pytest.approx(1.0, abs=4 * math.sqrt(2 / dof))
    assert reduced_chi2(0.5 * truth[None], obs, np.array([0.6]))[0] > 10
    noiseless = ObservationBatch.from_arrays(
        clean, obs.variance, obs.valid, obs.psf, obs.offset, dtype=torch.float64
    )
    np.testing.assert_allclose(reconvolve(truth[None], noiseless, np.array([0.6])), clean,
                               rtol=0, atol=1e-9)  # fmt: skip


def test_flux_samples_recover_each_samples_amplitude(rng):
    x = np.clip(rng.uniform(-1, 0.6, (1, 2, 3, 16, 16)), -1, 1)
    alpha_true = 40.0
    # the observation is sample 0 seen at amplitude 40: its profiled alpha must be 40
    truth = alpha_true * inverse_stretch(x[0, 0])
    obs, _ = _obs(truth, 0.6, 1e-6, rng)
    flux, alpha = flux_samples(x, obs, np.array([0.6]), ridge=0.0)
    assert flux.shape == x.shape and alpha.shape == (1, 2, 3)
    np.testing.assert_allclose(alpha[0, 0], alpha_true, rtol=1e-5)
    np.testing.assert_allclose(flux[0, 0], truth, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(flux[0, 1], alpha[0, 1][:, None, None] * inverse_stretch(x[0, 1]))
    # the sampler's own ridge biases alpha by well under a percent
    _, alpha_ridge = flux_samples(x, obs, np.array([0.6]))
    np.testing.assert_allclose(alpha_ridge[0, 0], alpha_true, rtol=1e-3)
