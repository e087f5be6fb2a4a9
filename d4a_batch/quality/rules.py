"""The quality rules: one check per `Flag` bit, each returning ``(bit, reason | None)``.

A check returns its bit and a human-readable reason when it fires, ``None`` as the reason
when it does not; ``quality.reasons.evaluate_flags`` runs them and ORs the bits. Thresholds
come from `FlagThresholds`; bit values and their meanings from `d4a_batch.schema` (never
redefined here). ``photoz_problem`` is the one photo-z rule, shared by staging (which refuses
an unusable photo-z) and PHOTOZ_BAD. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from d4a_batch.config import FlagThresholds
from d4a_batch.quality.regions import REGION_WORDS, REGIONS
from d4a_batch.schema import Flag

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
    """Each region's share of the positive excess chi2 (``quality.regions``), or None when
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
    ``chi2_neighbours``, ``chi2_footprint``, ``chi2_outside``: ``quality.regions``); the
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
    """A neighbour's light the mask cannot remove (``quality.detection``; thresholds measured,
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
    ellipse, ``quality.symmetry.outskirts_light``: a neighbour merged into its segment does
    not count, faint outskirts do), or, in noise units, the fit's excess χ²/dof outside the
    footprint (``chi2_outside``, ``quality.regions``) above ``truncated_chi2_max`` while at
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
