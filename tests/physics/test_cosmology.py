from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.integrate

from d4a_batch.physics.cosmology import (
    arcsec_per_kpc,
    footprint_hsc_pixels,
    model_pixel_arcsec,
    upsampling_factor,
)

C_KM_S = 299792.458
RAD_TO_ARCSEC = 180 / np.pi * 3600


def _flat_lcdm_arcsec_per_kpc(z: float, h0: float, om0: float) -> float:
    """Independent flat matter + Lambda angular scale (radiation ignored: ~1e-4 effect at z < 2)."""
    e_inv = lambda zz: 1.0 / np.sqrt(om0 * (1 + zz) ** 3 + 1 - om0)  # noqa: E731
    d_c_mpc = C_KM_S / h0 * scipy.integrate.quad(e_inv, 0, z)[0]
    d_a_kpc = d_c_mpc / (1 + z) * 1e3
    return RAD_TO_ARCSEC / d_a_kpc


@pytest.mark.parametrize("z", [0.05, 0.4, 1.0, 1.5])
def test_arcsec_per_kpc_matches_friedmann_integral(z):
    # Planck15: H0 = 67.74, Om0 = 0.3075 (matter incl. massive neutrinos today)
    expect = _flat_lcdm_arcsec_per_kpc(z, 67.74, 0.3075)
    assert arcsec_per_kpc(z) == pytest.approx(expect, rel=2e-3)


def test_vectorised_shapes_and_relations():
    z = np.array([[0.1, 0.3, 0.6], [0.9, 1.2, 1.5]])
    theta = model_pixel_arcsec(z, 0.5)
    assert theta.shape == z.shape and theta.dtype == np.float64
    assert np.ndim(model_pixel_arcsec(0.3, 0.5)) == 0
    np.testing.assert_allclose(theta, 0.5 * arcsec_per_kpc(z))
    n_out = footprint_hsc_pixels(z, 0.5, 64)
    u = upsampling_factor(z, 0.5)
    np.testing.assert_allclose(n_out, 64 * theta / 0.168)
    np.testing.assert_allclose(u * theta, 0.168)
    np.testing.assert_allclose(n_out * u, 64.0)
    # angular size falls with z below the turnover at z ~ 1.6
    assert np.all(np.diff(theta.ravel()) < 0)
    # one value matters downstream: 0.5 kpc at z = 0.4 is about 0.09" (u ~ 1.86)
    assert upsampling_factor(0.4, 0.5) == pytest.approx(0.168 / (0.5 * 0.18057), rel=1e-3)


def test_cosmology_by_name():
    p15, w9 = arcsec_per_kpc(0.5, "Planck15"), arcsec_per_kpc(0.5, "WMAP9")
    assert p15 != w9 and abs(p15 / w9 - 1) < 0.05
    with pytest.raises(ValueError, match="unknown cosmology 'Planck99'"):
        arcsec_per_kpc(0.5, "Planck99")


@pytest.mark.parametrize("bad", [0.0, -0.2, np.nan, np.inf])
def test_invalid_redshift_names_the_value(bad):
    with pytest.raises(ValueError, match=re.escape(f"invalid redshift {bad!r}")):
        arcsec_per_kpc(np.array([0.3, bad, 0.5]))
    with pytest.raises(ValueError, match="invalid redshift"):
        upsampling_factor(bad, 0.5)


def test_invalid_kpc_per_pixel():
    with pytest.raises(ValueError, match="kpc_per_pixel"):
        model_pixel_arcsec(0.3, 0.0)
