"""One writer per output: a lease file in the output root (``schema.LEASE_FILE``).

Longer than 400 lines: one concern, the output lease. Its correctness rests on two atomic
stores (local: hard link + ``flock``; s3://: conditional ``PutObject``) and the protocol
(acquire, renew, take over a stale lease, release) being read together: the protocol relies
on each store raising ``_Conflict`` exactly when a conditional write loses. Moving the
stores out would need the errors (``LeaseError``, raised by both) in a third module and
would separate the race argument below from the code it is about.

A run takes the lease before it touches its output and gives it back at the end; a
second run on the same output finds it held and stops at once (``LeaseHeld``; the job
exits with ``EXIT_LEASE_HELD``) without touching anything. The lease is a small JSON
record (run id, host, pid, started, heartbeat, ttl) that a background thread renews
every ``ttl_s / 4`` while the run lives. A lease whose heartbeat is older than its TTL
(a killed run: SIGKILL, a lost node) is stale and the next run takes it over.

Every change is atomic on the storage itself, so two runs that race never both win:

- local paths: the record is written to a temporary file and hard-linked into place
  (``os.link`` fails when the lease exists); replacing and deleting it happen under an
  ``flock`` of the output folder after checking that it still holds what was read;
- s3://: a conditional ``PutObject`` with ``If-None-Match: *`` creates it, ``If-Match:
  <ETag>`` replaces it (renewal, takeover), and S3 answers ``412 PreconditionFailed``
  (or ``409 ConditionalRequestConflict``) to the loser. Other fsspec protocols have no
  such primitive: a lease there is refused (``LeaseError``) rather than faked.

Heartbeats are compared with the reader's clock: hosts sharing an output need clocks
within a small fraction of the TTL (default 10 minutes) of each other.

    with hold_lease(output, storage_options) as lease:   # LeaseHeld if another run has it
        ...                                               # lease.check() raises LeaseLost
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from d4a_batch.schema import LEASE_FILE
from d4a_batch.survey.storage import S3_PROTOCOLS, absolute_uri, filesystem, join_uri

log = logging.getLogger(__name__)
DEFAULT_TTL_S = 600.0


class LeaseError(RuntimeError):
    """The lease could not be read or written (storage error, unsupported protocol)."""


class LeaseHeld(LeaseError):
    """Another live run holds the output's lease."""

    def __init__(self, output: str, holder: LeaseRecord, age_s: float):
        self.output, self.holder, self.age_s = output, holder, age_s
        super().__init__(
            f"output {output} is being written by another run: run {holder.run_id} on host "
            f"{holder.host} (pid {holder.pid}), started {_iso(holder.started)}, last heartbeat "
            f"{age_s:.0f} s ago (stale after {holder.ttl_s:.0f} s). Wait for it to finish, or "
            f"remove {join_uri(output, LEASE_FILE)} if that run is certainly dead."
        )


class LeaseLost(LeaseError):
    """This run's lease was taken over or removed while it ran."""


@dataclass(frozen=True)
class LeaseRecord:
    """The lease file's content (times in Unix seconds)."""

    run_id: str
    host: str
    pid: int
    started: float
    heartbeat: float
    ttl_s: float

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord:
        d = json.loads(data)
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.heartbeat

    def stale(self, now: float | None = None) -> bool:
        return self.age(now) > self.ttl_s


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# --------------------------------------------------------------------------- storage
class _Conflict(Exception):
    """A conditional write or delete lost: the lease is not what the caller expected."""


class _LocalStore:
    """The lease file on a local filesystem: create by hard link, change under ``flock``."""

    def __init__(self, root: str):
        self.root = root
        self.path = os.path.join(root, LEASE_FILE)

    def read(self) -> tuple[bytes, bytes] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data  # the content is its own tag

    def _tmp(self, data: bytes) -> str:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def create(self, data: bytes) -> bytes:
        os.makedirs(self.root, exist_ok=True)
        tmp = self._tmp(data)
        try:
            with self._locked():
                os.link(tmp, self.path)  # atomic; FileExistsError when the lease exists
        except FileExistsError:
            raise _Conflict from None
        finally:
            os.unlink(tmp)
        return data

    def replace(self, data: bytes, tag: bytes) -> bytes:
        tmp = self._tmp(data)
        try:
            with self._locked():
                now = self.read()
                if now is None or now[1] != tag:
                    raise _Conflict
                os.replace(tmp, self.path)
                tmp = None
        finally:
            if tmp is not None:
                os.unlink(tmp)
        return data

    def delete(self, tag: bytes) -> None:
        with self._locked():
            now = self.read()
            if now is None or now[1] != tag:
                raise _Conflict
            os.unlink(self.path)


class _S3Store:
    """The lease object on S3: conditional PutObject (If-None-Match / If-Match on the ETag)."""

    def __init__(self, fs: Any, path: str):
        self.fs = fs
        self.bucket, _, prefix = path.partition("/")
        self.key = f"{prefix.rstrip('/')}/{LEASE_FILE}" if prefix else LEASE_FILE

    def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        from fsspec.asyn import sync

        async def call() -> dict[str, Any]:
            out = await self.fs._call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
            if "Body" in out:
                out["Body"] = await out["Body"].read()
            return out

        try:
            return sync(self.fs.loop, call)
        except Exception as e:  # s3fs turns ClientErrors into OSErrors, the cause kept
            code = _s3_code(e)
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                raise _Conflict from e
            if code in ("NoSuchKey", "404") or isinstance(e, FileNotFoundError):
                raise FileNotFoundError(self.key) from e
            raise LeaseError(f"lease s3://{self.bucket}/{self.key}: {e}") from e

    def read(self) -> tuple[bytes, str] | None:
        try:
            out = self._call("get_object")
        except FileNotFoundError:
            return None
        return out["Body"], out["ETag"]

    def create(self, data: bytes) -> str:
        return self._call("put_object", Body=data, IfNoneMatch="*")["ETag"]

    def replace(self, data: bytes, tag: str) -> str:
        return self._call("put_object", Body=data, IfMatch=tag)["ETag"]

    def delete(self, tag: str) -> None:
        now = self.read()  # S3 general-purpose buckets: no conditional delete everywhere
        if now is None or now[1] != tag:
            raise _Conflict
        self._call("delete_object")


def _s3_code(e: BaseException) -> str | None:
    for err in (e, e.__cause__, e.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            return str(
                error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            )
    return None


def _store(output: str, storage_options: dict[str, Any] | None):
    fs, path = filesystem(output, storage_options)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols or "local" in protocols:
        return _LocalStore(path)
    if any(f"{p}://" in S3_PROTOCOLS for p in protocols):
        return _S3Store(fs, path)
    raise LeaseError(
        f"no atomic create on {protocols[0]}:// for the output lease; use a local path or s3://"
    )


# --------------------------------------------------------------------------- the lease
class Lease:
    """The lease on ``output`` for one run: ``acquire()``, renewed in the background, ``release()``.

    ``ttl_s``: a heartbeat older than this makes the lease stale (taken over by the next
    run); ``renew_s``: seconds between heartbeats (default ``ttl_s / 4``).
    """

    def __init__(
        self,
        output: str,
        storage_options: dict[str, Any] | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        renew_s: float | None = None,
        run_id: str | None = None,
    ):
        if not ttl_s > 0:
            raise ValueError(f"lease ttl_s must be > 0, got {ttl_s}")
        self.output = output
        self.ttl_s = float(ttl_s)
        self.renew_s = float(renew_s if renew_s is not None else ttl_s / 4)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self._store = _store(output, storage_options)
        self._tag: Any = None
        self._record: LeaseRecord | None = None
        self._lost: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.took_over: LeaseRecord | None = None  # the stale lease this one replaced

    @property
    def held(self) -> bool:
        return self._record is not None and self._lost is None

    def _new_record(self, started: float | None = None) -> LeaseRecord:
        now = time.time()
        return LeaseRecord(
            self.run_id, socket.gethostname(), os.getpid(), started or now, now, self.ttl_s
        )

    def acquire(self) -> Lease:
        """Take the lease (creating it, or taking over a stale one); LeaseHeld if it is live."""
        record = self._new_record()
        for _ in range(5):  # a few rounds: the holder may be releasing meanwhile
            try:
                self._tag = self._store.create(record.to_bytes())
                break
            except _Conflict:
                pass
            current = self._store.read()
            if current is None:
                continue  # released meanwhile: create again
            data, tag = current
            try:
                holder = LeaseRecord.from_bytes(data)
            except (ValueError, KeyError, TypeError):
                holder = None  # unreadable: a writer died mid-way on a store without atomic puts
            if holder is not None and not holder.stale():
                raise LeaseHeld(self.output, holder, holder.age())
            try:
                self._tag = self._store.replace(record.to_bytes(), tag)
            except _Conflict:
                continue  # another run took it over first: look again
            self.took_over = holder
            log.warning(
                "took over the stale lease on %s (run %s on %s, pid %s, last heartbeat %s)",
                self.output, *(
                    (holder.run_id, holder.host, holder.pid, _iso(holder.heartbeat))
                    if holder else ("?", "?", "?", "?")
                ),
            )  # fmt: skip
            break
        else:
            raise LeaseError(f"could not take the lease on {self.output}: it kept changing")
        self._record = record
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="d4a-lease", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> None:
        """Write a new heartbeat now (the background thread does this every ``renew_s``)."""
        with self._lock:
            if self._record is None or self._lost is not None:
                return
            record = dataclasses.replace(self._record, heartbeat=time.time(), run_id=self.run_id)
            try:
                self._tag = self._store.replace(record.to_bytes(), self._tag)
                self._record = record
            except _Conflict as e:
                self._lost = LeaseLost(
                    f"the lease on {self.output} was taken over or removed while run "
                    f"{self.run_id} held it"
                )
                self._lost.__cause__ = e
                log.error("%s", self._lost)

    def set_run_id(self, run_id: str) -> None:
        """Record the run's id in the lease (at once)."""
        self.run_id = run_id
        self.renew()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                self.renew()
            except Exception as e:  # storage hiccup: try again at the next beat
                log.warning("lease heartbeat on %s failed: %s", self.output, e)
            if self._lost is not None:
                return

    def check(self) -> None:
        """Raise LeaseLost if another run took this lease over (call before a commit)."""
        if self._lost is not None:
            raise self._lost

    def release(self) -> None:
        """Stop the heartbeats and delete the lease (if it is still this run's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._record is not None and self._lost is None:
                try:
                    self._store.delete(self._tag)
                except _Conflict:
                    log.error("the lease on %s was no longer this run's at release", self.output)
            self._record = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_lease(output: str, storage_options: dict[str, Any] | None = None) -> LeaseRecord | None:
    """The lease record on ``output``, or None when there is none."""
    current = _store(output, storage_options).read()
    return None if current is None else LeaseRecord.from_bytes(current[0])


# this process's leases by output: a run inside a job that already holds the lease
# (the command takes it before starting Ray) uses that one
_HELD: dict[str, tuple[Lease, int]] = {}
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def hold_lease(
    output: str,
    storage_options: dict[str, Any] | None = None,
    ttl_s: float = DEFAULT_TTL_S,
    run_id: str | None = None,
) -> Iterator[Lease]:
    """The lease on ``output`` for the duration of the block: this process's if it already
    holds it (re-entrant), else acquired (LeaseHeld if another run holds it) and released."""
    output = absolute_uri(output)
    with _HELD_LOCK:
        if output in _HELD:
            lease, n = _HELD[output]
            _HELD[output] = (lease, n + 1)
        else:
            lease = Lease(output, storage_options, ttl_s=ttl_s, run_id=run_id).acquire()
            _HELD[output] = (lease, 1)
    try:
        if run_id is not None and lease.run_id != run_id:
            lease.set_run_id(run_id)
        yield lease
    finally:
        with _HELD_LOCK:
            lease, n = _HELD[output]
            if n > 1:
                _HELD[output] = (lease, n - 1)
            else:
                del _HELD[output]
                lease.release()
