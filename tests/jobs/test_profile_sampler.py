"""jobs/profile_sampler.py: the time table and the CG trace of the data step."""

from __future__ import annotations

import json

from d4a_batch.testing import load_job


def test_profile_and_cg_trace_on_the_demo_prior(tmp_path, capsys):
    job = load_job("profile_sampler")
    argv = ["--mags", "19", "--samples", "2", "--steps", "3", "--cg", "4",
            "--gauss-newton", "2", "--cg-trace", "--out", str(tmp_path)]  # fmt: skip
    assert job.main(argv) == 0
    doc = json.loads((tmp_path / "profile.json").read_text())
    parts = {r["part"]: r for r in doc["rows"]}
    assert parts["network"]["calls"] == 3
    # 3 steps x 2 Gauss-Newton iterations x (4 CG x 2 passes + linearisation, backtracking)
    assert parts["operator (adjoint)"]["calls"] >= 3 * 2 * 4
    assert abs(sum(r["share"] for r in doc["rows"][:-1]) - 1.0) < 1e-9
    trace = doc["cg_trace"]
    assert {r["gauss_newton"] for r in trace} == {1, 2}
    assert sum(r["calls"] for r in trace) == 3 * 2  # one record per Gauss-Newton iteration
    for r in trace:
        assert 0 <= r["median_after_last"] <= r["max_after_last"]
        assert all(r[k] >= 0 for k in ("median_after_1", "median_after_3", "max_after_1"))
    assert "gauss_newton" in capsys.readouterr().out
