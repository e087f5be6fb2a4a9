"""A real galaxy with a known sharp answer: HST/ACS COSMOS 147246 degraded to HSC.

Truth: the F814W image (GalSim example data, 0.03''/px), sky-subtracted from the median
beyond 200 HST pixels of the centre and cut to 3.5'' around its centroid (its neighbours
are masked with noise beyond), as in ``tests/physics/test_hst_to_hsc.py``. Observation, per
band of the prior (the one F814W morphology in every band: a galaxy without colour
gradients): the model's own resampling to 0.168'', the real HSC PSF of that band of the
scarlet COSMOS cutout, and Gaussian noise at that band's median HSC variance, at a total
i-band magnitude ``mag_i`` (the same counts in every band), written as HSC cutout-service
and PSF-picker FITS files and read back by the engine's staging.

Scores (``score_real``), on the HSC pixel grid where the truth is known without the PSF:
``truth_hsc = R(truth)`` (resampled, not blurred) against (a) the observation and (b) the
posterior mean taken through the same resampling ``R`` (no PSF): Pearson correlation over
the **whole model footprint** (the stamp pixels the model field covers, R(1) > 0) and over
the core (within 1'' of the centre), and the re-convolved posterior mean's chi2/dof.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d4a_batch.physics.operator import ForwardOperator
from d4a_batch.schema import SHARED_DATA_DIR, Col

HST_FILE = SHARED_DATA_DIR / "galsim" / "cosmos_147246_f814w.fits"
HSC_NPZ = SHARED_DATA_DIR / "scarlet" / "hsc_cosmos_35.npz"
HST_PIXEL_ARCSEC = 0.03
HSC_PIXEL_ARCSEC = 0.168
TRUTH_RADIUS_ARCSEC = 3.5
ZEROPOINT = 27.0  # the scarlet cutouts' counts


def hst_galaxy_and_centre(
    path: str | Path = HST_FILE,
) -> tuple[np.ndarray, tuple[float, float]]:
    """The HST galaxy ``[H, W]`` (float64, 0.03''/px), sky-subtracted (median beyond 200 HST
    pixels of the array centre) and cut to 3.5'' around its light centroid (measured within
    60 pixels of the array centre), and that centroid (y, x) in HST pixels."""
    from astropy.io import fits

    hst = fits.getdata(path).astype(np.float64)
    n = hst.shape[0]
    y, x = np.indices(hst.shape)
    r0 = np.hypot(y - (n - 1) / 2, x - (n - 1) / 2)
    gal = hst - np.median(hst[r0 > 200])
    core = r0 < 60
    gy, gx = ((gal * c)[core].sum() / gal[core].sum() for c in (y, x))
    inside = np.hypot(y - gy, x - gx) < TRUTH_RADIUS_ARCSEC / HST_PIXEL_ARCSEC
    return np.where(inside, gal, 0.0), (float(gy), float(gx))


def hst_galaxy(path: str | Path = HST_FILE) -> np.ndarray:
    """The HST galaxy ``[H, W]`` (float64, 0.03''/px): sky-subtracted, cut to 3.5''."""
    return hst_galaxy_and_centre(path)[0]


def resample_only(
    img: np.ndarray, scale: float, offset: tuple[float, float], stamp: int
) -> np.ndarray:
    """``R(img)``: a square image ``[n, n]`` of pixel width ``scale`` (HSC pixels) centred at
    ``offset`` from the stamp centre, integrated onto the ``stamp x stamp`` HSC grid (flux
    conserving, no PSF): the engine's resampling with a one-pixel PSF. ``[stamp, stamp]``."""
    delta = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    op = ForwardOperator(delta, [scale], [offset], (stamp, stamp))
    return op.linear(torch.as_tensor(img, dtype=torch.float64)[None, None])[0, 0].numpy()


@dataclasses.dataclass(frozen=True)
class HscObservation:
    """A degraded truth: per band image/variance ``[C, S, S]``, PSF ``[C, P, P]``."""

    image: np.ndarray
    variance: np.ndarray
    psf: np.ndarray
    truth_hsc: np.ndarray  # [S, S] R(truth) in i-band counts (no PSF)
    offset: tuple[float, float]
    flux: float


def degrade_to_hsc(
    truth: np.ndarray,
    bands: tuple[str, ...],
    mag_i: float,
    stamp: int = 112,
    offset: tuple[float, float] = (0.3, -0.2),
    seed: int = 2024,
    npz: str | Path = HSC_NPZ,
) -> HscObservation:
    """``truth`` (0.03''/px) observed by HSC in ``bands``: real PSF and median variance per band."""
    data = np.load(npz)
    filters = [str(f) for f in data["filters"]]
    flux = 10 ** (0.4 * (ZEROPOINT - mag_i))
    v = truth / truth.sum()
    scale = HST_PIXEL_ARCSEC / HSC_PIXEL_ARCSEC
    truth_hsc = flux * resample_only(v, scale, offset, stamp)
    rng = np.random.default_rng(seed)
    images, variances, psfs = [], [], []
    for b in bands:
        k = filters.index(b)
        psf = data["psfs"][k].astype(np.float64)
        op = ForwardOperator(torch.from_numpy(psf)[None, None], [scale], [offset], (stamp, stamp))
        clean = flux * op.linear(torch.from_numpy(v)[None, None])[0, 0].numpy()
        var = float(np.median(data["variance"][k]))
        images.append(clean + rng.normal(0.0, np.sqrt(var), clean.shape))
        variances.append(np.full(clean.shape, var))
        psfs.append(psf)
    return HscObservation(
        np.stack(images), np.stack(variances), np.stack(psfs), truth_hsc, offset, flux
    )


def pearson(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    return float(np.corrcoef(a[where].ravel(), b[where].ravel())[0, 1])


def score_real(
    obs: HscObservation,
    mean_flux: np.ndarray,
    scale: float,
    offset: tuple[float, float],
    band: int,
    row: dict[str, Any],
) -> dict[str, Any]:
    """Scores of one deconvolution (``mean_flux`` [C, N, N] in counts per model pixel; the
    staged ``scale`` and ``offset``); ``band``: the index of the band compared (i)."""
    stamp = obs.image.shape[-1]
    mean_hsc = resample_only(mean_flux[band], scale, offset, stamp)
    footprint = resample_only(np.ones(mean_flux.shape[-2:]), scale, offset, stamp) > 0
    yy, xx = np.indices((stamp, stamp), dtype=np.float64)
    centre = (stamp / 2 - 0.5 + offset[0], stamp / 2 - 0.5 + offset[1])
    core = np.hypot(yy - centre[0], xx - centre[1]) < 1.0 / HSC_PIXEL_ARCSEC
    truth_in = obs.truth_hsc[footprint].sum() / obs.truth_hsc.sum()
    return {
        "chi2": float(row[Col.CHI2]),
        "flags": str(row[Col.FLAG_NAMES]),
        "hallucination": float(row[Col.HALLUCINATION]),
        "upsampling": float(1.0 / scale),
        "footprint_pixels": int(footprint.sum()),
        "truth_light_in_footprint": float(truth_in),
        "pearson_mean_footprint": pearson(mean_hsc, obs.truth_hsc, footprint),
        "pearson_obs_footprint": pearson(obs.image[band], obs.truth_hsc, footprint),
        "pearson_mean_core": pearson(mean_hsc, obs.truth_hsc, core & footprint),
        "pearson_obs_core": pearson(obs.image[band], obs.truth_hsc, core & footprint),
        "flux_ratio_mean": float(mean_hsc[footprint].sum() / obs.truth_hsc[footprint].sum()),
    }
