"""How a survey run executes (``ExecutionOptions``), what it did (``RunSummary``), ``JobError``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hats.pixel_math import HealpixPixel


class JobError(ValueError):
    """A problem with the job's inputs, found before any work starts (exit code 2)."""


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
    progress_interval_s: float = 15.0  # between progress lines (pipeline/progress.py)
    write_staged: str | None = None  # also write the staged packs here (Parquet)
    read_staged: str | None = None  # take staged packs from here instead of staging
    force: bool = False  # reprocess partitions the ledger says are up to date
    # only these partitions ("order/pixel" as --partitions takes them, or HealpixPixel)
    partitions: tuple[str | HealpixPixel, ...] | None = None
    # the output's lease (pipeline/lease.py): stale this long after its last heartbeat
    lease_ttl_s: float = 600.0


@dataclass
class RunSummary:
    """What a run did; partitions are keyed by ``HealpixPixel``."""

    output: str
    run_id: str
    objects: int = 0
    ok: int = 0
    failed: int = 0
    flagged: int = 0
    partitions: int = 0
    seconds: float = 0.0
    per_partition: dict[HealpixPixel, int] = field(default_factory=dict)
    committed: list[HealpixPixel] = field(default_factory=list)  # written by this run
    skipped: list[HealpixPixel] = field(default_factory=list)  # up to date (ledger)
    failed_partitions: dict[HealpixPixel, str] = field(default_factory=dict)  # -> why

    @property
    def objects_per_s(self) -> float:
        return self.objects / self.seconds if self.seconds > 0 else 0.0

    def add(self, pixel: HealpixPixel, counts: dict[str, Any]) -> None:
        """Count one written chunk of ``pixel`` (``n``, ``n_ok``, ``n_error``, ``n_flagged``)."""
        self.per_partition[pixel] = self.per_partition.get(pixel, 0) + int(counts["n"])
        self.objects += int(counts["n"])
        self.ok += int(counts["n_ok"])
        self.failed += int(counts["n_error"])
        self.flagged += int(counts["n_flagged"])

    def line(self, total: int | None = None) -> str:
        done = f"{self.objects}/{total}" if total else f"{self.objects}"
        text = (
            f"{done} objects: {self.ok} ok ({self.flagged} flagged), {self.failed} failed; "
            f"{self.objects_per_s:.2f} objects/s over {self.seconds:.0f} s"
        )
        if self.skipped:
            text += f"; {len(self.skipped)} partitions up to date (skipped)"
        if self.failed_partitions:
            names = ", ".join(f"{p.order}/{p.pixel}" for p in sorted(self.failed_partitions))
            text += f"; FAILED partitions: {names}"
        return text
