"""Posterior summaries: reductions checked against independent numpy, chi² against noise."""

from __future__ import annotations

import numpy as np
import torch

from d4a_batch.config import PhysicsConfig, SamplerConfig
from d4a_batch.physics.operator import ForwardOperator, ObservationBatch, degrees_of_freedom
from d4a_batch.physics.stretch import inverse_stretch
from d4a_batch.sampling.summaries import (
    PosteriorSummaries,
    aperture_mask,
    model_chi2,
    reconvolve,
    reconvolved_chi2,
)
from d4a_batch.schema import Col, band_col
from tests.sampling.conftest import gaussian_psf

B, S, C, N, H = 2, 5, 2, 8, 20
BANDS = ("r", "i")


def _setup(rng, sigma=1.0, flux_scale=300.0):
    """Samples, amplitudes, an observation of the mean flux image and its operator."""
    x = torch.as_tensor(rng.uniform(-1, 0.5, (B, S, C, N, N)), dtype=torch.float32)
    alpha = torch.as_tensor(rng.uniform(0.5, 2.0, (B, S, C)) * flux_scale, dtype=torch.float32)
    beta = torch.as_tensor(rng.normal(0, 1, (B, S, C)), dtype=torch.float32)
    psf = np.broadcast_to(gaussian_psf(9, 1.3), (B, C, 9, 9)).copy()
    offset = np.array([[0.1, -0.3], [0.0, 0.4]])
    scale = np.array([0.8, 1.3])
    op = ForwardOperator(
        torch.as_tensor(psf, dtype=torch.float32),
        torch.as_tensor(scale, dtype=torch.float32),
        torch.as_tensor(offset, dtype=torch.float32),
        (H, H),
    )
    mean_flux = (alpha[..., None, None] * inverse_stretch(x)).mean(1)
    bg = np.array([[2.0, -1.0], [0.5, 3.0]])[..., None, None]
    y = op.linear(mean_flux).numpy() + bg + sigma * rng.standard_normal((B, C, H, H))
    valid = np.ones(y.shape, bool)
    valid[0, 1, :3] = False  # a masked strip
    y[0, 1, :3] = np.nan
    obs = ObservationBatch.from_arrays(y, np.full(y.shape, sigma**2), valid, psf, offset)
    return x, alpha, beta, obs, op, scale, mean_flux


def test_aperture_mask_is_a_centred_disc():
    m = aperture_mask(256, 30 / 256)
    assert abs(m.sum() / (np.pi * 30**2) - 1) < 0.01
    assert np.array_equal(m, m[::-1]) and np.array_equal(m, m.T)
    assert aperture_mask(8, 0.25).sum() == 12  # centres at ±0.5, ±1.5 within radius 2


def test_reductions_match_numpy(rng):
    x, alpha, beta, obs, op, scale, _ = _setup(rng)
    var_prior = torch.as_tensor(rng.uniform(0.05, 0.2, (C, N, N)), dtype=torch.float32)
    cfg = SamplerConfig(samples=S, keep_samples=3, aperture_radius_frac=0.25, steps=7, seed=5)
    phys = PhysicsConfig()
    s = PosteriorSummaries.from_samples(
        x, alpha, beta, obs, op, var_prior,
        object_ids=[11, 22], redshift=np.array([0.3, 0.5]), scale=scale,
        bands=BANDS, config=cfg, physics=phys,
    )  # fmt: skip
    xn = x.double().numpy()
    an = alpha.double().numpy()
    np.testing.assert_allclose(s.mean_x, xn.mean(1), atol=1e-6)
    np.testing.assert_allclose(s.std_x, xn.std(1, ddof=1), rtol=1e-5, atol=1e-6)
    flux_s = an[..., None, None] * 0.01 * np.sinh((xn + 1) / 2 * np.arcsinh(100.0))
    np.testing.assert_allclose(s.mean_flux, flux_s.mean(1), rtol=1e-5)
    np.testing.assert_allclose(s.std_flux, flux_s.std(1, ddof=1), rtol=1e-4)
    ratio = (xn.var(1, ddof=1) / var_prior.numpy()).mean(1)
    np.testing.assert_allclose(s.variance_ratio, ratio, rtol=1e-5)
    disc = aperture_mask(N, 0.25)
    np.testing.assert_allclose(s.hallucination, ratio[:, disc].mean(-1), rtol=1e-5)
    np.testing.assert_allclose(s.variance_ratio_mean, ratio.mean((1, 2)), rtol=1e-5)
    tot = flux_s.sum((-2, -1))
    np.testing.assert_allclose(s.flux, tot.mean(1), rtol=1e-5)
    np.testing.assert_allclose(s.flux_err, tot.std(1, ddof=1), rtol=1e-4)
    np.testing.assert_allclose(s.mag, 27.0 - 2.5 * np.log10(tot.mean(1)), atol=1e-5)
    np.testing.assert_allclose(s.mag_err, (-2.5 * np.log10(tot)).std(1, ddof=1), rtol=1e-4)
    np.testing.assert_allclose(s.alpha, an.mean(1), rtol=1e-6)
    np.testing.assert_allclose(s.beta, beta.double().numpy().mean(1), atol=1e-6)
    np.testing.assert_allclose(s.upsampling, 1 / scale)
    np.testing.assert_allclose(s.theta_arcsec, scale * 0.168)
    np.testing.assert_allclose(s.footprint, N * scale)
    np.testing.assert_allclose(s.masked_fraction, [3 * H / (C * H * H), 0.0])
    assert s.samples_x.shape == (B, 3, C, N, N)
    np.testing.assert_array_equal(s.samples_x, xn[:, :3].astype(np.float32))
    assert (s.steps, s.samples, s.seed) == (7, S, 5)
    # the re-convolved mean is kept: the one model of the chi2 and of the POOR_FIT regions
    model = reconvolve(torch.as_tensor(s.mean_flux), obs, op)
    np.testing.assert_array_equal(s.reconvolved, model.double().numpy())
    np.testing.assert_array_equal(s.chi2, model_chi2(model, obs).double().numpy())


def test_reconvolved_chi2_is_one_for_the_truth_and_large_for_a_wrong_image(rng):
    _, _, _, obs, op, _, mean_flux = _setup(rng, flux_scale=3000.0)
    chi2 = reconvolved_chi2(mean_flux, obs, op).numpy()
    # alpha and beta are fitted per band: 2 dof per band (physics.operator.degrees_of_freedom)
    dof = np.array([C * H * H - 3 * H - 2 * C, C * H * H - 2 * C])
    np.testing.assert_array_equal(degrees_of_freedom(obs.valid).numpy(), dof)
    res = obs.masked_image() - reconvolve(mean_flux, obs, op)
    total = (obs.weight() * res * res).sum((1, 2, 3)).double().numpy()
    np.testing.assert_allclose(chi2 * dof, total, rtol=1e-5)
    # chi² / dof of pure noise: mean 1, std sqrt(2 / dof)
    assert np.all(np.abs(chi2 - 1) < 5 * np.sqrt(2 / dof)), chi2
    wrong = reconvolved_chi2(0.8 * mean_flux, obs, op).numpy()
    assert np.all(wrong > 3), wrong


def test_columns_are_keyed_by_schema_columns(rng):
    x, alpha, beta, obs, op, scale, _ = _setup(rng)
    s = PosteriorSummaries.from_samples(
        x, alpha, beta, obs, op, torch.full((C, N, N), 0.1),
        object_ids=[11, 22], redshift=np.array([0.3, 0.5]), scale=scale,
        bands=BANDS, config=SamplerConfig(samples=S), physics=PhysicsConfig(),
    )  # fmt: skip
    cols = s.columns()
    assert cols[Col.OBJECT_ID].tolist() == [11, 22]
    for name in (Col.FLUX, Col.FLUX_ERR, Col.MAG, Col.MAG_ERR, Col.ALPHA, Col.BETA):
        for c, band in enumerate(BANDS):
            np.testing.assert_array_equal(cols[band_col(name, band)], getattr(s, name)[:, c])
    np.testing.assert_array_equal(cols[Col.HALLUCINATION], s.hallucination)
    np.testing.assert_array_equal(cols[Col.CHI2], s.chi2)
    assert cols[Col.MEAN_FLUX].shape == (2, C, N, N) and cols[Col.VARIANCE_RATIO].shape == (2, N, N)
    assert Col.SAMPLES_X not in cols  # keep_samples = 0
    scalar_only = s.columns(maps=False)
    assert Col.MEAN_X not in scalar_only
    assert all(v.shape == (2,) for v in scalar_only.values())
