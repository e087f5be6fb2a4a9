"""The demo exactly as the README runs it: jobs/deconvolve_survey.py, shipped prior, mock survey."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
from hats.io.validation import is_valid_catalog

from d4a_batch.schema import DEMO_PRIOR_DIR, PRIOR_CONFIG, REPO_ROOT, Status


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1600)  # a hang guard, not a speed target (see jobs/ benchmarks)
def test_demo_job_writes_a_catalog_and_prints_a_working_query(tmp_path):
    if not (DEMO_PRIOR_DIR / PRIOR_CONFIG).exists():
        pytest.skip(f"the demo prior {DEMO_PRIOR_DIR} is absent")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = tmp_path / "demo_posteriors"
    job = subprocess.run(
        [sys.executable, "jobs/deconvolve_survey.py", "--output", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert f"output HATS catalog: {out}" in job.stdout
    assert is_valid_catalog(out, strict=True)
    df = pd.read_parquet(out / "dataset")
    assert len(df) == 32 and df.object_id.is_unique and set(df.status) == {Status.OK}
    # the printed one-liner runs and prints the objects
    lines = job.stdout.splitlines()
    query = lines[lines.index("[d4a] query it, e.g.:") + 1].strip()
    shown = subprocess.run(query, shell=True, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert all(str(i) in shown.stdout for i in df.object_id)
