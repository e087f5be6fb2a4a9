"""Every flag fires on a constructed bad case and stays off on a clean one."""

from __future__ import annotations

import math

import numpy as np
import pytest

from d4a_batch.config import FlagThresholds
from d4a_batch.quality import rules
from d4a_batch.quality.reasons import evaluate_flags
from d4a_batch.schema import Flag, flag_names

T = FlagThresholds()
Z_RANGE = (0.02, 1.5)
CLEAN = {
    "photoz": 0.4,
    "z_range": Z_RANGE,
    "psf_sum": [1.0, 1.005, 0.99],
    "psf_centroid_offset": [[0.01, -0.02], [0.0, 0.0], [0.1, 0.05]],
    "bands": ("g", "r", "i"),
    "masked_fraction": 0.05,
    "upsampling": 1.8,
    "hallucination": 0.2,
    "chi2_reduced": 1.1,
    "error": None,
}


def test_clean_object_has_no_flags():
    bits, reasons = evaluate_flags(T, **CLEAN)
    assert bits == 0 and reasons == []


@pytest.mark.parametrize(
    ("change", "flag", "words"),
    [
        ({"hallucination": 0.8}, Flag.PRIOR_DOMINATED, "hallucination score 0.8 > 0.5"),
        ({"hallucination": math.nan}, Flag.PRIOR_DOMINATED, "not finite"),
        ({"upsampling": 5.2}, Flag.UPSAMPLING_HIGH, "upsampling factor 5.2 > 4"),
        ({"chi2_reduced": 7.5}, Flag.POOR_FIT, "reduced chi2 7.5 > 3"),
        ({"chi2_reduced": math.inf}, Flag.POOR_FIT, "not finite"),
        ({"masked_fraction": 0.6}, Flag.MASKED_FRACTION_HIGH, "masked fraction 0.6 > 0.3"),
        ({"psf_sum": None}, Flag.PSF_BAD, "PSF missing"),
        ({"psf_sum": [1.0, math.nan, 1.0]}, Flag.PSF_BAD, "r: PSF missing"),
        ({"psf_sum": [1.0, 1.0, 0.9]}, Flag.PSF_BAD, "i: PSF sum 0.9 renormalised"),
        ({"psf_sum": [1.0, -1.0, 1.0]}, Flag.PSF_BAD, "r: PSF sum -1 <= 0"),
        ({"psf_centroid_offset": [[0, 0], [0.6, 0.3], [0, 0]]}, Flag.PSF_BAD, "r: PSF centroid"),
        ({"psf_centroid_offset": [0.0, 0.0, 0.7]}, Flag.PSF_BAD, "i: PSF centroid 0.7 px"),
        ({"psf_centroid_offset": None}, Flag.PSF_BAD, "centroid unknown"),
        ({"photoz": None}, Flag.PHOTOZ_BAD, "photo-z: missing"),
        ({"photoz": math.nan}, Flag.PHOTOZ_BAD, "missing (null or NaN)"),
        ({"photoz": -0.1}, Flag.PHOTOZ_BAD, "photo-z: -0.1 is not positive"),
        ({"photoz": 2.3}, Flag.PHOTOZ_BAD, "outside the prior's range [0.02, 1.5]"),
        ({"photoz": 0.01}, Flag.PHOTOZ_BAD, "outside the prior's range"),
        ({"photoz": math.inf}, Flag.PHOTOZ_BAD, "photo-z: inf is not finite"),
        ({"error": "cutout unreadable"}, Flag.INPUT_ERROR, "input error: cutout unreadable"),
        (
            {"contamination": 0.52, "blend_fraction": 0.041, "n_neighbours": 2},
            Flag.BLENDED,
            "light of 2 masked neighbour(s) left outside the mask adds 0.52 to the chi2/dof of "
            "a perfect fit of the target (> 0.13); it is 4.1 % of the target's light",
        ),
        ({"asymmetry": 0.3, "contamination": 0.0}, Flag.BLENDED, "no mirror image"),
        ({"truncated_fraction": 0.3}, Flag.TRUNCATED, "30 % of the target's flux"),
        ({"masked_fraction": 0.4}, Flag.MASKED_FRACTION_HIGH, "neighbour masking not counted"),
    ],
)
def test_each_flag_fires_alone(change, flag, words):
    bits, reasons = evaluate_flags(T, **{**CLEAN, **change})
    assert bits == int(flag), flag_names(bits)
    assert len(reasons) == 1
    assert reasons[0].startswith(f"{flag.name}: ") and words in reasons[0]


def test_thresholds_are_used_and_boundaries_do_not_fire():
    at_limit = {
        **CLEAN,
        "hallucination": T.hallucination_max,
        "upsampling": T.upsampling_max,
        "chi2_reduced": T.chi2_max,
        "masked_fraction": T.masked_fraction_max,
        "psf_sum": [1 + 0.99 * T.psf_sum_tolerance] * 3,
        "psf_centroid_offset": [T.psf_centroid_tolerance] * 3,
        "photoz": Z_RANGE[1],
    }
    assert evaluate_flags(T, **at_limit) == (0, [])
    strict = FlagThresholds(hallucination_max=0.1, chi2_max=1.0, upsampling_max=1.5)
    bits, _ = evaluate_flags(strict, **CLEAN)
    assert bits == Flag.PRIOR_DOMINATED | Flag.POOR_FIT | Flag.UPSAMPLING_HIGH


def test_summary_checks_skip_without_values_and_bits_combine():
    failed = {**CLEAN, "error": "no cutout", "photoz": math.nan, "psf_sum": None}
    for k in ("masked_fraction", "upsampling", "hallucination", "chi2_reduced"):
        failed[k] = None
    bits, reasons = evaluate_flags(T, **failed)
    assert bits == Flag.INPUT_ERROR | Flag.PHOTOZ_BAD | Flag.PSF_BAD
    assert [r.split(":")[0] for r in reasons] == ["INPUT_ERROR", "PHOTOZ_BAD", "PSF_BAD"]


def test_blended_is_in_noise_units_not_a_flux_share():
    """A faint target with a large neighbour share but little light in noise units (the
    demo's false BLENDED of the old flux-share rule) is not flagged; a bright one with a
    small share but a large chi2 contribution is."""
    faint = {**CLEAN, "contamination": 0.02, "blend_fraction": 0.07, "asymmetry": 0.05}
    assert evaluate_flags(T, **faint) == (0, [])
    bright = {**CLEAN, "contamination": 1.5, "blend_fraction": 0.005, "asymmetry": 0.05}
    bits, reasons = evaluate_flags(T, **bright)
    assert bits == Flag.BLENDED and "0.5 % of the target's light" in reasons[0]
    at_limit = {**CLEAN, "contamination": T.contamination_max, "asymmetry": T.asymmetry_max}
    assert evaluate_flags(T, **at_limit) == (0, [])
    unmeasured = {**CLEAN, "contamination": math.nan, "asymmetry": math.nan}
    assert evaluate_flags(T, **unmeasured) == (0, [])


def test_single_checks_return_their_bit_when_quiet():
    for bit, reason in (
        rules.check_prior_dominated(0.1, T),
        rules.check_upsampling(1.0, T),
        rules.check_chi2(1.0, T),
        rules.check_masked_fraction(0.0, T),
        rules.check_psf(np.ones(3), np.zeros((3, 2)), T),
        rules.check_photoz(0.5, *Z_RANGE),
        rules.check_input_error(None),
    ):
        assert isinstance(bit, Flag) and reason is None


def test_truncated_also_in_noise_units():
    """A bright galaxy with a few % of its flux beyond the field leaves many σ there: the
    misfit outside the footprint fires TRUNCATED when the target's own light is there;
    misfit outside with no target light there (an undetected neighbour) does not, nor
    target light there that the noise hides."""
    # the HST galaxy at z = 0.8 with demo-64: 4.0 % outside, 1.66 of chi2/dof there
    bright = {**CLEAN, "chi2_reduced": 2.91, "truncated_fraction": 0.040, "chi2_outside": 1.66}
    bits, reasons = evaluate_flags(T, **bright)
    assert bits == Flag.TRUNCATED, flag_names(bits)
    assert "4.0 % of the target's flux" in reasons[0] and "adds 1.66 to χ²/dof" in reasons[0]
    # boundaries: at the thresholds nothing fires
    edge = {**bright, "chi2_outside": T.truncated_chi2_max}
    assert evaluate_flags(T, **edge) == (0, [])
    neighbour = {**bright, "truncated_fraction": 0.5 * T.truncated_light_min}
    assert evaluate_flags(T, **neighbour) == (0, [])
    faint = {**bright, "chi2_outside": 0.05}
    assert evaluate_flags(T, **faint) == (0, [])
    assert evaluate_flags(T, **{**bright, "chi2_outside": math.nan}) == (0, [])
    # the flux share alone still fires, with both reasons when both hold
    both = {**bright, "truncated_fraction": 0.25}
    bits, reasons = evaluate_flags(T, **both)
    assert bits == Flag.TRUNCATED
    assert "25 % of the target's flux" in reasons[0] and "(> 10 %)" in reasons[0]
    assert "adds 1.66" in reasons[0]
