"""The survey run on Ray Data: HATS partitions in, a HATS catalog of posteriors out.

``run_survey`` wires the jobs of a run, each in its own module:

    plan.py     check the job (prior, catalog columns; JobError), prepare the output,
                fingerprint the partitions and ask the ledger which are up to date
                -> a frozen RunPlan
    stages.py   the stage functions, wired here into a Ray Data graph (each arrow an
                operator; objects stream through):
        partitions to process
          -> read      CPU tasks: one partition's rows, repeated object_ids marked
          -> stage     CPU tasks: fetch + decode FITS, cut stamps, operator parameters,
                       packs of <= batch_size objects of one stamp size (survey/packs.py)
          -> sample    actor pool (actors.py: prior loaded once per actor; GPU when there
                       is one; a dead actor is restarted and its batch retried)
          -> write     CPU tasks: result chunks per partition (+ optional FITS maps)
    commit.py   as soon as a partition has all its rows, a commit task merges its chunks
                (each row once), checks the count, writes
                ``dataset/Norder=k/Dir=d/Npix=p.parquet`` aside and moves it into place;
                the ledger records it. At the end: the catalog metadata over every
                partition file and the run's end record.

Every input object ends as exactly one output row: staging and sampling turn bad
input into error rows; a partition whose row count does not match is not
committed and is reported as failed. A run killed midway keeps what it committed;
the next run does the rest.
"""

from __future__ import annotations

import logging
import time

import pyarrow.fs as pafs
import ray
from hats.pixel_math import HealpixPixel
from ray.data import ActorPoolStrategy

from d4a_batch.config import RunConfig, to_dict
from d4a_batch.pipeline.actors import (
    DeconvolveActor,
    actor_resources,
    split_packs,
    torch_threads_for,
)
from d4a_batch.pipeline.commit import Commits, finish_run, start_run
from d4a_batch.pipeline.lease import Lease, hold_lease
from d4a_batch.pipeline.ledger import Ledger
from d4a_batch.pipeline.options import ExecutionOptions, JobError, RunSummary
from d4a_batch.pipeline.plan import Job, RunPlan, check_job, plan_run, prepare_output
from d4a_batch.pipeline.progress import ProgressBoard, ProgressReporter
from d4a_batch.pipeline.stages import (
    read_packs,
    read_partitions,
    repeats_json,
    stage_rows,
    write_results,
)
from d4a_batch.ray_setup import node_local_path, quiet_ray_data
from d4a_batch.survey.hats_io import ORDER, PIXEL
from d4a_batch.survey.staging import Stager
from d4a_batch.survey.storage import absolute_uri, filesystem

__all__ = ["ExecutionOptions", "JobError", "RunSummary", "run_job", "run_survey"]
log = logging.getLogger(__name__)
SMALL_BLOCK_BYTES = 256 * 1024  # below the size of one pack (see _one_pack_per_block)


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
    otherwise). Raises JobError for bad inputs found before any work starts, LeaseHeld
    (touching nothing) when another run holds the output's lease (pipeline/lease.py).
    """
    config, opts = config or RunConfig(), options or ExecutionOptions()
    return run_job(check_job(catalog, output, prior, config, opts))


def run_job(job: Job) -> RunSummary:
    """``run_survey`` of a job already checked (``plan.check_job``: the command checks it
    before it starts Ray, so a job error costs no cluster)."""
    opts = job.options
    # one writer per output: this process's lease if the job took it already, else taken here
    with hold_lease(job.output, opts.storage_options, opts.lease_ttl_s, job.run_id) as lease:
        return _run(job, opts, lease)


def _run(job: Job, opts: ExecutionOptions, lease: Lease) -> RunSummary:
    """``run_survey`` once the output's lease is held."""
    ledger = Ledger(job.output, opts.storage_options)
    prepare_output(job.output, opts.overwrite, ledger, opts.storage_options)
    plan = plan_run(job, ledger)
    summary = start_run(plan, ledger)
    prov = job.provenance
    log.info(
        "run %s: %s -> %s, prior %s (%s), config %s; %d partitions to process, %d up to date, "
        "%d unreadable",
        prov.run_id, job.catalog, job.output, prov.prior_id, prov.prior_hash[:12],
        prov.config_hash[:12], len(plan.todo), len(plan.done), len(plan.failed),
    )  # fmt: skip
    if plan.todo:
        _process(plan, Commits(plan, ledger, summary))
    else:
        log.info("nothing to do: every selected partition is up to date (no sampling)")
    lease.check()  # LeaseLost: another run took the output over; this one ends unfinished
    finish_run(plan, ledger, summary)
    log.info("done: %s -> %s", summary.line(), job.output)
    return summary


# --------------------------------------------------------------------------- the graph
def _one_pack_per_block(root: ray.data.Dataset) -> ray.data.Dataset:
    """Small blocks, no progress bars for this run (its datasets share the root's context).

    Actor tasks take whole blocks: with blocks smaller than a pack, every pack is its own
    block, so packs spread over the actors and results stream out pack by pack (instead
    of one actor sampling all packs of a staging batch). The write stage regroups rows.
    Ray's global DataContext is left alone.
    """
    root.context.target_max_block_size = SMALL_BLOCK_BYTES
    root.context.enable_progress_bars = False  # progress.py reports from the sampler's steps
    quiet_ray_data()  # and Ray Data's notice that its bars are off is dropped
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
        read_packs,
        fn_kwargs={"storage_options": storage_options},
        batch_size=1,
        num_cpus=task_cpus,
    )


def _staged(plan: RunPlan, gpus: float, pack_size: int) -> ray.data.Dataset:
    """Pack rows of <= ``pack_size`` objects: read + stage the plan's partitions (or read
    staged packs, packed as they were written)."""
    job, opts, so = plan.job, plan.job.options, plan.job.options.storage_options
    if opts.read_staged:
        return _read_staged(opts.read_staged, so, opts.task_cpus)
    parts = [
        {
            "order": p.order,
            "pixel": p.pixel,
            "uri": p.uri,
            "limit": plan.limits[p.healpix],
            # rows whose object_id an earlier partition holds (fingerprint.find_repeats)
            "repeats": repeats_json(plan.repeats.get(p.healpix, {})),
        }
        for p in plan.partitions
    ]
    # every task asks for task_cpus only: the actors hold the rest (Ray's readers and
    # writers default to 1 CPU, which would leave them unscheduled next to the actors)
    rows = _one_pack_per_block(
        ray.data.from_items(parts, override_num_blocks=max(1, len(parts)))
    ).map_batches(
        read_partitions,
        fn_kwargs={
            "columns": job.config.columns,
            "bands": job.bands,
            "healpix_column": job.cat.healpix_column,
            "storage_options": so,
        },
        batch_size=1,
        num_cpus=opts.task_cpus,
    )
    stager = Stager(
        job.cat.root, job.prior_cfg, job.config.physics, job.config.staging, so, plan.unreachable
    )
    staged = rows.map_batches(
        stage_rows,
        fn_kwargs={"stager": stager, "pack_size": pack_size, "threads": opts.stage_threads},
        # staging batches of several packs fill packs better (GPUs); one pack per
        # batch spreads small runs over the CPU actors
        batch_size=(4 if gpus > 0 else 1) * pack_size,
        batch_format="pyarrow",
        num_cpus=opts.task_cpus,
    )
    if not opts.write_staged:
        return staged
    fs, path = filesystem(absolute_uri(opts.write_staged), so)
    staged.write_parquet(
        path,
        filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)),
        ray_remote_args={"num_cpus": opts.task_cpus},
    )
    return _read_staged(opts.write_staged, so, opts.task_cpus)


def _written(plan: RunPlan, board=None) -> ray.data.Dataset:
    """Chunk counts (``stages.CHUNK_SCHEMA`` rows) of the whole graph; the sampling actors
    report their steps to ``board`` (a ``progress.ProgressBoard`` actor)."""
    job, opts = plan.job, plan.job.options
    expected = plan.expected_rows
    objects = sum(expected.values()) if expected else None
    cluster = ray.cluster_resources()
    args = (opts.actors, opts.gpus_per_actor, opts.cpus_per_actor, opts.task_cpus)
    slots, _, gpus = actor_resources(cluster, *args)
    # CPU actors: a run with fewer objects than full packs for every actor is split into
    # smaller packs, so that every actor samples (GPUs keep full packs: batching pays there)
    pack_size = opts.batch_size if gpus > 0 else split_packs(objects, opts.batch_size, slots)
    packs = None if objects is None else -(-objects // pack_size)
    actors, cpus, gpus = actor_resources(cluster, *args, max_packs=packs)
    log.info("%d partitions, %s objects in packs of <= %d, %d actors x (%g CPU, %g GPU)",
             len(plan.todo), objects, pack_size, actors, cpus, gpus)  # fmt: skip
    results = _staged(plan, gpus, pack_size).map_batches(
        DeconvolveActor,
        fn_constructor_kwargs={
            "prior_path": node_local_path(job.prior),  # a job's working dir: per node
            "run_config": to_dict(job.config),
            "spec": job.spec,
            "provenance": job.provenance,
            "torch_threads": None if gpus > 0 else torch_threads_for(cpus),
            "progress": board,
        },
        compute=ActorPoolStrategy(size=actors),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=cpus,
        num_gpus=gpus,
        # an actor that dies (node lost, OOM, killed) is restarted and its batch retried:
        # Ray Data's actor pools default to max_restarts = max_task_retries = -1 (passing
        # them is deprecated for Ray 2.64); tests/pipeline/test_faults.py kills one
    )
    return results.map_batches(
        write_results,
        fn_kwargs={
            "work_root": plan.work,
            "output_root": job.output,
            "spec": job.spec,
            "keep_maps": job.config.write_maps,
            "fits_maps": job.config.fits_maps,
            "zeropoint": job.config.physics.zeropoint_ab,
            "storage_options": opts.storage_options,
        },
        batch_size=opts.batch_size,
        batch_format="pyarrow",
        num_cpus=opts.task_cpus,
    )


def _process(plan: RunPlan, commits: Commits) -> None:
    """Run the graph over the plan's partitions; commit each as soon as all its rows are in.

    Progress lines come from the sampler's steps (``progress.ProgressReporter``, a thread
    reading the actors' reports), each partition's commit is logged as it lands.
    """
    summary, expected = commits.summary, plan.expected_rows
    total = sum(expected.values()) if expected else None
    written: dict[HealpixPixel, int] = {}
    sampler, opts = plan.job.config.sampler, plan.job.options
    board = ProgressBoard.start()
    # the first line 5 s after the first step, or sooner when lines are asked for more often
    reporter = ProgressReporter(board, total, sampler.samples, sampler.steps,
                                interval_s=opts.progress_interval_s,
                                first_after_s=min(5.0, opts.progress_interval_s))  # fmt: skip
    try:
        with reporter:
            for row in _written(plan, board).iter_rows():
                pixel = HealpixPixel(int(row[ORDER]), int(row[PIXEL]))
                summary.add(pixel, row)
                written[pixel] = written.get(pixel, 0) + int(row["n"])
                if expected is not None and written[pixel] == expected[pixel]:
                    commits.submit(pixel)  # all its rows are written: commit it now
                commits.collect(timeout=0)
                summary.seconds = time.monotonic() - plan.started
    finally:
        ray.kill(board)
    for pixel in sorted(set(written) - commits.submitted()):
        commits.submit(pixel)  # row counts disagreed (the commit re-checks them)
    commits.collect(timeout=None)
    for pixel in sorted(set(plan.todo) - set(written)):
        if expected is not None and expected[pixel] > 0:
            commits.fail(pixel, "no result rows were written")
