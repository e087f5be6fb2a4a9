"""Guards a scheduled run needs, end to end with the real job: config checks before any
work (exit 2), one writer per output (exit 4), a failing exit when most objects fail (exit 5).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest

from d4a_batch.cli import deconvolve as cli
from d4a_batch.config import ColumnMap
from d4a_batch.mock.survey import build_mock_survey
from d4a_batch.pipeline.lease import read_lease
from d4a_batch.pipeline.ledger import OK, Ledger
from d4a_batch.schema import LEASE_FILE, LEDGER_DIR, REPO_ROOT, Col, Status
from d4a_batch.survey.hats_io import open_input_catalog, read_partition
from d4a_batch.survey.storage import resolve_uri
from d4a_batch.testing import TINY_PRIOR, load_job, tiny_survey_config

JOB = [sys.executable, "jobs/deconvolve_survey.py"]
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def _job_module():
    """jobs/deconvolve_survey.py loaded from its file, as a scheduler's ``python jobs/...``."""
    return load_job("deconvolve_survey")


def _input_ids(survey) -> list[int]:
    cat = open_input_catalog(str(survey))
    return sorted(
        row[Col.OBJECT_ID]
        for part in cat.partitions
        for row in read_partition(
            part, ColumnMap(), TINY_PRIOR.bands, cat.healpix_column
        ).to_pylist()
    )


def _argv(survey, out, prior, *extra: str) -> list[str]:
    return [
        "--catalog", str(survey), "--output", str(out), "--prior", str(prior),
        "--steps", "2", "--samples", "2", "--batch-size", "4", "--no-maps", *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------- config checks
@pytest.mark.parametrize(
    ("extra", "config", "words"),
    [
        (["--steps", "0"], None, "SamplerConfig.steps must be > 0 (got 0)"),
        ([], {"sampler": {"guidance_rule": "rsm"}}, "SamplerConfig.guidance_rule must be one of"),
        ([], {"map_dtype": "int8"}, "RunConfig.map_dtype must be one of"),
    ],
    ids=["steps-0", "misspelt-guidance-rule", "map-dtype"],
)
def test_a_bad_config_exits_2_before_any_work(tmp_path, extra, config, words):
    out = tmp_path / "out"
    argv = ["--catalog", str(tmp_path / "no-survey"), "--output", str(out), *extra]
    if config is not None:
        (tmp_path / "run.json").write_text(json.dumps(config))
        argv += ["--config", str(tmp_path / "run.json")]
    started = time.monotonic()
    done = subprocess.run(
        JOB + argv, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == cli.EXIT_JOB_ERROR, done.stderr
    assert words in done.stderr and "nothing was done" in done.stderr
    assert "Ray" not in done.stdout + done.stderr  # stopped before starting Ray
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["run.json"] if config is not None else []
    )
    assert time.monotonic() - started < 300


def test_the_cli_options_are_checked_too():
    with pytest.raises(SystemExit):
        cli.parse_args(["--max-error-fraction", "1.5"])
    assert cli.parse_args([]).max_error_fraction == cli.MAX_ERROR_FRACTION == 0.5


# --------------------------------------------------------------------------- one writer
def _wait_for_lease(out, proc, timeout_s=300) -> None:
    deadline = time.monotonic() + timeout_s
    while not (out / LEASE_FILE).exists():
        assert proc.poll() is None, "the first run ended before it took the lease"
        assert time.monotonic() < deadline, f"no lease in {timeout_s} s"
        time.sleep(0.05)


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (a driver and anything it started)."""
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid:
                os.kill(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_two_concurrent_runs_on_one_output_one_exits_4_touching_nothing(
    tiny_survey, tiny_prior, tmp_path
):
    """The first run is held (SIGSTOP) right after it took the lease, before it started Ray:
    the second run meets a live lease whatever the machine's load. Then the first goes on."""
    out = tmp_path / "out"
    first = subprocess.Popen(
        JOB + _argv(tiny_survey, out, tiny_prior, "--seed", "1", "--num-cpus", "2"),
        cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_lease(out, first)
        os.kill(first.pid, signal.SIGSTOP)
        holder = read_lease(str(out))
        assert holder.pid == first.pid
        before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        second = subprocess.run(
            JOB + _argv(tiny_survey, out, tiny_prior, "--seed", "2", "--overwrite"),
            cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert second.returncode == cli.EXIT_LEASE_HELD, second.stderr
        assert "being written by another run" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
        assert read_lease(str(out)) == holder  # untouched, even with --overwrite
        os.kill(first.pid, signal.SIGCONT)
        log, _ = first.communicate(timeout=800)
        assert first.returncode == cli.EXIT_OK, log
    finally:
        _kill_session(first.pid)
    runs = Ledger(str(out)).runs()
    assert len(runs) == 1 and runs[0].status == OK  # the second run never started one
    df = pd.read_parquet(out / "dataset")
    assert df[Col.OBJECT_ID].is_unique and set(df[Col.RUN_ID]) == {runs[0].run_id}
    assert df[Col.CONFIG_HASH].nunique() == 1  # one configuration's catalog
    assert not (out / LEASE_FILE).exists()  # released at the end


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_killed_runs_stale_lease_is_taken_over(ray_local, tiny_survey, tiny_prior, tmp_path):
    out = tmp_path / "out"
    ttl = 3.0
    dead = subprocess.Popen(
        JOB + _argv(tiny_survey, out, tiny_prior, "--lease-ttl", str(ttl), "--num-cpus", "2"),
        cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_lease(out, dead)
    finally:
        _kill_session(dead.pid)
        dead.wait(timeout=60)
    stale = read_lease(str(out))
    assert stale.pid == dead.pid and stale.ttl_s == ttl
    while not stale.stale():  # no heartbeat comes from a killed run
        time.sleep(0.2)
    # the same command again (on the test's Ray cluster): it takes the lease over and runs
    assert _job_module().main(_argv(tiny_survey, out, tiny_prior)) == cli.EXIT_OK
    assert not (out / LEASE_FILE).exists()
    df = pd.read_parquet(out / "dataset")
    assert sorted(df[Col.OBJECT_ID]) == _input_ids(tiny_survey)
    assert (df[Col.STATUS] == Status.OK).all()


# --------------------------------------------------------------------------- error rows
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_run_where_every_object_fails_exits_5_with_the_output_complete(
    ray_local, tiny_prior, tmp_path, capsys
):
    survey = build_mock_survey(
        tmp_path / "survey", dataclasses.replace(tiny_survey_config(6), partition_rows=3)
    )
    cat = open_input_catalog(str(survey))
    for part in cat.partitions:  # every cutout unreadable: not FITS at all
        columns = [ColumnMap().cutout_uri.format(band=band) for band in TINY_PRIOR.bands]
        for uris in pq.read_table(part.uri, columns=columns).to_pylist():
            for uri in uris.values():
                with open(resolve_uri(uri, str(survey)), "wb") as f:
                    f.write(b"this is not a FITS file")
    ids = _input_ids(survey)
    out = tmp_path / "out"
    code = _job_module().main(_argv(survey, out, tiny_prior))
    err = capsys.readouterr().err
    assert code == cli.EXIT_TOO_MANY_ERRORS, err
    assert f"{len(ids)} of the {len(ids)} objects processed are error rows" in err
    df = pd.read_parquet(out / "dataset")  # complete: every object has its (error) row
    assert sorted(df[Col.OBJECT_ID]) == sorted(ids) and (df[Col.STATUS] == Status.ERROR).all()
    runs = Ledger(str(out)).runs()
    assert len(runs) == 1 and runs[0].status == OK  # committed and recorded as any run
    assert (out / LEDGER_DIR).is_dir() and not (out / LEASE_FILE).exists()
