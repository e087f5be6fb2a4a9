from __future__ import annotations

import io
import pickle
import uuid

import fsspec
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs.utils import proj_plane_pixel_scales

from d4a_batch.survey.fits_io import (
    HSC_MASK_PLANES,
    InputError,
    hsc_tan_wcs,
    mask_to_valid,
    read_hsc_cutout,
    read_psf,
    write_hsc_cutout,
    write_psf,
)

RA, DEC = 150.1, 2.2


@pytest.fixture
def arrays(rng):
    shape = (40, 36)
    image = rng.normal(0, 1, shape).astype(np.float32)
    mask = np.zeros(shape, np.int32)
    mask[3, 4] = 1 << HSC_MASK_PLANES["SAT"]
    mask[10:14, 20] = (1 << HSC_MASK_PLANES["DETECTED"]) | (1 << HSC_MASK_PLANES["INEXACT_PSF"])
    mask[0, :] = 1 << HSC_MASK_PLANES["EDGE"]
    variance = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return image, mask, variance


def _gaussian_psf(p: int, centre: tuple[float, float], sigma: float = 2.0) -> np.ndarray:
    y, x = np.indices((p, p))
    return np.exp(-0.5 * ((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / sigma**2)


def _hdul_bytes(hdus) -> bytes:
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


# --------------------------------------------------------------------------- cutouts
def test_cutout_round_trip(arrays, tmp_path):
    image, mask, variance = arrays
    uri = str(tmp_path / "deep" / "dir" / "cutout.fits")  # parent folders are created
    write_hsc_cutout(uri, image, mask, variance, hsc_tan_wcs(RA, DEC, image.shape))
    cut = read_hsc_cutout(uri)
    np.testing.assert_array_equal(cut.image, image)
    np.testing.assert_array_equal(cut.mask, mask)
    np.testing.assert_array_equal(cut.variance, variance)
    for arr, dtype in ((cut.image, np.float32), (cut.mask, np.int32), (cut.variance, np.float32)):
        assert arr.dtype == dtype and arr.dtype.isnative
    assert cut.mask_planes == HSC_MASK_PLANES
    assert cut.zeropoint == pytest.approx(27.0, abs=1e-12)
    assert cut.header["EXTTYPE"] == "IMAGE"
    # WCS: (ra, dec) at the stamp centre (H/2, W/2 in edge coordinates), 0.168"/pixel
    px, py = cut.wcs.world_to_pixel_values(RA, DEC)
    assert (py, px) == pytest.approx((image.shape[0] / 2 - 0.5, image.shape[1] / 2 - 0.5), abs=1e-9)
    np.testing.assert_allclose(proj_plane_pixel_scales(cut.wcs) * 3600, 0.168, rtol=1e-12)
    # the layout of a cutout-service file
    with fits.open(uri) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
        assert hdul[0].data is None
        assert hdul[2].header["MP_DETECTED"] == 5
        assert hdul[0].header["FLUXMAG0"] == pytest.approx(10 ** (0.4 * 27.0))
    valid = cut.valid(["SAT", "EDGE", "NO_DATA"])
    assert valid.sum() == valid.size - 1 - image.shape[1]
    assert valid[12, 20]  # DETECTED and INEXACT_PSF are not bad here


def test_custom_planes_zeropoint_and_invalid_pixels(arrays, tmp_path):
    image, mask, variance = arrays
    planes = {"BAD": 0, "DETECTED": 5, "A_VERY_LONG_PLANE_NAME": 20}
    mask = mask.copy()
    mask[7, 7] = 1 << 20
    image = image.copy()
    image[1, 1] = np.nan
    variance = variance.copy()
    variance[2, 2] = 0.0
    uri = str(tmp_path / "c.fits")
    write_hsc_cutout(
        uri, image, mask, variance, hsc_tan_wcs(RA, DEC, image.shape), planes, zeropoint=31.4
    )
    cut = read_hsc_cutout(uri)
    assert cut.mask_planes == planes
    assert cut.zeropoint == pytest.approx(31.4, abs=1e-12)
    valid = cut.valid(["BAD", "A_VERY_LONG_PLANE_NAME", "NOT_IN_THIS_FILE"])
    assert not valid[7, 7] and not valid[1, 1] and not valid[2, 2]
    assert valid.sum() == valid.size - 3


def test_reads_real_hsc_pixels_in_a_service_layout(shared_data, tmp_path):
    """Real HSC i-band cutout (scarlet's COSMOS data) as the service lays it out: no FLUXMAG0,
    EXTNAMEs, long MP_ names as HIERARCH cards, and an extra trailing HDU."""
    data = np.load(shared_data / "scarlet" / "hsc_cosmos_35.npz")
    i = list(data["filters"]).index("i")
    image, mask, variance = data["images"][i], data["mask"][i], data["variance"][i]
    mask_header = fits.Header()
    for name, bit in HSC_MASK_PLANES.items():
        mask_header[f"HIERARCH MP_{name}"] = bit
    hdus = [
        fits.PrimaryHDU(),
        fits.ImageHDU(image, header=hsc_tan_wcs(RA, DEC, image.shape).to_header(), name="IMAGE"),
        fits.ImageHDU(mask, header=mask_header, name="MASK"),
        fits.ImageHDU(variance, name="VARIANCE"),
        fits.BinTableHDU.from_columns([fits.Column("x", "E", array=np.zeros(2))], name="PSF_INFO"),
    ]
    uri = tmp_path / "real.fits"
    uri.write_bytes(_hdul_bytes(hdus))
    cut = read_hsc_cutout(str(uri))
    np.testing.assert_array_equal(cut.image, image)
    np.testing.assert_array_equal(cut.mask, mask)
    assert cut.zeropoint == 27.0 and cut.mask_planes["DETECTED_NEGATIVE"] == 6
    detected = ~mask_to_valid(cut.mask, cut.mask_planes, ["DETECTED"])
    np.testing.assert_array_equal(detected, (mask & 32) != 0)
    assert 0 < detected.mean() < 1


def test_mask_to_valid():
    planes = {"BAD": 0, "SAT": 1, "CR": 3}
    mask = np.array([[0, 1, 2], [4, 8, 9]], np.int32)
    np.testing.assert_array_equal(
        mask_to_valid(mask, planes, ["BAD", "CR", "ABSENT"]),
        [[True, False, True], [True, False, False]],
    )
    assert mask_to_valid(mask, planes, []).all()
    with pytest.raises(ValueError, match="integer"):
        mask_to_valid(mask.astype(float), planes, ["BAD"])


def test_fsspec_memory_filesystem(arrays):
    image, mask, variance = arrays
    mem = fsspec.filesystem("memory")
    name = uuid.uuid4().hex
    uri = f"memory://d4a-test/{name}/cutout.fits"
    try:
        write_hsc_cutout(uri, image, mask, variance, hsc_tan_wcs(RA, DEC, image.shape))
        write_psf(f"memory://d4a-test/{name}/psf.fits", _gaussian_psf(43, (21, 21)))
        assert mem.exists(f"/d4a-test/{name}/cutout.fits")
        np.testing.assert_array_equal(read_hsc_cutout(uri).image, image)
        # an explicit filesystem object with a plain path
        assert read_psf(f"/d4a-test/{name}/psf.fits", fs=mem).array.shape == (43, 43)
        with pytest.raises(InputError, match="cannot open"):
            read_hsc_cutout(f"memory://d4a-test/{name}/absent.fits")
    finally:
        mem.rm(f"/d4a-test/{name}", recursive=True)


# --------------------------------------------------------------------------- PSFs
def test_psf_round_trip_normalised_with_report(tmp_path):
    psf = 1.05 * _gaussian_psf(43, (21.4, 20.7))
    psf /= psf.sum() / 1.05
    uri = str(tmp_path / "psf.fits")
    write_psf(uri, psf)
    out = read_psf(uri)
    assert out.array.dtype == np.float64 and out.array.shape == (43, 43)
    assert out.array.sum() == pytest.approx(1.0, abs=1e-12)
    assert out.raw_sum == pytest.approx(1.05, rel=1e-12)
    assert out.centroid_offset == pytest.approx((0.4, -0.3), abs=1e-5)
    np.testing.assert_allclose(out.array, psf / psf.sum(), rtol=1e-15)
    with fits.open(uri) as hdul:
        assert len(hdul) == 1 and hdul[0].data.shape == (43, 43)


def test_real_hsc_psf(shared_data, tmp_path):
    psfs = np.load(shared_data / "scarlet" / "hsc_cosmos_35.npz")["psfs"]
    uri = str(tmp_path / "psf_i.fits")
    write_psf(uri, psfs[2])
    out = read_psf(uri)
    assert abs(out.raw_sum - 1) < 1e-12
    assert np.hypot(*out.centroid_offset) < 0.1  # a well-centred real PSF
    # another PSF-picker size is accepted when asked for
    small = np.load(shared_data / "scarlet" / "hsc_cosmos.npz")["psfs"][2]
    write_psf(uri, small)
    assert read_psf(uri, size=None).array.shape == (41, 41)
    with pytest.raises(InputError, match="43x43"):
        read_psf(uri)


# --------------------------------------------------------------------------- malformed files
def _good_cutout_hdus(image_shape=(20, 20)):
    image = np.zeros(image_shape, np.float32)
    mask_header = fits.Header()
    mask_header["MP_BAD"] = 0
    return [
        fits.PrimaryHDU(),
        fits.ImageHDU(image, header=hsc_tan_wcs(RA, DEC, image_shape).to_header(), name="IMAGE"),
        fits.ImageHDU(np.zeros(image_shape, np.int32), header=mask_header, name="MASK"),
        fits.ImageHDU(np.ones(image_shape, np.float32), name="VARIANCE"),
    ]


def _cutout_case(case: str) -> bytes:
    hdus = _good_cutout_hdus()
    if case == "no_mask":
        del hdus[2]
    elif case == "no_variance":
        del hdus[3]
    elif case == "cut_after_image":
        hdus = hdus[:2]
    elif case == "empty_mask":
        hdus[2] = fits.ImageHDU(None, header=hdus[2].header, name="MASK")
    elif case == "empty_variance":
        hdus[3] = fits.ImageHDU(None, name="VARIANCE")
    elif case == "image_only":
        hdus[2] = fits.ImageHDU(None, header=hdus[2].header, name="MASK")
        hdus[3] = fits.ImageHDU(None, name="VARIANCE")
    elif case == "only_primary":
        hdus = hdus[:1]
    elif case == "variance_shape":
        hdus[3] = fits.ImageHDU(np.ones((20, 19), np.float32), name="VARIANCE")
    elif case == "image_3d":
        hdus[1] = fits.ImageHDU(
            np.zeros((2, 20, 20), np.float32), header=hdus[1].header, name="IMAGE"
        )
    elif case == "image_1d":
        hdus[1] = fits.ImageHDU(np.zeros(400, np.float32), header=hdus[1].header, name="IMAGE")
    elif case == "image_int16":
        hdus[1] = fits.ImageHDU(np.zeros((20, 20), np.int16), header=hdus[1].header, name="IMAGE")
    elif case == "image_table":
        col = fits.Column(name="pixels", format="20A", array=np.array(["x" * 20] * 20))
        hdus[1] = fits.BinTableHDU.from_columns([col], name="IMAGE")
    elif case == "variance_int":
        hdus[3] = fits.ImageHDU(np.ones((20, 20), np.int32), name="VARIANCE")
    elif case == "image_empty":
        hdus[1] = fits.ImageHDU(None, header=hdus[1].header, name="IMAGE")
    elif case == "float_mask":
        hdus[2] = fits.ImageHDU(np.zeros((20, 20), np.float32), name="MASK")
    elif case == "mask_bit":
        hdus[2].header["MP_SAT"] = 40
    elif case == "mask_dup":
        hdus[2].header["MP_SAT"] = 0
    elif case == "no_wcs":
        hdus[1] = fits.ImageHDU(np.zeros((20, 20), np.float32), name="IMAGE")
    elif case == "fluxmag0":
        hdus[0].header["FLUXMAG0"] = -1.0
    return _hdul_bytes(hdus)


_GOOD = _hdul_bytes(_good_cutout_hdus())

CUTOUT_CASES = {
    "not_fits": (b"this is not a FITS file\n" * 200, "not a readable FITS"),
    "empty": (b"", "empty file"),
    "only_primary": (None, "missing HDU IMAGE"),
    "variance_shape": (None, "VARIANCE has shape (20, 19)"),
    "image_1d": (None, "IMAGE has shape (400,) (expected 2-D)"),
    "image_3d": (None, "IMAGE has shape (2, 20, 20) (expected 2-D)"),
    "image_int16": (None, "IMAGE has dtype int16 (expected floating-point)"),
    "image_table": (None, "IMAGE is a table (BinTableHDU), expected a 2-D floating-point image"),
    "variance_int": (None, "VARIANCE has dtype int32 (expected floating-point)"),
    "image_empty": (None, "IMAGE has no data (expected a 2-D image)"),
    "float_mask": (None, "MASK has dtype float32 (expected integer bit planes)"),
    "mask_bit": (None, "MP_SAT = 40"),
    "mask_dup": (None, "reuses bit 0"),
    "no_wcs": (None, "no celestial WCS"),
    "fluxmag0": (None, "invalid FLUXMAG0"),
    "truncated_data": (_GOOD[:-2880], f"truncated FITS file of {len(_GOOD) - 2880} bytes"),
    "truncated_tail": (_GOOD[:-100], "truncated"),
    "truncated_header": (_GOOD[:5000], "not a readable FITS"),
    # cut exactly at an HDU boundary: a valid FITS file without its last HDUs (issue 28)
    "no_variance": (None, "the file ends after HDU2 (MASK), without VARIANCE"),
    "cut_after_image": (None, "the file ends after HDU1 (IMAGE), without MASK and VARIANCE"),
}


@pytest.mark.parametrize("case", list(CUTOUT_CASES))
def test_malformed_cutout_raises_input_error(case, tmp_path):
    data, what = CUTOUT_CASES[case]
    path = tmp_path / f"{case}.fits"
    path.write_bytes(_cutout_case(case) if data is None else data)
    with pytest.raises(InputError) as err:
        read_hsc_cutout(str(path))
    assert isinstance(err.value, ValueError)
    assert err.value.uri == str(path) and str(err.value).startswith(f"{path}: ")
    assert what in str(err.value)


@pytest.mark.parametrize(
    ("case", "missing"),
    [
        ("no_mask", ("MASK",)),
        ("empty_mask", ("MASK",)),
        ("empty_variance", ("VARIANCE",)),
        ("image_only", ("MASK", "VARIANCE")),
    ],
)
def test_empty_or_absent_mask_and_variance_are_read_as_missing(case, missing, tmp_path):
    """Image-only cutouts (issue 11): an empty MASK / VARIANCE or an absent MASK is not an
    error; the reader says which plane is missing (MASK: zeros, VARIANCE: NaN until
    estimated). An absent VARIANCE is a file cut at an HDU boundary (``CUTOUT_CASES``)."""
    path = tmp_path / f"{case}.fits"
    path.write_bytes(_cutout_case(case))
    good = read_hsc_cutout(_good_path(tmp_path))
    cut = read_hsc_cutout(str(path))
    assert cut.missing == missing and good.missing == ()
    np.testing.assert_array_equal(cut.image, good.image)
    if "MASK" in missing:
        assert cut.mask.dtype == np.int32 and not cut.mask.any()
    else:
        np.testing.assert_array_equal(cut.mask, good.mask)
    if "VARIANCE" in missing:
        assert np.isnan(cut.variance).all() and not cut.valid([]).any()
    else:
        np.testing.assert_array_equal(cut.variance, good.variance)


def _good_path(tmp_path) -> str:
    path = tmp_path / "good.fits"
    path.write_bytes(_GOOD)
    return str(path)


def test_missing_file(tmp_path):
    path = str(tmp_path / "absent.fits")
    with pytest.raises(InputError, match=r"absent\.fits: cannot open: file not found$"):
        read_hsc_cutout(path)
    with pytest.raises(InputError, match=r"absent\.fits: cannot open: file not found$"):
        read_psf(path)


def test_scaled_integer_image_and_odd_extname_are_read(tmp_path):
    """BSCALE/BZERO int16 pixels are floats once read; a non-string EXTNAME is not an error."""
    hdus = _good_cutout_hdus()
    image = np.arange(400, dtype=np.float32).reshape(20, 20) * 0.5 - 3.0
    hdus[1] = fits.ImageHDU(image.copy(), header=hdus[1].header, name="IMAGE")
    hdus[1].scale("int16", bscale=0.5, bzero=-3.0)
    extra = fits.ImageHDU(np.zeros((2, 2), np.float32))
    extra.header["EXTNAME"] = 7
    buf = io.BytesIO()
    fits.HDUList([*hdus, extra]).writeto(buf, output_verify="ignore")
    path = tmp_path / "scaled.fits"
    path.write_bytes(buf.getvalue())
    cut = read_hsc_cutout(str(path))
    assert cut.image.dtype == np.float32
    np.testing.assert_array_equal(cut.image, image)


PSF_CASES = {
    "wrong_size": (np.ones((41, 41)), "PSF must be 43x43, got shape (41, 41)"),
    "not_square": (np.ones((43, 41)), "PSF must be 43x43"),
    "nan": (np.where(np.eye(43) > 0, np.nan, 1.0), "43 non-finite pixels"),
    "zero_sum": (np.zeros((43, 43)), "PSF sums to 0.0"),
    "cancelling": (
        np.outer(np.hanning(43), np.hanning(43)) - np.hanning(43).sum() ** 2 / 43**2 + 1e-6,
        "about 0 against the",
    ),
    "cube": (np.ones((2, 43, 43)), "PRIMARY has shape (2, 43, 43) (expected 2-D)"),
}


@pytest.mark.parametrize("case", list(PSF_CASES))
def test_malformed_psf_raises_input_error(case, tmp_path):
    data, what = PSF_CASES[case]
    path = tmp_path / f"{case}.fits"
    path.write_bytes(_hdul_bytes([fits.PrimaryHDU(data)]))
    with pytest.raises(InputError) as err:
        read_psf(str(path))
    assert err.value.uri == str(path) and what in str(err.value)


def test_psf_in_an_extension_or_truncated_is_rejected(tmp_path):
    path = tmp_path / "ext.fits"
    path.write_bytes(_hdul_bytes([fits.PrimaryHDU(), fits.ImageHDU(np.ones((43, 43)))]))
    with pytest.raises(InputError, match=r"PRIMARY has no data \(expected a 2-D image\)"):
        read_psf(str(path))
    good = _hdul_bytes([fits.PrimaryHDU(np.ones((43, 43), np.float32))])
    path.write_bytes(good[: len(good) - 1000])
    with pytest.raises(InputError, match=r"truncated FITS file"):
        read_psf(str(path))


def test_input_error_pickles():
    err = pickle.loads(pickle.dumps(InputError("s3://b/x.fits", "missing HDU MASK")))
    assert (
        isinstance(err, InputError)
        and err.uri == "s3://b/x.fits"
        and err.what == "missing HDU MASK"
    )
    assert str(err) == "s3://b/x.fits: missing HDU MASK"


def test_writers_check_their_input(tmp_path):
    with pytest.raises(ValueError, match="share a 2-D shape"):
        write_hsc_cutout(
            str(tmp_path / "x.fits"),
            np.zeros((4, 4)),
            np.zeros((4, 5), np.int32),
            np.ones((4, 4)),
            hsc_tan_wcs(0, 0, (4, 4)),
        )
    with pytest.raises(ValueError, match="mask must be integer"):
        write_hsc_cutout(
            str(tmp_path / "x.fits"),
            np.zeros((4, 4)),
            np.zeros((4, 4)),
            np.ones((4, 4)),
            hsc_tan_wcs(0, 0, (4, 4)),
        )
    with pytest.raises(ValueError, match="2-D PSF"):
        write_psf(str(tmp_path / "p.fits"), np.ones(5))
