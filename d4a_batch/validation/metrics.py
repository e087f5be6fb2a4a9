"""Scores of a reconstruction against the truth, and of a posterior's calibration.

Conventions (C bands, N×N model pixels, H×W stamp pixels, S samples):

- Images compared with the truth are flux per model pixel [C,N,N] (counts, zero point 27)
  at the prior's model resolution, as ``PosteriorSummaries.mean_flux`` and the mock
  survey's truth are.
- PSNR and SSIM use ``skimage.metrics`` with one data range per object: the truth's
  max − min over all its bands (``truth_range``). Every estimate of that object (posterior
  mean, Richardson-Lucy, resampled observation) is scored on that same range, so the
  methods compare on one scale; the range is not taken from the estimate, whose outliers
  would otherwise change its own score. SSIM treats the bands as channels (7×7 window).
- The "asinh" variants score the images after the model's own stretch
  x = stretch(F_c / m_c) with m_c the truth's peak in band c (the same m_c for the
  estimate): this weighs the faint outskirts the way the prior sees them. The data
  range is then 2 (x spans [−1, 1] on the truth).
- Coverage: per pixel, the central interval of level p from the samples' empirical
  quantiles (1 − p)/2 and (1 + p)/2; the coverage is the fraction of the selected
  pixels (all bands) whose truth lies inside. A calibrated posterior gives about p
  (slightly less with few samples: the empirical interval of S draws is narrower).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from d4a_batch.physics.operator import ObservationBatch
from d4a_batch.physics.stretch import DEFAULT_A, stretch
from d4a_batch.sampling.summaries import (
    aperture_mask,
    flux_operator,
    reconvolved_chi2,
)
from d4a_batch.sampling.summaries import reconvolved_flux as reconvolve  # noqa: F401

COVERAGE_LEVELS = (0.68, 0.95)


def _pair(estimate: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    est = np.asarray(estimate, dtype=np.float64)
    tru = np.asarray(truth, dtype=np.float64)
    if est.shape != tru.shape or tru.ndim != 3:
        raise ValueError(f"expected two [C, N, N] images, got {est.shape} and {tru.shape}")
    if not (np.all(np.isfinite(est)) and np.all(np.isfinite(tru))):
        raise ValueError("images must be finite")
    return est, tru


def truth_range(truth: np.ndarray) -> float:
    """Data range of an object for PSNR/SSIM: max − min of its truth over all bands (> 0)."""
    t = np.asarray(truth, dtype=np.float64)
    rng = float(t.max() - t.min())
    if not rng > 0:
        raise ValueError("the truth is constant: PSNR/SSIM are undefined")
    return rng


def psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    """PSNR (dB) of estimate[C,N,N] against truth[C,N,N], data range ``truth_range(truth)``."""
    est, tru = _pair(estimate, truth)
    return float(peak_signal_noise_ratio(tru, est, data_range=truth_range(tru)))


def ssim(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Mean SSIM of estimate[C,N,N] against truth[C,N,N] (bands as channels, 7×7 window)."""
    est, tru = _pair(estimate, truth)
    return float(structural_similarity(tru, est, data_range=truth_range(tru), channel_axis=0))


def asinh_image(flux: np.ndarray, norm: np.ndarray, a: float = DEFAULT_A) -> np.ndarray:
    """x = stretch(flux[C,N,N] / norm[C]): the model's asinh stretch with given normalisers."""
    norm = np.asarray(norm, dtype=np.float64).reshape(-1, 1, 1)
    if not np.all(norm > 0):
        raise ValueError("asinh_image: normalisers must be > 0")
    return stretch(np.asarray(flux, dtype=np.float64) / norm, a)


def image_scores(estimate: np.ndarray, truth: np.ndarray, a: float = DEFAULT_A) -> dict[str, float]:
    """PSNR and SSIM in flux and in asinh space (see the module docstring)."""
    est, tru = _pair(estimate, truth)
    peak = tru.max(axis=(1, 2))
    if not np.all(peak > 0):
        raise ValueError("image_scores: every band of the truth needs a positive peak")
    x_est, x_tru = asinh_image(est, peak, a), asinh_image(tru, peak, a)
    return {
        "psnr": psnr(est, tru),
        "ssim": ssim(est, tru),
        "psnr_asinh": float(peak_signal_noise_ratio(x_tru, x_est, data_range=2.0)),
        "ssim_asinh": float(structural_similarity(x_tru, x_est, data_range=2.0, channel_axis=0)),
    }


def interval_coverage(
    samples: np.ndarray, truth: np.ndarray, level: float, mask: np.ndarray | None = None
) -> float:
    """Fraction of pixels whose truth lies in the per-pixel central ``level`` interval.

    samples[S, ...] (S ≥ 2), truth[...]; ``mask`` (bool, broadcastable to truth's shape,
    e.g. [N,N] for [C,N,N]) selects the pixels scored.
    """
    s = np.asarray(samples, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    if s.ndim < 2 or s.shape[1:] != t.shape or s.shape[0] < 2:
        raise ValueError(f"expected samples [S>=2, *{t.shape}], got {s.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = np.quantile(s, [(1 - level) / 2, (1 + level) / 2], axis=0)
    inside = (t >= lo) & (t <= hi)
    sel = np.ones(t.shape, bool) if mask is None else np.broadcast_to(mask, t.shape)
    if not sel.any():
        raise ValueError("interval_coverage: the mask selects no pixel")
    return float(inside[sel].mean())


def coverage(
    samples: np.ndarray,
    truth: np.ndarray,
    levels: Sequence[float] = COVERAGE_LEVELS,
    mask: np.ndarray | None = None,
) -> dict[float, float]:
    """``interval_coverage`` at each level."""
    return {float(p): interval_coverage(samples, truth, p, mask) for p in levels}


def core_mask(n: int, radius_frac: float) -> np.ndarray:
    """Core pixels [n, n]: the centred disc of the hallucination score (radius radius_frac·n)."""
    return aperture_mask(n, radius_frac)


def stamp_disc(shape: tuple[int, int], offset: tuple[float, float], radius: float) -> np.ndarray:
    """bool [H, W]: stamp pixels whose centres lie within ``radius`` of centre + offset."""
    h, w = shape
    cy, cx = h / 2 + offset[0], w / 2 + offset[1]
    yy = np.arange(h)[:, None] + 0.5 - cy
    xx = np.arange(w)[None, :] + 0.5 - cx
    return yy**2 + xx**2 <= radius**2


def aperture_snr(
    model: np.ndarray,
    variance: np.ndarray,
    valid: np.ndarray,
    offset: tuple[float, float],
    radius: float,
) -> tuple[float, np.ndarray]:
    """S/N of a noiseless stamp: per band, mean flux over the aperture's valid pixels divided
    by sqrt(mean variance there); returns (mean over bands, per band [C]).

    model, variance, valid: [C,H,W] (model without background, counts per HSC pixel);
    the aperture is the disc of ``radius`` HSC pixels around the object (``stamp_disc``).
    """
    model = np.asarray(model, dtype=np.float64)
    if model.ndim != 3 or variance.shape != model.shape or valid.shape != model.shape:
        raise ValueError(f"aperture_snr: expected [C,H,W] arrays, got {model.shape}")
    disc = stamp_disc(model.shape[1:], offset, radius)
    per_band = np.full(model.shape[0], np.nan)
    for c in range(model.shape[0]):
        sel = disc & np.asarray(valid[c], bool)
        if sel.any():
            per_band[c] = model[c][sel].mean() / np.sqrt(np.asarray(variance[c])[sel].mean())
    return float(np.nanmean(per_band)), per_band


def reduced_chi2(flux: np.ndarray, obs: ObservationBatch, scale: np.ndarray) -> np.ndarray:
    """Reduced chi² [B] of flux[B,C,N,N] (counts per model pixel) re-convolved against ``obs``.

    y ≈ PSF ⊛ R(flux) + beta_c with beta_c profiled per band (as the posterior summaries
    score the posterior mean), dof = valid pixels − 2 per band
    (``physics.operator.degrees_of_freedom``).
    """
    f = torch.as_tensor(np.asarray(flux), dtype=obs.image.dtype)
    with torch.no_grad():
        return reconvolved_chi2(f, obs, flux_operator(obs, scale)).double().numpy()
