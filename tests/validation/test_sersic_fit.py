"""The PSF-convolved Sérsic fit (``validation.sersic_fit``) against GalSim profiles."""

from __future__ import annotations

import galsim
import numpy as np
import pytest
import torch

from d4a_batch.validation.sersic_fit import derived_measurements, fit_sersic, render

H = 48
MOFFAT = galsim.Moffat(beta=3.5, fwhm=4.0)


def test_render_conserves_the_analytic_flux():
    p = torch.zeros(2, 8, dtype=torch.float64)
    p[:, 0] = np.log(1000.0)
    p[:, 3] = torch.tensor([2.0, 3.0], dtype=torch.float64).log()
    p[:, 4] = torch.tensor([-2.0, 0.0], dtype=torch.float64)  # n ≈ 0.98, 3.15
    img = render(p, (300, 300), torch.full((2, 2), 150.0, dtype=torch.float64),
                 torch.ones(2, dtype=torch.float64))  # fmt: skip
    # an n = 3.15 profile keeps ~0.5 % of its light beyond 150 r_e/3 px
    assert img.sum((1, 2)).numpy() == pytest.approx([1000.0, 1000.0], rel=0.01)


def test_fit_recovers_a_convolved_sersic_and_its_circular_r50():
    """GalSim's half_light_radius of a sheared profile is the circularised one: the major
    axis is hlr/√q; the fit's circular-aperture r50 (``derived_measurements``) must match
    the same measurement of the unconvolved truth."""
    rng = np.random.default_rng(3)
    truths = [(1.0, 3.0, 0.5, 20.0), (2.5, 2.0, 0.8, -40.0)]
    imgs, clean = [], []
    for n, hlr, q, beta in truths:
        g = (
            galsim.Sersic(n=n, half_light_radius=hlr)
            .withFlux(4000)
            .shear(q=q, beta=beta * galsim.degrees)
        )
        imgs.append(galsim.Convolve(g, MOFFAT).drawImage(nx=H, ny=H, scale=1.0).array)
        clean.append(g.drawImage(nx=64, ny=64, scale=0.5).array)  # model grid: 0.5 HSC px
    img = np.array(imgs) + rng.normal(0, 1.0, (2, H, H))
    # the model applies the PSF image to the pixel-integrated profile (as the mocks and the
    # engine's operator do), so the reference's PSF is drawn without a second pixel
    psf = MOFFAT.drawImage(nx=31, ny=31, scale=1.0, method="no_pixel").array
    fit = fit_sersic(img, np.ones_like(img), np.ones_like(img, bool), np.stack([psf, psf]),
                     np.zeros((2, 2)), adam_steps=200, lbfgs_steps=60)  # fmt: skip
    assert fit.converged.all()
    assert fit.chi2_dof == pytest.approx([1.0, 1.0], abs=0.08)
    for i, (n, hlr, q, _) in enumerate(truths):
        assert fit.r_e[i] == pytest.approx(hlr / np.sqrt(q), rel=0.06)
        assert fit.q[i] == pytest.approx(q, abs=0.03)
        assert abs(fit.n[i] - n) < max(4 * fit.n_err[i], 0.15 * n)
    cols = derived_measurements(fit, np.full(2, 0.5), 64, 0.5, 0.168, n_draws=8)
    from d4a_batch.measure.catalog import measure_posterior

    truth_cols, _ = measure_posterior(
        np.array(clean)[:, None, None], 0.5, np.full(2, 0.084), ("i",)
    )
    assert cols["r50_arcsec"] == pytest.approx(truth_cols["r50_arcsec"], rel=0.06)
    assert cols["axis_ratio"] == pytest.approx(truth_cols["axis_ratio"], abs=0.03)
    assert (cols["r50_arcsec_p16"] <= cols["r50_arcsec"]).all()
    assert (cols["r50_arcsec"] <= cols["r50_arcsec_p84"]).all()
