"""Where a fit misses: the residual/σ map and its excess χ² by region (POOR_FIT, CORE_MISFIT).

    residual = (y − m) / σ on the used pixels (NaN elsewhere)      ``normalised_residual``
    E_R = Σ_{p ∈ R, bands} (residual² − 1)                           ``excess_chi2_regions``

m is the re-convolved posterior mean (``sampling.summaries.reconvolve``: PSF ⊛ R(mean flux)
+ the profiled background; the sampler computes it once per pack, with the χ², and keeps it
as ``PosteriorSummaries.reconvolved``), y the observation, σ² its variance. A perfect model leaves
residual² − 1 of mean 0 on every pixel, so E_R is the misfit a region of the stamp holds,
and Σ_R E_R ≈ χ² − n_used (χ²/dof − 1 per dof). Every used pixel belongs to exactly one
region, in this order of priority (positions follow ``survey.staging.cut_stamp``: the object
lies at (H/2 + dy, W/2 + dx) in pixel-edge coordinates):

- ``core``: pixel centres within ``core_radius_fwhm`` × the PSF FWHM of the object. A misfit
  here is a core more compact (or more extended) than the prior reproduces, a point source
  (AGN, a star taken for the target), or a PSF that is not the image's;
- ``neighbours``: within ``ring_fwhm`` × the FWHM (at least 2 px) of a pixel masked for a
  neighbour (``quality.detection``): the neighbour's light leaking past the dilated mask;
- ``footprint``: the rest of the model footprint (structure the prior does not reproduce:
  arms, clumps, a neighbour merged into the target's segment);
- ``outside``: the stamp's margin outside the footprint (the target's light beyond the model
  field, an undetected neighbour).

``chi2_regions`` is what the sampling stage calls for a pack; numpy only; the same
``normalised_residual`` draws the figures' residual panel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from d4a_batch.quality.detection_image import psf_fwhm_pixels

REGIONS = ("core", "neighbours", "footprint", "outside")
# how each region's misfit reads in the POOR_FIT reason (quality.rules.check_chi2)
REGION_WORDS = {
    "core": "a core more compact than the prior reproduces, or a PSF mismatch",
    "neighbours": "neighbour light leaking past the mask",
    "footprint": "structure in the footprint the prior does not reproduce, or a merged neighbour",
    "outside": "light beyond the model footprint (a truncated galaxy or an unmasked neighbour)",
}


def normalised_residual(
    observation: np.ndarray, model: np.ndarray, variance: np.ndarray, valid: np.ndarray
) -> np.ndarray:
    """(observation − model) / sqrt(variance) on ``valid`` pixels, NaN elsewhere.

    All arrays of one shape ([..., C, H, W]); pixels with a non-finite value or variance <= 0
    count as not valid.
    """
    y = np.asarray(observation, np.float64)
    m = np.asarray(model, np.float64)
    v = np.asarray(variance, np.float64)
    if not y.shape == m.shape == v.shape == np.shape(valid):
        raise ValueError(
            f"normalised_residual: shapes {y.shape}, {m.shape}, {v.shape}, {np.shape(valid)}"
        )
    ok = np.asarray(valid, bool) & np.isfinite(y) & np.isfinite(m) & np.isfinite(v) & (v > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, (y - m) / np.sqrt(np.where(ok, v, 1.0)), np.nan)


@dataclass(frozen=True)
class RegionMasks:
    """Boolean [H,W] masks of the regions (``REGIONS``, disjoint) and the core radius (px)."""

    masks: dict[str, np.ndarray]
    core_radius: float


def region_masks(
    shape: tuple[int, int],
    offset: tuple[float, float],
    psf_fwhm: float,
    footprint: float,
    neighbour_mask: np.ndarray | None = None,
    core_radius_fwhm: float = 1.5,
    ring_fwhm: float = 1.0,
) -> RegionMasks:
    """The four disjoint regions of an H×W stamp (module docstring) as boolean [H,W] masks.

    ``offset`` (dy, dx) of the object from the stamp centre; ``psf_fwhm`` in pixels (NaN:
    2.5 px assumed); ``footprint``: the model footprint's side in pixels;
    ``neighbour_mask`` [H,W]: pixels masked for neighbours (None: none).
    """
    h, w = shape
    fwhm = float(psf_fwhm) if math.isfinite(psf_fwhm) and psf_fwhm > 0 else 2.5
    cy, cx = h / 2 + offset[0], w / 2 + offset[1]
    yc, xc = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    radius = core_radius_fwhm * fwhm
    core = (yc - cy) ** 2 + (xc - cx) ** 2 <= radius**2
    box = (np.abs(yc - cy) <= footprint / 2) & (np.abs(xc - cx) <= footprint / 2)
    near = np.zeros((h, w), bool)
    if neighbour_mask is not None and np.any(neighbour_mask):
        nm = np.asarray(neighbour_mask, bool)
        if nm.shape != (h, w):
            raise ValueError(f"region_masks: neighbour_mask {nm.shape}, stamp {(h, w)}")
        # distance of every pixel to the nearest masked one (0 on the mask)
        dist = ndimage.distance_transform_edt(~nm)
        near = (dist > 0) & (dist <= max(2.0, ring_fwhm * fwhm))
    near &= ~core
    rest = box & ~core & ~near
    outside = ~box & ~core & ~near
    return RegionMasks({"core": core, "neighbours": near, "footprint": rest,
                        "outside": outside}, radius)  # fmt: skip


def excess_chi2_regions(residual: np.ndarray, regions: RegionMasks) -> dict[str, float]:
    """E_R = Σ (residual² − 1) over the used pixels (finite ``residual`` [C,H,W]) and bands of
    each region R, and ``n_used`` (used pixels, all bands): {"core": .., ..., "n_used": ..}."""
    r = np.asarray(residual, np.float64)
    if r.ndim != 3:
        raise ValueError(f"excess_chi2_regions: residual must be [C,H,W], got {r.shape}")
    used = np.isfinite(r)
    e = np.where(used, r * r - 1.0, 0.0).sum(0)  # [H,W]
    out = {k: float(e[m].sum()) for k, m in regions.masks.items()}
    out["n_used"] = float(used.sum())
    return out


def chi2_localisation(
    residual: np.ndarray,
    offsets: np.ndarray,
    psf_fwhm: np.ndarray,
    footprint: np.ndarray,
    neighbour_mask: np.ndarray | None = None,
    core_radius_fwhm: float = 1.5,
    ring_fwhm: float = 1.0,
) -> dict[str, np.ndarray]:
    """Excess χ² per region per object, in χ²/dof units (E_R / n_used), for B objects.

    residual [B,C,H,W] (``normalised_residual``); offsets [B,2]; psf_fwhm [B] (px);
    footprint [B] (px); neighbour_mask [B,H,W] or None. Returns {"chi2_core",
    "chi2_neighbours", "chi2_footprint", "chi2_outside"} arrays [B] (NaN: no used pixel):
    the keywords ``quality.reasons.evaluate_flags`` takes.
    """
    r = np.asarray(residual)
    if r.ndim != 4:
        raise ValueError(f"chi2_localisation: residual must be [B,C,H,W], got {r.shape}")
    b = r.shape[0]
    out = {f"chi2_{k}": np.full(b, np.nan) for k in REGIONS}
    for i in range(b):
        nm = None if neighbour_mask is None else neighbour_mask[i]
        masks = region_masks(r.shape[-2:], tuple(offsets[i]), float(psf_fwhm[i]),
                             float(footprint[i]), nm, core_radius_fwhm, ring_fwhm)  # fmt: skip
        e = excess_chi2_regions(r[i], masks)
        if e["n_used"] > 0:
            for k in REGIONS:
                out[f"chi2_{k}"][i] = e[k] / e["n_used"]
    return out


def chi2_regions(
    image: np.ndarray,
    variance: np.ndarray,
    valid: np.ndarray,
    model: np.ndarray,
    psf: np.ndarray,
    offsets: np.ndarray,
    footprint: np.ndarray,
    neighbour_mask: np.ndarray | None = None,
    core_radius_fwhm: float = 1.5,
) -> dict[str, np.ndarray]:
    """Where the excess χ² of each of B objects lies: ``chi2_localisation`` of the
    ``normalised_residual`` of the re-convolved posterior mean.

    image, variance, valid [B,C,H,W] (a pixel also needs a finite value and variance > 0 to
    count); model [B,C,H,W]: the re-convolved posterior mean (``PosteriorSummaries
    .reconvolved``); psf [B,C,P,P]: the core's radius scales with the widest band's FWHM;
    offsets [B,2]; footprint [B] (px); neighbour_mask [B,H,W] (None: none). Returns
    {"chi2_core", "chi2_neighbours", "chi2_footprint", "chi2_outside"} arrays [B].
    """
    residual = normalised_residual(image, model, variance, np.asarray(valid, bool))
    fwhm = np.array([max(psf_fwhm_pixels(p) for p in psfs) for psfs in psf])
    return chi2_localisation(residual, offsets, fwhm, footprint, neighbour_mask, core_radius_fwhm)
