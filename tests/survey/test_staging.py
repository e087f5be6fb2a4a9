from __future__ import annotations

import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from d4a_batch.config import ColumnMap, PhysicsConfig, StagingConfig
from d4a_batch.schema import Col
from d4a_batch.survey.fits_io import (
    HSC_MASK_PLANES,
    HSCCutout,
    hsc_tan_wcs,
    read_hsc_cutout,
    write_hsc_cutout,
    write_psf,
)
from d4a_batch.survey.hats_io import cutout_column, open_input_catalog, psf_column, read_partition
from d4a_batch.survey.staging import (
    IMAGE,
    KIND_ERRORS,
    KIND_OBJECTS,
    OFFSET,
    PSF,
    VALID,
    VARIANCE,
    Stager,
    cut_stamp,
    make_packs,
    pack_arrays,
    pack_from_bytes,
    pack_id,
    stamp_size,
)
from tests.survey.fixtures import TINY_PRIOR

BANDS = TINY_PRIOR.bands


def _rows(root):
    cat = open_input_catalog(str(root))
    rows = []
    for part in cat.partitions:
        rows += read_partition(part, ColumnMap(), BANDS, cat.healpix_column).to_pylist()
    return cat, rows


def _stager(root) -> Stager:
    return Stager(str(root), TINY_PRIOR, PhysicsConfig(), StagingConfig())


def test_stamp_size_takes_the_smallest_bucket_that_holds_footprint_and_margin():
    cfg = StagingConfig(stamp_sizes=(64, 32, 48, 96), psf_margin=8)
    assert stamp_size(16.0, cfg) == 32  # 16 + 2*8 = 32
    assert stamp_size(16.01, cfg) == 48  # 17 + 16 = 33
    assert stamp_size(48.0, cfg) == 64
    assert stamp_size(300.0, cfg) == 96  # larger than every bucket: the largest


def _cutout(h=40, w=50):
    wcs = hsc_tan_wcs(150.0, 2.0, (h, w))
    image = np.arange(h * w, dtype=np.float32).reshape(h, w)
    mask = np.zeros((h, w), np.int32)
    var = np.full((h, w), 2.0, np.float32)
    return HSCCutout(image, mask, var, dict(HSC_MASK_PLANES), wcs, fits.Header())


def test_cut_stamp_places_the_object_at_centre_plus_subpixel_offset():
    cut = _cutout()
    cut.mask[12, 15] = 1 << HSC_MASK_PLANES["CR"]
    cut.image[20, 20] = np.nan
    ra, dec = (float(v) for v in cut.wcs.pixel_to_world_values(20.3, 17.8))  # 0-based x, y
    image, var, valid, offset = cut_stamp(cut, ra, dec, 16, ("CR",), "mem")
    # edge coordinates (18.3, 20.8): corner (10, 13), centre (18, 21)
    np.testing.assert_allclose(offset, (0.3, -0.2), atol=1e-6)
    expect = cut.image[10:26, 13:29]
    ok = np.isfinite(expect)
    ok[12 - 10, 15 - 13] = False
    np.testing.assert_array_equal(valid, ok)
    np.testing.assert_array_equal(image[ok], expect[ok])
    assert image[~ok].tolist() == [0.0, 0.0] and var[~ok].tolist() == [0.0, 0.0]
    assert np.all(var[ok] == 2.0)


def test_cut_stamp_beyond_the_cutout_edge_is_invalid_and_off_cutout_objects_fail():
    cut = _cutout()
    ra, dec = (float(v) for v in cut.wcs.pixel_to_world_values(1.2, 2.3))
    image, _, valid, offset = cut_stamp(cut, ra, dec, 16, (), "mem")
    np.testing.assert_allclose(offset, (-0.2, -0.3), atol=1e-6)
    # edge coords (2.8, 1.7): corner (-5, -6): rows 0..4 and columns 0..5 lie outside
    assert not valid[:5].any() and not valid[:, :6].any()
    np.testing.assert_array_equal(image[5:, 6:], cut.image[0:11, 0:10])
    far_ra, far_dec = (float(v) for v in cut.wcs.pixel_to_world_values(80.0, 2.0))
    with pytest.raises(ValueError, match="outside the 40x50 cutout"):
        cut_stamp(cut, far_ra, far_dec, 16, (), "mem")


def test_stager_cuts_stamps_that_match_the_files_and_the_truth(tiny_survey):
    cat, rows = _rows(tiny_survey)
    truth = pq.read_table(tiny_survey / "truth.parquet").to_pandas().set_index("object_id")
    stager = _stager(tiny_survey)
    objs = stager.stage_rows(rows, threads=4)
    assert [o.ident[Col.OBJECT_ID] for o in objs] == [r[Col.OBJECT_ID] for r in rows]
    checked = 0
    for o, row in zip(objs, rows):
        assert o.error is None, o.error
        assert o.stamp_size in StagingConfig().stamp_sizes
        assert o.stamp_size >= math.ceil(o.footprint) + 2 * StagingConfig().psf_margin
        assert max(abs(v) for v in o.offset) <= 0.5
        t = truth.loc[row[Col.OBJECT_ID]]
        # the mock put the object at offset (t.offset_y, t.offset_x) from its cutout's centre
        for staged, true in zip(o.offset, (t.offset_y, t.offset_x)):
            assert (staged - true) % 1.0 == pytest.approx(0.0, abs=1e-6) or (
                staged - true
            ) % 1.0 == pytest.approx(1.0, abs=1e-6)
        assert o.scale == pytest.approx(o.footprint / TINY_PRIOR.image_size)
        assert o.arrays[IMAGE].shape == (3, o.stamp_size, o.stamp_size)
        np.testing.assert_allclose(o.arrays[PSF].sum((1, 2)), 1.0, rtol=1e-5)
        assert o.masked_fraction == pytest.approx(1.0 - o.arrays[VALID].mean())
        # the stamp's central pixel is the cutout pixel holding the object
        cut = read_hsc_cutout(str(tiny_survey / row[cutout_column("i")]))
        px, py = cut.wcs.world_to_pixel_values(row[Col.RA], row[Col.DEC])
        h = o.stamp_size // 2
        iy, ix = math.floor(py + 0.5), math.floor(px + 0.5)
        sy, sx = (h - 1 if o.offset[0] < 0 else h), (h - 1 if o.offset[1] < 0 else h)
        if o.arrays[VALID][2, sy, sx]:  # (unless a cosmic ray hit it)
            assert o.arrays[IMAGE][2, sy, sx] == cut.image[iy, ix]
            assert o.arrays[VARIANCE][2, sy, sx] == cut.variance[iy, ix]
            checked += 1
    assert checked >= len(objs) - 1
    assert len(cat.partitions) >= 2


@pytest.fixture
def broken_copy(tiny_survey, tmp_path):
    root = tmp_path / "survey"
    shutil.copytree(tiny_survey, root)
    return root


def test_bad_input_becomes_an_error_record_naming_the_problem(broken_copy):
    root = broken_copy
    _, rows = _rows(root)
    stager = _stager(root)
    a, b, c, d, e, f, g = rows[:7]
    (root / a[cutout_column("g")]).unlink()  # missing cutout
    (root / b[cutout_column("r")]).write_bytes(b"SIMPLE  = T" + b"\0" * 100)  # corrupt FITS
    (root / c[psf_column("i")]).unlink()  # missing PSF
    d[Col.PHOTOZ] = math.nan  # missing photo-z
    cut = read_hsc_cutout(str(root / e[cutout_column("i")]))
    bad = np.full(cut.mask.shape, 1 << HSC_MASK_PLANES["BAD"], np.int32)
    write_hsc_cutout(str(root / e[cutout_column("i")]), cut.image, bad, cut.variance, cut.wcs)
    write_psf(str(root / f[psf_column("g")]), np.ones((41, 41)) / 41**2)  # wrong shape
    g[Col.RA] += 1.0  # the object is not on its cutouts
    objs = [stager.stage(r) for r in (a, b, c, d, e, f, g)]
    msgs = [o.error for o in objs]
    assert "cannot open" in msgs[0] and a[cutout_column("g")].split("/")[-1] in msgs[0]
    assert "not a readable FITS file" in msgs[1] or "truncated" in msgs[1]
    assert msgs[2].startswith("PSF i:")
    assert np.isnan(objs[2].psf_sum[2]) and np.all(np.isfinite(objs[2].psf_sum[:2]))
    assert "photo-z nan" in msgs[3]
    assert "no usable pixel" in msgs[4]
    assert "PSF must be 43x43" in msgs[5]
    assert "outside the" in msgs[6]
    assert all(o.arrays == {} or o.error for o in objs)
    # the good rows are unaffected
    assert all(o.error is None for o in stager.stage_rows(rows[7:], threads=2))


def test_packs_group_by_stamp_size_and_round_trip_through_parquet(tiny_survey):
    _, rows = _rows(tiny_survey)
    rows[0] = dict(rows[0], **{Col.PHOTOZ: -1.0})
    objs = _stager(tiny_survey).stage_rows(rows, threads=4)
    packs = make_packs(objs, pack_size=2)
    errors = [p for p in packs if p["kind"] == KIND_ERRORS]
    assert len(errors) == 1 and errors[0]["n_objects"] == 1
    staged = {o.ident[Col.OBJECT_ID]: o for o in objs if o.error is None}
    seen = []
    for p in packs:
        table = pack_from_bytes(p["pack"])
        assert table.num_rows == p["n_objects"]
        ids = table[Col.OBJECT_ID].to_pylist()
        assert p["pack_id"] == pack_id(ids[::-1])
        seen += ids
        if p["kind"] != KIND_OBJECTS:
            assert IMAGE not in table.column_names
            continue
        assert 1 <= p["n_objects"] <= 2
        arrays = pack_arrays(table)
        for k, oid in enumerate(ids):
            o = staged[oid]
            assert o.stamp_size == p["stamp_size"]
            for name in (IMAGE, VARIANCE, VALID, PSF):
                np.testing.assert_array_equal(arrays[name][k], o.arrays[name])
            np.testing.assert_array_equal(arrays[OFFSET][k], o.offset)
    assert sorted(seen) == sorted(r[Col.OBJECT_ID] for r in rows)
