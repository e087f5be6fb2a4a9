"""Staging: from catalog rows to packs of stamps that the sampler can take as they are.

Per object (a row of ``hats_io.read_partition``; C = the prior's bands):

1. the PSF of every band (``read_psf``: normalised; its stored sum and centroid
   offset are kept for the PSF flag), of any odd size: zero-padded or cropped around its
   centre pixel to ``StagingConfig.psf_size`` and renormalised (``fit_psf_size``; the
   flux a crop loses is kept for the PSF flag, PSF_BAD above 1 %); an even side is an error;
2. the photo-z, which must be finite and > 0;
3. the operator parameters at that z: model pixel θ, scale θ/0.168'' (= 1/u),
   footprint n_out = N·θ/0.168'' and the stamp side H: the smallest
   ``StagingConfig.stamp_sizes`` bucket ≥ ceil(n_out) + 2·psf_margin (else the largest);
4. the cutout of every band: an H×H stamp around the object's WCS position
   (``cut_stamp``), the object at the stamp centre + offset, |offset| ≤ 0.5 px; pixels
   outside the cutout or with a bad mask plane are invalid. The bands must share
   a pixel grid (HSC coadds do): the object's offset is taken from the first band.
   An image-only cutout (MASK and/or VARIANCE HDU empty or absent) is staged anyway:
   its variance is estimated from the whole cutout (``noise.fill_missing_planes``: sky
   from source-free pixels + source term) and ``noise_note`` says how, per band (the
   NOISE_ESTIMATED flag's reason); a cutout whose noise cannot be estimated is an error.
5. neighbours (``StagingConfig.detect_neighbours``): ``quality.detection.find_sources`` on a
   stamp ``detection_pad`` pixels wider: the other sources' segments, dilated by about
   the PSF FWHM, become invalid pixels (like bad MASK bits, so the likelihood, χ² and
   every score skip them); the number of masked neighbours, the masked fraction, the
   blend fraction, the contamination, the asymmetry and the truncated fraction go into the
   pack (BLENDED, TRUNCATED flags).
6. ``masked_fraction`` (MASKED_FRACTION_HIGH): the unusable pixels of the model footprint
   (the n_out × n_out square around the object, all bands) in the cutout itself: bad MASK
   bits, non-finite values, pixels off the cutout. Neighbour masking is *not* counted (the
   neighbours have n_neighbours_masked, neighbour_masked_fraction and BLENDED), nor are
   stamp pixels outside the footprint.

A problem with any of these (missing, corrupt or truncated file, wrong shape or
dtype, no usable pixel in a band's stamp, missing PSF, unusable photo-z, object
off the cutout) makes the object an error record carrying a message that names
the band, the file and what is wrong (``"cutout g: <uri>: IMAGE has shape (10,)
(expected 2-D)"``, ``"PSF i: <uri>: cannot open: file not found"``,
``"photo-z: -0.5 is not positive"``; several joined by ``"; "``); a file whose storage
cannot be reached (no such bucket, no credentials, an unknown protocol) is such a problem
too: ``"PSF r: s3://b/r/7.fits: cannot reach its storage (NoCredentialsError: ...)"`` when
fingerprinting found its folder unreachable (``Stager.unreachable``: not tried again), or
``"... cannot open (...)"`` when reading it fails. ``stage`` never raises, so the other
objects are unaffected. A PSF whose stored sum is not 1 or
whose centroid is off centre is renormalised and kept (``psf_sum``/``psf_centroid``
let the output flag it PSF_BAD).

Packs (the format handed to the sampler, ``make_packs``): ``survey/packs.py`` owns their
schema, column names and encoding.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from d4a_batch.config import PhysicsConfig, PriorConfig, StagingConfig
from d4a_batch.physics.cosmology import footprint_hsc_pixels, model_pixel_arcsec
from d4a_batch.quality.detection import DetectionParams, StampSources, find_sources
from d4a_batch.quality.detection_image import footprint_box
from d4a_batch.quality.rules import photoz_problem
from d4a_batch.schema import Col
from d4a_batch.survey.fits_io import (
    HSCCutout,
    InputError,
    fit_psf_size,
    mask_to_valid,
    read_hsc_cutout,
    read_psf,
)
from d4a_batch.survey.hats_io import (
    cutout_column,
    psf_column,
)
from d4a_batch.survey.noise import NoiseEstimateError, fill_missing_planes
from d4a_batch.survey.packs import (
    IDENTITY,
    IMAGE,
    PSF,
    VALID,
    VARIANCE,
)
from d4a_batch.survey.storage import filesystem, resolve_uri

log = logging.getLogger(__name__)
# sub-pixel offsets of the bands may differ by this much (HSC pixels) before the object is refused
BAND_OFFSET_TOLERANCE = 0.1


@dataclass
class StagedObject:
    """One object after staging: identity, geometry, and stamps unless ``error`` is set."""

    ident: dict[str, Any]
    psf_sum: np.ndarray  # [C]
    psf_centroid: np.ndarray  # [C]
    error: str | None = None
    stamp_size: int = 0
    offset: tuple[float, float] = (math.nan, math.nan)
    theta_arcsec: float = math.nan
    scale: float = math.nan
    footprint: float = math.nan
    # unusable footprint pixels (all bands) in the cutout: bad MASK bits, non-finite, off the
    # cutout; neighbour masking not counted (MASKED_FRACTION_HIGH)
    masked_fraction: float = math.nan
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # image, variance, valid, psf
    noise_note: str | None = None  # image-only cutouts: how the noise was estimated, per band
    # [C] flux fraction lost by cropping each PSF to StagingConfig.psf_size (0: padded or
    # already that size, NaN: not read)
    psf_crop_loss: np.ndarray = field(default_factory=lambda: np.full(0, np.nan))
    # neighbours and truncation (quality/detection.py; NaN: not measured)
    n_neighbours_masked: float = math.nan
    neighbour_masked_fraction: float = math.nan
    blend_fraction: float = math.nan
    contamination: float = math.nan
    asymmetry: float = math.nan
    truncated_fraction: float = math.nan
    sources: StampSources | None = None  # segmentation on the stamp (not packed; figures)


def unstaged(row: dict[str, Any], n_bands: int, error: str | None = None) -> StagedObject:
    """The object of catalog ``row`` before staging: identity only, per-band values NaN
    (``error``: why it will not be staged, e.g. a repeated object_id)."""
    return StagedObject(
        ident={k: row[k] for k in IDENTITY},
        psf_sum=np.full(n_bands, np.nan),
        psf_centroid=np.full(n_bands, np.nan),
        psf_crop_loss=np.full(n_bands, np.nan),
        error=error,
    )


def photoz_error(z: float | None) -> str | None:
    """Why ``z`` cannot be used as the object's redshift (None when it can): the one
    photo-z rule, ``quality.rules.photoz_problem``, without the prior's range."""
    return photoz_problem(z)


def footprint_masked_fraction(
    valid: np.ndarray, offset: tuple[float, float], footprint: float
) -> float:
    """Unusable fraction of the model footprint's pixels, all bands: valid [C,H,W] (before
    neighbour masking), the object at the stamp centre + ``offset``, footprint n_out pixels
    (the whole stamp when the footprint covers no pixel centre)."""
    box = footprint_box(valid.shape[1:], offset, footprint)
    if not box.any():
        box = np.ones(valid.shape[1:], bool)
    return float(1.0 - np.asarray(valid, bool)[:, box].mean())


def stamp_size(footprint: float, staging: StagingConfig) -> int:
    """Stamp side (HSC pixels) for a model footprint of ``footprint`` pixels."""
    need = math.ceil(footprint) + 2 * staging.psf_margin
    sizes = sorted(staging.stamp_sizes)
    return next((s for s in sizes if s >= need), sizes[-1])


def cut_stamp(
    cutout: HSCCutout, ra: float, dec: float, size: int, bad_planes: tuple[str, ...], uri: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    """``(image, variance, valid, offset)`` of the size×size stamp around (ra, dec).

    image/variance float32 [size, size] (0 at invalid pixels), valid bool; the stamp's
    corner is the pixel edge nearest to position − size/2, so the object sits at the
    centre + offset with |offset| ≤ 0.5. Pixels beyond the cutout are invalid. Raises
    ``InputError`` when the object is off the cutout or no stamp pixel is usable.
    """
    px, py = (float(v) for v in cutout.wcs.world_to_pixel_values(ra, dec))
    cy, cx = py + 0.5, px + 0.5  # pixel-edge coordinates
    h, w = cutout.image.shape
    if not (0.0 <= cy < h and 0.0 <= cx < w):
        raise InputError(
            uri, f"object (ra={ra:.6f}, dec={dec:.6f}) lies outside the {h}x{w} cutout"
        )
    y0, x0 = math.floor(cy - size / 2 + 0.5), math.floor(cx - size / 2 + 0.5)
    offset = (cy - (y0 + size / 2), cx - (x0 + size / 2))
    ys, xs = slice(max(y0, 0), min(y0 + size, h)), slice(max(x0, 0), min(x0 + size, w))
    yd, xd = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
    image = np.zeros((size, size), np.float32)
    variance = np.zeros((size, size), np.float32)
    valid = np.zeros((size, size), bool)
    valid[yd, xd] = cutout.valid(bad_planes)[ys, xs]
    if not valid.any():
        raise InputError(uri, _unusable(cutout, ys, xs, size, bad_planes))
    image[yd, xd] = np.where(valid[yd, xd], cutout.image[ys, xs], 0.0)
    variance[yd, xd] = np.where(valid[yd, xd], cutout.variance[ys, xs], 0.0)
    return image, variance, valid, offset


def _unusable(
    cutout: HSCCutout, ys: slice, xs: slice, size: int, bad_planes: tuple[str, ...]
) -> str:
    """Why no pixel of a stamp is usable: counts per cause (a pixel may have several)."""
    image, var, mask = cutout.image[ys, xs], cutout.variance[ys, xs], cutout.mask[ys, xs]
    finite_var = np.isfinite(var)
    masked = ~mask_to_valid(mask, cutout.mask_planes, bad_planes)
    planes = [p for p in bad_planes if p in cutout.mask_planes
              and np.any(mask & (1 << cutout.mask_planes[p]))]  # fmt: skip
    causes = {
        "outside the cutout": size * size - image.size,
        f"masked ({', '.join(planes)})": int(masked.sum()),
        "with non-finite IMAGE": int((~np.isfinite(image)).sum()),
        "with non-finite VARIANCE": int((~finite_var).sum()),
        "with VARIANCE <= 0": int((finite_var & (var <= 0)).sum()),
    }
    why = ", ".join(f"{n} {cause}" for cause, n in causes.items() if n)
    return f"no usable pixel in the {size}x{size} stamp ({size * size} px: {why})"


@dataclass(frozen=True)
class Stager:
    """Stages catalog rows (engine names) of one catalog for one prior."""

    catalog_root: str
    prior: PriorConfig
    physics: PhysicsConfig
    staging: StagingConfig
    storage_options: dict[str, Any] | None = None
    # folders (as resolved URIs) that fingerprinting could not reach -> why: their files
    # are not tried again, each object is an error row saying so
    unreachable: dict[str, str] = field(default_factory=dict)

    def _read(self, row: dict[str, Any], column: str, reader):
        """``(reader(uri, fs), uri)`` for the file named in ``row[column]``; any failure
        is an ``InputError`` naming the file."""
        uri = row[column]
        if uri is None or uri == "":
            raise InputError(column, "no URI in the catalog")
        uri = resolve_uri(str(uri), self.catalog_root)
        why = self.unreachable.get(uri.rpartition("/")[0])
        if why is not None:
            raise InputError(uri, f"cannot reach its storage ({why})")
        try:
            fs, _ = filesystem(uri, self.storage_options)
            return reader(uri, fs), uri
        except InputError:
            raise
        except Exception as e:  # an odd file must fail its object, not the run
            raise InputError(uri, f"unexpected {type(e).__name__}: {e}") from e

    def stage(self, row: dict[str, Any]) -> StagedObject:
        """Stage one object; any problem is recorded in ``error``, never raised."""
        c = len(self.prior.bands)
        obj = unstaged(row, c)
        try:
            errors = self._psfs(obj, row)
            z = row[Col.PHOTOZ]
            if (z_error := photoz_error(z)) is not None:
                errors.append(z_error)
            if not errors:
                self._geometry(obj, float(z))
                errors = self._cutouts(obj, row)
        except Exception as e:  # one odd object must not stop a survey run
            errors = [f"unexpected {type(e).__name__}: {e}"]
        if errors:
            obj.error = "; ".join(errors)
            obj.arrays.clear()
        return obj

    def _psfs(self, obj: StagedObject, row: dict[str, Any]) -> list[str]:
        """Read every band's PSF into ``obj``; returns the error messages."""
        errors, psfs = [], []
        for i, b in enumerate(self.prior.bands):
            try:  # any odd size, padded or cropped to psf_size (fit_psf_size)
                stamp, _ = self._read(row, psf_column(b), lambda u, fs: read_psf(u, fs, None))
            except InputError as e:
                errors.append(f"PSF {b}: {e}")
                continue
            obj.psf_sum[i] = stamp.raw_sum
            obj.psf_centroid[i] = math.hypot(*stamp.centroid_offset)
            array, obj.psf_crop_loss[i] = fit_psf_size(stamp.array, self.staging.psf_size)
            psfs.append(array)
        if not errors:
            obj.arrays[PSF] = np.stack(psfs).astype(np.float32)
        return errors

    def _geometry(self, obj: StagedObject, z: float) -> None:
        p, ph = self.prior, self.physics
        obj.theta_arcsec = float(model_pixel_arcsec(z, p.kpc_per_pixel, ph.cosmology))
        obj.scale = obj.theta_arcsec / ph.hsc_pixel_arcsec
        obj.footprint = float(
            footprint_hsc_pixels(
                z, p.kpc_per_pixel, p.image_size, ph.hsc_pixel_arcsec, ph.cosmology
            )
        )
        obj.stamp_size = stamp_size(obj.footprint, self.staging)

    def _cutouts(self, obj: StagedObject, row: dict[str, Any]) -> list[str]:
        """Cut every band's stamp into ``obj``; returns the error messages."""
        size, bands = obj.stamp_size, self.prior.bands
        planes: dict[str, list[np.ndarray]] = {IMAGE: [], VARIANCE: [], VALID: []}
        pad = self.staging.detection_pad if self.staging.detect_neighbours else 0
        wide: dict[str, list[np.ndarray]] = {IMAGE: [], VARIANCE: [], VALID: []}
        offsets: dict[str, tuple[float, float]] = {}
        errors: list[str] = []
        notes: list[str] = []
        for c, b in enumerate(bands):
            try:
                cutout, uri = self._read(row, cutout_column(b), read_hsc_cutout)
                if cutout.missing:  # image-only cutout: noise from the stamp (survey/noise.py)
                    try:
                        cutout, note = fill_missing_planes(
                            cutout, self.staging.bad_mask_planes, obj.arrays[PSF][c]
                        )
                    except NoiseEstimateError as e:
                        what = " and ".join(cutout.missing)
                        raise InputError(uri, f"{what} empty, noise not estimable: {e}") from e
                    notes.append(f"{b}: {note}")
                image, var, valid, offsets[b] = cut_stamp(
                    cutout, row[Col.RA], row[Col.DEC], size, self.staging.bad_mask_planes, uri
                )
                if self.staging.detect_neighbours:  # the detection stamp: `pad` px wider
                    for name, plane in zip((IMAGE, VARIANCE, VALID), cut_stamp(
                            cutout, row[Col.RA], row[Col.DEC], size + 2 * pad,
                            self.staging.bad_mask_planes, uri)[:3]):  # fmt: skip
                        wide[name].append(plane)
                ref = offsets.get(bands[0], offsets[b])
                if max(abs(u - v) for u, v in zip(offsets[b], ref)) > BAND_OFFSET_TOLERANCE:
                    raise InputError(uri, f"not on the pixel grid of band {bands[0]}")
            except InputError as e:
                errors.append(f"cutout {b}: {e}")
                continue
            planes[IMAGE].append(image)
            planes[VARIANCE].append(var)
            planes[VALID].append(valid)
        if errors:
            return errors
        obj.noise_note = " / ".join(notes) or None
        obj.offset = offsets[bands[0]]
        obj.arrays[IMAGE] = np.stack(planes[IMAGE])
        obj.arrays[VARIANCE] = np.stack(planes[VARIANCE])
        obj.arrays[VALID] = np.stack(planes[VALID]).astype(np.uint8)
        obj.masked_fraction = footprint_masked_fraction(
            obj.arrays[VALID], obj.offset, obj.footprint
        )
        if self.staging.detect_neighbours:
            self._neighbours(obj, {k: np.stack(v) for k, v in wide.items()}, pad)
        return []

    def _neighbours(self, obj: StagedObject, wide: dict[str, np.ndarray], pad: int) -> None:
        """Detect the stamp's sources on the wider stamp ``wide`` [C,H+2pad,W+2pad]; make the
        dilated neighbour segments invalid pixels of ``obj``; record the measurements."""
        params = DetectionParams.from_staging(self.staging)
        try:
            found = find_sources(
                wide[IMAGE], wide[VARIANCE], wide[VALID], obj.arrays[PSF], obj.offset,
                obj.footprint, params, pad,
            ).crop(pad)  # fmt: skip
        except Exception as e:  # detection is a refinement: without it, stage unmasked
            log.warning("object %s: source detection failed (%s)", obj.ident[Col.OBJECT_ID], e)
            return
        obj.sources = found
        obj.arrays[VALID] &= ~found.neighbour_mask[None].astype(np.uint8)
        obj.n_neighbours_masked = float(found.n_neighbours)
        obj.neighbour_masked_fraction = found.neighbour_masked_fraction
        obj.blend_fraction = found.blend_fraction
        obj.contamination = found.contamination
        obj.asymmetry = found.asymmetry
        obj.truncated_fraction = found.truncated_fraction

    def stage_rows(self, rows: list[dict[str, Any]], threads: int = 8) -> list[StagedObject]:
        """Stage rows concurrently (I/O bound: remote reads overlap); order is kept."""
        if threads <= 1 or len(rows) <= 1:
            return [self.stage(r) for r in rows]
        with ThreadPoolExecutor(max_workers=min(threads, len(rows))) as pool:
            return list(pool.map(self.stage, rows))
