"""The output catalog: one row per input object, the schema, result chunks, FITS maps.

Longer than 400 lines: one concern, the output catalog: its schema (``OutputSpec``), the
rows (``output_table``), and the files they become (per-object FITS maps, result chunks,
the partition merge and commit). The writers read and write exactly the schema built here;
a split would leave two modules to change for every new column. The writing half (~170
lines from ``fits_maps_bytes`` on) is the seam if the file grows further.

Columns (names from ``d4a_batch.schema.Col``; C bands, N the prior's image side):

- identity: object_id, ra, dec, _healpix_29, photoz (the catalog's photo-z);
- status: status ("ok" | "error"), status_message (why, for errors), flags (int64
  bitmask of ``schema.Flag``), flag_names ("|"-joined names), flag_reasons ("; "-joined),
  as ``quality.reasons.flag_objects`` decided them (this module only writes them);
- geometry: model_pixel_arcsec, upsampling, footprint_hsc_pixels, stamp_size,
  masked_fraction;
- neighbours and truncation (staging, ``quality/detection.py``): n_neighbours_masked
  (int32, null: not measured), neighbour_masked_fraction, blend_fraction, asymmetry,
  truncated_fraction (NaN: not measured or target not detected);
- summaries: hallucination_score, variance_ratio_mean, chi2_reduced and per band
  flux_{b}, flux_err_{b}, mag_{b}, mag_err_{b}, alpha_{b}, beta_{b} (NaN for errors);
- calibrated intervals (``sampling/calibrate.py``, ``prior/calibration.py``):
  snr_aperture (observed aperture S/N per pixel, picks the bin), calib_snr_bin,
  calib_lambda68, calib_lambda95 (NaN without a calibration.json fitted for the run's
  sampler config) and the maps halfwidth68_flux, halfwidth95_flux = λ_p·z_p·std_flux
  (interval mean_flux ± half-width; std_flux stays the raw sampler's);
- morphology (``d4a_batch/measure``; names from ``schema.morphology_columns``): in the
  i band (``schema.MEASURE_BAND``) r20/r50/r80 (kpc and arcsec), r_total_kpc (the
  total-flux aperture), concentration, axis_ratio, pa_deg, centroid_offset_kpc/arcsec,
  cas_asymmetry, gini, m20, colour_gradient_gi, and r50_kpc per band: each the posterior
  median over samples with ``_p16``/``_p84`` percentiles and the observed stamp's
  ``_obs`` value; NaN for errors, and where a flag forbids it
  (``measure.catalog.FLAG_RULES``); measure_notes says why ("" when nothing, null for
  error rows);
- maps (``RunConfig.write_maps``): mean_x, std_x, mean_flux, std_flux [C,N,N],
  variance_ratio [N,N] (and samples_x [K,C,N,N] with ``keep_samples``) as Arrow
  fixed_shape_tensor columns (NaN for errors). pandas sees flat arrays; reshape with
  ``np.stack(df["mean_flux"]).reshape(-1, C, N, N)`` (the shape is in the column type);
- provenance: run_id, prior_id, prior_hash, config_hash, code_version, seed, steps,
  samples, created_utc.

Result chunks (one per pack and partition) are written under a work folder while a
run goes on; ``merge_partition`` turns them into the partition's single Parquet file.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from astropy.io import fits

from d4a_batch import __version__
from d4a_batch.config import PriorConfig, RunConfig, config_hash
from d4a_batch.measure.catalog import apply_flag_rules
from d4a_batch.quality.detection import DETECTION_COLUMNS
from d4a_batch.schema import Col, Status, band_col, morphology_columns
from d4a_batch.survey.fits_io import hsc_tan_wcs
from d4a_batch.survey.hats_io import ORDER, PIXEL, partition_uri, write_partition
from d4a_batch.survey.packs import SCALE, pack_id
from d4a_batch.survey.storage import filesystem, join_uri, safe_join
from d4a_batch.survey.tensors import tensor_array, tensor_numpy, tensor_type

if TYPE_CHECKING:  # HealpixPixel: not at run time, the write tasks need no hats (see hats_io)
    from hats.pixel_math import HealpixPixel

    from d4a_batch.quality.reasons import ObjectFlags

PER_BAND = (Col.FLUX, Col.FLUX_ERR, Col.MAG, Col.MAG_ERR, Col.ALPHA, Col.BETA)
SUMMARIES = (Col.HALLUCINATION, Col.VARIANCE_RATIO_MEAN, Col.CHI2)
# calibrated intervals (sampling/calibrate.py): NaN when the prior has no calibration.json
# fitted for the run's sampler config
CALIBRATED = (Col.SNR, Col.CALIB_BIN, Col.CALIB_LAMBDA68, Col.CALIB_LAMBDA95)
CALIBRATED_MAPS = (Col.HALFWIDTH68_FLUX, Col.HALFWIDTH95_FLUX)
GEOMETRY = (Col.THETA_ARCSEC, Col.UPSAMPLING, Col.N_OUT)
FITS_DIR = "fits"  # per-object FITS maps: <catalog>/fits/<Norder>_<Npix>/<object_id>.fits


@dataclass(frozen=True)
class OutputSpec:
    """What the output rows hold: bands, map shape and type, kept samples."""

    bands: tuple[str, ...]
    image_size: int
    maps: bool = True
    map_dtype: str = "float32"
    keep_samples: int = 0

    def map_shapes(self) -> dict[str, tuple[int, ...]]:
        """{map column: cell shape} of the tensor columns (empty without maps)."""
        if not self.maps:
            return {}
        c, n = len(self.bands), self.image_size
        shapes = {name: (c, n, n) for name in (Col.MEAN_X, Col.STD_X, Col.MEAN_FLUX, Col.STD_FLUX)}
        shapes[Col.VARIANCE_RATIO] = (n, n)
        shapes |= {name: (c, n, n) for name in CALIBRATED_MAPS}
        if self.keep_samples > 0:
            shapes[Col.SAMPLES_X] = (self.keep_samples, c, n, n)
        return shapes

    def schema(self) -> pa.Schema:
        """The output catalog's Arrow schema (without the partition columns)."""
        f64 = pa.float64()
        fields = [
            (Col.OBJECT_ID, pa.int64()), (Col.RA, f64), (Col.DEC, f64),
            (Col.HEALPIX, pa.int64()), (Col.PHOTOZ, f64),
            (Col.STATUS, pa.string()), (Col.MESSAGE, pa.string()), (Col.FLAGS, pa.int64()),
            (Col.FLAG_NAMES, pa.string()), (Col.FLAG_REASONS, pa.string()),
            *((name, f64) for name in GEOMETRY),
            (Col.STAMP_SIZE, pa.int32()), (Col.MASKED_FRACTION, f64),
            (Col.N_NEIGHBOURS_MASKED, pa.int32()),
            *((name, f64) for name, _ in DETECTION_COLUMNS[1:]),
            *((name, f64) for name in SUMMARIES),
            *((name, f64) for name in CALIBRATED),
            *((band_col(name, b), f64) for b in self.bands for name in PER_BAND),
            *((name, f64) for name in morphology_columns(self.bands)),
            (Col.MEASURE_NOTES, pa.string()),
            *((name, tensor_type(self.map_dtype, shape)) for name, shape in self.map_shapes().items()),
            (Col.RUN_ID, pa.string()), (Col.PRIOR_ID, pa.string()), (Col.PRIOR_HASH, pa.string()),
            (Col.CONFIG_HASH, pa.string()), (Col.CODE_VERSION, pa.string()),
            (Col.SEED, pa.int64()), (Col.STEPS, pa.int32()), (Col.SAMPLES, pa.int32()),
            (Col.CREATED, pa.timestamp("us", tz="UTC")),
        ]  # fmt: skip
        return pa.schema(fields)


@dataclass(frozen=True)
class Provenance:
    """The run's provenance, the same in every row."""

    run_id: str
    prior_id: str
    prior_hash: str
    config_hash: str
    code_version: str
    seed: int
    steps: int
    samples: int
    created_utc: datetime

    @classmethod
    def new_run(
        cls, prior_cfg: PriorConfig, prior_meta: dict[str, Any], config: RunConfig
    ) -> Provenance:
        """The provenance of a new run now (run id from the time and a random suffix)."""
        created = datetime.now(UTC)
        return cls(
            run_id=f"{created:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}",
            prior_id=str(prior_meta.get("prior_id", prior_cfg.name)),
            prior_hash=str(prior_meta.get("weights_sha256", "")),
            config_hash=config_hash(config),
            code_version=__version__,
            seed=config.sampler.seed,
            steps=config.sampler.steps,
            samples=config.sampler.samples,
            created_utc=created,
        )

    def columns(self, n: int) -> dict[str, pa.Array]:
        values = {
            Col.RUN_ID: (self.run_id, pa.string()),
            Col.PRIOR_ID: (self.prior_id, pa.string()),
            Col.PRIOR_HASH: (self.prior_hash, pa.string()),
            Col.CONFIG_HASH: (self.config_hash, pa.string()),
            Col.CODE_VERSION: (self.code_version, pa.string()),
            Col.SEED: (self.seed, pa.int64()),
            Col.STEPS: (self.steps, pa.int32()),
            Col.SAMPLES: (self.samples, pa.int32()),
            Col.CREATED: (self.created_utc, pa.timestamp("us", tz="UTC")),
        }
        return {k: pa.array([v] * n, t) for k, (v, t) in values.items()}


class SampledColumns(Protocol):
    """What ``output_table`` reads of the sampled objects' summaries: a
    ``sampling.summaries.PosteriorSummaries`` (named here by what it offers: survey does not
    import sampling, tests/test_layers.py)."""

    measure_notes: list[str] | None  # [B] why a morphology column is NaN ("" when none)

    def columns(self, maps: bool = True) -> dict[str, np.ndarray]:
        """Column arrays [B] / [B, ...] by ``Col`` name, the maps with ``maps``."""
        ...


def output_table(
    pack: pa.Table,
    summaries: SampledColumns | None,
    flags: ObjectFlags,
    spec: OutputSpec,
    provenance: Provenance,
    messages: list[str | None] | None = None,
    calibrated: dict[str, np.ndarray] | None = None,
) -> pa.Table:
    """Output rows of one pack, plus its Norder/Npix columns (the writer splits on them).

    ``summaries``: the pack's objects sampled, in pack order, or None when they were not
    (their messages say why); ``messages``: per object, overrides the pack's (e.g. when
    sampling itself failed); ``flags``: decided by ``quality.reasons.flag_objects``.
    Geometry (θ, upsampling, footprint, masked fraction) comes from staging.
    ``calibrated``: the calibrated interval columns of the sampled objects
    (``sampling.calibrate.calibrated_columns``, [B] scalars and [B,C,N,N] maps); absent -> NaN.
    """
    n = pack.num_rows
    messages = pack[Col.MESSAGE].to_pylist() if messages is None else list(messages)
    if len(messages) != n or len(flags) != n:
        raise ValueError(f"output_table: {n} objects, {len(messages)} messages, {len(flags)} flags")
    fit = {} if summaries is None else summaries.columns(maps=bool(spec.map_shapes()))
    if summaries is not None and calibrated:
        fit = {**fit, **calibrated}
    if summaries is not None and not np.array_equal(
        fit[Col.OBJECT_ID], pack[Col.OBJECT_ID].to_numpy()
    ):
        raise ValueError("output_table: summaries are not in pack order")
    sampled = np.array([summaries is not None and m is None for m in messages])
    cols: dict[str, Any] = {k: pack[k] for k in (Col.OBJECT_ID, Col.RA, Col.DEC, Col.HEALPIX)}
    cols[Col.PHOTOZ] = pack[Col.PHOTOZ]
    cols[Col.STATUS] = pa.array([str(Status.ERROR if m else Status.OK) for m in messages])
    cols[Col.MESSAGE] = pa.array(messages, pa.string())
    cols[Col.FLAGS] = pa.array(flags.bits, pa.int64())
    cols[Col.FLAG_NAMES] = pa.array(flags.names, pa.string())
    cols[Col.FLAG_REASONS] = pa.array(flags.reasons, pa.string())
    cols[Col.THETA_ARCSEC] = pack[Col.THETA_ARCSEC]
    cols[Col.UPSAMPLING] = pc.divide(1.0, pack[SCALE])
    cols[Col.N_OUT] = pack[Col.N_OUT]
    cols[Col.STAMP_SIZE] = pack[Col.STAMP_SIZE]
    cols[Col.MASKED_FRACTION] = pack[Col.MASKED_FRACTION]
    for name, _ in DETECTION_COLUMNS:  # staged without detection (old packs): null / NaN
        values = pack[name] if name in pack.column_names else pa.nulls(n, pa.float64())
        if name == Col.N_NEIGHBOURS_MASKED:
            v = np.asarray(values.to_numpy(zero_copy_only=False), np.float64)
            values = pa.array(np.nan_to_num(v, nan=0).astype(np.int32), mask=np.isnan(v))
        cols[name] = values
    names = [*SUMMARIES, *CALIBRATED, *(band_col(name, b) for b in spec.bands for name in PER_BAND)]
    for name in names:
        values = np.asarray(fit[name], np.float64) if name in fit else np.full(n, np.nan)
        cols[name] = pa.array(np.where(sampled, values, np.nan), pa.float64())
    morph = {
        name: np.where(sampled, np.asarray(fit[name], np.float64), np.nan)
        if name in fit else np.full(n, np.nan)
        for name in morphology_columns(spec.bands)
    }  # fmt: skip
    flag_notes = apply_flag_rules(morph, flags.bits, spec.bands)
    cols |= {name: pa.array(v, pa.float64()) for name, v in morph.items()}
    measured = (summaries.measure_notes if summaries is not None else None) or [""] * n
    notes = [
        "; ".join(x for x in (measured[i], *flag_notes[i]) if x) if sampled[i] else None
        for i in range(n)
    ]
    cols[Col.MEASURE_NOTES] = pa.array(notes, pa.string())
    for name, shape in spec.map_shapes().items():
        arr = np.full((n, *shape), np.nan, spec.map_dtype)
        if name in fit:
            arr[sampled] = fit[name][sampled]
        cols[name] = tensor_array(arr)
    cols |= provenance.columns(n)
    schema = spec.schema()
    table = pa.table({f.name: cols[f.name] for f in schema}, schema=schema)
    return table.append_column(ORDER, pack[ORDER]).append_column(PIXEL, pack[PIXEL])


# --------------------------------------------------------------------------- FITS maps
def fits_maps_bytes(row: dict[str, Any], bands: tuple[str, ...], zeropoint: float) -> bytes:
    """A FITS file of one object's maps: MEAN_FLUX_<B>, STD_FLUX_<B> per band, VARIANCE_RATIO.

    ``row``: an output row with its maps as arrays. Each HDU carries the WCS of the model
    grid (θ = model_pixel_arcsec), so DS9 overlays it on the HSC cutout.
    """
    n = int(np.asarray(row[Col.VARIANCE_RATIO]).shape[-1])
    header = hsc_tan_wcs(row[Col.RA], row[Col.DEC], (n, n), row[Col.THETA_ARCSEC]).to_header()
    primary = fits.PrimaryHDU()
    primary.header["OBJID"] = (str(row[Col.OBJECT_ID]), "object_id")
    primary.header["PHOTOZ"] = row[Col.PHOTOZ]
    primary.header["STATUS"] = row[Col.STATUS]
    primary.header["FLAGS"] = row[Col.FLAGS]
    primary.header["RUNID"] = row[Col.RUN_ID]
    hdus: list[fits.ImageHDU | fits.PrimaryHDU] = [primary]
    for name, col in (("MEAN_FLUX", Col.MEAN_FLUX), ("STD_FLUX", Col.STD_FLUX)):
        cube = np.asarray(row[col], np.float32)
        for c, b in enumerate(bands):
            h = header.copy()
            h["BUNIT"] = ("count", f"per model pixel, AB zero point {zeropoint}")
            h["MAGZERO"] = zeropoint
            hdus.append(fits.ImageHDU(cube[c], header=h, name=f"{name}_{b.upper()}"))
    hdus.append(
        fits.ImageHDU(
            np.asarray(row[Col.VARIANCE_RATIO], np.float32), header=header, name="VARIANCE_RATIO"
        )
    )
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


def fits_maps_uri(root: str, pixel: HealpixPixel, object_id: int) -> str:
    """Where an object's FITS maps go under the output catalog root."""
    return _fits_maps_uri(root, pixel.order, pixel.pixel, object_id)


def _fits_maps_uri(root: str, order: int, pixel: int, object_id: int) -> str:
    name = f"{int(order)}_{int(pixel)}"
    return safe_join(root, FITS_DIR, name, f"{int(object_id)}.fits")


def write_fits_maps(
    table: pa.Table,
    output_root: str,
    spec: OutputSpec,
    zeropoint: float,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Write the FITS maps of the ok rows of output ``table`` (with Norder/Npix); how many."""
    maps = {name: tensor_numpy(table[name]) for name in spec.map_shapes()}
    written = 0
    for i, row in enumerate(table.drop_columns(list(maps)).to_pylist()):
        if row[Col.STATUS] != Status.OK:
            continue
        row |= {name: arr[i] for name, arr in maps.items()}
        uri = _fits_maps_uri(output_root, row[ORDER], row[PIXEL], row[Col.OBJECT_ID])
        fs, path = filesystem(uri, storage_options)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(fits_maps_bytes(row, spec.bands, zeropoint))
        written += 1
    return written


# --------------------------------------------------------------------------- chunks
def chunk_dir(work_root: str, pixel: HealpixPixel) -> str:
    return _chunk_dir(work_root, pixel.order, pixel.pixel)


def _chunk_dir(work_root: str, order: int, pixel: int) -> str:
    return safe_join(work_root, f"{ORDER}={int(order)}", f"{PIXEL}={int(pixel)}")


def write_chunks(
    table: pa.Table, work_root: str, storage_options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Write output rows split by partition as result chunks; one summary dict per chunk.

    A chunk's name derives from its object ids, so a retried task overwrites its chunk.
    """
    out = []
    keys = table.select([ORDER, PIXEL]).group_by([ORDER, PIXEL]).aggregate([]).to_pylist()
    for key in keys:
        o, p = int(key[ORDER]), int(key[PIXEL])
        part = table.filter(pc.and_(pc.equal(table[ORDER], o), pc.equal(table[PIXEL], p)))
        ids = part[Col.OBJECT_ID].to_pylist()
        uri = safe_join(_chunk_dir(work_root, o, p), f"{pack_id(ids)}.parquet")
        fs, path = filesystem(uri, storage_options)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        pq.write_table(part.drop_columns([ORDER, PIXEL]), path, filesystem=fs)
        counts = status_counts(part)
        out.append({ORDER: o, PIXEL: p, "n": counts.pop("rows"), **counts})
    return out


def status_counts(table: pa.Table) -> dict[str, int]:
    """Rows of output ``table``: all, ok, error, and ok but flagged."""
    ok = table[Col.STATUS].to_numpy(zero_copy_only=False) == str(Status.OK)
    flagged = (table[Col.FLAGS].to_numpy() != 0) & ok
    return {
        "rows": table.num_rows,
        "n_ok": int(ok.sum()),
        "n_error": int((~ok).sum()),
        "n_flagged": int(flagged.sum()),
    }


def merge_chunks(
    work_root: str, pixel: HealpixPixel, storage_options: dict[str, Any] | None = None
) -> pa.Table:
    """A partition's result rows from its chunks, each row once.

    A retried task may have written the same rows under another chunk name: rows are
    unique by (object_id, status message), since a second input row with the same
    object_id becomes an error row whose message names its input row.
    """
    fs, path = filesystem(chunk_dir(work_root, pixel), storage_options)
    files = sorted(f for f in fs.ls(path, detail=False) if f.endswith(".parquet"))
    table = pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files])
    keys = pa.table(
        {"id": table[Col.OBJECT_ID], "msg": pc.fill_null(table[Col.MESSAGE], "")}
    ).to_pandas()
    first = np.flatnonzero(~keys.duplicated().to_numpy())
    if len(first) != table.num_rows:
        table = table.take(pa.array(first))
    return table


def commit_partition(
    table: pa.Table,
    output_root: str,
    staging_root: str,
    pixel: HealpixPixel,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write a partition aside under ``staging_root``, then move it into the catalog.

    A reader of the catalog sees the old file or the new one, never a partial one
    (a rename on a local disk; on S3 the object appears whole when its copy completes).
    """
    tmp = write_partition(table, staging_root, pixel.order, pixel.pixel, storage_options)
    final = partition_uri(output_root, pixel.order, pixel.pixel)
    fs, tmp_path = filesystem(tmp, storage_options)
    _, final_path = filesystem(final, storage_options)
    fs.makedirs(final_path.rsplit("/", 1)[0], exist_ok=True)
    fs.mv(tmp_path, final_path)
    return final


def merge_partition(
    work_root: str,
    output_root: str,
    pixel: HealpixPixel,
    storage_options: dict[str, Any] | None = None,
    expected_rows: int | None = None,
) -> pa.Table:
    """Merge a partition's result chunks and commit its catalog file; the merged rows.

    Raises (committing nothing) when ``expected_rows`` is given and the count differs.
    """
    table = merge_chunks(work_root, pixel, storage_options)
    if expected_rows is not None and table.num_rows != expected_rows:
        raise RuntimeError(f"{table.num_rows} result rows for {expected_rows} input rows")
    commit_partition(table, output_root, join_uri(work_root, "commit"), pixel, storage_options)
    return table
