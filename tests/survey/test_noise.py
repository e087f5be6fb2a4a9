"""Noise of image-only cutouts (survey/noise.py): estimates against mocks of known variance,
the image-only FITS layout, and staging + flags of image-only cutouts."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from astropy.io import fits

from d4a_batch.config import ColumnMap, FlagThresholds, PhysicsConfig, StagingConfig
from d4a_batch.mock.galaxies import draw_galaxy, sample_params
from d4a_batch.mock.survey import INV_GAIN, SKY_VARIANCE, draw_psf
from d4a_batch.physics.operator import ForwardOperator
from d4a_batch.quality.reasons import flag_objects
from d4a_batch.schema import Col, Flag
from d4a_batch.survey.fits_io import (
    hsc_tan_wcs,
    read_hsc_cutout,
    write_hsc_cutout,
)
from d4a_batch.survey.hats_io import cutout_column, open_input_catalog, read_partition
from d4a_batch.survey.noise import (
    MIN_SKY_PIXELS,
    NoiseEstimateError,
    estimate_noise,
    fill_missing_planes,
    header_gain,
)
from d4a_batch.survey.packs import NOISE_NOTE, pack_table
from d4a_batch.survey.staging import VALID, VARIANCE, Stager
from d4a_batch.testing import TINY_PRIOR

SKY_I, INV_GAIN_I = SKY_VARIANCE["i"], INV_GAIN["i"]  # HSC COSMOS i band (mock/survey.py)
BACKGROUND = 0.003


def mock_cutout(seed: int, mag: float, size: int = 96, psf_size: int = 43):
    """``(image, true variance, noise-free image incl. background, psf)`` of one galaxy.

    Sky + source Poisson noise as the mock survey draws it: Var = s² + model / g.
    """
    rng = np.random.default_rng(seed)
    flux = draw_galaxy(sample_params(rng, 1)[0], 0.5, 64, ("i",)).astype(np.float64)
    flux *= 10 ** (-0.4 * (mag - 27.0)) / flux.sum()
    psf = draw_psf(0.62, 0.02, -0.01, size=psf_size)
    op = ForwardOperator(
        torch.as_tensor(psf[None, None]),
        torch.tensor([0.35], dtype=torch.float64),
        torch.tensor([[0.2, -0.3]], dtype=torch.float64),
        (size, size),
    )
    model = op.linear(torch.as_tensor(flux[None]))[0, 0].numpy()
    var = SKY_I + np.clip(model, 0, None) * INV_GAIN_I
    image = model + BACKGROUND + rng.standard_normal(model.shape) * np.sqrt(var)
    return image, var, model + BACKGROUND, psf


def _chi2(image, truth, var) -> float:
    return float(np.mean((image - truth) ** 2 / var))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("mag", [18.5, 20.0, 22.0])
def test_estimate_matches_the_true_variance(seed, mag):
    """Within 10 % of the truth (median over pixels), χ²/dof of the truth 1 ± 0.1."""
    image, var, truth, psf = mock_cutout(seed, mag)
    est = estimate_noise(image, psf=psf)
    assert est.variance.shape == image.shape and est.variance.dtype == np.float32
    assert np.median(np.abs(est.variance / var - 1)) < 0.10
    assert abs(_chi2(image, truth, est.variance) - 1.0) < 0.1
    assert est.sky == pytest.approx(BACKGROUND, abs=0.05 * math.sqrt(SKY_I))  # galaxy wings
    assert est.sky_variance == pytest.approx(SKY_I, rel=0.05)
    assert est.n_sky > 5000
    assert f"from {est.n_sky} source-free pixels (sep background)" in est.reason


def test_source_term_from_a_header_gain_is_exact_on_the_galaxy():
    """With the gain in the header, the bright galaxy's pixels get their variance to 10 %."""
    image, var, truth, psf = mock_cutout(0, 18.5)
    header = fits.Header({"GAIN": 1.0 / INV_GAIN_I})
    assert header_gain(header) == (pytest.approx(1.0 / INV_GAIN_I), "GAIN")
    est = estimate_noise(image, header=header, psf=psf)
    assert est.gain_source == "header GAIN" and "from header GAIN" in est.reason
    footprint = truth - BACKGROUND > 3 * math.sqrt(SKY_I)  # where the galaxy is
    source_dominated = var > 2 * SKY_I
    assert footprint.sum() > 300 and source_dominated.sum() > 20
    for region in (footprint, source_dominated):
        assert np.median(np.abs(est.variance[region] / var[region] - 1)) < 0.10
    # ~500 pixels: ±0.06 is one standard deviation of chi2/dof
    assert abs(_chi2(image[footprint], truth[footprint], est.variance[footprint]) - 1) < 0.15


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gain_estimated_from_the_stamp_finds_the_source_term(seed):
    """Bright galaxies (i = 18.5): the source term is found, g_eff within a factor 2 (the stamp
    alone constrains it to ~±40 %), the galaxy's summed variance within 25 % of the truth and
    χ²/dof of the truth on the galaxy's pixels 1 ± 0.15 (without a source term the summed
    variance there is 25 % low)."""
    image, var, truth, psf = mock_cutout(seed, 18.5)
    est = estimate_noise(image, psf=psf)
    assert est.gain_source == "estimated", est.reason
    assert 0.5 < est.gain * INV_GAIN_I < 2.0, est.reason
    assert "estimated from the stamp" in est.reason
    footprint = truth - BACKGROUND > 3 * math.sqrt(SKY_I)
    assert est.variance[footprint].sum() == pytest.approx(var[footprint].sum(), rel=0.25)
    assert abs(_chi2(image[footprint], truth[footprint], est.variance[footprint]) - 1) < 0.15


def test_faint_galaxy_has_sky_noise_only():
    image, var, _, psf = mock_cutout(1, 23.0)
    est = estimate_noise(image, psf=psf)
    assert est.gain == math.inf and est.gain_source == "not detected", est.reason
    assert "no source term (the sources' Poisson noise is not significant" in est.reason
    assert np.all(est.variance == np.float32(est.sky_variance))
    assert np.abs(est.variance / var - 1).max() < 0.1  # the source term is negligible there


def test_invalid_and_non_finite_pixels_are_excluded():
    image, var, _, psf = mock_cutout(2, 20.0)
    image[10, :] = np.nan
    image[:, 5] = 1e4  # a bad column: masked
    valid = np.ones(image.shape, bool)
    valid[:, 5] = False
    est = estimate_noise(image, valid, psf=psf)
    assert np.isnan(est.variance[10]).all() and np.isnan(est.variance[:, 5]).all()
    ok = np.isfinite(est.variance)
    assert ok.sum() == image.size - image.shape[1] - image.shape[0] + 1
    assert np.median(np.abs(est.variance[ok] / var[ok] - 1)) < 0.10


def test_a_cutout_full_of_source_cannot_be_estimated():
    yy, xx = np.indices((40, 40))
    image = np.random.default_rng(0).normal(0, 0.02, (40, 40))
    for cy in range(3, 40, 8):  # a crowded field: no pixel far enough from every source
        for cx in range(3, 40, 8):
            image += 2.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0)
    with pytest.raises(
        NoiseEstimateError, match=rf"source-free pixels .* \(need {MIN_SKY_PIXELS}\)"
    ):
        estimate_noise(image)


def test_psf_of_any_size_selects_the_noise_frequencies():
    for p in (31, 63):
        image, _, truth, psf = mock_cutout(3, 20.0, psf_size=p)
        est = estimate_noise(image, psf=psf)
        assert abs(_chi2(image, truth, est.variance) - 1.0) < 0.1


# --------------------------------------------------------------------------- FITS + staging
def test_image_only_fits_reads_with_missing_planes(tmp_path):
    """The cutout service's image-only file: MASK and VARIANCE HDUs present but empty."""
    image, _, truth, psf = mock_cutout(0, 20.0)
    uri = str(tmp_path / "image_only.fits")
    write_hsc_cutout(uri, image, None, None, hsc_tan_wcs(150.1, 2.2, image.shape))
    with fits.open(uri) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
        assert hdul["MASK"].data is None and hdul["VARIANCE"].data is None
        assert hdul["MASK"].header["NAXIS"] == 0
    cut = read_hsc_cutout(uri)
    assert cut.missing == ("MASK", "VARIANCE")
    assert not cut.mask.any() and np.isnan(cut.variance).all()
    assert not cut.valid(StagingConfig().bad_mask_planes).any()  # until the noise is estimated
    filled, note = fill_missing_planes(cut, StagingConfig().bad_mask_planes, psf)
    assert note.startswith("MASK and VARIANCE empty: sky var ")
    assert filled.valid(StagingConfig().bad_mask_planes).all()
    assert abs(_chi2(image, truth, filled.variance) - 1.0) < 0.1


def test_absent_mask_hdu_is_an_image_only_cutout(tmp_path):
    image, var, _, _ = mock_cutout(1, 21.0, size=40)
    uri = str(tmp_path / "no_mask.fits")
    write_hsc_cutout(uri, image, np.zeros(image.shape, np.int32), var, hsc_tan_wcs(1, 2, (40, 40)))
    with fits.open(uri) as hdul:
        del hdul["MASK"]
        hdul.writeto(uri, overwrite=True)
    cut = read_hsc_cutout(uri)
    assert cut.missing == ("MASK",) and cut.mask_planes == {}
    np.testing.assert_array_equal(cut.variance, var.astype(np.float32))
    same, note = fill_missing_planes(cut)
    assert same.variance is cut.variance
    assert note == "MASK empty: no pixel masked (only non-finite IMAGE pixels are invalid)"


def _make_image_only(root, rows, k: int) -> None:
    """Rewrite object k's cutouts (every band) as the cutout service's image-only files."""
    for b in TINY_PRIOR.bands:
        path = root / rows[k][cutout_column(b)]
        cut = read_hsc_cutout(str(path))
        write_hsc_cutout(str(path), cut.image, None, None, cut.wcs)


def test_image_only_cutouts_are_staged_and_flagged(tiny_survey, tmp_path):
    root = tmp_path / "survey"
    shutil.copytree(tiny_survey, root)
    cat = open_input_catalog(str(root))
    rows = []
    for part in cat.partitions:
        rows += read_partition(part, ColumnMap(), TINY_PRIOR.bands).to_pylist()
    _make_image_only(root, rows, 2)
    stager = Stager(str(root), TINY_PRIOR, PhysicsConfig(), StagingConfig())
    objs = stager.stage_rows(rows[:4], threads=1)
    assert all(o.error is None for o in objs), [o.error for o in objs]
    assert [o.noise_note is not None for o in objs] == [False, False, True, False]
    note = objs[2].noise_note
    assert note.startswith("g: MASK and VARIANCE empty: sky var ")
    assert " / r: MASK and VARIANCE empty" in note and " / i: " in note
    # the original VARIANCE plane vs the estimate on the stamp's pixels
    clean = Stager(str(tiny_survey), TINY_PRIOR, PhysicsConfig(), StagingConfig()).stage(rows[2])
    both = clean.arrays[VALID].astype(bool) & objs[2].arrays[VALID].astype(bool)
    ratio = objs[2].arrays[VARIANCE][both] / clean.arrays[VARIANCE][both]
    assert np.median(np.abs(ratio - 1)) < 0.10
    # through a pack to the flags: the reason reaches flag_reasons
    same = [o for o in objs if o.stamp_size == objs[2].stamp_size]  # one pack: one stamp size
    pack = pack_table(same)
    notes = pack[NOISE_NOTE].to_pylist()
    k = same.index(objs[2])
    assert notes[k] == note and sum(n is not None for n in notes) == 1
    b = len(same)
    flags = flag_objects(
        FlagThresholds(),
        z_range=(0.0, 10.0),
        bands=TINY_PRIOR.bands,
        photoz=pack[Col.PHOTOZ].to_numpy(),
        psf_sum=np.ones((b, 3)),
        psf_centroid_offset=np.zeros((b, 3)),
        errors=[None] * b,
        noise_notes=notes,
    )
    assert [bool(f & Flag.NOISE_ESTIMATED) for f in flags.bits] == [i == k for i in range(b)]
    assert f"NOISE_ESTIMATED: {note}" in flags.reasons[k]
    assert "NOISE_ESTIMATED" in flags.names[k].split("|")
