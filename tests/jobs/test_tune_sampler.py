"""jobs/tune_sampler.py over validation.tuning: the grid, the mocks, the choice, the outputs."""

from __future__ import annotations

import json
import math

import numpy as np

from d4a_batch.prior.artifact import load_prior
from d4a_batch.testing import load_job, make_tiny_prior
from d4a_batch.validation.tuning import choose, make_mocks, parse_grid


def test_grid_entries_become_settings_in_order():
    assert parse_grid(["rms:0.01,0.02", "raw:0.003"]) == [
        ("rms", 0.01), ("rms", 0.02), ("raw", 0.003),
    ]  # fmt: skip


def _result(rule, psnr, halluc, chi2):
    return {"rule": rule, "per_mag": {"20": {"psnr_x": psnr, "halluc": halluc, "chi2": chi2},
                                      "blank": {"psnr_x": -99.0, "halluc": 9.0, "chi2": 9.0}}}  # fmt: skip


def test_the_choice_prefers_narrow_posteriors_that_fit():
    wide = _result("wide", 40.0, 1.5, 1.0)  # best PSNR but wider than the prior
    misfit = _result("misfit", 35.0, 0.5, 3.0)
    fit = _result("fit", 30.0, 0.5, 1.1)
    assert choose([wide, misfit, fit], chi2_max=1.5)["rule"] == "fit"
    assert choose([wide, misfit], chi2_max=1.5)["rule"] == "misfit"  # none fits: narrow only


def test_mocks_and_the_job_end_to_end(tmp_path):
    prior_dir = make_tiny_prior(tmp_path / "prior")
    truths, obs, mags = make_mocks(load_prior(prior_dir), [21.0], 2, 0.4, seed=3, blank=1)
    assert truths.shape[0] == 3 and list(mags[:2]) == [21.0, 21.0] and math.isinf(mags[2])
    assert not truths[2].any() and truths[0].any()
    again = make_mocks(load_prior(prior_dir), [21.0], 2, 0.4, seed=3, blank=1)[1]
    assert np.array_equal(obs.image.numpy(), again.image.numpy())  # seeded
    out = tmp_path / "tune.json"
    job = load_job("tune_sampler")
    argv = ["--prior", str(prior_dir), "--mags", "21", "--objects", "1", "--blank", "1",
            "--samples", "2", "--steps", "2", "--grid", "rms:0.01,0.02",
            "--out-json", str(out), "--out-md", str(tmp_path / "tune.md")]  # fmt: skip
    assert job.main(argv) == 0
    doc = json.loads(out.read_text())
    assert [(r["rule"], r["zeta"]) for r in doc["results"]] == [("rms", 0.01), ("rms", 0.02)]
    assert set(doc["results"][0]["per_mag"]) == {"21", "blank"}
    assert (
        doc["chosen"]["rule"] == "rms"
        and "Chosen: rule `rms`" in (tmp_path / "tune.md").read_text()
    )
