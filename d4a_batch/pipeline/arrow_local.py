"""Parquet bytes read by Arrow without Python on Arrow's threads (issue 30, item 4).

The fingerprint scan (``fingerprint.scan_partition``) reads each partition's bytes with
the read stage's own reader, to find the partitions that would fail later. It used to
put the bytes in fsspec's in-memory filesystem and hand that to pyarrow, which wraps a
Python filesystem in ``PyFileSystem(FSSpecHandler)``: Arrow's I/O threads then call into
Python (take the GIL) to read. A process that exits soon after such a read -- a Ray
worker that Ray stops as idle, or one that reached its ``max_calls`` -- can still have
an Arrow thread entering Python while the interpreter finalizes; CPython ends that
thread with ``pthread_exit``, whose forced unwind through Arrow's C++ frames ends in
``std::terminate`` (SIGABRT: "terminate called without an active exception", or an
abseil "Mutex corrupt" abort on the way). Measured on the 2-core VM: a process that
scans the tiny survey's partitions that way and exits crashed in 4 of 41 runs.

Here the bytes go to a private temporary folder on local disk instead and are read by
path: pyarrow opens local paths with its native filesystem, so no Arrow thread runs
Python. ``tests/pipeline/test_fingerprint.py`` runs the scan in Ray workers that exit
right after it and checks that none dies.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def local_parquet_copy(blobs: Sequence[bytes]) -> Iterator[str]:
    """A temporary local folder holding ``blobs`` as ``part00000.parquet``, ...; removed
    on exit. Read it with pyarrow by path (its native local filesystem)."""
    folder = Path(tempfile.mkdtemp(prefix="d4a_parquet_"))
    try:
        for i, blob in enumerate(blobs):
            (folder / f"part{i:05d}.parquet").write_bytes(blob)
        yield str(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
