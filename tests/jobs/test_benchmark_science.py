"""jobs/benchmark_science.py over validation.science_report: one tiny run with a comparison."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from d4a_batch.testing import load_job, make_tiny_prior
from d4a_batch.validation.science_report import SUMMARY_COLUMNS, summarise


def test_summary_medians_and_snr_bins():
    df = pd.DataFrame({c: [1.0, 2.0, 3.0] for c in SUMMARY_COLUMNS} | {"snr": [5.0, 50.0, 60.0]})
    df["psnr_rl"] = [0.0, 5.0, 0.0]
    s = summarise(df)
    assert s["objects"] == 3 and s["psnr_mean"] == 2.0 and s["coverage68_mean"] == 2.0
    assert s["mean_better_than_rl"] == 2 / 3
    assert [(b["snr_bin"], b["objects"]) for b in s["by_snr"]] == [("0–10", 1), ("30–100", 2)]


def test_a_tiny_run_writes_its_record_report_and_frontier(tmp_path):
    prior = make_tiny_prior(tmp_path / "prior")
    out = tmp_path / "out"
    job = load_job("benchmark_science")
    argv = ["--prior", str(prior), "--out", str(out), "--n-objects", "4", "--n-tune", "1",
            "--samples", "2", "--steps", "2", "--batch-size", "4", "--rl-iters", "5",
            "--figures", "0", "--no-real", "--sampler", "dds", "--cg", "2",
            "--compare", "dps:2", '{"steps": 3}']  # fmt: skip
    assert job.main(argv) == 0
    doc = json.loads((out / "science.json").read_text())
    sam = doc["run_config"]["sampler"]
    assert (sam["sampler"], sam["steps"], sam["samples"], sam["cg_iterations"]) == ("dds", 2, 2, 2)
    assert doc["summary"]["objects"] == len(doc["objects"]) > 0
    specs = {r["spec"] for r in doc["frontier"]}
    assert specs == {"dps:2", '{"steps": 3}'}
    assert np.isfinite([r["chi2"] for r in doc["objects"]]).all()
    assert "posterior mean" in (out / "science.md").read_text()
