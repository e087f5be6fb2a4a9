"""Before any work: check the job, prepare the output, plan the run (a frozen ``RunPlan``).

``check_job`` reads the prior's config and the catalog's metadata and checks that the
prior loads and the catalog has the columns its bands need (``JobError`` otherwise);
it writes nothing. ``prepare_output`` makes the output root and clears what a killed
run left in the work folder. ``plan_run`` fingerprints every selected partition (Ray
tasks: one read of each partition file, one listing per cutout / PSF folder, see
``fingerprint.py``; an unreadable partition fails alone), applies ``--limit`` and asks
the ledger which partitions are up to date.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pyarrow.parquet as pq
from hats.pixel_math import HealpixPixel

from d4a_batch.config import PriorConfig, RunConfig
from d4a_batch.pipeline.fingerprint import fingerprint_partitions
from d4a_batch.pipeline.ledger import (
    Ledger,
    PartitionRecord,
    parse_pixel,
    pixel_name,
    plan,
)
from d4a_batch.pipeline.options import ExecutionOptions, JobError
from d4a_batch.prior.artifact import load_prior, read_prior_config
from d4a_batch.schema import LEASE_FILE, LEDGER_DIR, WORK_DIR
from d4a_batch.survey.hats_io import (
    INPUT_PHOTOZ_HI,
    INPUT_PHOTOZ_LO,
    InputCatalog,
    Partition,
    input_column_names,
    open_input_catalog,
)
from d4a_batch.survey.output import OutputSpec, Provenance
from d4a_batch.survey.storage import absolute_uri, filesystem, join_uri

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
    of each partition before this run.
    """

    job: Job
    work: str  # this run's work folder (result chunks, partitions being committed)
    todo: dict[HealpixPixel, str]
    done: list[HealpixPixel]
    failed: dict[HealpixPixel, str]
    fingerprints: dict[HealpixPixel, str]
    limits: dict[HealpixPixel, int]
    previous: dict[HealpixPixel, PartitionRecord]

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
    select_partitions(cat, opts.partitions)  # unknown names are the job's error
    return job


def _check_inputs(job: Job) -> None:
    """The prior loads and matches its config; the catalog has the columns its bands need."""
    cat, so = job.cat, job.options.storage_options
    try:
        load_prior(job.prior, device="cpu")
    except Exception as e:  # any way the prior is unusable is the job's error
        raise JobError(f"prior {job.prior} does not load: {e}") from e
    if not cat.partitions:
        raise JobError(f"catalog {cat.root} has no partitions")
    names = None
    for part in cat.partitions:  # the first readable one (a broken partition fails alone later)
        fs, path = filesystem(part.uri, so)
        try:
            names = pq.ParquetDataset(path, filesystem=fs).schema.names
            break
        except Exception as e:
            log.warning("partition %s: schema unreadable (%s)", part.uri, e)
    if names is None:
        raise JobError(f"catalog {cat.root}: no partition file is readable")
    wanted = input_column_names(job.config.columns, job.bands)
    missing = [c for k, c in wanted.items() if c not in names and k not in OPTIONAL_INPUTS]
    if missing:
        raise JobError(
            f"catalog {cat.root} lacks required columns {missing} for prior bands "
            f"{list(job.bands)} (set names with ColumnMap / --columns)"
        )


def select_partitions(
    cat: InputCatalog, names: tuple[str | HealpixPixel, ...] | None
) -> list[Partition]:
    """The catalog's partitions named in ``names`` ("k/p" or HealpixPixel); None: all."""
    if not names:
        return list(cat.partitions)
    want = {parse_pixel(n) for n in names}
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
    limits = apply_limit(selected, counts, opts.limit)
    if opts.limit is not None:  # a limited run stands only for the rows it took
        fingerprints = {k: f"{fp}:limit={limits[k]}" for k, fp in fingerprints.items()}
    previous = ledger.state()
    todo, done = plan(
        previous,
        {k: fp for k, fp in fingerprints.items() if limits.get(k, 0) != 0},
        job.provenance.prior_hash,
        job.provenance.config_hash,
        force=opts.force or bool(opts.read_staged),
    )
    work = join_uri(job.output, WORK_DIR, job.run_id)
    return RunPlan(job, work, todo, done, failed, fingerprints, limits, previous)
