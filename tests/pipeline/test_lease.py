"""One writer per output: the lease file on local disk and on S3 (moto's server)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from d4a_batch.pipeline.lease import (
    Lease,
    LeaseError,
    LeaseHeld,
    LeaseLost,
    LeaseRecord,
    hold_lease,
    read_lease,
)
from d4a_batch.schema import LEASE_FILE
from d4a_batch.survey.storage import filesystem, join_uri
from tests.faults import moto_s3


@pytest.fixture(scope="module")
def s3():
    with moto_s3("lease-bucket") as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path, s3):
    """(output URI, storage options) on local disk or on moto's S3 server."""
    if request.param == "local":
        return str(tmp_path / "out"), None
    return f"s3://{s3.bucket}/{tmp_path.name}/out", s3.options()


def _race(output, so, n=8):
    """n leases try at once (released by a barrier); returns the winners and the refused."""
    barrier = threading.Barrier(n)

    def attempt(i):
        lease = Lease(output, so, ttl_s=60, run_id=f"run{i}")
        barrier.wait()
        try:
            return lease.acquire()
        except LeaseHeld:
            return None

    with ThreadPoolExecutor(n) as pool:
        got = list(pool.map(attempt, range(n)))
    return [g for g in got if g is not None], got.count(None)


def test_concurrent_acquires_exactly_one_wins(where):
    output, so = where
    for _ in range(3):
        winners, refused = _race(output, so)
        assert len(winners) == 1 and refused == 7
        assert read_lease(output, so).run_id == winners[0].run_id
        winners[0].release()
        assert read_lease(output, so) is None


def test_a_held_lease_refuses_with_a_clear_message_and_touches_nothing(where):
    output, so = where
    first = Lease(output, so, ttl_s=60, run_id="first").acquire()
    before = read_lease(output, so)
    with pytest.raises(LeaseHeld) as err:
        Lease(output, so, ttl_s=60, run_id="second").acquire()
    message = str(err.value)
    assert "run first" in message and output in message and "heartbeat" in message
    assert read_lease(output, so) == before  # the refused run changed nothing
    first.release()
    with Lease(output, so, run_id="third") as third:
        assert third.held and read_lease(output, so).run_id == "third"
    assert read_lease(output, so) is None


def test_heartbeats_renew_the_lease(where):
    output, so = where
    with Lease(output, so, ttl_s=60, renew_s=0.05, run_id="beating") as lease:
        first = read_lease(output, so).heartbeat
        deadline = time.monotonic() + 60  # a loaded machine may delay the thread
        while read_lease(output, so).heartbeat == first:
            assert time.monotonic() < deadline, "no heartbeat in 60 s"
            time.sleep(0.05)
        now = read_lease(output, so)
        assert now.heartbeat > first and now.started <= first and now.run_id == "beating"
        lease.check()


def _silence(lease: Lease, age_s: float) -> None:
    """Make ``lease`` look like a killed run's: no more heartbeats, the last ``age_s`` ago."""
    lease._stop.set()
    old = dataclasses.replace(lease._record, heartbeat=time.time() - age_s)
    lease._tag = lease._store.replace(old.to_bytes(), lease._tag)
    lease._record = old


def test_a_stale_lease_is_taken_over_and_its_holder_learns_it_lost(where):
    output, so = where
    dead = Lease(output, so, ttl_s=60, run_id="dead").acquire()
    _silence(dead, age_s=30)  # half the ttl: still fresh even after a long stall here
    with pytest.raises(LeaseHeld):
        Lease(output, so, ttl_s=60, run_id="early").acquire()
    _silence(dead, age_s=61)
    with Lease(output, so, ttl_s=60, run_id="next") as nxt:
        assert nxt.took_over is not None and nxt.took_over.run_id == "dead"
        assert read_lease(output, so).run_id == "next"
        dead.renew()  # the old holder's next heartbeat finds it gone
        with pytest.raises(LeaseLost):
            dead.check()
        dead.release()  # leaves the new holder's lease alone
        assert read_lease(output, so).run_id == "next"
    assert read_lease(output, so) is None


def test_concurrent_takeovers_of_a_stale_lease_exactly_one_wins(where):
    output, so = where
    Lease(output, so, ttl_s=0.2, renew_s=3600, run_id="dead").acquire()
    time.sleep(0.3)
    winners, refused = _race(output, so)
    assert len(winners) == 1 and refused == 7
    assert winners[0].took_over.run_id == "dead"
    winners[0].release()


def test_hold_lease_is_reentrant_in_one_process(where):
    output, so = where
    with hold_lease(output, so) as outer:
        with hold_lease(output, so, run_id="inner-run") as inner:
            assert inner is outer and read_lease(output, so).run_id == "inner-run"
        assert read_lease(output, so) is not None  # still held by the outer block
    assert read_lease(output, so) is None


def test_an_unreadable_lease_file_counts_as_stale(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LEASE_FILE).write_text("{not json")
    with Lease(str(out), run_id="fresh") as lease:
        assert lease.took_over is None and read_lease(str(out)).run_id == "fresh"


def test_lease_record_round_trip_and_staleness():
    rec = LeaseRecord("r", "h", 1, 100.0, 100.0, 10.0)
    assert LeaseRecord.from_bytes(rec.to_bytes()) == rec
    assert json.loads(rec.to_bytes())["heartbeat"] == 100.0
    assert not rec.stale(now=110.0) and rec.stale(now=110.5)


def test_protocols_without_atomic_create_are_refused():
    with pytest.raises(LeaseError, match="no atomic create"):
        Lease("memory://somewhere/out")


def test_the_lease_lies_in_the_output_root(where):
    output, so = where
    with Lease(output, so):
        fs, path = filesystem(join_uri(output, LEASE_FILE), so)
        assert fs.exists(path)
