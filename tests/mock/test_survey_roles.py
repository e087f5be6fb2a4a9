"""The mock survey's issue-11 roles: overlapping neighbours, too-large galaxies, image-only files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from d4a_batch.mock.survey import (
    DEMO_REAL_DATA_MIX,
    TRUTH_FILE,
    MockSurveyConfig,
    build_mock_survey,
)
from d4a_batch.survey.fits_io import read_hsc_cutout
from d4a_batch.survey.hats_io import open_input_catalog

SMALL = MockSurveyConfig(n_objects=3, seed=5, kpc_per_pixel=1.0, n_model=16, cutout_size=64,
                         neighbour_fraction=0.0, star_fraction=0.0, cr_fraction=0.0,
                         bad_column_fraction=0.0)  # fmt: skip


def _truth(root):
    return pq.read_table(root / TRUTH_FILE).to_pandas()


def _rows(root):
    cat = open_input_catalog(str(root))
    return pq.read_table(cat.partitions[0].uri).to_pandas()


def test_roles_are_off_by_default_and_on_in_the_demo_mix(tmp_path):
    t = _truth(build_mock_survey(tmp_path / "s", SMALL))
    assert not t["overlapping_neighbour"].any() and not t["larger_than_field"].any()
    assert not t["image_only"].any() and t["neighbour_sep_px"].isna().all()
    assert (t["flux_outside_field"] == 0).all()
    assert all(0 < v < 0.5 for v in DEMO_REAL_DATA_MIX.values())


def test_overlapping_neighbour_is_drawn_close_and_recorded(tmp_path):
    root = build_mock_survey(tmp_path / "s", dataclasses.replace(SMALL, overlap_fraction=1.0))
    t = _truth(root)
    assert t["overlapping_neighbour"].all()
    assert t["neighbour_sep_px"].between(6, 9).all()
    assert all("overlapping galaxy" in e for e in t["extras"])


def test_large_galaxies_overflow_the_field_and_the_truth_is_its_centre(tmp_path):
    root = build_mock_survey(tmp_path / "s", dataclasses.replace(SMALL, large_fraction=1.0))
    t = _truth(root)
    assert t["larger_than_field"].all()
    assert (t["flux_outside_field"] > 0.1).all()  # TRUNCATED's threshold
    truth = np.stack(t["truth"].to_numpy()).reshape(len(t), 3, 16, 16)
    assert np.all(truth > 0)  # the field is filled to its edges


def test_image_only_cutouts_have_empty_mask_and_variance(tmp_path):
    root = build_mock_survey(tmp_path / "s", dataclasses.replace(SMALL, image_only_fraction=1.0))
    assert _truth(root)["image_only"].all()
    for uri in _rows(root)["g_cutout_uri"]:
        cut = read_hsc_cutout(str(root / uri))
        assert set(cut.missing) == {"MASK", "VARIANCE"}
        assert np.isfinite(cut.image).all()


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_roles_do_not_change_the_other_objects(tmp_path, fraction):
    base = _truth(build_mock_survey(tmp_path / "a", SMALL))
    other = _truth(build_mock_survey(tmp_path / "b", dataclasses.replace(
        SMALL, image_only_fraction=fraction)))  # fmt: skip
    assert np.allclose(base["z_true"], other["z_true"])
    assert np.allclose(base["i_mag_true"], other["i_mag_true"])
