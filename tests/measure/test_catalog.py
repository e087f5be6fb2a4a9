"""Morphology columns: units, summaries over samples, the observed stamp, flag rules."""

from __future__ import annotations

import galsim
import numpy as np
import pytest

from d4a_batch.measure import catalog as mc
from d4a_batch.schema import (
    MEASURE_BAND,
    MORPHOLOGY,
    Col,
    Flag,
    band_col,
    morphology_columns,
    obs_col,
    pct_col,
)

BANDS = ("g", "r", "i")
N = 64
KPC = 0.5  # kpc per model pixel


def galaxy(hlr_kpc, pixel_kpc, n, q=0.6, beta=30.0, psf_fwhm_kpc=None, offset=(0.0, 0.0)):
    """A Sérsic (n = 1.5) of half-light radius ``hlr_kpc`` on an n×n grid of ``pixel_kpc``
    pixels, centred at n/2 + offset (dy, dx) pixels; convolved with a Gaussian PSF if given."""
    g = galsim.Sersic(n=1.5, half_light_radius=hlr_kpc).shear(q=q, beta=beta * galsim.degrees)
    g = g.withFlux(1e4)
    if psf_fwhm_kpc:
        g = galsim.Convolve(g, galsim.Gaussian(fwhm=psf_fwhm_kpc))
    return g.drawImage(nx=n, ny=n, scale=pixel_kpc, offset=(offset[1], offset[0])).array


def test_column_names_cover_every_measurement_with_intervals_and_observed():
    cols = morphology_columns(BANDS)
    assert len(cols) == len(set(cols)) == 4 * (len(MORPHOLOGY) + len(BANDS))
    for name in (Col.R50_KPC, band_col(Col.R50_KPC, "g")):
        assert {name, pct_col(name, 16), pct_col(name, 84), obs_col(name)} <= set(cols)
    assert "r50_kpc_p16" in cols and "r50_kpc_g_obs" in cols and MEASURE_BAND == "i"


def test_posterior_summaries_in_kpc_and_arcsec_over_samples():
    hlr = np.linspace(1.5, 3.0, 16)  # one size per sample
    one = np.stack([galaxy(h, KPC, N) for h in hlr])  # [S, N, N]
    flux = np.stack([one * f for f in (0.4, 0.7, 1.0)], 1)[None].repeat(2, 0)  # [2,S,C,N,N]
    theta = np.array([0.1, 0.05])  # arcsec per model pixel
    cols, notes = mc.measure_posterior(flux, KPC, theta, BANDS)
    # per sample, the circular r50 of these q = 0.6 profiles is close to their hlr
    assert cols[Col.R50_KPC][0] == pytest.approx(np.median(hlr), rel=0.04)
    assert cols[pct_col(Col.R50_KPC, 16)][0] == pytest.approx(np.percentile(hlr, 16), rel=0.04)
    assert cols[pct_col(Col.R50_KPC, 84)][0] == pytest.approx(np.percentile(hlr, 84), rel=0.04)
    # kpc -> arcsec with each object's own model pixel
    np.testing.assert_allclose(cols[Col.R50_ARCSEC], cols[Col.R50_KPC] / KPC * theta)
    np.testing.assert_allclose(cols[Col.R50_KPC][0], cols[Col.R50_KPC][1])
    # same profile in every band: per-band r50 equal, no colour gradient
    np.testing.assert_allclose(cols[band_col(Col.R50_KPC, "g")], cols[Col.R50_KPC], rtol=1e-6)
    np.testing.assert_allclose(cols[Col.COLOUR_GRADIENT], 0.0, atol=1e-6)
    assert cols[Col.AXIS_RATIO][0] == pytest.approx(0.6, abs=0.03)
    assert cols[Col.POSITION_ANGLE][0] == pytest.approx(120.0, abs=1.0)
    assert abs(cols[Col.CAS_ASYMMETRY][0]) < 1e-3 and cols[Col.CENTROID_OFFSET_KPC][0] < 0.01
    assert cols[Col.CONCENTRATION][0] > 2.5 and 0.3 < cols[Col.GINI][0] < 0.8
    assert notes == [[], []]


def test_position_angle_percentiles_wrap_around_180_degrees():
    pa = np.array([[178.0, 179.0, 0.5, 1.0, 2.0, 177.0, 179.5, 1.5]])
    med, lo, hi = mc.summarise(pa, period=180.0)
    assert lo[0] < med[0] < hi[0] and hi[0] - lo[0] < 6.0
    assert 0 <= med[0] < 180 and (med[0] < 2.0 or med[0] > 178.0)
    # plain values, and too few finite samples -> NaN
    vals = np.array([[1.0, 2.0, 3.0, np.nan], [1.0, np.nan, np.nan, np.nan]])
    med, lo, hi = mc.summarise(vals)
    assert med[0] == 2.0 and np.isnan(med[1]) and np.isnan(hi[1])


def test_observed_stamp_same_aperture_and_units_as_the_model_grid():
    """One galaxy on the model grid (0.5 kpc pixels) and on an HSC-like stamp (1.2 kpc pixels,
    off-centre, with sky and a masked patch): the same r50 in kpc and the same shape."""
    scale = KPC / 1.2  # model pixel in HSC pixels
    hsc_arcsec = 0.168
    model = galaxy(2.5, KPC, N)
    flux = np.stack([model * f for f in (0.5, 0.8, 1.0)])[None, None]  # [1,1,C,N,N]
    post, _ = mc.measure_posterior(flux, KPC, np.array([scale * hsc_arcsec]), BANDS)
    h = 48
    off = (0.3, -0.4)
    stamp = galaxy(2.5, 1.2, h, offset=off)
    image = np.stack([stamp * f for f in (0.5, 0.8, 1.0)])[None] + 7.0  # sky
    valid = np.ones(image.shape, bool)
    valid[0, :, 10:13, 28:33] = False  # restorable from the point-symmetric side
    image[~valid] = np.nan
    obs, notes = mc.measure_observed(
        image, valid, np.array([off]), np.array([scale]), N, KPC, hsc_arcsec, BANDS
    )
    # r50 is ~2 stamp pixels here: their integration (light not uniform inside a pixel the
    # aperture cuts) biases it by +2 % centred, +3.5 % at this offset (0.1 % at 0.5 kpc pixels)
    assert obs[obs_col(Col.R50_KPC)][0] == pytest.approx(post[Col.R50_KPC][0], rel=0.05)
    assert obs[obs_col(Col.R50_ARCSEC)][0] == pytest.approx(post[Col.R50_ARCSEC][0], rel=0.05)
    assert obs[obs_col(Col.R80_KPC)][0] == pytest.approx(post[Col.R80_KPC][0], rel=0.03)
    assert obs[obs_col(Col.AXIS_RATIO)][0] == pytest.approx(post[Col.AXIS_RATIO][0], abs=0.03)
    assert obs[obs_col(Col.POSITION_ANGLE)][0] == pytest.approx(120.0, abs=1.5)
    assert obs[obs_col(Col.CENTROID_OFFSET_KPC)][0] < 0.05
    assert "masked, set to 0" not in " ".join(notes[0])
    # PSF-blurred: larger, rounder, less concentrated than the model grid's
    blurred = galaxy(2.5, 1.2, h, psf_fwhm_kpc=4.0, offset=off)
    image = np.stack([blurred * f for f in (0.5, 0.8, 1.0)])[None]
    obs_b, _ = mc.measure_observed(
        image, np.ones(image.shape, bool), np.array([off]), np.array([scale]), N, KPC,
        hsc_arcsec, BANDS,
    )  # fmt: skip
    assert obs_b[obs_col(Col.R50_KPC)][0] > 1.1 * post[Col.R50_KPC][0]
    assert obs_b[obs_col(Col.AXIS_RATIO)][0] > post[Col.AXIS_RATIO][0] + 0.05
    assert obs_b[obs_col(Col.CONCENTRATION)][0] < post[Col.CONCENTRATION][0]


def test_observed_values_are_nan_when_too_much_of_the_field_is_masked():
    scale = KPC / 1.2
    image = np.stack([galaxy(2.5, 1.2, 48)] * 3)[None]
    valid = np.ones(image.shape, bool)
    valid[0, :, :24, :] = False  # half the stamp, its partners on the other half are valid
    valid[0, :, 24:, 24:] = False  # and the partners of the other quarter
    obs, notes = mc.measure_observed(
        image, valid, np.zeros((1, 2)), np.array([scale]), N, KPC, 0.168, BANDS
    )
    assert all(np.isnan(v[0]) for v in obs.values())
    assert "all observed values NaN" in notes[0][0]


def test_flag_rules_nan_the_sizes_of_truncated_objects_only():
    cols = {c: np.array([1.0, 2.0, 3.0]) for c in morphology_columns(BANDS)}
    bits = np.array([0, int(Flag.TRUNCATED), int(Flag.BLENDED)])
    notes = mc.apply_flag_rules(cols, bits, BANDS)
    for name in (Col.R50_KPC, pct_col(Col.R80_KPC, 84), obs_col(Col.CONCENTRATION),
                 band_col(Col.R50_KPC, "g"), obs_col(band_col(Col.R50_KPC, "r"))):  # fmt: skip
        assert np.isnan(cols[name][1]) and cols[name][0] == 1.0 and cols[name][2] == 3.0
    for name in (Col.AXIS_RATIO, obs_col(Col.GINI), Col.CAS_ASYMMETRY):
        assert cols[name][1] == 2.0
    assert notes[0] == [] and notes[2] == [] and notes[1][0].startswith("TRUNCATED: ")
