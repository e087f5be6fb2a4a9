"""Partition commits and the run's records: what makes finished work visible and durable.

``Commits`` submits one commit task per partition whose rows are all written (merge
its chunks, each row once; check the count; write the partition aside and move it
into place) and records each outcome in the ledger as it completes. ``start_run`` /
``finish_run`` write the run's ledger record and, at the end, the catalog metadata
over every partition file (``write_catalog_metadata``) and the run config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import ray
from hats.io.paths import get_healpix_from_path
from hats.pixel_math import HealpixPixel

from d4a_batch import __version__
from d4a_batch.config import to_dict
from d4a_batch.pipeline.ledger import FAILED, OK, Ledger, PartitionRecord, RunRecord, pixel_name
from d4a_batch.pipeline.ledger import reason as ledger_reason
from d4a_batch.pipeline.options import RunSummary
from d4a_batch.pipeline.plan import RunPlan
from d4a_batch.schema import DATASET_DIR, RUN_CONFIG_FILE, WORK_DIR
from d4a_batch.survey.hats_io import write_catalog_metadata
from d4a_batch.survey.output import merge_partition, status_counts
from d4a_batch.survey.storage import filesystem, join_uri

log = logging.getLogger(__name__)


@ray.remote
def _commit(work, output, pixel: HealpixPixel, expected, storage_options) -> dict[str, Any]:
    """Merge a partition's chunks, check its row count, commit it; its counts."""
    return status_counts(merge_partition(work, output, pixel, storage_options, expected))


def partition_record(
    plan: RunPlan, pixel: HealpixPixel, status: str, reason: str, message: str, counts=None
) -> PartitionRecord:
    """The ledger record of what this run did to ``pixel``."""
    prov = plan.job.provenance
    return PartitionRecord(
        order=pixel.order,
        pixel=pixel.pixel,
        run_id=prov.run_id,
        status=status,
        fingerprint=plan.fingerprints.get(pixel, ""),
        prior_hash=prov.prior_hash,
        config_hash=prov.config_hash,
        reason=reason,
        message=message,
        seconds=time.monotonic() - plan.started,
        committed_utc=datetime.now(UTC).isoformat(),
        **(counts or {}),
    )


class Commits:
    """Commit tasks of one run in flight, and their ledger records."""

    def __init__(self, plan: RunPlan, ledger: Ledger, summary: RunSummary):
        self.plan, self.ledger, self.summary = plan, ledger, summary
        self.expected = plan.expected_rows
        self.pending: dict[ray.ObjectRef, HealpixPixel] = {}
        self._task = _commit.options(num_cpus=plan.job.options.task_cpus)

    def submit(self, pixel: HealpixPixel) -> None:
        n = None if self.expected is None else self.expected[pixel]
        job = self.plan.job
        ref = self._task.remote(self.plan.work, job.output, pixel, n, job.options.storage_options)
        self.pending[ref] = pixel

    def submitted(self) -> set[HealpixPixel]:
        """Partitions committed or being committed."""
        return set(self.pending.values()) | set(self.summary.committed)

    def collect(self, timeout: float | None) -> None:
        """Record the commits that finished (within ``timeout``; None: wait for all)."""
        refs = list(self.pending)
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for ref in ready:
            pixel = self.pending.pop(ref)
            try:
                counts = ray.get(ref)
            except Exception as e:  # this partition failed; the others go on
                self.fail(pixel, f"commit failed: {getattr(e, 'cause', None) or e}")
                continue
            self.summary.committed.append(pixel)
            self.ledger.write_partition(
                partition_record(self.plan, pixel, OK, self.plan.todo[pixel], "", counts)
            )
            log.info("partition %s committed: %d rows", pixel_name(pixel), counts["rows"])

    def fail(self, pixel: HealpixPixel, message: str) -> None:
        self.summary.failed_partitions[pixel] = message
        self.ledger.write_partition(
            partition_record(self.plan, pixel, FAILED, self.plan.todo[pixel], message)
        )
        log.error("partition %s failed: %s", pixel_name(pixel), message)


def run_record(plan: RunPlan) -> RunRecord:
    """The run's ledger record as it starts."""
    prov = plan.job.provenance
    return RunRecord(
        run_id=prov.run_id,
        created_utc=prov.created_utc.isoformat(),
        catalog=plan.job.catalog,
        prior_id=prov.prior_id,
        prior_hash=prov.prior_hash,
        config_hash=prov.config_hash,
        code_version=__version__,
        processed={pixel_name(k): r for k, r in plan.todo.items()},
        skipped=[pixel_name(k) for k in plan.done],
        failed={pixel_name(k): m for k, m in plan.failed.items()},
    )


def start_run(plan: RunPlan, ledger: Ledger) -> RunSummary:
    """Record the run's start and its unreadable partitions; its (empty) summary."""
    prov = plan.job.provenance
    ledger.write_run(run_record(plan))
    for pixel, msg in plan.failed.items():  # unreadable: why this run tried it at all
        why = ledger_reason(plan.previous.get(pixel), None, prov.prior_hash, prov.config_hash)
        ledger.write_partition(partition_record(plan, pixel, FAILED, why or "", msg))
    summary = RunSummary(output=plan.job.output, run_id=prov.run_id)
    summary.skipped = list(plan.done)
    summary.failed_partitions = dict(plan.failed)
    return summary


def committed_pixels(output: str, storage_options) -> list[HealpixPixel]:
    """Every partition file in the output catalog."""
    fs, path = filesystem(join_uri(output, DATASET_DIR), storage_options)
    if not fs.exists(path):
        return []
    return sorted(
        get_healpix_from_path(f) for f in fs.glob(f"{path}/Norder=*/Dir=*/Npix=*.parquet")
    )


def finish_run(plan: RunPlan, ledger: Ledger, summary: RunSummary) -> None:
    """Catalog metadata (when this run changed partitions), drop the work folder, end record."""
    job, so = plan.job, plan.job.options.storage_options
    prov, output = job.provenance, job.output
    fs, path = filesystem(output, so)
    pixels = committed_pixels(output, so)
    if pixels and plan.todo:
        shapes = job.spec.map_shapes() if job.config.write_maps else {}
        extra = {
            "d4a_run_id": prov.run_id,
            "d4a_input_catalog": job.catalog,
            "d4a_prior_id": prov.prior_id,
            "d4a_prior_hash": prov.prior_hash,
            "d4a_config_hash": prov.config_hash,
            "d4a_code_version": __version__,
            "d4a_created_utc": prov.created_utc.isoformat(),
            "d4a_map_shapes": json.dumps({k: list(v) for k, v in shapes.items()}),
        }
        write_catalog_metadata(output, pixels, f"{job.cat.name}_posteriors", extra, so)
        with fs.open(join_uri(path, RUN_CONFIG_FILE), "w") as f:
            f.write(json.dumps(to_dict(job.config), indent=2, sort_keys=True) + "\n")
    work_path = filesystem(join_uri(output, WORK_DIR), so)[1]
    if fs.exists(work_path):
        fs.rm(work_path, recursive=True)
    summary.partitions = len(summary.committed)
    summary.seconds = time.monotonic() - plan.started
    start = run_record(plan)
    names = {pixel_name(k) for k in (*summary.committed, *summary.failed_partitions)}
    ledger.write_run(
        dataclasses.replace(
            start,
            status=OK if not summary.failed_partitions else FAILED,
            finished_utc=datetime.now(UTC).isoformat(),
            processed={n: r for n, r in start.processed.items() if n in names},
            failed={pixel_name(k): m for k, m in summary.failed_partitions.items()},
            objects=summary.objects,
            seconds=summary.seconds,
        )
    )
