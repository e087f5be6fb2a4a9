"""The reasons of an object's flags: every rule of ``quality.rules`` run on its inputs, the
bits OR-ed and the reasons joined, for one object (``evaluate_flags``) or B objects
(``flag_objects`` -> ``ObjectFlags``, what the output catalog writes).

The input checks (photo-z, PSF, input error, estimated noise) always run; the fit checks
only with their values (an object that failed before sampling is not also flagged for a
fit that never happened). Reasons are "NAME: reason", in the order the checks run here.
numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from d4a_batch.config import FlagThresholds
from d4a_batch.quality.rules import (
    check_blended,
    check_chi2,
    check_core_misfit,
    check_input_error,
    check_masked_fraction,
    check_noise_estimated,
    check_photoz,
    check_prior_dominated,
    check_psf,
    check_truncated,
    check_upsampling,
)
from d4a_batch.schema import flag_names


def evaluate_flags(
    thresholds: FlagThresholds,
    *,
    photoz: float | None,
    z_range: tuple[float, float],
    psf_sum: Sequence[float] | np.ndarray | None,
    psf_centroid_offset: Sequence[float] | np.ndarray | None,
    bands: Sequence[str] | None = None,
    masked_fraction: float | None = None,
    upsampling: float | None = None,
    hallucination: float | None = None,
    chi2_reduced: float | None = None,
    error: str | None = None,
    noise_estimated: str | None = None,
    psf_crop_loss: Sequence[float] | np.ndarray | None = None,
    blend_fraction: float | None = None,
    contamination: float | None = None,
    asymmetry: float | None = None,
    n_neighbours: float | None = None,
    truncated_fraction: float | None = None,
    field_kpc: float | None = None,
    footprint: float | None = None,
    chi2_core: float | None = None,
    chi2_neighbours: float | None = None,
    chi2_footprint: float | None = None,
    chi2_outside: float | None = None,
) -> tuple[int, list[str]]:
    """All flags of one object -> ``(bits, reasons)`` (one reason per fired check).

    The input checks (photo-z, PSF, error) always run. The summary checks run
    only when their value is given (``None``: not available, e.g. the object
    failed before sampling), so a failed object is not also flagged for a fit
    that never happened. ``chi2_core`` .. ``chi2_outside``: where the excess chi2 lies
    (``quality.regions.chi2_localisation``), for the POOR_FIT reason and CORE_MISFIT.
    """
    results = [
        check_input_error(error),
        check_photoz(photoz, *z_range),
        check_psf(psf_sum, psf_centroid_offset, thresholds, bands, psf_crop_loss),
        check_noise_estimated(noise_estimated),
    ]
    if masked_fraction is not None:
        results.append(check_masked_fraction(masked_fraction, thresholds))
    if upsampling is not None:
        results.append(check_upsampling(upsampling, thresholds))
    if hallucination is not None:
        results.append(check_prior_dominated(hallucination, thresholds))
    if chi2_reduced is not None:
        regions = {"chi2_core": chi2_core, "chi2_neighbours": chi2_neighbours,
                   "chi2_footprint": chi2_footprint, "chi2_outside": chi2_outside}  # fmt: skip
        results.append(check_chi2(chi2_reduced, thresholds, regions))
        results.append(check_core_misfit(chi2_reduced, regions, thresholds))
    if contamination is not None or asymmetry is not None:
        results.append(
            check_blended(
                math.nan if contamination is None else contamination,
                math.nan if asymmetry is None else asymmetry,
                thresholds,
                n_neighbours,
                blend_fraction,
            )
        )
    if truncated_fraction is not None:
        results.append(
            check_truncated(truncated_fraction, thresholds, field_kpc, footprint, chi2_outside)
        )
    bits = 0
    reasons: list[str] = []
    for bit, reason in results:
        if reason is not None:
            bits |= int(bit)
            reasons.append(f"{bit.name}: {reason}")
    return bits, reasons


@dataclass(frozen=True)
class ObjectFlags:
    """The flags of B objects as the output catalog stores them."""

    bits: np.ndarray  # [B] int64 bitmask of ``schema.Flag``
    names: list[str]  # [B] "|"-joined flag names
    reasons: list[str]  # [B] "; "-joined reasons

    def __len__(self) -> int:
        return len(self.names)


def flag_objects(
    thresholds: FlagThresholds,
    *,
    z_range: tuple[float, float],
    bands: Sequence[str],
    photoz: np.ndarray,
    psf_sum: np.ndarray,
    psf_centroid_offset: np.ndarray,
    errors: Sequence[str | None],
    fit: Mapping[str, np.ndarray] | None = None,
    noise_notes: Sequence[str | None] | None = None,
    psf_crop_loss: np.ndarray | None = None,
) -> ObjectFlags:
    """``evaluate_flags`` for each of B objects.

    ``photoz[B]``, ``psf_sum[B,C]``, ``psf_centroid_offset[B,C]``, ``errors[B]`` (None: the
    object is usable); ``fit``: the sampled objects' ``masked_fraction``, ``upsampling``,
    ``hallucination``, ``chi2_reduced`` arrays [B] (None: nothing was sampled), and
    optionally staging's ``contamination``, ``blend_fraction``, ``asymmetry``, ``n_neighbours``,
    ``truncated_fraction``, ``footprint``, ``field_kpc`` (any ``evaluate_flags`` keyword
    taking a float) for BLENDED and TRUNCATED, and ``chi2_core``, ``chi2_neighbours``,
    ``chi2_footprint``, ``chi2_outside`` (``quality.regions.chi2_localisation``) for the
    POOR_FIT reason and CORE_MISFIT. An object
    with an error gets no fit checks. ``noise_notes[B]``: how staging estimated an
    image-only cutout's noise (None: not estimated), the NOISE_ESTIMATED reason;
    ``psf_crop_loss[B,C]``: flux lost cropping each PSF to the configured size (PSF_BAD).
    """
    n = len(errors)
    if len(photoz) != n or len(psf_sum) != n or len(psf_centroid_offset) != n:
        raise ValueError(f"flag_objects: {n} errors but inputs of {len(photoz)}, {len(psf_sum)}")
    bits = np.zeros(n, np.int64)
    names, reasons = [], []
    for i in range(n):
        values = {k: float(v[i]) for k, v in fit.items()} if fit and errors[i] is None else {}
        b, why = evaluate_flags(
            thresholds,
            photoz=float(photoz[i]),
            z_range=z_range,
            psf_sum=psf_sum[i],
            psf_centroid_offset=psf_centroid_offset[i],
            bands=bands,
            error=errors[i],
            noise_estimated=None if noise_notes is None else noise_notes[i],
            psf_crop_loss=None if psf_crop_loss is None else psf_crop_loss[i],
            **values,
        )
        bits[i] = b
        names.append("|".join(flag_names(b)))
        reasons.append("; ".join(why))
    return ObjectFlags(bits, names, reasons)
