from __future__ import annotations

import io
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from d4a_batch.config import ColumnMap, PhysicsConfig, StagingConfig
from d4a_batch.quality.detection_image import footprint_box
from d4a_batch.schema import Col, Flag
from d4a_batch.survey.fits_io import (
    HSC_MASK_PLANES,
    HSCCutout,
    hsc_tan_wcs,
    read_hsc_cutout,
    write_psf,
)
from d4a_batch.survey.hats_io import cutout_column, open_input_catalog, psf_column, read_partition
from d4a_batch.survey.packs import (
    IMAGE,
    KIND_ERRORS,
    KIND_OBJECTS,
    OFFSET,
    PSF,
    VALID,
    VARIANCE,
    make_packs,
    pack_arrays,
    pack_from_bytes,
    pack_id,
)
from d4a_batch.survey.staging import Stager, cut_stamp, footprint_masked_fraction, stamp_size
from d4a_batch.testing import TINY_PRIOR

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


def test_masked_fraction_counts_bad_pixels_of_the_footprint_only():
    """MASKED_FRACTION_HIGH's input: unusable pixels inside the model footprint, all bands;
    bad pixels outside the footprint (and neighbour masking, applied later) do not count."""
    valid = np.ones((3, 32, 32), bool)
    valid[:, :6, :] = False  # a bad stripe along the stamp edge, outside a 16-px footprint
    assert footprint_masked_fraction(valid, (0.0, 0.0), 16.0) == 0.0
    valid[1, 12:20, 8:24] = False  # 8 x 16 of the 16 x 16 footprint, in one band of three
    assert footprint_masked_fraction(valid, (0.0, 0.0), 16.0) == pytest.approx(0.5 / 3)
    assert footprint_masked_fraction(valid, (0.0, 0.0), 0.0) == pytest.approx(1 - valid.mean())


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
        # the footprint's unusable pixels, neighbour masking not counted
        box = footprint_box(o.arrays[VALID].shape[1:], o.offset, o.footprint)
        valid = o.arrays[VALID].astype(bool)
        nb = o.sources.neighbour_mask if o.sources is not None else np.zeros_like(box)
        assert 1.0 - (valid | nb)[:, box].mean() <= o.masked_fraction + 1e-12
        assert o.masked_fraction <= 1.0 - valid[:, box].mean() + 1e-12
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


# --------------------------------------------------------------------------- bad inputs
@dataclass(frozen=True)
class BadInput:
    """One kind of bad input: the band it hits, the status message (a regex, ``{file}``
    standing for the broken file; None: status ok), the flags it must raise and, for
    status ok, a regex for its flag reasons."""

    band: str | None
    message: str | None
    flags: Flag
    reason: str | None = None

    def message_regex(self, row: dict[str, Any]) -> str:
        column = psf_column if self.message.startswith("PSF") else cutout_column
        file = r"\S*" + re.escape(row[column(self.band)]) if self.band else ""
        return self.message.replace("{file}", file)


PSF_SCALE, PSF_SHIFT = 1.7, 3
STAMP_NOT_USABLE = (
    r"no usable pixel in the (\d+)x\1 stamp \((\d+) px: (\d+ masked \([A-Z_, ]+\), )?"
)
ERR, PSF_ERR, Z_ERR = (
    Flag.INPUT_ERROR,
    Flag.INPUT_ERROR | Flag.PSF_BAD,
    Flag.INPUT_ERROR | Flag.PHOTOZ_BAD,
)
BAD_INPUTS: dict[str, BadInput] = {
    "missing_cutout": BadInput("g", r"cutout g: {file}: cannot open: file not found", ERR),
    "corrupt_fits": BadInput(
        "r", r"cutout r: {file}: not a readable FITS file \(OSError: No SIMPLE card found.*\)", ERR
    ),
    "truncated_fits": BadInput(
        "i", r"cutout i: {file}: truncated FITS file of \d+ bytes \(.*truncated.*\)", ERR
    ),
    "image_1d": BadInput("g", r"cutout g: {file}: IMAGE has shape \(4096,\) \(expected 2-D\)", ERR),
    "image_3d": BadInput(
        "r", r"cutout r: {file}: IMAGE has shape \(2, 64, 64\) \(expected 2-D\)", ERR
    ),
    "image_int16": BadInput(
        "i", r"cutout i: {file}: IMAGE has dtype int16 \(expected floating-point\)", ERR
    ),
    "image_strings": BadInput(
        "g",
        r"cutout g: {file}: IMAGE is a table \(BinTableHDU\), expected a 2-D floating-point image",
        ERR,
    ),
    "all_nan": BadInput(
        "r", rf"cutout r: {{file}}: {STAMP_NOT_USABLE}\2 with non-finite IMAGE\)", ERR
    ),
    "all_masked": BadInput(
        "i",
        r"cutout i: {file}: no usable pixel in the (\d+)x\1 stamp \((\d+) px: "
        r"\2 masked \(BAD[A-Z_, ]*, NO_DATA[A-Z_, ]*\)\)",
        ERR,
    ),
    "variance_not_positive": BadInput(
        "g", rf"cutout g: {{file}}: {STAMP_NOT_USABLE}\2 with VARIANCE <= 0\)", ERR
    ),
    "missing_psf": BadInput("r", r"PSF r: {file}: cannot open: file not found", PSF_ERR),
    "psf_not_normalised": BadInput(
        "g", None, Flag.PSF_BAD, rf"PSF_BAD: g: PSF sum {PSF_SCALE} renormalised to 1"
    ),
    "psf_off_centre": BadInput(
        "i", None, Flag.PSF_BAD, rf"PSF_BAD: i: PSF centroid {PSF_SHIFT}(\.\d+)? px off centre"
    ),
    "photoz_null": BadInput(None, r"photo-z: missing \(null or NaN\)", Z_ERR),
    "photoz_nan": BadInput(None, r"photo-z: missing \(null or NaN\)", Z_ERR),
    "photoz_negative": BadInput(None, r"photo-z: -0\.3 is not positive", Z_ERR),
}


def _rewrite_fits(path: Path, edit: Callable[[fits.HDUList], None]) -> None:
    """Apply ``edit`` to the HDUs of a FITS file and write it back."""
    hdul = fits.open(io.BytesIO(path.read_bytes()), memmap=False)
    edit(hdul)
    hdul.writeto(path, overwrite=True)


def _edit_cutout(hdul: fits.HDUList, case: str) -> None:
    """Break a cutout's HDUs in place (HDU1 is IMAGE)."""
    image, header = hdul[1].data, hdul[1].header
    if case == "image_1d":
        hdul[1] = fits.ImageHDU(image.ravel(), header=header, name="IMAGE")
    elif case == "image_3d":
        hdul[1] = fits.ImageHDU(np.stack([image, image]), header=header, name="IMAGE")
    elif case == "image_int16":
        hdul[1].data = np.round(image * 100).astype(np.int16)
    elif case == "image_strings":
        h, w = image.shape
        col = fits.Column(name="pixels", format=f"{w}A", array=np.array(["x" * w] * h))
        hdul[1] = fits.BinTableHDU.from_columns([col], name="IMAGE")
    elif case == "all_nan":
        hdul[1].data = np.full_like(image, np.nan)
    elif case == "all_masked":
        hdul["MASK"].data |= (1 << HSC_MASK_PLANES["BAD"]) | (1 << HSC_MASK_PLANES["NO_DATA"])
    elif case == "variance_not_positive":
        var = hdul["VARIANCE"].data
        var[:, : var.shape[1] // 2] = 0.0
        var[:, var.shape[1] // 2 :] = -1.0
    else:
        raise ValueError(case)


def _set_photoz(root: Path, object_id: int, z: float | None) -> None:
    """Set one object's photo-z (None: null) in its partition file."""
    column = ColumnMap().photoz
    for part in open_input_catalog(str(root)).partitions:
        t = pq.read_table(part.uri)
        hit = pc.equal(t[ColumnMap().object_id], object_id)
        if pc.any(hit).as_py():
            col = pc.if_else(hit, pa.scalar(z, pa.float64()), t[column])
            pq.write_table(t.set_column(t.schema.get_field_index(column), column, col), part.uri)


def break_object(root: Path, row: dict[str, Any], case: str) -> None:
    """Break one object (a ``read_partition`` row) of a survey copy as ``BAD_INPUTS[case]`` says."""
    band = BAD_INPUTS[case].band
    cutout = root / row[cutout_column(band)] if band else None
    psf = root / row[psf_column(band)] if band else None
    if case == "missing_cutout":
        cutout.unlink()
    elif case == "corrupt_fits":
        cutout.write_bytes(b"not a FITS file at all\n" * 200)
    elif case == "truncated_fits":
        data = cutout.read_bytes()
        cutout.write_bytes(data[: len(data) // 2])
    elif case == "missing_psf":
        psf.unlink()
    elif case == "psf_not_normalised":
        _rewrite_fits(psf, lambda h: setattr(h[0], "data", h[0].data * PSF_SCALE))
    elif case == "psf_off_centre":
        _rewrite_fits(psf, lambda h: setattr(h[0], "data", np.roll(h[0].data, PSF_SHIFT, 0)))
    elif case.startswith("photoz_"):
        z = {"photoz_null": None, "photoz_nan": math.nan, "photoz_negative": -0.3}[case]
        _set_photoz(root, row[Col.OBJECT_ID], z)
    else:
        _rewrite_fits(cutout, lambda h: _edit_cutout(h, case))


@pytest.fixture
def survey_copy(tiny_survey, tmp_path):
    root = tmp_path / "survey"
    shutil.copytree(tiny_survey, root)
    return root


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_each_bad_input_fails_or_flags_only_its_object(case, tiny_survey, survey_copy):
    """The broken object gets a precise message (or a flaggable PSF), the others are untouched."""
    _, clean_rows = _rows(tiny_survey)
    k = 3  # the object to break
    break_object(survey_copy, clean_rows[k], case)
    _, rows = _rows(survey_copy)
    assert [r[Col.OBJECT_ID] for r in rows] == [r[Col.OBJECT_ID] for r in clean_rows]
    objs = _stager(survey_copy).stage_rows(rows, threads=2)
    clean = _stager(tiny_survey).stage(clean_rows[k])
    bad, spec = objs[k], BAD_INPUTS[case]
    assert all(o.error is None for i, o in enumerate(objs) if i != k)
    if spec.message is None:
        assert bad.error is None and bad.arrays[IMAGE].shape == clean.arrays[IMAGE].shape
        c = BANDS.index(spec.band)
        np.testing.assert_allclose(bad.arrays[PSF].sum((1, 2)), 1.0, rtol=1e-5)
        if case == "psf_not_normalised":  # renormalised: the same PSF as before, stored sum kept
            assert bad.psf_sum[c] == pytest.approx(PSF_SCALE * clean.psf_sum[c], rel=1e-12)
            np.testing.assert_allclose(bad.arrays[PSF], clean.arrays[PSF], rtol=1e-6)
        else:  # kept as it is, off centre by the shift
            np.testing.assert_array_equal(
                bad.arrays[PSF][c], np.roll(clean.arrays[PSF][c], PSF_SHIFT, axis=0)
            )
            assert bad.psf_centroid[c] == pytest.approx(PSF_SHIFT, abs=0.1)
            assert clean.psf_centroid[c] < 0.1
        return
    assert re.fullmatch(spec.message_regex(clean_rows[k]), bad.error), bad.error
    assert bad.arrays == {} and math.isnan(bad.masked_fraction)
    missing = np.array([b == spec.band and case == "missing_psf" for b in BANDS])
    assert np.array_equal(np.isnan(bad.psf_sum), missing)  # PSFs are read before cutouts
    np.testing.assert_allclose(bad.psf_sum[~missing], clean.psf_sum[~missing])


def test_stager_reports_every_broken_band_and_other_problems(survey_copy):
    _, rows = _rows(survey_copy)
    a, b, c = rows[:3]
    (survey_copy / a[cutout_column("g")]).unlink()
    (survey_copy / a[cutout_column("i")]).write_bytes(b"junk" * 1000)
    write_psf(str(survey_copy / b[psf_column("g")]), np.ones((42, 42)) / 42**2)
    (survey_copy / b[psf_column("i")]).unlink()
    c[Col.RA] += 1.0  # the object is not on its cutouts
    stager = _stager(survey_copy)
    msgs = [stager.stage(r).error for r in (a, b, c)]
    one, two = msgs[0].split("; ")
    assert one.startswith("cutout g: ") and "file not found" in one
    assert two.startswith("cutout i: ") and "not a readable FITS file" in two
    one, two = msgs[1].split("; ")
    assert one.startswith("PSF g: ") and one.endswith(
        "PSF side must be odd (centre pixel P//2), got shape (42, 42)"
    )
    assert two.startswith("PSF i: ") and two.endswith("cannot open: file not found")
    assert all(f"cutout {x}: " in msgs[2] and "lies outside the 64x64 cutout" in msgs[2]
               for x in BANDS)  # fmt: skip
    # no URI, a photo-z of the wrong type: error records, never an exception
    no_uri = stager.stage(dict(rows[3], **{psf_column("r"): None})).error
    assert no_uri == f"PSF r: {psf_column('r')}: no URI in the catalog"
    assert stager.stage(dict(rows[3], **{Col.PHOTOZ: "0.5"})).error.startswith(
        "unexpected TypeError"
    )
    assert (
        stager.stage(dict(rows[3], **{Col.PHOTOZ: math.inf})).error == "photo-z: inf is not finite"
    )


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
