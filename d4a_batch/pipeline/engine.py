"""The survey run on Ray Data: HATS partitions in, a HATS catalog of posteriors out.

Before any work: the prior loads and matches its config, the catalog has the
columns the prior's bands need (else JobError), and each selected partition gets a
fingerprint (its file's content, its rows' cutout and PSF files). The run ledger
(``pipeline/ledger.py``) then says which partitions are up to date; only the others
go through the graph (each arrow a Ray Data operator; objects stream through):

    partitions to process
      -> read      CPU tasks: one partition's rows, engine column names; repeated
                   object_ids marked
      -> stage     CPU tasks: fetch + decode FITS, cut stamps, operator parameters,
                   packs of <= batch_size objects of one stamp size (Parquet bytes)
      -> sample    actor pool (prior loaded once per actor; GPU when there is one;
                   a dead actor is restarted and its batch retried)
      -> write     CPU tasks: result chunks per partition (+ optional FITS maps)
    driver: progress from the write summaries; as soon as a partition has all its
    rows, a commit task merges its chunks (each row once), checks the count, writes
    ``dataset/Norder=k/Dir=d/Npix=p.parquet`` aside and moves it into place; then the
    ledger records it. At the end: the catalog metadata over every partition file.

Every input object ends as exactly one output row: staging and sampling turn bad
input into error rows; a partition whose row count does not match is not
committed and is reported as failed. A run killed midway keeps what it committed;
the next run does the rest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy

from d4a_batch import __version__
from d4a_batch.config import RunConfig, config_hash, to_dict
from d4a_batch.pipeline.actors import DeconvolveActor, actor_resources, torch_threads_for
from d4a_batch.pipeline.ledger import (
    FAILED,
    OK,
    Ledger,
    PartitionRecord,
    RunRecord,
    parse_pixel,
    partition_fingerprint,
    pixel_name,
    plan,
    reason,
)
from d4a_batch.prior.artifact import load_prior, read_prior_config
from d4a_batch.schema import DATASET_DIR, LEDGER_DIR, RUN_CONFIG_FILE, WORK_DIR, Col, Status
from d4a_batch.survey.hats_io import (
    INPUT_PHOTOZ_HI,
    INPUT_PHOTOZ_LO,
    ORDER,
    PIXEL,
    InputCatalog,
    Partition,
    input_column_names,
    open_input_catalog,
    read_partition,
    write_catalog_metadata,
)
from d4a_batch.survey.output import (
    OutputSpec,
    Provenance,
    commit_partition,
    fits_maps_bytes,
    fits_maps_uri,
    merge_chunks,
    status_counts,
    write_chunks,
)
from d4a_batch.survey.staging import IDENTITY, StagedObject, Stager, make_packs
from d4a_batch.survey.storage import absolute_uri, filesystem, join_uri
from d4a_batch.survey.tensors import tensor_numpy

log = logging.getLogger(__name__)
OPTIONAL_INPUTS = (INPUT_PHOTOZ_LO, INPUT_PHOTOZ_HI)
DUPLICATE = "_d4a_duplicate"  # read -> stage: why a row is not processed (a repeated object_id)
SMALL_BLOCK_BYTES = 256 * 1024  # below the size of one pack (see _one_pack_per_block)
# one row per pack between the stage and sample operators (see staging.make_packs)
PACK_ROW_SCHEMA = pa.schema(
    [
        ("pack_id", pa.string()),
        ("kind", pa.string()),
        ("stamp_size", pa.int32()),
        ("n_objects", pa.int32()),
        ("pack", pa.large_binary()),
    ]
)


@dataclass(frozen=True)
class ExecutionOptions:
    """How a run executes (not what it computes: none of this enters the config hash)."""

    actors: int | None = None  # sampling actors; None: one per GPU, else 1
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float | None = None  # None: the CPUs minus headroom for tasks
    batch_size: int = 8  # objects per sampler call (a pack); on GPUs use more (64)
    limit: int | None = None  # process only the first N objects (partition order)
    task_cpus: float = 0.25  # CPUs of each read / stage / write task
    stage_threads: int = 8  # concurrent file fetches within a staging task
    storage_options: dict[str, Any] | None = None  # fsspec options for every URI
    overwrite: bool = False
    progress_interval_s: float = 15.0
    write_staged: str | None = None  # also write the staged packs here (Parquet)
    read_staged: str | None = None  # take staged packs from here instead of staging
    force: bool = False  # reprocess partitions the ledger says are up to date
    partitions: tuple[str, ...] | None = None  # only these ("order/pixel"); None: all


@dataclass
class RunSummary:
    """What a run did."""

    output: str
    run_id: str
    objects: int = 0
    ok: int = 0
    failed: int = 0
    flagged: int = 0
    partitions: int = 0
    seconds: float = 0.0
    per_partition: dict[tuple[int, int], int] = field(default_factory=dict)
    committed: list[str] = field(default_factory=list)  # partitions written by this run
    skipped: list[str] = field(default_factory=list)  # up to date (ledger)
    failed_partitions: dict[str, str] = field(default_factory=dict)  # "k/p" -> why

    @property
    def objects_per_s(self) -> float:
        return self.objects / self.seconds if self.seconds > 0 else 0.0

    def add(self, row: dict[str, Any]) -> None:
        key = (int(row[ORDER]), int(row[PIXEL]))
        self.per_partition[key] = self.per_partition.get(key, 0) + int(row["n"])
        self.objects += int(row["n"])
        self.ok += int(row["n_ok"])
        self.failed += int(row["n_error"])
        self.flagged += int(row["n_flagged"])

    def line(self, total: int | None = None) -> str:
        done = f"{self.objects}/{total}" if total else f"{self.objects}"
        text = (
            f"{done} objects: {self.ok} ok ({self.flagged} flagged), {self.failed} failed; "
            f"{self.objects_per_s:.2f} objects/s over {self.seconds:.0f} s"
        )
        if total and 0 < self.objects < total:
            text += f", about {(total - self.objects) / self.objects_per_s:.0f} s to go"
        if self.skipped:
            text += f"; {len(self.skipped)} partitions up to date (skipped)"
        if self.failed_partitions:
            text += f"; FAILED partitions: {', '.join(sorted(self.failed_partitions))}"
        return text


# --------------------------------------------------------------------------- stage functions
def _read(batch: dict[str, Any], columns, bands, healpix_column, storage_options) -> pa.Table:
    tables = []
    for order, pixel, uri, limit in zip(
        batch["order"], batch["pixel"], batch["uri"], batch["limit"]
    ):
        t = read_partition(
            Partition(int(order), int(pixel), str(uri)),
            columns,
            bands,
            healpix_column,
            storage_options,
        )
        t = t.slice(0, int(limit)) if limit >= 0 else t
        tables.append(t.append_column(DUPLICATE, _duplicates(t[Col.OBJECT_ID].to_pylist())))
    return pa.concat_tables(tables)


def _duplicates(ids: list[int]) -> pa.Array:
    """Per row: null, or why it is not processed (its object_id came earlier in the partition).

    HATS partitions by position, so repeats of an object land in the same partition.
    """
    first: dict[int, int] = {}
    out: list[str | None] = []
    for i, oid in enumerate(ids):
        if oid in first:
            out.append(
                f"duplicate object_id {oid}: input row {i} of this partition repeats row "
                f"{first[oid]}, which was processed; this row was not"
            )
        else:
            first[oid] = i
            out.append(None)
    return pa.array(out, pa.string())


def _read_packs(batch: dict[str, Any], storage_options) -> pa.Table:
    tables = []
    for uri in batch["uri"]:
        fs, path = filesystem(str(uri), storage_options)
        tables.append(pq.read_table(path, filesystem=fs, schema=PACK_ROW_SCHEMA))
    return pa.concat_tables(tables)


def _stage(batch: pa.Table, stager: Stager, pack_size: int, threads: int) -> pa.Table:
    rows = batch.to_pylist()
    reasons = [r.pop(DUPLICATE) for r in rows]
    staged = iter(stager.stage_rows([r for r, d in zip(rows, reasons) if d is None], threads))
    c = len(stager.prior.bands)
    objs = [
        next(staged)
        if d is None
        else StagedObject(
            ident={k: r[k] for k in IDENTITY},
            psf_sum=np.full(c, np.nan),
            psf_centroid=np.full(c, np.nan),
            error=d,
        )
        for r, d in zip(rows, reasons)
    ]
    return pa.Table.from_pylist(make_packs(objs, pack_size), schema=PACK_ROW_SCHEMA)


def _write(
    batch: pa.Table,
    work_root: str,
    output_root: str,
    spec: OutputSpec,
    keep_maps: bool,
    fits_maps: bool,
    zeropoint: float,
    storage_options: dict[str, Any] | None,
) -> pa.Table:
    if fits_maps:
        maps = {name: tensor_numpy(batch[name]) for name in spec.map_shapes()}
        scalars = batch.drop_columns(list(maps)).to_pylist()
        for i, row in enumerate(scalars):
            if row[Col.STATUS] != Status.OK:
                continue
            row |= {name: arr[i] for name, arr in maps.items()}
            uri = fits_maps_uri(output_root, row[ORDER], row[PIXEL], row[Col.OBJECT_ID])
            fs, path = filesystem(uri, storage_options)
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(path, "wb") as f:
                f.write(fits_maps_bytes(row, spec.bands, zeropoint))
    if not keep_maps:
        batch = batch.drop_columns([n for n in spec.map_shapes() if n in batch.column_names])
    return pa.Table.from_pylist(write_chunks(batch, work_root, storage_options))


# --------------------------------------------------------------------------- the run
def _one_pack_per_block(root: ray.data.Dataset) -> ray.data.Dataset:
    """Small blocks, no progress bars for this run (its datasets share the root's context).

    Actor tasks take whole blocks: with blocks smaller than a pack, every pack is its own
    block, so packs spread over the actors and results stream out pack by pack (instead
    of one actor sampling all packs of a staging batch). The write stage regroups rows.
    Ray's global DataContext is left alone.
    """
    root.context.target_max_block_size = SMALL_BLOCK_BYTES
    root.context.enable_progress_bars = False
    return root


def _read_staged(uri: str, storage_options, task_cpus: float) -> ray.data.Dataset:
    """The staged packs written by an earlier run (one read task per Parquet file).

    Not ``ray.data.read_parquet``: its file listing asks for a whole CPU, which the
    actors may hold.
    """
    fs, path = filesystem(absolute_uri(uri), storage_options)
    files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no staged packs (*.parquet) under {uri}")
    items = [{"uri": fs.unstrip_protocol(f)} for f in files]
    return _one_pack_per_block(
        ray.data.from_items(items, override_num_blocks=len(items))
    ).map_batches(
        _read_packs,
        fn_kwargs={"storage_options": storage_options},
        batch_size=1,
        num_cpus=task_cpus,
    )


class JobError(ValueError):
    """A problem with the job's inputs, found before any work starts (exit code 2)."""


def _check_inputs(cat: InputCatalog, prior: str, config: RunConfig, prior_cfg, so) -> None:
    """Job-level checks: the prior loads and matches its config; the catalog has the columns."""
    try:
        load_prior(prior, device="cpu")
    except Exception as e:  # any way the prior is unusable is the job's error
        raise JobError(f"prior {prior} does not load: {e}") from e
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
    wanted = input_column_names(config.columns, tuple(prior_cfg.bands))
    missing = [c for k, c in wanted.items() if c not in names and k not in OPTIONAL_INPUTS]
    if missing:
        raise JobError(
            f"catalog {cat.root} lacks required columns {missing} for prior bands "
            f"{list(prior_cfg.bands)} (set names with ColumnMap / --columns)"
        )


def _prepare_output(output: str, overwrite: bool, ledger: Ledger, storage_options) -> None:
    """Make the output root; remove what a killed run left in the work folder."""
    fs, path = filesystem(output, storage_options)
    if fs.exists(path) and fs.ls(path):
        if overwrite:
            fs.rm(path, recursive=True)
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


@ray.remote
def _fingerprint(part: Partition, columns, bands, root, healpix_column, storage_options):
    """(key, fingerprint, rows, None), or (key, "", 0, why) when the partition is unusable."""
    try:
        fp, n = partition_fingerprint(part, columns, bands, root, -1, storage_options)
        # the read stage must not fail later on this partition (column types, e.g. object_id)
        read_partition(part, columns, bands, healpix_column, storage_options)
        return (part.order, part.pixel), fp, n, None
    except Exception as e:  # an unreadable partition fails alone
        return (part.order, part.pixel), "", 0, f"cannot read partition {part.uri}: {e}"


@ray.remote
def _commit(work, output, order, pixel, expected, storage_options) -> dict[str, Any]:
    """Merge a partition's chunks, check its row count, commit it; its counts."""
    table = merge_chunks(work, order, pixel, storage_options)
    if expected is not None and table.num_rows != expected:
        raise RuntimeError(f"{table.num_rows} result rows for {expected} input rows")
    commit_partition(table, output, join_uri(work, "commit"), order, pixel, storage_options)
    return status_counts(table)


def _select(cat: InputCatalog, names: tuple[str, ...] | None) -> list[Partition]:
    if not names:
        return list(cat.partitions)
    want = {parse_pixel(n) for n in names}
    have = {(p.order, p.pixel): p for p in cat.partitions}
    unknown = sorted(want - set(have))
    if unknown:
        raise JobError(
            f"partitions {[pixel_name(*k) for k in unknown]} are not in catalog {cat.root}"
        )
    return [have[k] for k in sorted(want)]


def run_survey(
    catalog: str,
    output: str,
    prior: str,
    config: RunConfig | None = None,
    options: ExecutionOptions | None = None,
) -> RunSummary:
    """Deconvolve the objects of the HATS ``catalog`` that need it; update the catalog ``output``.

    Partitions whose ledger record matches their input fingerprint, the prior and the
    config are skipped (``options.force`` redoes them); each processed partition is
    committed atomically as soon as all its rows are written, then recorded in the
    ledger, so a killed run loses at most the partitions in flight. ``prior``: a prior
    artifact folder readable by every actor. Local paths are made absolute (Ray jobs run
    in a temporary working copy); URLs pass through fsspec with ``options.storage_options``.
    Uses the Ray cluster this process is connected to (Ray Data starts a local one
    otherwise). Raises JobError for bad inputs found before any work starts.
    """
    config = config or RunConfig()
    opts = options or ExecutionOptions()
    so = opts.storage_options
    catalog, output, prior = absolute_uri(catalog), absolute_uri(output), absolute_uri(prior)
    t0 = time.monotonic()
    try:
        prior_cfg, prior_meta = read_prior_config(prior)
    except Exception as e:
        raise JobError(f"prior {prior}: {e}") from e
    created = datetime.now(UTC)
    run_id = f"{created:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    provenance = Provenance(
        run_id=run_id,
        prior_id=str(prior_meta.get("prior_id", prior_cfg.name)),
        prior_hash=str(prior_meta.get("weights_sha256", "")),
        config_hash=config_hash(config),
        code_version=__version__,
        seed=config.sampler.seed,
        steps=config.sampler.steps,
        samples=config.sampler.samples,
        created_utc=created,
    )
    spec = OutputSpec(
        bands=tuple(prior_cfg.bands),
        image_size=prior_cfg.image_size,
        maps=config.write_maps or config.fits_maps,
        map_dtype=config.map_dtype,
        keep_samples=config.sampler.keep_samples,
    )
    bands = tuple(prior_cfg.bands)
    try:
        cat = open_input_catalog(catalog, so)
    except Exception as e:
        raise JobError(f"catalog {catalog} does not open as a HATS catalog: {e}") from e
    _check_inputs(cat, prior, config, prior_cfg, so)
    selected = _select(cat, opts.partitions)
    ledger = Ledger(output, so)
    _prepare_output(output, opts.overwrite, ledger, so)
    work = join_uri(output, WORK_DIR, run_id)
    summary = RunSummary(output=output, run_id=run_id)

    # fingerprints (one task per partition; an unreadable partition fails alone)
    fp_task = _fingerprint.options(num_cpus=opts.task_cpus)
    results = ray.get(
        [
            fp_task.remote(p, config.columns, bands, cat.root, cat.healpix_column, so)
            for p in selected
        ]
    )
    fingerprints, counts, failed = {}, {}, {}
    for key, fp, n, err in results:
        if err:
            failed[key] = err
        else:
            fingerprints[key], counts[key] = fp, n
    limits = _apply_limit(selected, counts, opts.limit)
    if opts.limit is not None:  # a limited run stands only for the rows it took
        fingerprints = {k: f"{fp}:limit={limits[k]}" for k, fp in fingerprints.items()}
    state = ledger.state()
    todo, done = plan(
        state,
        {k: fp for k, fp in fingerprints.items() if limits.get(k, 0) != 0},
        provenance.prior_hash,
        provenance.config_hash,
        force=opts.force or bool(opts.read_staged),
    )
    run = RunRecord(
        run_id=run_id,
        created_utc=created.isoformat(),
        catalog=catalog,
        prior_id=provenance.prior_id,
        prior_hash=provenance.prior_hash,
        config_hash=provenance.config_hash,
        code_version=__version__,
        processed={pixel_name(*k): r for k, r in todo.items()},
        skipped=[pixel_name(*k) for k in done],
        failed={pixel_name(*k): m for k, m in failed.items()},
    )
    ledger.write_run(run)
    for key, msg in failed.items():  # unreadable: why this run tried it at all
        why = reason(state.get(key), None, provenance.prior_hash, provenance.config_hash)
        ledger.write_partition(_record(run_id, key, FAILED, "", provenance, why, msg, t0))
    summary.skipped = [pixel_name(*k) for k in done]
    summary.failed_partitions = {pixel_name(*k): m for k, m in failed.items()}
    log.info(
        "run %s: %s -> %s, prior %s (%s), config %s; %d partitions to process, %d up to date, "
        "%d unreadable",
        run_id, catalog, output, provenance.prior_id, provenance.prior_hash[:12],
        provenance.config_hash[:12], len(todo), len(done), len(failed),
    )  # fmt: skip
    if todo:
        _process(
            cat, prior, prior_cfg, config, opts, spec, provenance, work, ledger, todo,
            {k: fingerprints[k] for k in todo}, {k: limits[k] for k in todo}, summary, t0,
        )  # fmt: skip
    else:
        log.info("nothing to do: every selected partition is up to date (no sampling)")

    fs, path = filesystem(output, so)
    pixels = _committed_pixels(output, so)
    if pixels and todo:
        shapes = spec.map_shapes() if config.write_maps else {}
        extra = {
            "d4a_run_id": run_id,
            "d4a_input_catalog": catalog,
            "d4a_prior_id": provenance.prior_id,
            "d4a_prior_hash": provenance.prior_hash,
            "d4a_config_hash": provenance.config_hash,
            "d4a_code_version": __version__,
            "d4a_created_utc": created.isoformat(),
            "d4a_map_shapes": json.dumps({k: list(v) for k, v in shapes.items()}),
        }
        write_catalog_metadata(output, pixels, f"{cat.name}_posteriors", extra, so)
        with fs.open(join_uri(path, RUN_CONFIG_FILE), "w") as f:
            f.write(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")
    work_path = filesystem(join_uri(output, WORK_DIR), so)[1]
    if fs.exists(work_path):
        fs.rm(work_path, recursive=True)
    summary.partitions = len(summary.committed)
    summary.seconds = time.monotonic() - t0
    ledger.write_run(
        dataclasses.replace(
            run,
            status=OK if not summary.failed_partitions else FAILED,
            finished_utc=datetime.now(UTC).isoformat(),
            processed={
                n: r
                for n, r in run.processed.items()
                if n in summary.committed or n in summary.failed_partitions
            },
            failed=summary.failed_partitions,
            objects=summary.objects,
            seconds=summary.seconds,
        )
    )
    log.info("done: %s -> %s", summary.line(), output)
    return summary


def _apply_limit(
    parts: list[Partition], counts: dict[tuple[int, int], int], limit: int | None
) -> dict[tuple[int, int], int]:
    """Rows to take per readable partition: all, or the first ``limit`` in partition order."""
    if limit is None:
        return dict(counts)
    out, left = {}, int(limit)
    for p in parts:
        key = (p.order, p.pixel)
        if key in counts:
            out[key] = min(counts[key], left)
            left -= out[key]
    return out


def _record(run_id, key, status, fingerprint, prov: Provenance, reason, msg, t0, counts=None):
    return PartitionRecord(
        order=key[0],
        pixel=key[1],
        run_id=run_id,
        status=status,
        fingerprint=fingerprint,
        prior_hash=prov.prior_hash,
        config_hash=prov.config_hash,
        reason=reason,
        message=msg,
        seconds=time.monotonic() - t0,
        committed_utc=datetime.now(UTC).isoformat(),
        **(counts or {}),
    )


def _committed_pixels(output: str, so) -> list[tuple[int, int]]:
    """(order, pixel) of every partition file in the output catalog."""
    fs, path = filesystem(join_uri(output, DATASET_DIR), so)
    if not fs.exists(path):
        return []
    found = []
    for f in fs.glob(f"{path}/Norder=*/Dir=*/Npix=*.parquet"):
        parts = dict(seg.split("=", 1) for seg in f.split("/") if "=" in seg)
        found.append((int(parts["Norder"]), int(parts["Npix"].removesuffix(".parquet"))))
    return sorted(found)


def _process(
    cat, prior, prior_cfg, config, opts, spec, provenance, work, ledger, todo, fingerprints,
    limits, summary: RunSummary, t0: float,
) -> None:  # fmt: skip
    """Run the Ray Data graph over the ``todo`` partitions; commit each as it completes."""
    so = opts.storage_options
    output = summary.output
    parts = [
        {"order": p.order, "pixel": p.pixel, "uri": p.uri, "limit": limits[(p.order, p.pixel)]}
        for p in cat.partitions
        if (p.order, p.pixel) in todo
    ]
    expected = None if opts.read_staged else dict(limits)
    total = sum(expected.values()) if expected else None
    actors, cpus, gpus = actor_resources(
        ray.cluster_resources(),
        opts.actors,
        opts.gpus_per_actor,
        opts.cpus_per_actor,
        opts.task_cpus,
    )
    log.info("%d partitions, %s objects, %d actors x (%g CPU, %g GPU)",
             len(parts), total, actors, cpus, gpus)  # fmt: skip

    # every task asks for task_cpus only: the actors hold the rest (Ray's readers and
    # writers default to 1 CPU, which would leave them unscheduled next to the actors)
    if opts.read_staged:
        staged = _read_staged(opts.read_staged, so, opts.task_cpus)
    else:
        stager = Stager(cat.root, prior_cfg, config.physics, config.staging, so)
        rows = _one_pack_per_block(
            ray.data.from_items(parts, override_num_blocks=max(1, len(parts)))
        ).map_batches(
            _read,
            fn_kwargs={
                "columns": config.columns,
                "bands": tuple(prior_cfg.bands),
                "healpix_column": cat.healpix_column,
                "storage_options": so,
            },
            batch_size=1,
            num_cpus=opts.task_cpus,
        )
        staged = rows.map_batches(
            _stage,
            fn_kwargs={
                "stager": stager,
                "pack_size": opts.batch_size,
                "threads": opts.stage_threads,
            },
            # staging batches of several packs fill packs better (GPUs); one pack per
            # batch spreads small runs over the CPU actors
            batch_size=(4 if gpus > 0 else 1) * opts.batch_size,
            batch_format="pyarrow",
            num_cpus=opts.task_cpus,
        )
        if opts.write_staged:
            fs, path = filesystem(absolute_uri(opts.write_staged), so)
            staged.write_parquet(
                path,
                filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)),
                ray_remote_args={"num_cpus": opts.task_cpus},
            )
            staged = _read_staged(opts.write_staged, so, opts.task_cpus)
    results = staged.map_batches(
        DeconvolveActor,
        fn_constructor_kwargs={
            "prior_path": prior,
            "run_config": to_dict(config),
            "spec": spec,
            "provenance": provenance,
            "torch_threads": None if gpus > 0 else torch_threads_for(cpus),
        },
        compute=ActorPoolStrategy(size=actors),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=cpus,
        num_gpus=gpus,
        # an actor that dies (node lost, OOM, killed) is restarted and its batch retried
        max_restarts=-1,
        max_task_retries=-1,
    )
    summaries = results.map_batches(
        _write,
        fn_kwargs={
            "work_root": work,
            "output_root": output,
            "spec": spec,
            "keep_maps": config.write_maps,
            "fits_maps": config.fits_maps,
            "zeropoint": config.physics.zeropoint_ab,
            "storage_options": so,
        },
        batch_size=opts.batch_size,
        batch_format="pyarrow",
        num_cpus=opts.task_cpus,
    )

    commit = _commit.options(num_cpus=opts.task_cpus)
    written: dict[tuple[int, int], int] = {}
    pending: dict[ray.ObjectRef, tuple[int, int]] = {}

    def submit(key):
        n = None if expected is None else expected[key]
        pending[commit.remote(work, output, key[0], key[1], n, so)] = key

    def collect(timeout: float | None) -> None:
        refs = list(pending)
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for ref in ready:
            key = pending.pop(ref)
            name = pixel_name(*key)
            try:
                counts = ray.get(ref)
            except Exception as e:  # this partition failed; the others go on
                msg = f"commit failed: {getattr(e, 'cause', None) or e}"
                summary.failed_partitions[name] = msg
                ledger.write_partition(
                    _record(
                        summary.run_id,
                        key,
                        FAILED,
                        fingerprints[key],
                        provenance,
                        todo[key],
                        msg,
                        t0,
                    )
                )
                log.error("partition %s failed: %s", name, msg)
                continue
            summary.committed.append(name)
            ledger.write_partition(
                _record(
                    summary.run_id,
                    key,
                    OK,
                    fingerprints[key],
                    provenance,
                    todo[key],
                    "",
                    t0,
                    counts,
                )
            )
            log.info("partition %s committed: %d rows", name, counts["rows"])

    last = time.monotonic()
    for row in summaries.iter_rows():
        summary.add(row)
        key = (int(row[ORDER]), int(row[PIXEL]))
        written[key] = written.get(key, 0) + int(row["n"])
        if expected is not None and written[key] == expected[key]:
            submit(key)  # all its rows are written: commit it now
        collect(timeout=0)
        summary.seconds = time.monotonic() - t0
        if time.monotonic() - last >= opts.progress_interval_s:
            log.info("progress: %s", summary.line(total))
            last = time.monotonic()
    committed_or_pending = set(pending.values()) | {parse_pixel(n) for n in summary.committed}
    for key in sorted(written):
        if key not in committed_or_pending:
            submit(key)  # row counts disagreed (the commit re-checks them)
    collect(timeout=None)
    for key in sorted(set(todo) - set(written)):
        if expected is not None and expected[key] > 0:
            name = pixel_name(*key)
            msg = "no result rows were written"
            summary.failed_partitions[name] = msg
            ledger.write_partition(
                _record(
                    summary.run_id, key, FAILED, fingerprints[key], provenance, todo[key], msg, t0
                )
            )
