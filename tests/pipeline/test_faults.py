"""Real process kills during a run: a sampling actor, then the driver itself.

The catalog in the end must hold exactly one row per input object, with no
duplicates, whatever was killed.

Each kill lands mid-run whatever the machine's load: the driver's ``Commits.submit`` is
gated so that once the first partition's commit is recorded, no other partition is
committed until the test has killed what it kills. Nothing here waits a fixed time for
the run to reach a state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest

from d4a_batch.config import RunConfig, SamplerConfig, to_dict
from d4a_batch.mock.survey import build_mock_survey
from d4a_batch.pipeline.commit import Commits
from d4a_batch.pipeline.engine import ExecutionOptions, run_survey
from d4a_batch.pipeline.lease import read_lease
from d4a_batch.pipeline.ledger import OK, RUNNING, Ledger, describe_runs, pixel_name
from d4a_batch.schema import LEDGER_DIR, REPO_ROOT, Col, Status
from d4a_batch.survey.hats_io import open_input_catalog
from d4a_batch.testing import load_job, tiny_survey_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

N_OBJECTS = 16
STEPS = 120  # long enough that batches are still being sampled when the kill lands
# The engine's default sampler (DDS), at one Gauss-Newton iteration of 2 CG steps: these tests
# are about kills, not the posterior, and every kill is gated on the ledger, not timed. At the
# default 3 x 10 a step costs ~4x as much (the two tests took 5-8 min on the 2-core VM).
SAMPLER = SamplerConfig(steps=STEPS, samples=2, gauss_newton=1, cg_iterations=2)


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    cfg = dataclasses.replace(tiny_survey_config(N_OBJECTS), partition_rows=5)
    return build_mock_survey(tmp_path_factory.mktemp("faults") / "survey", cfg)


def _input_ids(root) -> list[int]:
    cat = open_input_catalog(str(root))
    return sorted(i for p in cat.partitions for i in pq.read_table(p.uri)["object_id"].to_pylist())


def _committed(out) -> int:
    return len(list((out / LEDGER_DIR / "partitions").rglob("*.json")))


def _sampling_actor_pids() -> list[int]:
    """PIDs of the sampling actors of this test's Ray cluster (children of its raylet)."""
    import ray

    flag = f"--gcs-address={ray.get_runtime_context().gcs_address}"
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].endswith("raylet") and flag in cmd:
            pids = []
            for c in p.children(recursive=True):
                try:
                    if "MapWorker(MapBatches(DeconvolveActor))" in " ".join(c.cmdline()):
                        pids.append(c.pid)
                except psutil.Error:  # exited meanwhile
                    pass
            return pids
    return []


def _gate_commits(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """(reached, release): the run records its first partition's commit, sets ``reached``
    and commits nothing more until ``release`` is set."""
    reached, release = threading.Event(), threading.Event()
    submit = Commits.submit

    def gated(self, pixel):
        if self.submitted() and not release.is_set():
            self.collect(timeout=None)  # the first partition's commit is in the ledger
            reached.set()
            release.wait(600)
        submit(self, pixel)

    monkeypatch.setattr(Commits, "submit", gated)
    return reached, release


class _Lines(logging.Handler):
    """Keeps the messages of a logger (the run's progress and retry lines)."""

    def __init__(self, name: str):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self):
        # setLevel, not ``.level =``: it also clears the loggers' isEnabledFor cache, where
        # an earlier test's run (root at WARNING) left INFO cached as off; with a plain
        # assignment every line of this run was dropped, but only in the full suite (CI)
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        # a logging.config call earlier in the session (dictConfig's
        # disable_existing_loggers) may have disabled it: the run's lines would go nowhere
        self.disabled, self.logger.disabled = self.logger.disabled, False
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)
        self.logger.disabled = self.disabled


def test_a_killed_sampling_actor_is_restarted_and_nothing_is_lost(
    ray_local, survey, tiny_prior, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    progress = _Lines("d4a_batch.pipeline.progress")
    reached, release = _gate_commits(monkeypatch)
    config = RunConfig(sampler=SAMPLER, write_maps=False)
    options = ExecutionOptions(batch_size=2, progress_interval_s=0.0)
    result: dict = {}

    def run():
        try:
            result["summary"] = run_survey(str(survey), str(out), str(tiny_prior), config, options)
        except BaseException as e:  # reported by the test below
            result["error"] = e

    thread = threading.Thread(target=run)
    with progress:
        _kill_an_actor_midway(thread, reached, release, result, out)
    assert "error" not in result, result.get("error")
    n_parts = len(open_input_catalog(str(survey)).partitions)
    assert result["committed_at_kill"] == 1 < n_parts  # the kill landed before the run was done
    df = pd.read_parquet(out / "dataset")
    assert sorted(df.object_id) == _input_ids(survey) and df.object_id.is_unique
    assert (df[Col.STATUS] == Status.OK).all()
    assert result["summary"].failed_partitions == {}
    # progress from the sampler's steps, and one line saying what was retried (issue 30)
    assert any(x.startswith("sampling ") and "to go" in x for x in progress.lines), progress.lines
    # the retry line comes when the restarted actor registers again; when the other actors
    # finish the run before it is back (a loaded machine), there is none: at most one, and
    # then it names the killed process (the line itself: tests/pipeline/test_progress.py)
    retried = [x for x in progress.lines if "a sampling actor died" in x]
    assert len(retried) <= 1, progress.lines
    for line in retried:
        assert f"(process {result['killed']})" in line and "nothing is lost" in line


def _kill_an_actor_midway(thread, reached, release, result, out) -> None:
    """Start the run's ``thread``, SIGKILL a sampling actor once the first partition is
    committed, let the run finish."""
    thread.start()
    deadline = time.monotonic() + 300
    pids: list[int] = []
    while not pids and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.5)
        pids = _sampling_actor_pids()
    assert pids, "no sampling actor appeared"
    assert reached.wait(600), "no partition was committed in 600 s"
    result["committed_at_kill"] = _committed(out)
    running_at_kill = thread.is_alive()
    # an actor process found a moment ago may have exited since (Ray Data retires idle pool
    # workers): kill one that is there now, looking again for a few seconds
    killed, kill_deadline = None, time.monotonic() + 30
    while killed is None and time.monotonic() < kill_deadline:
        for pid in _sampling_actor_pids() or pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed = pid
            break
        else:
            time.sleep(0.2)
            pids = []
    assert killed is not None, "no sampling actor left to kill"
    result["killed"] = killed
    release.set()
    thread.join(timeout=600)
    assert running_at_kill and not thread.is_alive()
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == "zombie"


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (the driver and the Ray it started)."""
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid:
                os.kill(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


# the job as a scheduler runs it, with the commit gate of ``_gate_commits``: after the first
# commit it writes the marker file and waits to be killed
GATED_JOB = """
import pathlib, runpy, sys, time
from d4a_batch.pipeline.commit import Commits
marker, submit = pathlib.Path(sys.argv.pop(1)), Commits.submit
def gated(self, pixel):
    if self.submitted():
        self.collect(timeout=None)
        marker.touch()
        time.sleep(3600)
    submit(self, pixel)
Commits.submit = gated
sys.argv[0] = "jobs/deconvolve_survey.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_killed_driver_resumes_from_the_ledger(ray_local, survey, tiny_prior, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "first-commit"
    config = tmp_path / "config.json"
    config.write_text(json.dumps(to_dict(RunConfig(sampler=SAMPLER, write_maps=False))))
    argv = ["--catalog", str(survey), "--output", str(out), "--prior", str(tiny_prior)]
    argv += ["--config", str(config), "--batch-size", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    ttl = 2.0  # the killed driver's lease is stale this long after its last heartbeat
    command = [sys.executable, "-c", GATED_JOB, str(marker), *argv, "--num-cpus", "2"]
    driver = subprocess.Popen(
        [*command, "--lease-ttl", str(ttl)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not marker.exists() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert driver.poll() is None, "the run ended before it could be killed"
        assert marker.exists() and _committed(out) == 1, "no partition was committed in time"
    finally:
        _kill_session(driver.pid)
        driver.wait(timeout=60)
    time.sleep(1.0)
    _kill_session(driver.pid)  # anything the driver's Ray started late
    n_parts = len(open_input_catalog(str(survey)).partitions)
    first = Ledger(str(out)).runs()
    assert len(first) == 1 and first[0].status == RUNNING  # it never finished
    done_before = {pixel_name(k) for k, r in Ledger(str(out)).state().items() if r.status == OK}
    assert len(done_before) == 1 < n_parts
    lease = read_lease(str(out))  # the killed run's lease: no heartbeats any more
    assert lease is not None and lease.ttl_s == ttl
    while not lease.stale():
        time.sleep(0.1)

    # the same command again (on the test's Ray cluster): it does only what is left
    job = load_job("deconvolve_survey")
    assert job.main(argv) == 0
    runs = Ledger(str(out)).runs()
    assert len(runs) == 2 and runs[1].status == OK
    assert set(runs[1].skipped) == done_before
    assert (
        set(runs[1].processed)
        == {pixel_name(p.healpix) for p in open_input_catalog(str(survey)).partitions} - done_before
    )
    df = pd.read_parquet(out / "dataset")
    assert sorted(df.object_id) == _input_ids(survey) and df.object_id.is_unique
    assert (df[Col.STATUS] == Status.OK).all()
    assert set(df[Col.RUN_ID]) == {runs[0].run_id, runs[1].run_id}
    assert not (out / "_d4a_work").exists()
    assert "interrupted" in describe_runs(str(out)).splitlines()[0]
