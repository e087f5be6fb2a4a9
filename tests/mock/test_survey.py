from __future__ import annotations

import dataclasses
import math

import hats
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hats.io.validation import is_valid_catalog

from d4a_batch.mock.survey import (
    CONFIG_FILE,
    SKY_VARIANCE,
    TRUTH_FILE,
    MockSurveyConfig,
    build_mock_survey,
    ensure_mock_survey,
    seeing_fwhm,
)
from d4a_batch.survey.fits_io import HSC_MASK_PLANES, read_hsc_cutout, read_psf
from d4a_batch.survey.tensors import tensor_numpy

SMALL = MockSurveyConfig(n_objects=6, seed=5, kpc_per_pixel=1.0, n_model=16, cutout_size=64,
                         partition_rows=2)  # fmt: skip
CLEAN = dataclasses.replace(
    SMALL, neighbour_fraction=0.0, star_fraction=0.0, cr_fraction=0.0, bad_column_fraction=0.0
)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return build_mock_survey(tmp_path_factory.mktemp("clean") / "s", CLEAN)


def _catalog(root) -> pd.DataFrame:
    return pd.read_parquet(root / "dataset").drop(columns=["Norder", "Dir"])


def test_a_valid_hats_catalog_with_hsc_columns_over_several_partitions(clean):
    assert is_valid_catalog(clean, strict=True)
    cat = hats.read_hats(clean)
    assert len(cat.get_healpix_pixels()) >= 2 and cat.catalog_info.total_rows == 6
    df = _catalog(clean)
    for col in ("object_id", "ra", "dec", "photoz_best", "photoz_err68_min", "photoz_err68_max",
                "i_cmodel_mag", "g_cutout_uri", "i_psf_uri", "_healpix_29"):  # fmt: skip
        assert col in df.columns
    assert df.object_id.is_unique
    assert (df.photoz_err68_min <= df.photoz_best).all() and (
        df.photoz_best <= df.photoz_err68_max
    ).all()
    # COSMOS: within the configured square around (150.1, 2.2)
    assert df.dec.between(2.2 - 0.61, 2.2 + 0.61).all() and df.ra.between(149.4, 150.8).all()
    assert all(not u.startswith("/") for u in df.i_cutout_uri)  # relative to the catalog root


def test_deterministic_per_seed(tmp_path, clean):
    again = build_mock_survey(tmp_path / "again", CLEAN)
    pd.testing.assert_frame_equal(_catalog(again), _catalog(clean))
    a, b = pq.read_table(again / TRUTH_FILE), pq.read_table(clean / TRUTH_FILE)
    np.testing.assert_array_equal(tensor_numpy(a["truth"]), tensor_numpy(b["truth"]))
    row = _catalog(clean).iloc[0]
    np.testing.assert_array_equal(
        read_hsc_cutout(str(again / row.r_cutout_uri)).image,
        read_hsc_cutout(str(clean / row.r_cutout_uri)).image,
    )
    other = build_mock_survey(tmp_path / "other", dataclasses.replace(CLEAN, seed=6))
    assert not np.array_equal(_catalog(other).ra, _catalog(clean).ra)
    # ensure_mock_survey keeps a survey built from the same config and rebuilds otherwise
    stamp = (clean / CONFIG_FILE).stat().st_mtime_ns
    assert (
        ensure_mock_survey(clean, CLEAN) == clean
        and (clean / CONFIG_FILE).stat().st_mtime_ns == stamp
    )


def test_cutouts_hold_the_truth_flux_with_hsc_noise(clean):
    df = _catalog(clean)
    truth = pq.read_table(clean / TRUTH_FILE)
    images = tensor_numpy(truth["truth"])
    ids = truth["object_id"].to_pylist()
    for _, row in df.iterrows():
        t = images[ids.index(row.object_id)]
        for c, band in enumerate("gri"):
            cut = read_hsc_cutout(str(clean / row[f"{band}_cutout_uri"]))
            border = np.ones(cut.image.shape, bool)
            border[8:-8, 8:-8] = False
            background = float(np.median(cut.image[border]))
            sigma = math.sqrt(SKY_VARIANCE[band])
            # sky noise: the border's scatter, and VARIANCE = sky + source / gain >= sky
            assert np.std(cut.image[border]) == pytest.approx(sigma, rel=0.1)
            assert cut.variance.min() == pytest.approx(SKY_VARIANCE[band], rel=1e-5)
            # flux: the resampled, PSF-convolved truth conserves the flux of the model image
            flux = float((cut.image - background).sum(dtype=np.float64))
            noise = math.sqrt(float(cut.variance.sum())) + sigma / 30 * cut.image.size
            assert abs(flux - float(t[c].sum())) < 5 * noise + 0.02 * float(t[c].sum())
            # the object is where the WCS says: the brightest pixel is near it
            px, py = cut.wcs.world_to_pixel_values(row.ra, row.dec)
            peak = np.unravel_index(np.argmax(cut.image - background), cut.image.shape)
            assert math.hypot(peak[0] - py, peak[1] - px) < 3
        mag = 27.0 - 2.5 * math.log10(float(t[2].sum()))
        assert row.i_cmodel_mag == pytest.approx(mag, abs=5 * row.i_cmodel_magerr + 1e-3)


def test_psfs_follow_the_seeing_pattern(clean):
    df = _catalog(clean)
    for _, row in df.iterrows():
        for band in "gri":
            psf = read_psf(str(clean / row[f"{band}_psf_uri"]))
            assert psf.array.shape == (43, 43) and psf.raw_sum == pytest.approx(1.0, rel=1e-5)
            assert math.hypot(*psf.centroid_offset) < 0.05
            area = float((psf.array >= psf.array.max() / 2).sum())
            fwhm = 2 * math.sqrt(area / math.pi) * 0.168
            assert fwhm == pytest.approx(seeing_fwhm(band, row.ra, row.dec, CLEAN), abs=0.1)


def test_masks_mark_cosmic_rays_bad_columns_and_saturation(tmp_path):
    cfg = dataclasses.replace(SMALL, n_objects=4, cr_fraction=1.0, bad_column_fraction=1.0,
                              star_fraction=1.0, partition_rows=None)  # fmt: skip
    root = build_mock_survey(tmp_path / "masked", cfg)
    bit = {n: 1 << b for n, b in HSC_MASK_PLANES.items()}
    saturated = 0
    for _, row in _catalog(root).iterrows():
        masks = [read_hsc_cutout(str(root / row[f"{b}_cutout_uri"])).mask for b in "gri"]
        assert any((m & bit["CR"]).any() for m in masks)
        assert all(((m & bit["BAD"]) != 0).all(axis=0).any() for m in masks)  # a full column
        assert all((m & bit["DETECTED"]).any() for m in masks)
        saturated += int(any((m & bit["SAT"]).any() for m in masks))
    assert saturated >= 1
    extras = pq.read_table(root / TRUTH_FILE)["extras"].to_pylist()
    assert all("star" in e and "cosmic ray" in e and "bad column" in e for e in extras)


def test_galaxy_population_follows_mock_structure():
    """``mock_structure`` picks the population; "smooth" (the default) draws exactly what the
    survey drew before the field existed, so existing surveys and their truths are unchanged."""
    from d4a_batch.mock.galaxies import draw_galaxy, sample_params
    from d4a_batch.mock.survey import _galaxy

    cfg = MockSurveyConfig(n_objects=4, kpc_per_pixel=0.75)
    smooth = _galaxy(np.random.default_rng(3), cfg, 21.0)
    params = sample_params(np.random.default_rng(3), 1)[0]
    expected = draw_galaxy(params, 0.75, 64, cfg.bands).astype(np.float64)
    np.testing.assert_allclose(smooth / smooth[2].sum(), expected / expected[2].sum(), rtol=1e-12)
    real_cfg = dataclasses.replace(cfg, mock_structure="realistic")
    realistic = _galaxy(np.random.default_rng(3), real_cfg, 21.0)
    p_real = sample_params(np.random.default_rng(3), 1, "realistic")[0]
    want = draw_galaxy(p_real, 0.75, 64, cfg.bands).astype(np.float64)
    np.testing.assert_allclose(realistic / realistic[2].sum(), want / want[2].sum(), rtol=1e-12)
    assert not np.allclose(realistic, smooth)
