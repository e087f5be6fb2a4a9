"""Before any work: check the job, prepare the output, plan the run (a frozen ``RunPlan``).

``check_job`` reads the prior's config and the catalog's metadata and checks that the
prior loads, the catalog has the columns its bands need with integer object ids, the
stamps can hold the prior's footprint, the output is neither the catalog or the prior
nor inside or around them, and that an existing output belongs to this catalog
(``JobError`` otherwise); it writes nothing. ``prepare_output`` makes the output root
and clears what a killed run left in the work folder. ``plan_run`` fingerprints every
selected partition (Ray tasks: one read of each partition file, one listing per cutout /
PSF folder, see ``fingerprint.py``; an unreadable partition fails alone), applies
``--limit``, finds object ids repeated across partitions and asks the ledger which
partitions are up to date. A cutout / PSF folder that cannot be reached makes its
objects error rows; when none can be reached the job stops there (``JobError``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hats.pixel_math import HealpixPixel

from d4a_batch.config import PriorConfig, RunConfig
from d4a_batch.pipeline.fingerprint import find_repeats, fingerprint_partitions, repeats_digest
from d4a_batch.pipeline.ledger import (
    Ledger,
    PartitionRecord,
    parse_pixel,
    pixel_name,
    plan,
)
from d4a_batch.pipeline.options import ExecutionOptions, JobError
from d4a_batch.prior.artifact import load_prior, read_prior_config
from d4a_batch.schema import LEASE_FILE, LEDGER_DIR, WORK_DIR, Col
from d4a_batch.survey.hats_io import (
    INPUT_PHOTOZ_HI,
    INPUT_PHOTOZ_LO,
    InputCatalog,
    Partition,
    input_column_names,
    open_input_catalog,
)
from d4a_batch.survey.output import OutputSpec, Provenance
from d4a_batch.survey.storage import (
    absolute_uri,
    filesystem,
    join_uri,
    output_location_problem,
    overlap,
)

log = logging.getLogger(__name__)
OPTIONAL_INPUTS = (INPUT_PHOTOZ_LO, INPUT_PHOTOZ_HI)


@dataclass(frozen=True)
class Job:
    """A checked job: absolute URIs, the prior's config, the opened catalog, provenance."""

    catalog: str
    output: str
    prior: str
    config: RunConfig
    options: ExecutionOptions
    prior_cfg: PriorConfig
    cat: InputCatalog
    provenance: Provenance
    spec: OutputSpec
    started: float  # time.monotonic() when the job was checked

    @property
    def run_id(self) -> str:
        return self.provenance.run_id

    @property
    def bands(self) -> tuple[str, ...]:
        return tuple(self.prior_cfg.bands)


@dataclass(frozen=True)
class RunPlan:
    """What a run will do, decided before any object is processed.

    ``todo``: partitions to process and why (ledger reasons); ``done``: up to date;
    ``failed``: unreadable (why); ``fingerprints``/``limits``: per readable partition
    (its input fingerprint, the rows to take); ``previous``: the ledger's newest record
    of each partition before this run; ``repeats``: rows whose object_id an earlier
    partition holds ({partition: {row: why}}, not processed); ``unreachable``: cutout /
    PSF folders that could not be reached (folder -> why; their objects are error rows).
    """

    job: Job
    work: str  # this run's work folder (result chunks, partitions being committed)
    todo: dict[HealpixPixel, str]
    done: list[HealpixPixel]
    failed: dict[HealpixPixel, str]
    fingerprints: dict[HealpixPixel, str]
    limits: dict[HealpixPixel, int]
    previous: dict[HealpixPixel, PartitionRecord]
    repeats: dict[HealpixPixel, dict[int, str]] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)

    @property
    def started(self) -> float:
        return self.job.started

    @property
    def partitions(self) -> list[Partition]:
        """The input partitions to process, in catalog order."""
        return [p for p in self.job.cat.partitions if p.healpix in self.todo]

    @property
    def expected_rows(self) -> dict[HealpixPixel, int] | None:
        """Rows each processed partition must end with (None: staged packs, not known)."""
        if self.job.options.read_staged:
            return None
        return {k: self.limits[k] for k in self.todo}


def check_job(
    catalog: str, output: str, prior: str, config: RunConfig, opts: ExecutionOptions
) -> Job:
    """Open and check the job's inputs; raises JobError. Writes nothing."""
    started = time.monotonic()
    so = opts.storage_options
    catalog, output, prior = absolute_uri(catalog), absolute_uri(output), absolute_uri(prior)
    if (problem := output_location_problem(output, catalog, prior)) is not None:
        raise JobError(problem)
    try:
        prior_cfg, prior_meta = read_prior_config(prior)
    except Exception as e:
        raise JobError(f"prior {prior}: {e}") from e
    provenance = Provenance.new_run(prior_cfg, prior_meta, config)
    spec = OutputSpec(
        bands=tuple(prior_cfg.bands),
        image_size=prior_cfg.image_size,
        maps=config.write_maps or config.fits_maps,
        map_dtype=config.map_dtype,
        keep_samples=config.sampler.keep_samples,
    )
    try:
        cat = open_input_catalog(catalog, so)
    except Exception as e:
        raise JobError(f"catalog {catalog} does not open as a HATS catalog: {e}") from e
    job = Job(catalog, output, prior, config, opts, prior_cfg, cat, provenance, spec, started)
    _check_inputs(job)
    _check_stamps(job)
    select_partitions(cat, opts.partitions)  # unknown names are the job's error
    if not (opts.overwrite or opts.force):
        _check_output_belongs_to_catalog(job)
    return job


def _check_output_belongs_to_catalog(job: Job) -> None:
    """An output holds the results of one catalog: the one its ledger's newest run read."""
    ledger = Ledger(job.output, job.options.storage_options)
    try:
        runs = ledger.runs() if ledger.exists() else []
    except Exception as e:
        raise JobError(f"output {job.output}: its run ledger is unreadable ({e})") from e
    if runs and overlap(runs[-1].catalog, job.catalog) != "is":
        raise JobError(
            f"output {job.output} holds the results of catalog {runs[-1].catalog} (run "
            f"{runs[-1].run_id}), not of catalog {job.catalog}: choose another --output, "
            "--overwrite to replace it, or --force to process this catalog into it anyway"
        )


def _check_stamps(job: Job) -> None:
    """The largest stamp holds the model footprint (+ margins) of at least the objects at
    the prior's smallest footprint; else every object would be cut to a stamp that does
    not hold its model."""
    from d4a_batch.physics.cosmology import footprint_hsc_pixels

    p, ph, st = job.prior_cfg, job.config.physics, job.config.staging
    z = np.linspace(max(p.z_min, 1e-3), p.z_max, 64)
    smallest = float(np.min(footprint_hsc_pixels(z, p.kpc_per_pixel, p.image_size,
                                                 ph.hsc_pixel_arcsec, ph.cosmology)))  # fmt: skip
    need = math.ceil(smallest) + 2 * st.psf_margin
    if max(st.stamp_sizes) < need:
        raise JobError(
            f"StagingConfig.stamp_sizes {list(st.stamp_sizes)}: the largest stamp must hold "
            f"at least {need} px (the prior {p.name}'s smallest model footprint, "
            f"{smallest:.1f} px at z <= {p.z_max:g}, + 2 x psf_margin {st.psf_margin}); "
            "with these stamps no object's model fits its stamp"
        )


def _check_inputs(job: Job) -> None:
    """The prior loads and matches its config; the catalog has the columns its bands need."""
    cat, so = job.cat, job.options.storage_options
    try:
        load_prior(job.prior, device="cpu")
    except Exception as e:  # any way the prior is unusable is the job's error
        raise JobError(f"prior {job.prior} does not load: {e}") from e
    if not cat.partitions:
        raise JobError(f"catalog {cat.root} has no partitions")
    schema = None
    for part in cat.partitions:  # the first readable one (a broken partition fails alone later)
        fs, path = filesystem(part.uri, so)
        try:
            schema = pq.ParquetDataset(path, filesystem=fs).schema
            break
        except Exception as e:
            log.warning("partition %s: schema unreadable (%s)", part.uri, e)
    if schema is None:
        raise JobError(f"catalog {cat.root}: no partition file is readable")
    wanted = input_column_names(job.config.columns, job.bands)
    missing = [c for k, c in wanted.items() if c not in schema.names and k not in OPTIONAL_INPUTS]
    if missing:
        raise JobError(
            f"catalog {cat.root} lacks required columns {missing} for prior bands "
            f"{list(job.bands)} (set names with ColumnMap / --columns)"
        )
    id_name = wanted[Col.OBJECT_ID]
    if cat.schema is not None and id_name in cat.schema.names:
        schema = cat.schema  # the catalog's own: what every partition should hold
    id_type = schema.field(id_name).type
    # ids are int64 from the start: a float cannot hold 17-digit ids, an uint64 may not fit
    if not pa.types.is_integer(id_type) or pa.types.is_uint64(id_type):
        raise JobError(
            f"catalog {cat.root}: object id column {id_name!r} is {id_type}; object ids must "
            "be a signed 64-bit (or narrower) integer column, read as int64 and never through "
            "a float (make_catalog writes them so)"
        )


def select_partitions(
    cat: InputCatalog, names: tuple[str | HealpixPixel, ...] | None
) -> list[Partition]:
    """The catalog's partitions named in ``names`` ("k/p" or HealpixPixel); None: all."""
    if not names:
        return list(cat.partitions)
    try:
        want = {parse_pixel(n) for n in names}
    except ValueError as e:
        raise JobError(str(e)) from None
    have = {p.healpix: p for p in cat.partitions}
    unknown = sorted(want - set(have))
    if unknown:
        raise JobError(
            f"partitions {[pixel_name(k) for k in unknown]} are not in catalog {cat.root}"
        )
    return [have[k] for k in sorted(want)]


def prepare_output(output: str, overwrite: bool, ledger: Ledger, storage_options) -> None:
    """Make the output root; remove what a killed run left in the work folder. The run's
    lease (``LEASE_FILE``, pipeline/lease.py) stays, even with ``overwrite``."""
    fs, path = filesystem(output, storage_options)
    fs.invalidate_cache(path)
    entries = [
        e for e in (fs.ls(path, detail=False) if fs.exists(path) else [])
        if e.rstrip("/").rsplit("/", 1)[-1] != LEASE_FILE
    ]  # fmt: skip
    if entries:
        if overwrite:
            for entry in entries:
                fs.rm(entry, recursive=True)
        elif not ledger.exists():
            raise JobError(
                f"output {output} exists, is not empty and has no run ledger "
                f"({LEDGER_DIR}); choose another output or overwrite it"
            )
    fs.makedirs(path, exist_ok=True)
    work = join_uri(path, WORK_DIR)
    if fs.exists(work):
        log.info("removing leftovers of an earlier run: %s", work)
        fs.rm(work, recursive=True)


def apply_limit(
    parts: list[Partition], counts: dict[HealpixPixel, int], limit: int | None
) -> dict[HealpixPixel, int]:
    """Rows to take per readable partition: all, or the first ``limit`` in partition order."""
    if limit is None:
        return dict(counts)
    out, left = {}, int(limit)
    for p in parts:
        if p.healpix in counts:
            out[p.healpix] = min(counts[p.healpix], left)
            left -= out[p.healpix]
    return out


def plan_run(job: Job, ledger: Ledger) -> RunPlan:
    """Fingerprint the selected partitions (Ray tasks) and split them by the ledger."""
    opts, cat, so = job.options, job.cat, job.options.storage_options
    selected = select_partitions(cat, opts.partitions)
    # one read per partition file, one listing per folder of cutouts / PSFs (Ray tasks)
    fp = fingerprint_partitions(
        selected, job.config.columns, job.bands, cat.root, cat.healpix_column, so, opts.task_cpus
    )
    fingerprints, counts, failed = dict(fp.fingerprints), dict(fp.rows), dict(fp.failed)
    log.info("fingerprints: %d partition files read, %d folder listings",
             fp.files_read, fp.listings)  # fmt: skip
    if fp.unreachable:
        folder, why = next(iter(sorted(fp.unreachable.items())))
        if fp.listings and len(fp.unreachable) == fp.listings:
            raise JobError(
                f"none of the {fp.listings} folders of the catalog's cutouts and PSFs can be "
                f"reached (e.g. {folder}: {why}); check --storage-options (nothing was done)"
            )
        log.warning("%d of %d cutout / PSF folders cannot be reached (e.g. %s: %s): their "
                    "objects become error rows", len(fp.unreachable), fp.listings, folder,
                    why)  # fmt: skip
    limits = apply_limit(selected, counts, opts.limit)
    if opts.limit is not None:  # a limited run stands only for the rows it took
        fingerprints = {k: f"{fp}:limit={limits[k]}" for k, fp in fingerprints.items()}
    # an object_id of an earlier partition: that row is an error row, and the partition's
    # result depends on the other partition, so its fingerprint says which rows repeat
    repeats = find_repeats(fp, limits, opts.task_cpus)
    for k, rows in repeats.items():
        fingerprints[k] = f"{fingerprints[k]}:repeats={repeats_digest(rows)}"
    if repeats:
        log.warning("%d rows repeat an object_id of another partition (error rows)",
                    sum(map(len, repeats.values())))  # fmt: skip
    previous = ledger.state()
    todo, done = plan(
        previous,
        {k: fp for k, fp in fingerprints.items() if limits.get(k, 0) != 0},
        job.provenance.prior_hash,
        job.provenance.config_hash,
        force=opts.force or bool(opts.read_staged),
    )
    work = join_uri(job.output, WORK_DIR, job.run_id)
    return RunPlan(
        job, work, todo, done, failed, fingerprints, limits, previous, repeats, fp.unreachable
    )
