"""Redshift -> angular scale of the prior's physical pixels.

A model pixel of ``kpc_per_pixel`` proper kpc at redshift z spans
``theta(z) = kpc_per_pixel * arcsec_per_kpc_proper(z)`` arcsec; the N-pixel model
image covers ``n_out = N * theta / hsc_pixel`` HSC pixels, and the model grid is
``u = hsc_pixel / theta`` times finer than HSC's. All functions take a scalar or
an array of redshifts and return float64 numpy arrays of the same shape.
"""

from __future__ import annotations

import functools

import astropy.units as u
import numpy as np
from astropy.cosmology import realizations
from numpy.typing import ArrayLike, NDArray

DEFAULT_COSMOLOGY = "Planck15"  # the TNG cosmology
HSC_PIXEL_ARCSEC = 0.168


@functools.lru_cache(maxsize=16)
def get_cosmology(name: str = DEFAULT_COSMOLOGY):
    """The astropy cosmology realisation called ``name`` (e.g. "Planck15", "WMAP9")."""
    if name not in realizations.available:
        raise ValueError(
            f"unknown cosmology {name!r}; available: {', '.join(realizations.available)}"
        )
    return getattr(realizations, name)


def _check_z(z: ArrayLike) -> NDArray[np.float64]:
    arr = np.asarray(z, dtype=np.float64)
    bad = ~(np.isfinite(arr) & (arr > 0))
    if bad.any():
        raise ValueError(
            f"invalid redshift {float(arr[bad].ravel()[0])!r}: must be finite and > 0 "
            f"({int(bad.sum())} of {arr.size} values invalid)"
        )
    return arr


def arcsec_per_kpc(z: ArrayLike, cosmology: str = DEFAULT_COSMOLOGY) -> NDArray[np.float64]:
    """Arcsec subtended by one proper kpc at redshift ``z``."""
    zz = _check_z(z)
    value = get_cosmology(cosmology).arcsec_per_kpc_proper(zz)
    return np.asarray(value.to_value(u.arcsec / u.kpc), dtype=np.float64)


def model_pixel_arcsec(
    z: ArrayLike, kpc_per_pixel: float, cosmology: str = DEFAULT_COSMOLOGY
) -> NDArray[np.float64]:
    """theta(z): angular size (arcsec) of one model pixel of ``kpc_per_pixel`` proper kpc."""
    if not kpc_per_pixel > 0:
        raise ValueError(f"kpc_per_pixel must be > 0, got {kpc_per_pixel!r}")
    return kpc_per_pixel * arcsec_per_kpc(z, cosmology)


def footprint_hsc_pixels(
    z: ArrayLike,
    kpc_per_pixel: float,
    n_model: int,
    hsc_pixel_arcsec: float = HSC_PIXEL_ARCSEC,
    cosmology: str = DEFAULT_COSMOLOGY,
) -> NDArray[np.float64]:
    """n_out(z) = N * theta(z) / hsc_pixel: side of the model footprint in HSC pixels (not rounded)."""
    return n_model * model_pixel_arcsec(z, kpc_per_pixel, cosmology) / hsc_pixel_arcsec


def upsampling_factor(
    z: ArrayLike,
    kpc_per_pixel: float,
    hsc_pixel_arcsec: float = HSC_PIXEL_ARCSEC,
    cosmology: str = DEFAULT_COSMOLOGY,
) -> NDArray[np.float64]:
    """u(z) = hsc_pixel / theta(z): model pixels per HSC pixel along one axis."""
    return hsc_pixel_arcsec / model_pixel_arcsec(z, kpc_per_pixel, cosmology)
