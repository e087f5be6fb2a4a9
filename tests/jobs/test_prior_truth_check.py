"""jobs/prior_truth_check.py on the demo prior at a tiny budget: files, rows, both samplers."""

from __future__ import annotations

import json

from d4a_batch.config import SamplerConfig
from d4a_batch.testing import load_job


def test_job_writes_a_table_per_sampler(tmp_path):
    args = ["--out", str(tmp_path), "--n-truths", "1", "--magnitudes", "18,23", "--threads", "1",
            "--sampler", '{"steps": 2, "samples": 2}',
            "--compare", '{"steps": 2, "samples": 2, "gauss_newton": 2}']  # fmt: skip
    assert load_job("prior_truth_check").main(args) == 0
    doc = json.loads((tmp_path / "prior_truth.json").read_text())
    assert [r["sampler"]["gauss_newton"] for r in doc["runs"]] == [SamplerConfig().gauss_newton, 2]
    for run in doc["runs"]:
        assert [row["mag"] for row in run["rows"]] == [18.0, 23.0]
        assert len(run["records"]) == 2 and set(run["pit"]) == {"18", "23"}
    text = (tmp_path / "prior_truth.md").read_text()
    assert "2 Gauss-Newton" in text and "chi2_median" in text
    assert (tmp_path / "prior_truth.png").stat().st_size > 0


def test_bad_sampler_overrides_are_refused(tmp_path, capsys):
    """A bad sampler SPEC is a usage error (sampler_spec.sampler_arg) naming the field."""
    import pytest

    mod = load_job("prior_truth_check")
    with pytest.raises(SystemExit):
        mod.main(["--out", str(tmp_path), "--sampler", "[1, 2]"])
    with pytest.raises(SystemExit) as e:
        mod.main(["--out", str(tmp_path), "--sampler", '{"gauss_newton": 0}'])
    assert e.value.code == 2 and "gauss_newton" in capsys.readouterr().err
