"""Quality flags: one check per `Flag` bit, each returning ``(bit, reason | None)``.

A check returns its bit and a human-readable reason when it fires, ``None`` as
the reason when it does not. `evaluate_flags` runs every check whose inputs are
given and ORs the bits. Thresholds come from `FlagThresholds`; bit values and
their meanings from `d4a_batch.schema` (never redefined here).

Longer than 400 lines: it is the rulebook, one small check per flag bit with the reason
text a user reads, and the rules are read and changed together (thresholds, wording, the
order `evaluate_flags` reports them in). Issue 32 item 3 moves quality into one package
(inputs, regions, rules); there the rules stay one module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from d4a_batch.config import FlagThresholds
from d4a_batch.sampling.residuals import REGION_WORDS, REGIONS
from d4a_batch.schema import Flag, flag_names

FlagResult = tuple[Flag, str | None]


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(float(value))


def check_prior_dominated(hallucination: float, thresholds: FlagThresholds) -> FlagResult:
    """Core variance ratio (hallucination score) above ``hallucination_max``; NaN fires too."""
    if not _finite(hallucination):
        return Flag.PRIOR_DOMINATED, f"hallucination score is not finite ({hallucination})"
    if hallucination > thresholds.hallucination_max:
        return Flag.PRIOR_DOMINATED, (
            f"hallucination score {hallucination:.3g} > {thresholds.hallucination_max:.3g}"
        )
    return Flag.PRIOR_DOMINATED, None


def check_upsampling(upsampling: float, thresholds: FlagThresholds) -> FlagResult:
    """Upsampling factor u = 0.168''/theta above ``upsampling_max``."""
    if not _finite(upsampling):
        return Flag.UPSAMPLING_HIGH, f"upsampling factor is not finite ({upsampling})"
    if upsampling > thresholds.upsampling_max:
        return Flag.UPSAMPLING_HIGH, (
            f"upsampling factor {upsampling:.3g} > {thresholds.upsampling_max:.3g}"
        )
    return Flag.UPSAMPLING_HIGH, None


def _region_shares(regions: Mapping[str, float] | None) -> dict[str, float] | None:
    """Each region's share of the positive excess chi2 (``sampling.residuals``), or None when
    the regions are unknown (missing or not finite) or hold no positive excess."""
    if not regions:
        return None
    excess = {k: regions.get(f"chi2_{k}") for k in REGIONS}
    if not all(_finite(v) for v in excess.values()):
        return None
    pos = {k: max(0.0, float(v)) for k, v in excess.items()}
    total = sum(pos.values())
    return {k: v / total for k, v in pos.items()} if total > 0 else None


def _region_place(region: str, thresholds: FlagThresholds) -> str:
    return {
        "core": f"within {thresholds.core_radius_fwhm:g} PSF FWHM of the object",
        "neighbours": "next to masked neighbours",
        "footprint": "in the rest of the model footprint",
        "outside": "outside the model footprint",
    }[region]


def check_chi2(
    chi2_reduced: float,
    thresholds: FlagThresholds,
    regions: Mapping[str, float] | None = None,
) -> FlagResult:
    """Reduced chi2 of the re-convolved posterior mean above ``chi2_max`` (or not finite).

    ``regions``: the excess chi2 per dof of each region of the stamp (``chi2_core``,
    ``chi2_neighbours``, ``chi2_footprint``, ``chi2_outside``: ``sampling.residuals``); the
    reason then names the region holding most of the excess, with its share and what a
    misfit there means, and the others' shares.
    """
    if not _finite(chi2_reduced):
        return Flag.POOR_FIT, f"reduced chi2 is not finite ({chi2_reduced})"
    if chi2_reduced <= thresholds.chi2_max:
        return Flag.POOR_FIT, None
    why = f"reduced chi2 {chi2_reduced:.3g} > {thresholds.chi2_max:.3g}"
    shares = _region_shares(regions)
    if shares is not None:
        top = max(shares, key=shares.get)
        short = {"core": "core", "neighbours": "next to neighbours",
                 "footprint": "rest of the footprint", "outside": "outside the footprint"}  # fmt: skip
        rest = ", ".join(f"{short[k]} {100 * v:.0f} %" for k, v in shares.items() if k != top)
        why += (
            f"; {100 * shares[top]:.0f} % of the excess chi2 lies "
            f"{_region_place(top, thresholds)}: {REGION_WORDS[top]} ({rest})"
        )
    return Flag.POOR_FIT, why


def check_core_misfit(
    chi2_reduced: float, regions: Mapping[str, float] | None, thresholds: FlagThresholds
) -> FlagResult:
    """A poor fit (reduced chi2 above ``chi2_max``) whose excess chi2 lies mostly (share >=
    ``core_misfit_share``) within ``core_radius_fwhm`` PSF FWHM of the object: the core is
    more compact (or a point source) than the prior reproduces, or the PSF is not the
    image's. Unknown regions do not fire."""
    shares = _region_shares(regions)
    if not _finite(chi2_reduced) or chi2_reduced <= thresholds.chi2_max or shares is None:
        return Flag.CORE_MISFIT, None
    if shares["core"] < thresholds.core_misfit_share:
        return Flag.CORE_MISFIT, None
    per_dof = float(regions["chi2_core"])
    return Flag.CORE_MISFIT, (
        f"{100 * shares['core']:.0f} % of the excess chi2 ({per_dof:.3g} of the chi2/dof "
        f"{chi2_reduced:.3g}) lies within {thresholds.core_radius_fwhm:g} PSF FWHM of the "
        f"object (>= {100 * thresholds.core_misfit_share:.0f} %): {REGION_WORDS['core']}"
    )


def check_masked_fraction(masked_fraction: float, thresholds: FlagThresholds) -> FlagResult:
    """Fraction of the model footprint's pixels (all bands) that the cutout itself makes
    unusable (bad MASK bits, non-finite, off the cutout: ``survey.staging``) above
    ``masked_fraction_max``. Neighbour masking does not count: BLENDED and
    ``n_neighbours_masked`` report neighbours."""
    if not _finite(masked_fraction):
        return Flag.MASKED_FRACTION_HIGH, f"masked fraction is not finite ({masked_fraction})"
    if masked_fraction > thresholds.masked_fraction_max:
        return Flag.MASKED_FRACTION_HIGH, (
            f"masked fraction {masked_fraction:.3g} > {thresholds.masked_fraction_max:.3g} "
            "of the model footprint's pixels (bad MASK bits, non-finite or off the cutout; "
            "neighbour masking not counted)"
        )
    return Flag.MASKED_FRACTION_HIGH, None


def check_psf(
    psf_sum: Sequence[float] | np.ndarray | None,
    centroid_offset: Sequence[float] | np.ndarray | None,
    thresholds: FlagThresholds,
    bands: Sequence[str] | None = None,
    crop_loss: Sequence[float] | np.ndarray | None = None,
) -> FlagResult:
    """PSF missing, renormalised, off-centre or cropped with a loss, per band.

    ``psf_sum[C]``: each band's PSF sum *before* normalisation (None or NaN:
    missing; <= 0: unusable). ``centroid_offset``: each PSF's centroid offset from its
    nominal centre in pixels, as distances [C] or (dy, dx) pairs [C, 2] (as
    ``survey.fits_io.PSFStamp.centroid_offset``). Fires when a PSF is missing,
    when ``|sum - 1| > psf_sum_tolerance`` (it was renormalised) or when the
    offset exceeds ``psf_centroid_tolerance``, or when cropping it to the configured size
    lost more than ``psf_crop_loss_max`` of its flux (``crop_loss[C]``, NaN: unknown).
    """
    if psf_sum is None:
        return Flag.PSF_BAD, "PSF missing"
    sums = np.atleast_1d(np.asarray(psf_sum, dtype=np.float64))
    offs = None
    if centroid_offset is not None:
        offs = np.asarray(centroid_offset, dtype=np.float64)
        offs = np.hypot(offs[..., 0], offs[..., 1]) if offs.ndim == 2 else np.atleast_1d(offs)
    names = list(bands) if bands is not None else [str(c) for c in range(sums.size)]
    problems: list[str] = []
    for c, s in enumerate(sums):
        if not math.isfinite(s):
            problems.append(f"{names[c]}: PSF missing")
        elif s <= 0:
            problems.append(f"{names[c]}: PSF sum {s:.3g} <= 0")
        elif abs(s - 1.0) > thresholds.psf_sum_tolerance:
            problems.append(f"{names[c]}: PSF sum {s:.4g} renormalised to 1")
    if crop_loss is not None:
        for c, lost in enumerate(np.atleast_1d(np.asarray(crop_loss, dtype=np.float64))):
            if math.isfinite(lost) and lost > thresholds.psf_crop_loss_max:
                problems.append(
                    f"{names[c]}: cropping the PSF to the configured size lost {lost:.1%} of "
                    f"its flux (> {thresholds.psf_crop_loss_max:.1%}; renormalised)"
                )
    if offs is None:
        problems.append("PSF centroid unknown")
    else:
        for c, d in enumerate(offs):
            if not math.isfinite(d) or d > thresholds.psf_centroid_tolerance:
                problems.append(
                    f"{names[c]}: PSF centroid {d:.3g} px off centre "
                    f"(> {thresholds.psf_centroid_tolerance:.3g})"
                )
    return Flag.PSF_BAD, ("; ".join(problems) if problems else None)


def photoz_problem(z: float | None, z_range: tuple[float, float] | None = None) -> str | None:
    """The one photo-z rule: why ``z`` is not a usable redshift (missing: None or NaN; not
    finite; not positive) or, given ``z_range``, lies outside the prior's range; None: fine.

    Staging refuses an object whose photo-z is not usable (``survey.staging.photoz_error``);
    the PHOTOZ_BAD flag also fires outside the prior's range (``check_photoz``).
    """
    if z is None or (isinstance(z, float) and math.isnan(z)):
        return "photo-z: missing (null or NaN)"
    if not math.isfinite(z):
        return f"photo-z: {z} is not finite"
    if z <= 0:
        return f"photo-z: {z:g} is not positive"
    if z_range is not None and not z_range[0] <= z <= z_range[1]:
        return f"photo-z: {z:.3g} outside the prior's range [{z_range[0]:g}, {z_range[1]:g}]"
    return None


def check_photoz(photoz: float | None, z_min: float, z_max: float) -> FlagResult:
    """Photo-z missing, NaN, not positive, or outside the prior's ``[z_min, z_max]``."""
    z = None if photoz is None else float(photoz)
    return Flag.PHOTOZ_BAD, photoz_problem(z, (z_min, z_max))


def check_noise_estimated(note: str | None) -> FlagResult:
    """MASK and/or VARIANCE of a cutout were empty: ``note`` says how staging replaced them
    (``survey.noise``; None or "" when every band had both planes)."""
    return Flag.NOISE_ESTIMATED, (note or None)


def check_blended(
    contamination: float,
    asymmetry: float,
    thresholds: FlagThresholds,
    n_neighbours: float | None = None,
    blend_fraction: float | None = None,
) -> FlagResult:
    """A neighbour's light the mask cannot remove (``survey.detection``; thresholds measured,
    see ``FlagThresholds.contamination_max``).

    Fires when ``contamination`` (the neighbours' light left on the used pixels in noise
    units: the χ²/dof it adds to a perfect fit of the target) exceeds
    ``contamination_max``, or when ``asymmetry`` (light of the target's segment with no
    point-mirror image: a neighbour too close to deblend) exceeds ``asymmetry_max``. NaN
    (target not detected, no detection run) does not fire. ``blend_fraction`` (the
    neighbour light's share of the target's on the used footprint pixels) only words the
    reason: a bright share can be harmless on a faint target and a small one not on a
    bright target.
    """
    why = []
    if _finite(contamination) and contamination > thresholds.contamination_max:
        n = f" of {int(n_neighbours)} masked neighbour(s)" if _finite(n_neighbours) else ""
        share = (
            f"; it is {100 * blend_fraction:.2g} % of the target's light on the used "
            "footprint pixels"
            if _finite(blend_fraction)
            else ""
        )
        why.append(
            f"the light{n} left outside the mask adds {contamination:.2g} to the chi2/dof of "
            f"a perfect fit of the target (> {thresholds.contamination_max:.2g}){share}"
        )
    if _finite(asymmetry) and asymmetry > thresholds.asymmetry_max:
        why.append(
            f"{100 * asymmetry:.0f} % of the target segment's light has no mirror image "
            f"(> {100 * thresholds.asymmetry_max:.0f} %): a neighbour too close to deblend"
        )
    return Flag.BLENDED, ("; ".join(why) if why else None)


def check_truncated(
    truncated_fraction: float,
    thresholds: FlagThresholds,
    field_kpc: float | None = None,
    footprint: float | None = None,
    chi2_outside: float | None = None,
) -> FlagResult:
    """The target's light runs out of the model field: its flux outside the model footprint
    above ``truncated_fraction_max`` (its point-symmetric light on its segment and Kron
    ellipse, ``survey.symmetry.outskirts_light``: a neighbour merged into its segment does
    not count, faint outskirts do), or, in noise units, the fit's excess χ²/dof outside the
    footprint (``chi2_outside``, ``sampling.residuals``) above ``truncated_chi2_max`` while at
    least ``truncated_light_min`` of the target's flux lies there (a bright galaxy leaves
    many σ beyond the field with a few % of its flux). NaN: not measured, does not fire.
    ``field_kpc``/``footprint`` (HSC pixels) only word the reason."""
    if not _finite(truncated_fraction):
        return Flag.TRUNCATED, None
    by_share = truncated_fraction > thresholds.truncated_fraction_max
    by_noise = (
        _finite(chi2_outside)
        and chi2_outside > thresholds.truncated_chi2_max
        and truncated_fraction >= thresholds.truncated_light_min
    )
    if not (by_share or by_noise):
        return Flag.TRUNCATED, None
    where = "the model field"
    if _finite(field_kpc):
        where = f"the {field_kpc:.3g} kpc model field"
    if _finite(footprint):
        where += f" ({footprint:.0f} HSC px)"
    why = (
        f"{100 * truncated_fraction:.{0 if truncated_fraction >= 0.1 else 1}f} % of the target's flux (its symmetric light on its "
        f"segment and Kron ellipse) lies outside {where}"
    )
    if by_share:
        why += f" (> {100 * thresholds.truncated_fraction_max:.0f} %)"
    if by_noise:
        why += (
            f", and the fit's misfit there adds {chi2_outside:.2f} to χ²/dof "
            f"(> {thresholds.truncated_chi2_max:g})"
        )
    return Flag.TRUNCATED, why


def check_input_error(error: str | None) -> FlagResult:
    """Input could not be read or used: ``error`` is its message (None or "" when fine)."""
    return Flag.INPUT_ERROR, (f"input error: {error}" if error else None)


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
    (``sampling.residuals.chi2_localisation``), for the POOR_FIT reason and CORE_MISFIT.
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
    ``chi2_footprint``, ``chi2_outside`` (``sampling.residuals.chi2_localisation``) for the
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
