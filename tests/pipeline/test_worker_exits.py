"""The fingerprint stage in Ray workers that exit right after it: no worker dies (issue 30).

A demo run printed a SIGABRT crash dump from a Ray worker whose last task was the
fingerprint task ``_finish_group``. The cause: the scan read partition bytes through
fsspec's memory filesystem, so Arrow's I/O threads ran Python (reads, seeks and closes
of fsspec file objects), and a process exiting soon after could abort (measured: 5 of
60 plain processes that scanned the tiny survey that way and exited; 0 of 60 with the
local copy of ``pipeline/arrow_local.py``).

The test runs the scan in Ray workers that exit as soon as it returns (``max_calls=1``),
spying on fsspec's file objects there: none may be used from a thread other than the
task's (deterministic: the old scan made 41 such calls on the tiny survey). Then it runs
the whole stage a few more times, and every worker that exited meanwhile must have
exited cleanly: no ``SYSTEM_ERROR`` exit in Ray's worker table, no crash dump in its logs.
"""

from __future__ import annotations

import glob
import os
import time

import pytest

from d4a_batch.config import ColumnMap
from d4a_batch.pipeline.fingerprint import _scan_group, fingerprint_partitions
from d4a_batch.survey.hats_io import open_input_catalog

BANDS = ("g", "r", "i")
EXITING_SCANS = 6  # workers that exit right after scanning every partition
ROUNDS = 2  # whole fingerprint stages on the session's (reused) workers
CRASH_SIGNS = ("SIGABRT", "SIGSEGV", "terminate called", "Mutex corrupt", "Fatal Python error")


def _exited_workers(ray) -> dict[bytes, tuple[int, str, str]]:
    """{worker id: (pid, exit type, exit detail)} of every worker of the cluster that exited
    (Ray's worker table in the GCS; the state API would need the dashboard)."""
    import grpc
    from ray.core.generated import common_pb2, gcs_service_pb2, gcs_service_pb2_grpc

    channel = grpc.insecure_channel(ray.get_runtime_context().gcs_address)
    try:
        stub = gcs_service_pb2_grpc.WorkerInfoGcsServiceStub(channel)
        reply = stub.GetAllWorkerInfo(gcs_service_pb2.GetAllWorkerInfoRequest(), timeout=30)
    finally:
        channel.close()
    return {
        w.worker_address.worker_id: (
            w.pid,
            common_pb2.WorkerExitType.Name(w.exit_type) if w.HasField("exit_type") else "",
            w.exit_detail,
        )
        for w in reply.worker_table_data
        if not w.is_alive
    }


def _crash_dumps(ray, pids) -> dict[int, str]:
    """{pid: the crash sign} for workers among ``pids`` whose logs hold a crash dump."""
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    out = {}
    for pid in pids:
        for path in glob.glob(f"{logs}/*{pid}.err") + glob.glob(f"{logs}/*{pid}.log"):
            with open(path, errors="replace") as f:
                text = f.read()
            hit = next((s for s in CRASH_SIGNS if s in text), None)
            if hit:
                out[pid] = f"{os.path.basename(path)}: {hit}"
    return out


def _watched_scan(*args):
    """``_scan_group(*args)`` and the fsspec file calls made meanwhile from other threads
    (Arrow's); defined at call time so that Ray ships it by value."""
    import threading

    from fsspec.implementations.local import LocalFileOpener
    from fsspec.implementations.memory import MemoryFile
    from fsspec.spec import AbstractBufferedFile

    me, off_thread = threading.get_ident(), []

    def spying(method, label):
        def spy(self, *a, **k):
            if threading.get_ident() != me:
                off_thread.append(label)
            return method(self, *a, **k)

        return spy

    for cls in (MemoryFile, LocalFileOpener, AbstractBufferedFile):
        for name in ("read", "readinto", "read1", "seek", "tell", "close"):
            if hasattr(cls, name):  # its own or inherited (MemoryFile's are io.BytesIO's)
                setattr(cls, name, spying(getattr(cls, name), f"{cls.__name__}.{name}"))
    scans, _, _ = _scan_group(*args)
    return [s.error for s in scans], sorted(set(off_thread)), len(off_thread)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_fingerprint_workers_exit_cleanly(ray_local, tiny_survey):
    ray = ray_local
    cat = open_input_catalog(str(tiny_survey))
    args = (list(cat.partitions), ColumnMap(), BANDS, cat.root, cat.healpix_column, None)
    before = _exited_workers(ray)
    scan = ray.remote(num_cpus=0.25, max_calls=1)(lambda *a: _watched_scan(*a))
    for errors, off_thread, n in ray.get([scan.remote(*args) for _ in range(EXITING_SCANS)]):
        assert errors == [None] * len(cat.partitions)
        assert n == 0, f"Arrow's threads ran Python: {n} calls of {off_thread}"
    for _ in range(ROUNDS):
        fp = fingerprint_partitions(*args[:5], None, 0.25, group_size=1)
        assert len(fp.fingerprints) == len(cat.partitions) and not fp.failed
    deadline = time.monotonic() + 120  # the max_calls workers exit after their task returned
    while len(new := {k: v for k, v in _exited_workers(ray).items() if k not in before}) < (
        EXITING_SCANS
    ):
        assert time.monotonic() < deadline, f"only {len(new)} of the scan workers exited"
        time.sleep(1)
    died = {pid: (kind, detail) for pid, kind, detail in new.values() if "SYSTEM_ERROR" in kind}
    assert died == {}, died
    assert _crash_dumps(ray, [pid for pid, _, _ in new.values()]) == {}
