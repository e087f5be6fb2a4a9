"""HSC cutout-service and PSF-picker FITS files: readers, writers, mask helper.

Longer than 400 lines: one concern, the HSC FITS files the engine reads and the mocks
write: cutouts (IMAGE / MASK / VARIANCE HDUs, mask planes, zero point, the cutout
service's image-only files) and PSF-picker PSFs, reader beside writer so the two stay
symmetric, plus the mask-to-valid helper and the TAN WCS both use. The writers serve the
mock survey, the real-data checks and the tests; splitting them off would let the format
drift between the two sides.

Cutout (HSC cutout service, coadd): HDU0 empty primary (FLUXMAG0 = 10^(0.4 zp)),
HDU1 ``IMAGE`` (float32 counts at zero point 27 AB, celestial WCS), HDU2 ``MASK``
(int32 bit planes; header keywords ``MP_<NAME> = bit`` name them, long names as
HIERARCH cards), HDU3 ``VARIANCE`` (float32, counts²). The cutout service's "image
only" files keep the MASK and VARIANCE HDUs but empty (NAXIS = 0): an empty MASK or
VARIANCE, or an absent MASK, is not an error, ``HSCCutout.missing`` names it (MASK reads
as all zeros, VARIANCE as NaN until staging estimates it, ``survey/noise.py``); a file
without a VARIANCE HDU ends early (cut at an HDU boundary) and is. PSF (PSF picker): one
primary HDU holding a P×P image (43×43 for HSC). Everything goes through fsspec,
so local paths, ``memory://`` and ``s3://`` URLs work alike; a given ``fs`` takes
precedence over the URL's protocol. IMAGE and VARIANCE must be 2-D floating point
(BSCALE-scaled integers read as floats), MASK integer, the PSF real-valued. Any
problem with a file raises ``InputError`` naming the file and what is wrong.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import fsspec
import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning
from astropy.wcs import WCS, FITSFixedWarning
from fsspec.implementations.local import LocalFileSystem
from numpy.typing import ArrayLike, NDArray

HSC_ZEROPOINT = 27.0
HSC_PIXEL_ARCSEC = 0.168
PSF_SIZE = 43
# a PSF whose net sum is below this fraction of the sum of its absolute values is mostly
# cancelling positive and negative pixels (e.g. a background-subtracted or differenced
# image), not a PSF: renormalised to sum 1 it is noise scaled up by 1/sum (issue 28: a PSF
# summing to ~0 gave status ok with mag 65)
PSF_MIN_NET_FRACTION = 0.5

# Mask planes of HSC PDR3 coadds (bit numbers as in the MP_* keywords of real cutouts).
HSC_MASK_PLANES: dict[str, int] = {
    "BAD": 0,
    "SAT": 1,
    "INTRP": 2,
    "CR": 3,
    "EDGE": 4,
    "DETECTED": 5,
    "DETECTED_NEGATIVE": 6,
    "SUSPECT": 7,
    "NO_DATA": 8,
    "BRIGHT_OBJECT": 9,
    "CROSSTALK": 10,
    "NOT_DEBLENDED": 11,
    "UNMASKEDNAN": 12,
    "REJECTED": 13,
    "CLIPPED": 14,
    "SENSOR_EDGE": 15,
    "INEXACT_PSF": 16,
}


class InputError(ValueError):
    """A file that cannot be used: ``str(err) == f"{uri}: {what}"``. Pickles (crosses Ray)."""

    def __init__(self, uri: str, what: str) -> None:
        super().__init__(f"{uri}: {what}")
        self.uri = str(uri)
        self.what = what

    def __reduce__(self):
        return (type(self), (self.uri, self.what))


@dataclass
class HSCCutout:
    """One band of one cutout: image/variance float32 [H,W], mask int32 [H,W] (native byte order)."""

    image: NDArray[np.float32]
    mask: NDArray[np.int32]
    variance: NDArray[np.float32]
    mask_planes: dict[str, int]
    wcs: WCS
    header: fits.Header  # the IMAGE HDU's header
    zeropoint: float = HSC_ZEROPOINT  # AB zero point of the counts (from FLUXMAG0 when present)
    # planes the file did not hold ("MASK", "VARIANCE"): empty or absent HDUs. A missing MASK
    # reads as zeros (nothing masked), a missing VARIANCE as NaN (no pixel valid) until
    # ``with_estimated_noise`` fills it
    missing: tuple[str, ...] = ()

    def valid(self, bad_plane_names: Iterable[str]) -> NDArray[np.bool_]:
        """Usable pixels: no bad mask bit, finite image, finite variance > 0. [H, W] bool."""
        return (
            mask_to_valid(self.mask, self.mask_planes, bad_plane_names)
            & np.isfinite(self.image)
            & np.isfinite(self.variance)
            & (self.variance > 0)
        )


@dataclass
class PSFStamp:
    """A PSF read from a PSF-picker file, renormalised to sum 1, with what the caller needs to flag it.

    array: float64 [P, Q], sums to 1, centre pixel (P//2, Q//2); raw_sum: its sum as stored;
    centroid_offset: (dy, dx) of its flux centroid from the centre pixel, pixels.
    """

    array: NDArray[np.float64]
    raw_sum: float
    centroid_offset: tuple[float, float]


def mask_to_valid(
    mask: ArrayLike, planes: Mapping[str, int], bad_plane_names: Iterable[str]
) -> NDArray[np.bool_]:
    """True where none of the named bad planes' bits is set in ``mask``.

    ``planes`` maps plane names to bit numbers (``HSCCutout.mask_planes``); bad names the
    file does not define cannot be set in it and are ignored.
    """
    bits = 0
    for name in bad_plane_names:
        if name in planes:
            bits |= 1 << int(planes[name])
    m = np.asarray(mask)
    if not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"mask_to_valid: mask must be an integer array, got {m.dtype}")
    return (m.astype(np.int64) & bits) == 0


# --------------------------------------------------------------------------- plumbing
def _fs_path(
    uri: str, fs: fsspec.AbstractFileSystem | None
) -> tuple[fsspec.AbstractFileSystem, str]:
    if fs is not None:
        return fs, uri
    return fsspec.core.url_to_fs(uri)


def _read_hdus(uri: str, fs: fsspec.AbstractFileSystem | None) -> fits.HDUList:
    """Read the whole file and parse every HDU's header and data; problems -> InputError."""
    try:
        filesystem, path = _fs_path(uri, fs)
        with filesystem.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise InputError(uri, "cannot open: file not found") from e
    except Exception as e:  # unreachable storage: no such bucket, no credentials, no endpoint...
        raise InputError(uri, f"cannot open ({type(e).__name__}: {e})") from e
    if len(raw) == 0:
        raise InputError(uri, "empty file")
    try:
        with warnings.catch_warnings():
            # astropy only warns about truncated files and bad headers: make them errors
            warnings.simplefilter("error", AstropyUserWarning)
            hdul = fits.open(io.BytesIO(raw), memmap=False, lazy_load_hdus=False)
            for hdu in hdul:
                _ = hdu.data
    except Exception as e:  # astropy raises OSError, TypeError, ValueError, ... on bad bytes
        why = f"{type(e).__name__}: {e}"
        if "truncated" in str(e).lower():
            raise InputError(uri, f"truncated FITS file of {len(raw)} bytes ({why})") from e
        raise InputError(uri, f"not a readable FITS file ({why})") from e
    if len(raw) % 2880:
        raise InputError(uri, f"truncated FITS file: {len(raw)} bytes is not a multiple of 2880")
    return hdul


def _write_bytes(uri: str, data: bytes, fs: fsspec.AbstractFileSystem | None) -> None:
    filesystem, path = _fs_path(uri, fs)
    if isinstance(filesystem, LocalFileSystem):
        parent = os.path.dirname(path)
        if parent:
            filesystem.makedirs(parent, exist_ok=True)
    with filesystem.open(path, "wb") as f:
        f.write(data)


def _find_hdu(
    hdul: fits.HDUList, name: str, index: int, uri: str, required: bool = True
) -> fits.ImageHDU | None:
    """The HDU called ``name``, or the one at ``index`` if it has no EXTNAME (None when
    absent and not ``required``)."""
    for hdu in hdul[1:]:
        if str(hdu.header.get("EXTNAME", "")).strip().upper() == name:
            return hdu
    if index < len(hdul) and "EXTNAME" not in hdul[index].header:
        return hdul[index]
    if not required:
        return None
    raise InputError(uri, f"missing HDU {name} (HDU{index}); file has {len(hdul)} HDUs")


def _image_data(hdu: fits.ImageHDU, name: str, uri: str, kinds: str, want: str) -> np.ndarray:
    """The HDU's 2-D array, whose dtype kind must be one of ``kinds`` (``want`` says which)."""
    data = hdu.data
    if data is None:
        raise InputError(uri, f"{name} has no data (expected a 2-D image)")
    if not isinstance(data, np.ndarray) or data.dtype.names is not None:
        raise InputError(
            uri, f"{name} is a table ({type(hdu).__name__}), expected a 2-D {want} image"
        )
    if data.ndim != 2:
        raise InputError(uri, f"{name} has shape {data.shape} (expected 2-D)")
    if data.dtype.kind not in kinds:
        raise InputError(uri, f"{name} has dtype {data.dtype.name} (expected {want})")
    return data


# --------------------------------------------------------------------------- cutouts
def _zeropoint(hdul: fits.HDUList, image_header: fits.Header, uri: str) -> float:
    for header in (hdul[0].header, image_header):
        if "FLUXMAG0" in header:
            fluxmag0 = header["FLUXMAG0"]
            if not isinstance(fluxmag0, int | float) or not fluxmag0 > 0:
                raise InputError(uri, f"invalid FLUXMAG0 {fluxmag0!r}")
            return 2.5 * math.log10(float(fluxmag0))
    return HSC_ZEROPOINT


def _mask_planes(header: fits.Header, uri: str) -> dict[str, int]:
    planes: dict[str, int] = {}
    for key in header:
        if not key.startswith("MP_"):
            continue
        bit = header[key]
        if isinstance(bit, bool) or not isinstance(bit, int) or not 0 <= bit <= 31:
            raise InputError(uri, f"mask plane keyword {key} = {bit!r} is not a bit number 0..31")
        if bit in planes.values():
            raise InputError(uri, f"mask plane keyword {key} reuses bit {bit}")
        planes[key[3:]] = bit
    return planes


def read_hsc_cutout(uri: str, fs: fsspec.AbstractFileSystem | None = None) -> HSCCutout:
    """Read one HSC cutout-service FITS file (local path or any fsspec URL).

    IMAGE is required; an empty (NAXIS = 0) MASK or VARIANCE, or an absent MASK, is listed
    in ``missing`` (image-only cutouts), a MASK or VARIANCE with data must be valid. An
    absent VARIANCE is an error: the file ends early, cut at an HDU boundary (which leaves
    a valid FITS file), as the cutout service's image-only files keep both HDUs, empty.
    """
    hdul = _read_hdus(uri, fs)
    image_hdu = _find_hdu(hdul, "IMAGE", 1, uri)
    mask_hdu = _find_hdu(hdul, "MASK", 2, uri, required=False)
    var_hdu = _find_hdu(hdul, "VARIANCE", 3, uri, required=False)
    if var_hdu is None:
        last = str(hdul[-1].header.get("EXTNAME", "PRIMARY")).strip()
        raise InputError(
            uri,
            f"truncated at an HDU boundary: the file ends after HDU{len(hdul) - 1} ({last}), "
            f"without {'MASK and ' if mask_hdu is None else ''}VARIANCE (image-only cutouts "
            "keep both HDUs, empty)",
        )
    image = _image_data(image_hdu, "IMAGE", uri, "f", "floating-point")
    missing = tuple(
        name
        for name, hdu in (("MASK", mask_hdu), ("VARIANCE", var_hdu))
        if hdu is None or hdu.data is None
    )
    if "MASK" in missing:
        mask = np.zeros(image.shape, np.int32)
    else:
        mask = _image_data(mask_hdu, "MASK", uri, "iu", "integer bit planes")
    if "VARIANCE" in missing:
        variance = np.full(image.shape, np.nan, np.float32)
    else:
        variance = _image_data(var_hdu, "VARIANCE", uri, "f", "floating-point")
    for name, arr in (("MASK", mask), ("VARIANCE", variance)):
        if arr.shape != image.shape:
            raise InputError(uri, f"{name} has shape {arr.shape}, IMAGE has {image.shape}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(image_hdu.header)
    except Exception as e:
        raise InputError(uri, f"invalid WCS in the IMAGE header ({type(e).__name__}: {e})") from e
    if not wcs.has_celestial:
        raise InputError(uri, "the IMAGE header has no celestial WCS")
    return HSCCutout(
        image=image.astype(np.float32),
        mask=mask.astype(np.int32),
        variance=variance.astype(np.float32),
        mask_planes=_mask_planes(mask_hdu.header, uri) if mask_hdu is not None else {},
        wcs=wcs.celestial,
        header=image_hdu.header,
        zeropoint=_zeropoint(hdul, image_hdu.header, uri),
        missing=missing,
    )


def hsc_tan_wcs(
    ra: float, dec: float, shape: tuple[int, int], pixel_arcsec: float = HSC_PIXEL_ARCSEC
) -> WCS:
    """A TAN WCS with (ra, dec) deg at the stamp centre (H/2, W/2 in pixel-edge coordinates)."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5]  # FITS pixel centres are integers
    wcs.wcs.cdelt = [-pixel_arcsec / 3600.0, pixel_arcsec / 3600.0]
    wcs.wcs.cunit = ["deg", "deg"]
    return wcs


def write_hsc_cutout(
    uri: str,
    image: ArrayLike,
    mask: ArrayLike | None,
    variance: ArrayLike | None,
    wcs: WCS,
    mask_planes: Mapping[str, int] | None = None,
    *,
    zeropoint: float = HSC_ZEROPOINT,
    fs: fsspec.AbstractFileSystem | None = None,
) -> None:
    """Write an HSC cutout-service FITS file: image/variance [H,W] float, mask [H,W] int.

    ``mask_planes`` (name -> bit) default to ``HSC_MASK_PLANES``. ``mask`` and/or
    ``variance`` None write that HDU empty, as the cutout service's "image only" option does.
    """
    image = np.asarray(image, dtype=np.float32)
    empty_mask, empty_var = mask is None, variance is None
    variance = np.zeros(image.shape, np.float32) if empty_var else np.asarray(variance, np.float32)
    mask = np.zeros(image.shape, np.int32) if empty_mask else np.asarray(mask)
    if image.ndim != 2 or variance.shape != image.shape or mask.shape != image.shape:
        raise ValueError(
            f"write_hsc_cutout: image, mask, variance must share a 2-D shape, got "
            f"{image.shape}, {mask.shape}, {variance.shape}"
        )
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"write_hsc_cutout: mask must be integer, got {mask.dtype}")
    primary = fits.PrimaryHDU()
    primary.header["FLUXMAG0"] = (
        10 ** (0.4 * zeropoint),
        "flux of a zero-magnitude source (counts)",
    )
    image_header = wcs.to_header()
    image_header["EXTTYPE"] = "IMAGE"
    image_header["BUNIT"] = "count"
    mask_header = fits.Header()
    mask_header["EXTTYPE"] = "MASK"
    for name, bit in (HSC_MASK_PLANES if mask_planes is None else mask_planes).items():
        key = f"MP_{name}"
        mask_header[key if len(key) <= 8 else f"HIERARCH {key}"] = int(bit)
    var_header = fits.Header()
    var_header["EXTTYPE"] = "VARIANCE"
    hdul = fits.HDUList(
        [
            primary,
            fits.ImageHDU(image, header=image_header, name="IMAGE"),
            fits.ImageHDU(
                None if empty_mask else mask.astype(np.int32), header=mask_header, name="MASK"
            ),
            fits.ImageHDU(None if empty_var else variance, header=var_header, name="VARIANCE"),
        ]
    )
    buf = io.BytesIO()
    hdul.writeto(buf)
    _write_bytes(uri, buf.getvalue(), fs)


# --------------------------------------------------------------------------- PSFs
def read_psf(
    uri: str, fs: fsspec.AbstractFileSystem | None = None, size: int | None = PSF_SIZE
) -> PSFStamp:
    """Read a PSF-picker FITS file: primary HDU with a ``size``×``size`` image.

    ``size=None``: any square with an odd side (the centre pixel P//2; an even side has
    none, and guessing it would shift the model by half a pixel: an error); staging then
    pads or crops it with ``fit_psf_size``. Returns the PSF normalised to sum 1 with its
    stored sum and centroid offset; a missing image, wrong shape, non-finite values, a
    sum <= 0 or a sum of about 0 (below ``PSF_MIN_NET_FRACTION`` of its absolute values)
    raise ``InputError``.
    """
    hdul = _read_hdus(uri, fs)
    data = _image_data(hdul[0], "PRIMARY", uri, "iuf", "real-valued")
    if data.shape[0] != data.shape[1] or (size is not None and data.shape != (size, size)):
        want = "square" if size is None else f"{size}x{size}"
        raise InputError(uri, f"PSF must be {want}, got shape {data.shape}")
    if size is None and data.shape[0] % 2 == 0:
        raise InputError(uri, f"PSF side must be odd (centre pixel P//2), got shape {data.shape}")
    psf = data.astype(np.float64)
    if not np.all(np.isfinite(psf)):
        raise InputError(uri, f"PSF has {int((~np.isfinite(psf)).sum())} non-finite pixels")
    total, absolute = float(psf.sum()), float(np.abs(psf).sum())
    if not total > 0:
        raise InputError(uri, f"PSF sums to {total!r} (must be > 0)")
    if total < PSF_MIN_NET_FRACTION * absolute:  # renormalising would blow it up
        raise InputError(
            uri,
            f"PSF sums to {total:.3g}, about 0 against the {absolute:.3g} of its absolute "
            f"values: its positive and negative pixels cancel (a PSF's sum is more than "
            f"{PSF_MIN_NET_FRACTION:g} of that)",
        )
    psf /= total
    yy, xx = np.indices(psf.shape)
    offset = (
        float((psf * yy).sum() - psf.shape[0] // 2),
        float((psf * xx).sum() - psf.shape[1] // 2),
    )
    return PSFStamp(array=psf, raw_sum=total, centroid_offset=offset)


def fit_psf_size(psf: ArrayLike, size: int) -> tuple[NDArray[np.float64], float]:
    """``(psf [size, size], lost)``: a PSF [P, P] (odd P, centre pixel P//2) on a size×size grid.

    Smaller PSFs are zero-padded, larger ones cropped, both around the centre pixel (which
    stays at size//2); the result is renormalised to sum 1. ``lost`` is the fraction of the
    flux outside the crop (0 when padded): ``FlagThresholds.psf_crop_loss_max`` flags it.
    """
    p = np.asarray(psf, np.float64)
    n = p.shape[0]
    if p.ndim != 2 or p.shape[1] != n or n % 2 == 0 or size % 2 == 0:
        raise ValueError(
            f"fit_psf_size: need an odd square PSF and odd size, got {p.shape}, {size}"
        )
    total = float(p.sum())
    if n <= size:
        out = np.zeros((size, size))
        o = (size - n) // 2
        out[o : o + n, o : o + n] = p
    else:
        o = (n - size) // 2
        out = p[o : o + size, o : o + size].copy()
    kept = float(out.sum())
    if not kept > 0:
        raise ValueError(f"fit_psf_size: no flux left in the central {size}x{size} pixels")
    return out / kept, max(0.0, 1.0 - kept / total)


def write_psf(uri: str, psf: ArrayLike, fs: fsspec.AbstractFileSystem | None = None) -> None:
    """Write a PSF-picker FITS file: one primary HDU holding ``psf[P, P]`` (float64, as LSST's
    ``computeImage`` gives it)."""
    arr = np.asarray(psf, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"write_psf: expected a 2-D PSF, got shape {arr.shape}")
    buf = io.BytesIO()
    fits.PrimaryHDU(arr).writeto(buf)
    _write_bytes(uri, buf.getvalue(), fs)
