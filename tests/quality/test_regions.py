"""Where a misfit lies: residual/σ maps of known misfits localised to the right region."""

from __future__ import annotations

import math

import numpy as np
import pytest

from d4a_batch.config import FlagThresholds
from d4a_batch.quality.detection_image import psf_fwhm_pixels
from d4a_batch.quality.reasons import evaluate_flags
from d4a_batch.quality.regions import (
    REGIONS,
    chi2_localisation,
    chi2_regions,
    excess_chi2_regions,
    normalised_residual,
    region_masks,
)
from d4a_batch.schema import Flag

T = FlagThresholds()
C, H = 3, 61
FWHM = 4.0  # px, HSC-like seeing
SIGMA = 0.05  # counts, sky noise
OFFSET = (0.4, -0.3)  # the object's (dy, dx) from the stamp centre
FOOTPRINT = 40.0  # px


def _gauss(shape, centre, sigma, flux):
    """A circular Gaussian of total ``flux`` at ``centre`` (pixel-edge coordinates) [H,W]."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    r2 = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2
    return flux * np.exp(-0.5 * r2 / sigma**2) / (2 * math.pi * sigma**2)


def _stamps(truth_sigma: float, model_sigma: float, rng, flux=400.0):
    """Observation of a Gaussian galaxy (observed width ``truth_sigma`` px) with noise, and a
    model of the same flux and width ``model_sigma``: [C,H,W] each, and the variance."""
    centre = (H / 2 + OFFSET[0], H / 2 + OFFSET[1])
    truth = _gauss((H, H), centre, truth_sigma, flux)
    model = _gauss((H, H), centre, model_sigma, flux)
    var = np.full((C, H, H), SIGMA**2)
    obs = truth[None] + rng.normal(0, SIGMA, (C, H, H))
    return obs, np.broadcast_to(model, (C, H, H)).copy(), var


def _regions(residual, neighbour_mask=None):
    return chi2_localisation(
        residual[None], np.array([OFFSET]), np.array([FWHM]), np.array([FOOTPRINT]),
        None if neighbour_mask is None else neighbour_mask[None], T.core_radius_fwhm,
    )  # fmt: skip


def _flags(residual, neighbour_mask=None):
    regions = {k: float(v[0]) for k, v in _regions(residual, neighbour_mask).items()}
    chi2 = float(np.nansum(residual**2) / np.isfinite(residual).sum())
    return chi2, regions, evaluate_flags(
        T, photoz=0.4, z_range=(0.02, 1.5), psf_sum=[1.0] * C,
        psf_centroid_offset=[[0.0, 0.0]] * C, chi2_reduced=chi2, **regions,
    )  # fmt: skip


def test_the_residual_is_data_minus_model_over_sigma_on_used_pixels_only():
    obs = np.array([[[1.0, 2.0], [3.0, np.nan]]])
    model = np.array([[[0.5, 2.0], [1.0, 1.0]]])
    var = np.array([[[0.25, 4.0], [0.0, 1.0]]])
    valid = np.array([[[True, False], [True, True]]])
    r = normalised_residual(obs, model, var, valid)
    # (1 - 0.5)/0.5; not valid; variance 0; not finite
    np.testing.assert_array_equal(np.isnan(r), [[[False, True], [True, True]]])
    assert r[0, 0, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes"):
        normalised_residual(obs, model[..., :1], var, valid)


def test_regions_are_disjoint_cover_the_stamp_and_sum_to_the_total_excess(rng):
    nm = np.zeros((H, H), bool)
    nm[5:15, 40:52] = True
    masks = region_masks((H, H), OFFSET, FWHM, FOOTPRINT, nm, T.core_radius_fwhm)
    count = sum(m.astype(int) for m in masks.masks.values())
    np.testing.assert_array_equal(count, 1)
    assert masks.core_radius == pytest.approx(1.5 * FWHM)
    assert masks.masks["core"].sum() == pytest.approx(math.pi * 6.0**2, rel=0.1)
    # the ring: within max(2, 1 FWHM) = 4 px of the mask, never the mask itself
    ring = masks.masks["neighbours"]
    assert not (ring & nm).any() and ring[15:19, 45].all() and not ring[20, 45]
    r = rng.normal(size=(C, H, H))
    r[:, nm] = np.nan  # masked pixels are not used
    e = excess_chi2_regions(r, masks)
    used = np.isfinite(r)
    assert e["n_used"] == used.sum()
    assert sum(e[k] for k in REGIONS) == pytest.approx(float((r[used] ** 2 - 1).sum()))


def test_pure_noise_has_no_region_excess_and_no_flag(rng):
    r = rng.normal(size=(C, H, H))
    regions = _regions(r)
    for k in REGIONS:  # E_R / n_used: noise of sd sqrt(2 n_R) / n_used
        assert abs(regions[f"chi2_{k}"][0]) < 5 * math.sqrt(2 * C * H * H) / (C * H * H)
    _, _, (bits, reasons) = _flags(r)
    assert bits == 0 and reasons == []


def test_a_core_more_compact_than_the_model_is_a_core_misfit(rng):
    """A bright compact galaxy (σ 1.6 px observed) fitted by a model of the same flux but
    σ 2.4 px: the residual is a positive core in a negative ring, within 1.5 FWHM (6 px)."""
    obs, model, var = _stamps(1.6, 2.4, rng)
    r = normalised_residual(obs, model, var, np.ones_like(obs, bool))
    chi2, regions, (bits, reasons) = _flags(r)
    assert chi2 > T.chi2_max
    share = regions["chi2_core"] / sum(max(0.0, regions[f"chi2_{k}"]) for k in REGIONS)
    assert share > 0.9, regions
    assert bits == Flag.POOR_FIT | Flag.CORE_MISFIT, reasons
    poor = next(x for x in reasons if x.startswith("POOR_FIT"))
    assert "of the excess chi2 lies within 1.5 PSF FWHM of the object" in poor
    assert "a core more compact than the prior reproduces, or a PSF mismatch" in poor
    core = next(x for x in reasons if x.startswith("CORE_MISFIT"))
    assert f"{100 * share:.0f} % of the excess chi2" in core


def test_neighbour_light_past_the_mask_is_named_not_the_core(rng):
    """The target fits; a neighbour's wing leaks 2-4 px past its dilated mask."""
    obs, model, var = _stamps(2.0, 2.0, rng)
    nm = np.zeros((H, H), bool)
    yy, xx = np.mgrid[0:H, 0:H] + 0.5
    centre = (H / 2 + 14, H / 2 + 12)
    d = np.hypot(yy - centre[0], xx - centre[1])
    nm[d <= 6] = True
    wing = 10.0 * np.exp(-0.5 * (d / 3.0) ** 2) * (d > 6)  # counts, beyond the mask only
    obs = obs + wing[None]
    valid = np.broadcast_to(~nm, obs.shape)
    r = normalised_residual(obs, model, var, valid)
    chi2, regions, (bits, reasons) = _flags(r, nm)
    assert chi2 > T.chi2_max
    assert bits == Flag.POOR_FIT, reasons  # no CORE_MISFIT
    assert "lies next to masked neighbours: neighbour light leaking past the mask" in reasons[0]
    assert regions["chi2_neighbours"] > 10 * abs(regions["chi2_core"])


def test_light_beyond_the_footprint_is_named(rng):
    """A galaxy whose outskirts the model (cut at the footprint) does not have."""
    obs, model, var = _stamps(2.0, 2.0, rng)
    yy, xx = np.mgrid[0:H, 0:H] + 0.5
    cy, cx = H / 2 + OFFSET[0], H / 2 + OFFSET[1]
    outer = (np.abs(yy - cy) > FOOTPRINT / 2) | (np.abs(xx - cx) > FOOTPRINT / 2)
    obs = obs + np.where(outer, 0.12, 0.0)[None]  # a flat disc beyond the model field
    r = normalised_residual(obs, model, var, np.ones_like(obs, bool))
    chi2, _, (bits, reasons) = _flags(r)
    assert chi2 > T.chi2_max and bits == Flag.POOR_FIT, reasons
    assert "lies outside the model footprint: light beyond the model footprint" in reasons[0]


def test_unknown_regions_leave_the_plain_reason():
    bits, reasons = evaluate_flags(
        T, photoz=0.4, z_range=(0.02, 1.5), psf_sum=[1.0], psf_centroid_offset=[[0.0, 0.0]],
        chi2_reduced=9.0, chi2_core=math.nan, chi2_neighbours=0.0, chi2_footprint=0.0,
        chi2_outside=0.0,
    )  # fmt: skip
    assert bits == Flag.POOR_FIT and reasons == ["POOR_FIT: reduced chi2 9 > 3"]


def test_chi2_regions_is_the_localisation_of_the_residual_on_valid_pixels(rng):
    """What the sampling stage calls: B objects' stamps and re-convolved means -> the same
    regions as ``chi2_localisation`` of their residual; the core follows the widest PSF."""
    obs, model, var = _stamps(1.5, 2.5, rng)
    valid = np.ones(obs.shape, np.uint8)
    valid[0, :5] = 0  # a masked strip, and a pixel with no variance: neither is used
    var[1, 30, 30] = 0.0
    yy, xx = np.mgrid[0:9, 0:9] - 4
    psf = np.stack([np.exp(-0.5 * (yy**2 + xx**2) / s**2) for s in (1.0, 1.7, 1.2)])
    psf /= psf.sum((1, 2), keepdims=True)
    got = chi2_regions(
        obs[None], var[None], valid[None], model[None], psf[None], np.array([OFFSET]),
        np.array([FOOTPRINT]), None, T.core_radius_fwhm,
    )  # fmt: skip
    residual = normalised_residual(obs, model, var, valid.astype(bool))
    assert np.isnan(residual[0, :5]).all() and np.isnan(residual[1, 30, 30])
    fwhm = max(psf_fwhm_pixels(p) for p in psf)
    expected = chi2_localisation(
        residual[None], np.array([OFFSET]), np.array([fwhm]), np.array([FOOTPRINT]), None,
        T.core_radius_fwhm,
    )  # fmt: skip
    assert got.keys() == expected.keys() == {f"chi2_{k}" for k in REGIONS}
    for k in got:
        np.testing.assert_array_equal(got[k], expected[k])
    assert got["chi2_core"][0] > 0.5 * sum(v[0] for v in got.values())  # too wide a model
