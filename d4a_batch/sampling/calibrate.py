"""Calibrated interval columns of the catalog: the observed S/N and λ-scaled half-widths.

S/N of an object (``observed_snr``; what picks its calibration bin, computable from the
observation at run time): per band c, the mean of (y − β_c) over the valid stamp pixels
whose centres lie within ``aperture_radius_frac · N`` model pixels (the hallucination
score's aperture, ``radius_frac · N · scale`` HSC pixels) of the object, divided by the
square root of the mean VARIANCE there; then the mean over bands with valid pixels. β_c is
the sampler's profiled background (mean over samples). It is the per-pixel S/N of the core,
the same definition as ``validation.metrics.aperture_snr`` applied to the noisy data (the
science benchmark applies it to the noiseless truth).

Calibrated columns (``calibrated_columns``): ``Col.SNR``, ``Col.CALIB_BIN`` (float bin index,
NaN outside the edges or without calibration), ``Col.CALIB_LAMBDA68``/``95`` and the maps
``Col.HALFWIDTH68_FLUX``/``95`` = λ_p · z_p · std_flux [C,N,N]. The raw std stays in
``Col.STD_FLUX``. Without a calibration, or with one fitted for another sampler config,
everything but the S/N is NaN.

No interval where it would be degenerate (``degenerate_intervals``): an object whose
posterior flux has zero spread at some core pixel (the profiled amplitude α hit its clamp at
0 in a band, so every sample has zero flux there: a bright unmasked neighbour the galaxy
model anti-correlates with) gets NaN λ and half-widths: no λ makes a zero-width interval
cover. The calibration fit (``validation.conformal``) leaves out the same objects by the same
rule, which reads only the samples (never the truth), so the guarantee holds for the objects
that get an interval.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from d4a_batch.physics.operator import ObservationBatch
from d4a_batch.prior.calibration import Calibration, sampler_fingerprint, z_score
from d4a_batch.sampling.summaries import aperture_mask
from d4a_batch.schema import Col

CALIBRATED_SCALARS = (Col.SNR, Col.CALIB_BIN, Col.CALIB_LAMBDA68, Col.CALIB_LAMBDA95)
CALIBRATED_MAPS = {0.68: Col.HALFWIDTH68_FLUX, 0.95: Col.HALFWIDTH95_FLUX}
_LAMBDA_COLS = {0.68: Col.CALIB_LAMBDA68, 0.95: Col.CALIB_LAMBDA95}


def observed_snr(
    obs: ObservationBatch, beta: np.ndarray, scale: np.ndarray, radius_frac: float, n_model: int
) -> np.ndarray:
    """Observed aperture S/N per pixel [B] (see the module docstring).

    ``beta[B,C]``: background per band (counts); ``scale[B]``: model pixel width in HSC
    pixels; the aperture radius is ``radius_frac · n_model · scale`` HSC pixels. NaN for an
    object with no valid pixel in the aperture.
    """
    img = obs.image.detach().to("cpu", torch.float64).numpy()
    var = obs.variance.detach().to("cpu", torch.float64).numpy()
    valid = obs.valid.detach().to("cpu").numpy()
    off = obs.offset.detach().to("cpu", torch.float64).numpy()
    b, c, h, w = img.shape
    beta = np.asarray(beta, dtype=np.float64).reshape(b, c)
    scale = np.asarray(scale, dtype=np.float64).reshape(b)
    yy = np.arange(h)[:, None] + 0.5 - h / 2
    xx = np.arange(w)[None, :] + 0.5 - w / 2
    out = np.full(b, np.nan)
    for o in range(b):
        r = radius_frac * n_model * scale[o]
        disc = (yy - off[o, 0]) ** 2 + (xx - off[o, 1]) ** 2 <= r * r
        per_band = []
        for k in range(c):
            sel = disc & valid[o, k]
            if sel.any():
                signal = float((img[o, k][sel] - beta[o, k]).mean())
                per_band.append(signal / math.sqrt(float(var[o, k][sel].mean())))
        if per_band:
            out[o] = float(np.mean(per_band))
    return out


def degenerate_intervals(std_flux: np.ndarray, core: np.ndarray | None = None) -> np.ndarray:
    """bool [B]: the posterior flux std std_flux[B,C,N,N] is zero (or not finite) at some
    selected pixel in some band. ``core``: bool [N,N] (every band) or [C,N,N]; None: every
    pixel. The catalog selects the centred disc of radius ``aperture_radius_frac · N``
    (``calibrated_columns``), the calibration fit its loss pixels (``validation.conformal``)."""
    std = np.asarray(std_flux)
    if std.ndim != 4 or std.shape[-1] != std.shape[-2]:
        raise ValueError(f"degenerate_intervals: std_flux {std.shape}, expected [B, C, N, N]")
    if core is None:
        px = std.reshape(std.shape[0], -1)
    else:
        core = np.asarray(core, bool)
        px = (std[:, core] if core.ndim == 3 else std[:, :, core]).reshape(std.shape[0], -1)
    return ~(np.isfinite(px) & (px > 0)).all(1)


def calibrated_columns(
    snr: np.ndarray,
    std_flux: np.ndarray,
    calibration: Calibration | None,
    radius_frac: float | None = None,
) -> dict[str, np.ndarray]:
    """The calibrated columns of B objects (see the module docstring), keyed by ``Col`` names.

    ``snr[B]``, ``std_flux[B,C,N,N]`` -> scalars [B] float64 and half-width maps
    [B,C,N,N] float32. ``calibration`` None (absent, or fitted for another sampler config)
    gives NaN for all but the S/N; ``radius_frac`` (the sampler's aperture) given, objects
    with ``degenerate_intervals`` get NaN λ.
    """
    snr = np.asarray(snr, dtype=np.float64).reshape(-1)
    std = np.asarray(std_flux, dtype=np.float32)
    if std.ndim != 4 or std.shape[0] != snr.size:
        raise ValueError(f"calibrated_columns: snr {snr.shape}, std_flux {std.shape}")
    usable = np.ones(snr.size, bool)
    if radius_frac is not None:
        usable = ~degenerate_intervals(std, aperture_mask(std.shape[-1], radius_frac))
    cols: dict[str, np.ndarray] = {Col.SNR: snr}
    if calibration is None:
        cols[Col.CALIB_BIN] = np.full(snr.size, np.nan)
    else:
        b = calibration.bin_of(snr)
        cols[Col.CALIB_BIN] = np.where(b >= 0, b, np.nan).astype(np.float64)
    for p, name in CALIBRATED_MAPS.items():
        fitted = calibration is not None and any(abs(p - q) < 1e-9 for q in calibration.levels)
        lam = calibration.lambda_for(p, snr) if fitted else np.full(snr.size, np.nan)
        lam = np.where(usable, lam, np.nan)
        cols[_LAMBDA_COLS[p]] = lam
        cols[name] = (std * (lam * z_score(p)).astype(np.float32)[:, None, None, None]).astype(
            np.float32
        )
    return cols


def usable_calibration(
    calibrations: Calibration | Sequence[Calibration] | None, sampler: Any
) -> Calibration | None:
    """The prior's calibration fitted for this sampler config, else None (warned when the
    prior has calibrations, none of them for this config).

    λ scales the intervals of one sampler config (steps, guidance, samples, the sampler
    itself...); applied to another it would promise a coverage nobody measured.
    """
    if calibrations is None:
        return None
    entries = (calibrations,) if isinstance(calibrations, Calibration) else tuple(calibrations)
    for cal in entries:
        if cal.matches(sampler):
            return cal
    if entries:
        fitted = "; ".join(f"{c.sampler_fingerprint} ({dict(c.sampler)})" for c in entries)
        warnings.warn(
            f"the prior's calibration.json was fitted for sampler config(s) {fitted}, the run "
            f"uses {sampler_fingerprint(sampler)}: calibrated interval columns will be NaN "
            "(fit one with jobs/calibrate_prior.py --sampler)",
            stacklevel=2,
        )
    return None
