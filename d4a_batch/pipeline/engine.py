"""The survey run on Ray Data: HATS partitions in, a HATS catalog of posteriors out.

Graph (each arrow a Ray Data operator; objects stream through):

    partitions (from hats metadata)
      -> read      CPU tasks: one partition's rows, engine column names
      -> stage     CPU tasks: fetch + decode FITS, cut stamps, operator parameters,
                   packs of <= batch_size objects of one stamp size (Parquet bytes)
      -> sample    actor pool (prior loaded once per actor; GPU when there is one)
      -> write     CPU tasks: result chunks per partition (+ optional FITS maps)
    driver: progress from the write summaries; then one merge task per partition writes
    ``dataset/Norder=k/Dir=d/Npix=p.parquet`` and the catalog metadata.

Every input object ends as exactly one output row: staging and sampling turn bad
input into error rows, and the driver checks the count at the end.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy

from d4a_batch import __version__
from d4a_batch.config import RunConfig, config_hash, to_dict
from d4a_batch.pipeline.actors import DeconvolveActor, actor_resources, torch_threads_for
from d4a_batch.prior.artifact import read_prior_config
from d4a_batch.schema import RUN_CONFIG_FILE, Col, Status
from d4a_batch.survey.hats_io import (
    ORDER,
    PIXEL,
    InputCatalog,
    Partition,
    open_input_catalog,
    read_partition,
    write_catalog_metadata,
)
from d4a_batch.survey.output import (
    OutputSpec,
    Provenance,
    fits_maps_bytes,
    fits_maps_uri,
    merge_partition,
    write_chunks,
)
from d4a_batch.survey.staging import Stager, make_packs
from d4a_batch.survey.storage import absolute_uri, filesystem, join_uri
from d4a_batch.survey.tensors import tensor_numpy

log = logging.getLogger(__name__)
WORK_DIR = "_d4a_work"  # result chunks while the run goes on (removed at the end)
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
        tables.append(t.slice(0, int(limit)) if limit >= 0 else t)
    return pa.concat_tables(tables)


def _read_packs(batch: dict[str, Any], storage_options) -> pa.Table:
    tables = []
    for uri in batch["uri"]:
        fs, path = filesystem(str(uri), storage_options)
        tables.append(pq.read_table(path, filesystem=fs, schema=PACK_ROW_SCHEMA))
    return pa.concat_tables(tables)


def _stage(batch: pa.Table, stager: Stager, pack_size: int, threads: int) -> pa.Table:
    objs = stager.stage_rows(batch.to_pylist(), threads)
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


@ray.remote
def _merge(work_root: str, output_root: str, order: int, pixel: int, storage_options) -> int:
    return merge_partition(work_root, output_root, order, pixel, storage_options)


# --------------------------------------------------------------------------- the run
def _partition_limits(
    cat: InputCatalog, limit: int | None, storage_options
) -> tuple[list[dict[str, Any]], int | None]:
    """Partition rows for the read stage (with per-partition row limits) and the expected total."""
    if limit is None:
        rows = [
            {"order": p.order, "pixel": p.pixel, "uri": p.uri, "limit": -1} for p in cat.partitions
        ]
        return rows, cat.total_rows
    rows, left = [], int(limit)
    for p in cat.partitions:
        if left <= 0:
            break
        fs, path = filesystem(p.uri, storage_options)
        n = sum(f.metadata.num_rows for f in pq.ParquetDataset(path, filesystem=fs).fragments)
        rows.append({"order": p.order, "pixel": p.pixel, "uri": p.uri, "limit": min(n, left)})
        left -= min(n, left)
    return rows, int(limit) - left


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


def _prepare_output(output: str, overwrite: bool, storage_options) -> None:
    fs, path = filesystem(output, storage_options)
    if fs.exists(path) and fs.ls(path):
        if not overwrite:
            raise FileExistsError(f"output {output} exists and is not empty (use overwrite)")
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)


def run_survey(
    catalog: str,
    output: str,
    prior: str,
    config: RunConfig | None = None,
    options: ExecutionOptions | None = None,
) -> RunSummary:
    """Deconvolve every object of the HATS ``catalog``; write the HATS catalog ``output``.

    ``prior``: a prior artifact folder readable by every actor. Local paths are made
    absolute (Ray jobs run in a temporary working copy); URLs pass through fsspec with
    ``options.storage_options``. Uses the Ray cluster this process is connected to
    (Ray Data starts a local one otherwise).
    """
    config = config or RunConfig()
    opts = options or ExecutionOptions()
    so = opts.storage_options
    catalog, output, prior = absolute_uri(catalog), absolute_uri(output), absolute_uri(prior)
    t0 = time.monotonic()
    prior_cfg, prior_meta = read_prior_config(prior)
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
    cat = open_input_catalog(catalog, so)
    parts, expected = _partition_limits(cat, opts.limit, so)
    if opts.read_staged:
        expected = None  # the staged packs say how many objects they hold
    _prepare_output(output, opts.overwrite, so)
    work = join_uri(output, WORK_DIR)
    actors, cpus, gpus = actor_resources(
        ray.cluster_resources(),
        opts.actors,
        opts.gpus_per_actor,
        opts.cpus_per_actor,
        opts.task_cpus,
    )
    log.info(
        "run %s: %s -> %s, prior %s (%s), %d partitions, %s objects, %d actors x (%g CPU, %g GPU)",
        run_id, catalog, output, provenance.prior_id, provenance.prior_hash[:12], len(parts),
        expected, actors, cpus, gpus,
    )  # fmt: skip

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
    summary = RunSummary(output=output, run_id=run_id)
    last = time.monotonic()
    for row in summaries.iter_rows():
        summary.add(row)
        summary.seconds = time.monotonic() - t0
        if time.monotonic() - last >= opts.progress_interval_s:
            log.info("progress: %s", summary.line(expected))
            last = time.monotonic()
    if summary.objects == 0:
        raise RuntimeError(f"no objects were processed from {catalog}")

    pixels = sorted(summary.per_partition)
    merge = _merge.options(num_cpus=opts.task_cpus)
    merged = sum(ray.get([merge.remote(work, output, o, p, so) for o, p in pixels]))
    if expected is not None and merged != expected:
        raise RuntimeError(f"{merged} output rows for {expected} input objects")
    shapes = spec.map_shapes() if config.write_maps else {}
    extra = {
        "d4a_run_id": run_id,
        "d4a_input_catalog": catalog,
        "d4a_prior_id": provenance.prior_id,
        "d4a_prior_hash": provenance.prior_hash,
        "d4a_config_hash": provenance.config_hash,
        "d4a_code_version": __version__,
        "d4a_map_shapes": json.dumps({k: list(v) for k, v in shapes.items()}),
    }
    write_catalog_metadata(output, pixels, f"{cat.name}_posteriors", extra, so)
    fs, path = filesystem(output, so)
    with fs.open(join_uri(path, RUN_CONFIG_FILE), "w") as f:
        f.write(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")
    fs.rm(filesystem(work, so)[1], recursive=True)
    summary.partitions = len(pixels)
    summary.seconds = time.monotonic() - t0
    log.info("done: %s -> %s", summary.line(expected), output)
    return summary
