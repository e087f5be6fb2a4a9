"""Partition fingerprints at survey scale: one read per partition file, one listing per prefix.

A partition's fingerprint (what the run ledger compares, see ``pipeline/ledger.py``) is
the SHA-256 of its Parquet bytes, ``rows=<n>`` and, for every distinct cutout / PSF URI
its first n rows name (sorted), ``<uri>:<size>:<ETag or mtime>``. It is the same digest
as :func:`d4a_batch.pipeline.ledger.partition_fingerprint`, so ledgers written before
keep planning correctly (no partition is redone because of the change), but it is
computed without one HEAD / stat per file:

1. **scan** (one task per group of partitions): each partition file is read once (one GET); its
   bytes are hashed, its URI columns listed, its rows checked the way the read stage
   reads them (``read_partition`` on the same bytes). The task hands back only small
   things (rows, the folders its files live in); the bytes and URIs stay in Ray's
   object store for step 3.
2. **list** (one task per folder): ``ls(folder, detail=True)`` gives size and ETag /
   mtime of every file in it (S3 answers 1,000 keys a request).
3. **finish** (one task per group): each partition's URIs joined with the listings -> digest.

Storage requests: partitions (+ files of multi-file partitions) + listing pages, instead
of partitions x 3 + rows x 6. The driver holds per-partition digests and the set of
folders, nothing per row. A file absent from its folder's listing counts as missing
(as before). Folders hold the files of many objects (HSC: per band, tract or patch);
a survey with one folder per object gets one listing per object, which is still
correct but no cheaper than stat.

A folder that cannot be reached at all (no credentials, no such endpoint, a protocol
fsspec does not know) is not the run's error: ``FingerprintResult.unreachable`` names it
with the reason, and staging makes each object with a file there an error row saying so
(``Stager.unreachable``) without trying it again. The scan also keeps each partition's
object ids in the object store: ``find_repeats`` (one task) finds an object_id that
appears in more than one partition, whose later rows are not processed (error rows that
name the row processed). The driver gets only those rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hats.pixel_math import HealpixPixel

from d4a_batch.config import ColumnMap
from d4a_batch.pipeline.arrow_local import local_parquet_copy
from d4a_batch.schema import Col
from d4a_batch.survey.hats_io import (
    Partition,
    cutout_column,
    input_column_names,
    psf_column,
    read_partition,
)
from d4a_batch.survey.storage import S3_PROTOCOLS, filesystem, resolve_uri

Key = HealpixPixel
LISTING_SCHEMA = pa.schema([("name", pa.string()), ("stamp", pa.string())])
UNREACHABLE = b"d4a_unreachable"  # listing metadata: why the folder could not be listed


@dataclass(frozen=True)
class Scan:
    """What the driver keeps of a scanned partition (no per-row data)."""

    key: Key
    rows: int = 0  # rows the fingerprint stands for (all, or the first ``limit``)
    folders: tuple[str, ...] = ()  # folders (URIs) of the files its rows name
    files_read: int = 0  # partition files read (storage GETs)
    error: str | None = None  # the partition is unusable: why


@dataclass(frozen=True)
class Payload:
    """Per-partition data that step 3 needs: its bytes and its URIs (in the object store)."""

    blobs: tuple[bytes, ...]  # the Parquet file(s), in path order
    rows: int
    uris: tuple[str, ...]  # distinct URIs as the catalog writes them, sorted
    folders: tuple[str, ...]  # per URI: its folder (resolved)
    names: tuple[str, ...]  # per URI: its file name


@dataclass
class FingerprintResult:
    """The fingerprints of a set of partitions and what computing them cost."""

    fingerprints: dict[Key, str] = field(default_factory=dict)
    rows: dict[Key, int] = field(default_factory=dict)
    failed: dict[Key, str] = field(default_factory=dict)  # unusable partitions: why
    files_read: int = 0
    listings: int = 0  # folder listings (each is ceil(files / 1000) requests on S3)
    unreachable: dict[str, str] = field(default_factory=dict)  # folder -> why
    # each partition's object ids ({Key: int64 array}) per scan group, for find_repeats:
    # Ray object refs (fingerprint_partitions) or the dicts (fingerprint_partitions_local)
    ids: list[Any] = field(default_factory=list)


# --------------------------------------------------------------------------- pure steps
def _read_blobs(part: Partition, storage_options) -> list[bytes]:
    """The partition's Parquet bytes: one GET for a file; a listing + GETs for a folder."""
    fs, path = filesystem(part.uri, storage_options)
    # s3fs asks for the size (a HEAD) before a whole-file GET unless it reads in one stream
    kw = {"max_concurrency": 1} if str(part.uri).startswith(S3_PROTOCOLS) else {}
    try:
        return [fs.cat_file(path, **kw)]
    except (IsADirectoryError, FileNotFoundError, PermissionError):
        files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
        if not files:
            raise
        return [fs.cat_file(f, **kw) for f in files]


def scan_partition(
    part: Partition,
    columns: ColumnMap,
    bands: tuple[str, ...],
    catalog_root: str,
    healpix_column: str = "",
    limit: int = -1,
    storage_options: dict[str, Any] | None = None,
) -> tuple[Scan, Payload | None, np.ndarray | None]:
    """Read partition ``part`` once: (its Scan, its Payload, its object ids as int64);
    (Scan with error, None, None) if unusable.

    The rows are also read the way the read stage reads them (``read_partition``), so a
    partition that passes here does not fail later on column types.
    """
    key = part.healpix
    try:
        blobs = _read_blobs(part, storage_options)
        # the read stage's own reader, on these bytes: a local copy, read by path (not an
        # fsspec memory filesystem: Python on Arrow's threads crashed exiting workers,
        # see arrow_local.py)
        with local_parquet_copy(blobs) as local:
            rows = read_partition(
                Partition(part.order, part.pixel, local), columns, bands, healpix_column
            )
            ids = rows[Col.OBJECT_ID].to_numpy(zero_copy_only=False).astype(np.int64)
            names = input_column_names(columns, bands)
            uri_cols = [names[k(b)] for b in bands for k in (cutout_column, psf_column)]
            table = pq.ParquetDataset(local).read(columns=uri_cols)
    except Exception as e:  # an unreadable partition fails alone
        return Scan(key, error=f"cannot read partition {part.uri}: {e}"), None, None
    n = table.num_rows if limit < 0 else min(limit, table.num_rows)
    uris = sorted(
        {str(u) for c in uri_cols for u in table[c].slice(0, n).to_pylist() if u is not None}
    )
    folders, files = [], []
    for u in uris:
        folder, _, name = resolve_uri(u, catalog_root).rpartition("/")
        folders.append(folder)
        files.append(name)
    payload = Payload(tuple(blobs), n, tuple(uris), tuple(folders), tuple(files))
    return Scan(key, n, tuple(sorted(set(folders))), len(blobs)), payload, ids


def list_folder(folder: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """``name``, ``stamp`` (``<size>:<ETag or mtime>``) of every entry of ``folder``; empty if absent.

    One listing (S3: one request per 1,000 keys); the stamp is what ``info`` reports. A
    folder the storage answers for but does not list (absent, not a folder, listing not
    permitted: OSErrors) lists empty, its files counted missing, and staging tries them.
    A folder that cannot be reached at all (no credentials, no endpoint, an unknown
    protocol, ...) lists empty with the reason in the schema metadata (``listing_error``).
    """
    try:
        fs, path = filesystem(folder, storage_options)
        entries = fs.ls(path, detail=True, refresh=True)
    except OSError:
        entries = []
    except Exception as e:  # the storage could not be asked: its objects' error, not the run's
        why = f"{type(e).__name__}: {e}".encode()
        return LISTING_SCHEMA.with_metadata({UNREACHABLE: why}).empty_table()
    names, stamps = [], []
    for e in entries:
        version = e.get("ETag") or e.get("mtime") or e.get("LastModified") or ""
        names.append(str(e["name"]).rstrip("/").rpartition("/")[2])
        stamps.append(f"{e.get('size')}:{version}")
    return pa.table({"name": names, "stamp": stamps}, schema=LISTING_SCHEMA)


def listing_error(listing: pa.Table) -> str | None:
    """Why ``list_folder`` could not reach the folder of ``listing``; None when it could."""
    why = (listing.schema.metadata or {}).get(UNREACHABLE)
    return None if why is None else why.decode()


def _list_folder_and_error(folder: str, storage_options) -> tuple[pa.Table, str | None]:
    listing = list_folder(folder, storage_options)
    return listing, listing_error(listing)


def finish_fingerprint(payload: Payload, listings: dict[str, pa.Table]) -> str:
    """The partition's fingerprint from its bytes, rows and the listings of its folders."""
    h = hashlib.sha256()
    for blob in payload.blobs:
        h.update(blob)
    h.update(f"rows={payload.rows}".encode())
    lookup: dict[str, dict[str, str]] = {}
    for folder in set(payload.folders):
        t = listings.get(folder)
        lookup[folder] = (
            {} if t is None else dict(zip(t["name"].to_pylist(), t["stamp"].to_pylist()))
        )
    for u, folder, name in zip(payload.uris, payload.folders, payload.names):
        stamp = lookup[folder].get(name)
        h.update((f"{u}:missing" if stamp is None else f"{u}:{stamp}").encode())
    return h.hexdigest()


def fingerprint_partitions_local(
    parts: Iterable[Partition],
    columns: ColumnMap,
    bands: tuple[str, ...],
    catalog_root: str,
    healpix_column: str = "",
    storage_options: dict[str, Any] | None = None,
) -> FingerprintResult:
    """The three steps in this process (no Ray): for tests and small catalogs."""
    out = FingerprintResult()
    payloads: dict[Key, Payload] = {}
    ids: dict[Key, np.ndarray] = {}
    for part in parts:
        scan, payload, part_ids = scan_partition(
            part, columns, bands, catalog_root, healpix_column, -1, storage_options
        )
        out.files_read += scan.files_read
        if scan.error:
            out.failed[scan.key] = scan.error
        else:
            payloads[scan.key], out.rows[scan.key] = payload, scan.rows
            ids[scan.key] = part_ids
    out.ids = [ids]
    folders = sorted({f for p in payloads.values() for f in p.folders})
    listings = {f: list_folder(f, storage_options) for f in folders}
    out.listings = len(listings)
    out.unreachable = {f: why for f, t in listings.items() if (why := listing_error(t)) is not None}
    for key, payload in payloads.items():
        out.fingerprints[key] = finish_fingerprint(payload, listings)
    return out


# --------------------------------------------------------------------------- on Ray
def _scan_group(parts, columns, bands, catalog_root, healpix_column, storage_options):
    """``scan_partition`` over a group of partitions: (their Scans, their Payloads, their
    object ids)."""
    done = [
        scan_partition(p, columns, bands, catalog_root, healpix_column, -1, storage_options)
        for p in parts
    ]
    return (
        [scan for scan, _, _ in done],
        {scan.key: pay for scan, pay, _ in done if pay is not None},
        {scan.key: ids for scan, _, ids in done if ids is not None},
    )


def _finish_group(payloads: dict[Key, Payload], listing_refs: dict[str, Any]) -> dict[Key, str]:
    """``finish_fingerprint`` over a group (Ray does not resolve refs nested in a dict)."""
    import ray

    names = list(listing_refs)
    listings = dict(zip(names, ray.get([listing_refs[n] for n in names])))
    return {key: finish_fingerprint(p, listings) for key, p in payloads.items()}


def fingerprint_partitions(
    parts: Sequence[Partition],
    columns: ColumnMap,
    bands: tuple[str, ...],
    catalog_root: str,
    healpix_column: str = "",
    storage_options: dict[str, Any] | None = None,
    task_cpus: float = 0.25,
    group_size: int = 16,
) -> FingerprintResult:
    """The three steps as Ray tasks (``group_size`` partitions per scan / finish task).

    Per-row data (partition bytes, URIs) stays in the object store between the steps;
    the driver holds per-partition digests and the set of folders.
    """
    import ray  # the pure steps above stay importable without Ray

    scan_task = ray.remote(num_returns=3)(_scan_group).options(num_cpus=task_cpus)
    list_task = ray.remote(num_returns=2)(_list_folder_and_error).options(num_cpus=task_cpus)
    finish_task = ray.remote(_finish_group).options(num_cpus=task_cpus)

    out = FingerprintResult()
    groups = [list(parts[i : i + group_size]) for i in range(0, len(parts), group_size)]
    refs = [
        scan_task.remote(g, columns, bands, catalog_root, healpix_column, storage_options)
        for g in groups
    ]
    group_scans: list[list[Scan]] = ray.get([scans for scans, _, _ in refs])
    out.ids = [ids for _, _, ids in refs]
    folders: set[str] = set()
    for scans in group_scans:
        for scan in scans:
            out.files_read += scan.files_read
            if scan.error:
                out.failed[scan.key] = scan.error
            else:
                out.rows[scan.key] = scan.rows
                folders.update(scan.folders)
    listed = {f: list_task.remote(f, storage_options) for f in sorted(folders)}
    listing_refs = {f: table for f, (table, _) in listed.items()}
    out.listings = len(listing_refs)
    names = list(listed)
    whys = ray.get([listed[f][1] for f in names])  # one small string or None per folder
    out.unreachable = {f: why for f, why in zip(names, whys) if why is not None}
    finish_refs = []
    for scans, (_, payloads, _) in zip(group_scans, refs):
        wanted = sorted({f for scan in scans if not scan.error for f in scan.folders})
        if wanted:
            finish_refs.append(finish_task.remote(payloads, {f: listing_refs[f] for f in wanted}))
    for part in ray.get(finish_refs):
        out.fingerprints.update(part)
    return out


# --------------------------------------------------------------------------- repeated ids
def repeats_of(
    groups: Sequence[dict[Key, np.ndarray]], limits: dict[Key, int]
) -> dict[Key, dict[int, str]]:
    """Rows whose object_id an earlier partition holds: {partition: {row: why}}.

    ``groups``: each partition's object ids (``FingerprintResult.ids``, resolved); only
    the first ``limits[partition]`` rows of each count (a partition not in ``limits``:
    none). Partitions are taken in (order, pixel) order and rows in file order: the
    first row of an id is processed, a later row in *another* partition is reported here
    (repeats within one partition: ``stages.mark_duplicates``).
    """
    ids_of = {k: v for g in groups for k, v in g.items()}
    keys = sorted((k for k in ids_of if limits.get(k, 0) > 0), key=lambda k: (k.order, k.pixel))
    if len(keys) < 2:
        return {}
    arrays = [np.asarray(ids_of[k][: limits[k]], np.int64) for k in keys]
    ids = np.concatenate(arrays)
    part = np.concatenate([np.full(len(a), n) for n, a in enumerate(arrays)])
    row = np.concatenate([np.arange(len(a)) for a in arrays])
    order = np.lexsort((row, part, ids))  # by id, then partition, then row
    sid = ids[order]
    starts = np.r_[True, sid[1:] != sid[:-1]]
    first = order[np.maximum.accumulate(np.where(starts, np.arange(len(sid)), 0))]
    out: dict[Key, dict[int, str]] = {}
    for pos in np.nonzero(~starts & (part[order] != part[first]))[0]:
        i, j = order[pos], first[pos]
        k, k0 = keys[part[i]], keys[part[j]]
        out.setdefault(k, {})[int(row[i])] = (
            f"duplicate object_id {int(ids[i])}: input row {int(row[i])} of partition "
            f"{k.order}/{k.pixel} repeats row {int(row[j])} of partition {k0.order}/{k0.pixel}, "
            "which was processed; this row was not"
        )
    return out


def find_repeats(
    result: FingerprintResult, limits: dict[Key, int], task_cpus: float = 0.25
) -> dict[Key, dict[int, str]]:
    """``repeats_of`` the partitions of ``result``: in a Ray task when its ids are object
    refs (the ids never reach the driver), else here."""
    if any(not isinstance(g, dict) for g in result.ids):
        import ray

        task = ray.remote(_repeats_of_refs).options(num_cpus=task_cpus)
        return ray.get(task.remote(result.ids, limits))
    return repeats_of(result.ids, limits)


def _repeats_of_refs(group_refs: list[Any], limits: dict[Key, int]) -> dict[Key, dict[int, str]]:
    import ray

    return repeats_of(ray.get(group_refs), limits)


def repeats_digest(repeats: dict[int, str]) -> str:
    """A short digest of one partition's repeated rows (part of its input fingerprint)."""
    doc = json.dumps(sorted(repeats.items()), separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()[:16]
