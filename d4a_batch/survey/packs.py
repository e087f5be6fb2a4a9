"""Packs: the one format between the stage and sample operators (schema and encoding).

A pack is up to ``pack_size`` staged objects of one stamp size in an Arrow table
(B objects, C bands, H×W stamps, P×P PSFs):

- identity ``IDENTITY`` (object_id, ra, dec, _healpix_29, Norder, Npix, photoz and its
  68 % bounds), ``status_message`` (null for staged objects);
- geometry: stamp_size int32, ``model_pixel_arcsec``, ``model_scale`` (θ/0.168''),
  ``footprint_hsc_pixels``, ``masked_fraction`` float64; ``offset`` [2] float64;
- neighbours and truncation (``quality.detection.DETECTION_COLUMNS``, float64, NaN: not measured):
  n_neighbours_masked, neighbour_masked_fraction, blend_fraction, asymmetry,
  truncated_fraction;
- PSF checks: ``psf_sum``, ``psf_centroid_offset``, ``psf_crop_loss`` [C] float64 (NaN: not read);
- ``noise_estimate`` string: how the noise of image-only cutouts was estimated (null: not);
- stamps, only in a pack of staged objects: image, variance [C,H,W] float32,
  valid [C,H,W] uint8, psf [C,P,P] float32, neighbour_mask [H,W] uint8 (fixed_shape_tensor
  columns).

A pack holds either staged objects (kind ``objects``) or the error records of a
batch (kind ``errors``, no stamp columns). Between operators each pack is one row
of ``PACK_ROW_SCHEMA`` whose ``pack`` cell holds the table as Parquet bytes, so a
staged dataset is plain Parquet that can be written and reused (``--write-staged``).
"""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from d4a_batch.quality.detection import DETECTION_COLUMNS
from d4a_batch.schema import Col
from d4a_batch.survey.hats_io import INPUT_PHOTOZ_HI, INPUT_PHOTOZ_LO, ORDER, PIXEL
from d4a_batch.survey.tensors import tensor_array, tensor_numpy

if TYPE_CHECKING:
    from d4a_batch.survey.staging import StagedObject

KIND_OBJECTS = "objects"
KIND_ERRORS = "errors"
# pack columns besides the identity columns
PSF_SUM = "psf_sum"  # [C] PSF sums as stored (NaN: PSF not read)
PSF_CENTROID = "psf_centroid_offset"  # [C] |centroid - centre| in pixels (NaN: not read)
# [C] flux fraction lost cropping the PSF to StagingConfig.psf_size (NaN: not read)
PSF_CROP_LOSS = "psf_crop_loss"
OFFSET = "offset"  # [2] (dy, dx) of the object from the stamp centre, HSC pixels
SCALE = "model_scale"  # model pixel width in HSC pixels, θ/0.168''
# how staging estimated the noise of image-only cutouts (null: every band had MASK and
# VARIANCE); the NOISE_ESTIMATED flag's reason (survey/noise.py)
NOISE_NOTE = "noise_estimate"
IMAGE, VARIANCE, VALID, PSF = "image", "variance", "valid", "psf"
# [H,W] uint8: pixels staging made invalid for neighbours (quality/detection.py; all 0 when
# staged without detection): where POOR_FIT looks for neighbour light past the mask
NEIGHBOUR_MASK = "neighbour_mask"
IDENTITY = (Col.OBJECT_ID, Col.RA, Col.DEC, Col.HEALPIX, ORDER, PIXEL, Col.PHOTOZ,
            INPUT_PHOTOZ_LO, INPUT_PHOTOZ_HI)  # fmt: skip
_INT_IDENTITY = (Col.OBJECT_ID, Col.HEALPIX, ORDER, PIXEL)
STAMPS = (IMAGE, VARIANCE, VALID, PSF)
# one row per pack between the stage and sample operators (see make_packs)
PACK_ROW_SCHEMA = pa.schema(
    [
        ("pack_id", pa.string()),
        ("kind", pa.string()),
        ("stamp_size", pa.int32()),
        ("n_objects", pa.int32()),
        ("pack", pa.large_binary()),
    ]
)


def _common_columns(objs: list[StagedObject]) -> dict[str, pa.Array]:
    cols: dict[str, pa.Array] = {}
    for k in IDENTITY:
        typ = pa.int64() if k in _INT_IDENTITY else pa.float64()
        cols[k] = pa.array([o.ident[k] for o in objs], typ)
    cols[Col.MESSAGE] = pa.array([o.error for o in objs], pa.string())
    cols[NOISE_NOTE] = pa.array([getattr(o, "noise_note", None) for o in objs], pa.string())
    cols[PSF_SUM] = tensor_array(np.stack([o.psf_sum for o in objs]))
    cols[PSF_CENTROID] = tensor_array(np.stack([o.psf_centroid for o in objs]))
    cols[PSF_CROP_LOSS] = tensor_array(
        np.stack([getattr(o, "psf_crop_loss", np.full_like(o.psf_sum, np.nan)) for o in objs])
    )
    cols[Col.STAMP_SIZE] = pa.array([o.stamp_size for o in objs], pa.int32())
    cols[OFFSET] = tensor_array(np.array([o.offset for o in objs], np.float64))
    for name, attr in ((Col.THETA_ARCSEC, "theta_arcsec"), (SCALE, "scale"),
                       (Col.N_OUT, "footprint"), (Col.MASKED_FRACTION, "masked_fraction")):  # fmt: skip
        cols[name] = pa.array([getattr(o, attr) for o in objs], pa.float64())
    for name, attr in DETECTION_COLUMNS:  # neighbours, truncation (quality/detection.py)
        cols[name] = pa.array([float(getattr(o, attr)) for o in objs], pa.float64())
    return cols


def pack_table(objs: list[StagedObject]) -> pa.Table:
    """Arrow table of staged objects: stamps when none has an error, else error records only."""
    cols = _common_columns(objs)
    if all(o.error is None for o in objs):
        for name in STAMPS:
            cols[name] = tensor_array(np.stack([o.arrays[name] for o in objs]))
        cols[NEIGHBOUR_MASK] = tensor_array(np.stack([
            np.zeros(o.arrays[IMAGE].shape[-2:], np.uint8) if getattr(o, "sources", None) is None
            else o.sources.neighbour_mask.astype(np.uint8) for o in objs]))  # fmt: skip
    elif any(o.error is None for o in objs):
        raise ValueError("pack_table: a pack holds either staged objects or error records")
    return pa.table(cols)


def pack_id(object_ids: list[int]) -> str:
    """Stable name of a pack (or result chunk) from its object ids."""
    digest = hashlib.sha1(",".join(str(int(i)) for i in sorted(object_ids)).encode())
    return digest.hexdigest()[:20]


def make_packs(objs: list[StagedObject], pack_size: int) -> list[dict[str, Any]]:
    """Group staged objects into packs: one per stamp size (≤ pack_size objects), one of errors.

    Returns rows of ``PACK_ROW_SCHEMA``: ``{pack_id, kind, stamp_size, n_objects, pack}``.
    """
    groups: dict[tuple[str, int], list[StagedObject]] = defaultdict(list)
    for o in objs:
        key = (KIND_ERRORS, 0) if o.error else (KIND_OBJECTS, o.stamp_size)
        groups[key].append(o)
    rows = []
    for (kind, size), members in sorted(groups.items()):
        step = len(members) if kind == KIND_ERRORS else max(1, int(pack_size))
        for i in range(0, len(members), step):
            chunk = members[i : i + step]
            rows.append(
                {
                    "pack_id": pack_id([o.ident[Col.OBJECT_ID] for o in chunk]),
                    "kind": kind,
                    "stamp_size": size,
                    "n_objects": len(chunk),
                    "pack": pack_to_bytes(pack_table(chunk)),
                }
            )
    return rows


def pack_rows_table(objs: list[StagedObject], pack_size: int) -> pa.Table:
    """``make_packs`` as an Arrow table of ``PACK_ROW_SCHEMA`` (what the stage operator emits)."""
    return pa.Table.from_pylist(make_packs(objs, pack_size), schema=PACK_ROW_SCHEMA)


def pack_to_bytes(table: pa.Table) -> bytes:
    """Parquet bytes of a pack table."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def pack_from_bytes(data: bytes) -> pa.Table:
    """A pack table from its Parquet bytes."""
    return pq.read_table(io.BytesIO(data))


def pack_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """numpy arrays (writable copies) of a pack of staged objects: tensors ``[B, ...]``, scalars ``[B]``.

    The stamps, offset and PSF checks; ``neighbour_mask`` [B,H,W] and the detection columns
    (``DETECTION_COLUMNS``, float64) when the pack has them (staged before detection: not);
    the identity, ``model_scale``, ``footprint_hsc_pixels`` and ``masked_fraction``.
    ``pack_sampler.pack_observations`` turns them into the sampler's observations.
    """
    tensors = (*STAMPS, OFFSET, PSF_SUM, PSF_CENTROID)
    optional = [NEIGHBOUR_MASK] if NEIGHBOUR_MASK in table.column_names else []
    out = {name: np.array(tensor_numpy(table[name])) for name in (*tensors, *optional)}
    for name in (*IDENTITY, SCALE, Col.N_OUT, Col.MASKED_FRACTION):
        out[name] = table[name].to_numpy()
    for name, _ in DETECTION_COLUMNS:
        if name in table.column_names:
            out[name] = np.asarray(table[name].to_numpy(zero_copy_only=False), np.float64)
    b = table.num_rows
    for name in STAMPS:
        if out[name].ndim != 4 or out[name].shape[0] != b:
            raise ValueError(f"pack column {name}: shape {out[name].shape}, expected [{b},C,.,.]")
    return out
