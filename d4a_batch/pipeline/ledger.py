"""The run ledger: what each run did to each output partition, kept next to the catalog.

Layout (JSON files, written once each, so it works the same on local disks and S3):

    <output>/_d4a_ledger/runs/<run_id>.json                  one per run (start, then end)
    <output>/_d4a_ledger/partitions/<run_id>/<k>-<p>.json    one per partition a run handled

A partition's state is its newest record (run ids sort by start time). A re-run
skips a partition whose newest record is ``ok`` with the same input fingerprint,
prior hash and config hash; everything else is (re)processed, and the reason is
recorded. Runs that died leave a run record with status ``running``; :func:`list_runs`
shows them as interrupted.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.parquet as pq
from hats.pixel_math import HealpixPixel

from d4a_batch.config import ColumnMap
from d4a_batch.schema import LEDGER_DIR
from d4a_batch.survey.hats_io import Partition, cutout_column, input_column_names, psf_column
from d4a_batch.survey.storage import filesystem, join_uri, resolve_uri

OK = "ok"
FAILED = "failed"
RUNNING = "running"

# why a partition is (re)processed
NEW = "new partition"
INPUT_CHANGED = "input changed"
PRIOR_CHANGED = "prior changed"
CONFIG_CHANGED = "config changed"
RETRY = "previous attempt failed"
FORCED = "forced"


@dataclass(frozen=True)
class PartitionRecord:
    """What one run did to one partition."""

    order: int
    pixel: int
    run_id: str
    status: str  # OK | FAILED
    fingerprint: str
    prior_hash: str
    config_hash: str
    rows: int = 0
    n_ok: int = 0
    n_error: int = 0
    n_flagged: int = 0
    reason: str = ""  # why it was processed
    message: str = ""  # the failure, when status is FAILED
    seconds: float = 0.0  # from the run's start to the commit
    committed_utc: str = ""

    @property
    def key(self) -> HealpixPixel:
        return HealpixPixel(self.order, self.pixel)


@dataclass(frozen=True)
class RunRecord:
    """One run: what it was asked to do and, once finished, what it did."""

    run_id: str
    created_utc: str
    catalog: str
    prior_id: str
    prior_hash: str
    config_hash: str
    code_version: str
    status: str = RUNNING  # RUNNING until the run ends (stays so if it was killed)
    finished_utc: str = ""
    processed: dict[str, str] = field(default_factory=dict)  # "k/p" -> reason
    skipped: list[str] = field(default_factory=list)  # up to date
    failed: dict[str, str] = field(default_factory=dict)  # "k/p" -> message
    objects: int = 0
    seconds: float = 0.0


def pixel_name(pixel: HealpixPixel) -> str:
    """``"k/p"``: how the ledger's JSON, logs and ``--partitions`` spell a partition."""
    return f"{pixel.order}/{pixel.pixel}"


def parse_pixel(text: str | HealpixPixel) -> HealpixPixel:
    """``"k/p"`` -> ``HealpixPixel(k, p)`` (a HealpixPixel passes through)."""
    if isinstance(text, HealpixPixel):
        return text
    try:
        order, pixel = text.strip().split("/")
        return HealpixPixel(int(order), int(pixel))
    except ValueError:
        raise ValueError(
            f"partition {text!r} is not of the form ORDER/PIXEL, e.g. 7/12345"
        ) from None


# --------------------------------------------------------------------------- fingerprints
def partition_fingerprint(
    part: Partition,
    columns: ColumnMap,
    bands: tuple[str, ...],
    catalog_root: str,
    limit: int,
    storage_options: dict[str, Any] | None = None,
    threads: int = 16,
) -> tuple[str, int]:
    """(fingerprint, rows used) of an input partition and the files its rows point to.

    The partition file is hashed by content; each cutout and PSF file by URI, size and
    ETag or modification time (what the store reports, without reading it). ``limit``
    (-1: none) is part of the fingerprint: a run on the first N rows does not stand
    for the whole partition. Raises when the partition file cannot be read.
    """
    fs, path = filesystem(part.uri, storage_options)
    h = hashlib.sha256()
    files = sorted(f for f in fs.find(path) if f.endswith(".parquet")) if fs.isdir(path) else [path]
    for f in files:
        with fs.open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    names = input_column_names(columns, bands)
    uri_cols = [names[k(b)] for b in bands for k in (cutout_column, psf_column)]
    table = pq.ParquetDataset(path, filesystem=fs).read(columns=uri_cols)
    n = table.num_rows if limit < 0 else min(limit, table.num_rows)
    h.update(f"rows={n}".encode())
    uris = sorted(
        {str(u) for c in uri_cols for u in table[c].slice(0, n).to_pylist() if u is not None}
    )

    def stamp(u: str) -> str:
        full = resolve_uri(u, catalog_root)
        try:
            ffs, fpath = filesystem(full, storage_options)
            info = ffs.info(fpath)
        except (FileNotFoundError, OSError):
            return f"{u}:missing"
        version = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
        return f"{u}:{info.get('size')}:{version}"

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for s in pool.map(stamp, uris):
            h.update(s.encode())
    return h.hexdigest(), n


# --------------------------------------------------------------------------- the ledger
class Ledger:
    """Reads and writes the ledger of the output catalog at ``output``."""

    def __init__(self, output: str, storage_options: dict[str, Any] | None = None):
        self.root = join_uri(output, LEDGER_DIR)
        self.storage_options = storage_options
        self.fs, self.path = filesystem(self.root, storage_options)

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def _write(self, rel: str, doc: dict[str, Any]) -> None:
        path = f"{self.path}/{rel}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp"
        with self.fs.open(tmp, "w") as f:
            f.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        self.fs.mv(tmp, path)

    def _read_all(self, rel: str) -> list[dict[str, Any]]:
        base = f"{self.path}/{rel}"
        if not self.fs.exists(base):
            return []
        files = sorted(f for f in self.fs.find(base) if f.endswith(".json"))
        out = []
        for f in files:
            with self.fs.open(f, "r") as fh:
                out.append(json.load(fh))
        return out

    def write_run(self, record: RunRecord) -> None:
        self._write(f"runs/{record.run_id}.json", asdict(record))

    def write_partition(self, record: PartitionRecord) -> None:
        name = f"partitions/{record.run_id}/{record.order}-{record.pixel}.json"
        self._write(name, asdict(record))

    def runs(self) -> list[RunRecord]:
        """Every run, oldest first."""
        return sorted((RunRecord(**d) for d in self._read_all("runs")), key=lambda r: r.run_id)

    def partition_records(self) -> list[PartitionRecord]:
        """Every partition record, oldest run first."""
        recs = [PartitionRecord(**d) for d in self._read_all("partitions")]
        return sorted(recs, key=lambda r: (r.run_id, r.order, r.pixel))

    def state(self) -> dict[HealpixPixel, PartitionRecord]:
        """The newest record of each partition."""
        return {r.key: r for r in self.partition_records()}


def reason(
    rec: PartitionRecord | None,
    fingerprint: str | None,
    prior_hash: str,
    config_hash: str,
    force: bool = False,
) -> str | None:
    """Why a partition whose newest record is ``rec`` needs processing; None: up to date.

    ``fingerprint`` None: the partition could not be fingerprinted (unreadable), which
    never matches a record.
    """
    if force:
        return FORCED
    if rec is None:
        return NEW
    if rec.status != OK:
        return RETRY
    if rec.fingerprint != fingerprint:
        return INPUT_CHANGED
    if rec.prior_hash != prior_hash:
        return PRIOR_CHANGED
    if rec.config_hash != config_hash:
        return CONFIG_CHANGED
    return None


def plan(
    state: dict[HealpixPixel, PartitionRecord],
    fingerprints: dict[HealpixPixel, str],
    prior_hash: str,
    config_hash: str,
    force: bool = False,
) -> tuple[dict[HealpixPixel, str], list[HealpixPixel]]:
    """Split partitions into ({pixel: reason to process}, [up-to-date pixels])."""
    todo: dict[HealpixPixel, str] = {}
    done: list[HealpixPixel] = []
    for key, fp in sorted(fingerprints.items()):
        why = reason(state.get(key), fp, prior_hash, config_hash, force)
        if why is None:
            done.append(key)
        else:
            todo[key] = why
    return todo, done


def describe_runs(output: str, storage_options: dict[str, Any] | None = None) -> str:
    """A table of the runs on ``output`` and what each changed (the ``list_runs`` command).

    A run without an end record is ``running`` while the output's lease is its and live,
    else ``interrupted``; for either, what it committed comes from its partition records
    (its start record only says what it planned).
    """
    ledger = Ledger(output, storage_options)
    if not ledger.exists():
        return f"no run ledger under {output}"
    by_run: dict[str, list[PartitionRecord]] = {}
    for rec in ledger.partition_records():
        by_run.setdefault(rec.run_id, []).append(rec)
    lines = []
    prev: RunRecord | None = None
    for run in ledger.runs():
        if run.status == RUNNING:
            lines += _unfinished_run(run, by_run.get(run.run_id, []), output, storage_options)
        else:
            lines.append(
                f"{run.run_id}  {run.status}  prior {run.prior_id} ({run.prior_hash[:12]})  "
                f"config {run.config_hash[:12]}  code {run.code_version}  {run.objects} "
                f"objects  {run.seconds:.0f} s"
            )
        changes = []
        if prev is not None and prev.prior_hash != run.prior_hash:
            changes.append(f"prior {prev.prior_hash[:12]} -> {run.prior_hash[:12]}")
        if prev is not None and prev.config_hash != run.config_hash:
            changes.append(f"config {prev.config_hash[:12]} -> {run.config_hash[:12]}")
        if prev is not None and prev.catalog != run.catalog:
            changes.append(f"catalog {prev.catalog} -> {run.catalog}")
        if changes:
            lines.append("    changed: " + "; ".join(changes))
        if run.status != RUNNING:
            by_reason: dict[str, list[str]] = {}
            for pix, reason in run.processed.items():
                by_reason.setdefault(reason, []).append(pix)
            for reason, pixels in sorted(by_reason.items()):
                lines.append(f"    processed ({reason}): {', '.join(pixels)}")
            if run.skipped:
                lines.append(f"    up to date, skipped: {len(run.skipped)} partitions")
            for pix, msg in run.failed.items():
                lines.append(f"    FAILED {pix}: {msg}")
        prev = run
    return "\n".join(lines)


def _unfinished_run(
    run: RunRecord, records: list[PartitionRecord], output: str, storage_options
) -> list[str]:
    """The lines of a run with no end record: what its partition records say it did."""
    from d4a_batch.pipeline.lease import read_lease

    try:
        lease = read_lease(output, storage_options)
    except Exception:  # the listing must not fail on an odd lease file
        lease = None
    live = lease is not None and lease.run_id == run.run_id and not lease.stale()
    status = "running (its lease is live)" if live else "interrupted (no end record)"
    ok = [r for r in records if r.status == OK]
    seconds = max((r.seconds for r in records), default=0.0)
    lines = [
        f"{run.run_id}  {status}  prior {run.prior_id} ({run.prior_hash[:12]})  config "
        f"{run.config_hash[:12]}  code {run.code_version}  {sum(r.rows for r in ok)} objects "
        f"committed in {len(ok)} of {len(run.processed)} partitions planned  "
        f"{seconds:.0f} s to its last commit"
    ]
    by_reason: dict[str, list[str]] = {}
    for r in ok:
        by_reason.setdefault(r.reason, []).append(pixel_name(r.key))
    for reason, pixels in sorted(by_reason.items()):
        lines.append(f"    committed ({reason}): {', '.join(pixels)}")
    for r in records:
        if r.status != OK:
            lines.append(f"    FAILED {pixel_name(r.key)}: {r.message}")
    done = {pixel_name(r.key) for r in records}
    left = [p for p in run.processed if p not in done]
    if left:
        verb = "not committed yet" if live else "not committed (the next run does them)"
        lines.append(f"    planned, {verb}: {', '.join(left)}")
    if run.skipped:
        lines.append(f"    up to date, skipped: {len(run.skipped)} partitions")
    return lines
