"""jobs/calibrate_prior.py end to end on the tiny prior: two sampler configs, one file."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from d4a_batch.config import RunConfig, SamplerConfig, from_dict, to_dict
from d4a_batch.prior.artifact import load_prior
from d4a_batch.sampling.calibrate import usable_calibration
from d4a_batch.testing import load_job, make_tiny_prior


def test_each_sampler_config_gets_its_own_entry_and_samples_are_never_mixed(tmp_path):
    prior = make_tiny_prior(tmp_path / "prior")
    job = load_job("calibrate_prior")
    dps = {"steps": 2, "samples": 4}
    dds = {"steps": 2, "samples": 4, "sampler": "dds", "cg_iterations": 2}
    common = ["--prior", str(prior), "--n-calib", "6", "--n-score", "4", "--batch-size", "4",
              "--bound", "none", "--min-per-bin", "1", "--write"]  # fmt: skip
    for name, fields in (("dps", dps), ("dds", dds)):
        args = [*common, "--work", str(tmp_path / name), "--sampler", json.dumps(fields)]
        assert job.main(args) == 0
        report = json.loads((tmp_path / name / "calibration_report.json").read_text())
        assert report["sampler"] == to_dict(
            from_dict(SamplerConfig, to_dict(SamplerConfig()) | fields)
        )
        pooled = report["reports"]["score"]["pooled"]
        assert pooled["n"] == 4 and 0 <= pooled["cov68_core_gauss"] <= 1
    cals = load_prior(prior).calibrations
    assert len(cals) == 2
    for fields in (dps, dds):
        sampler = from_dict(SamplerConfig, to_dict(SamplerConfig()) | fields)
        cal = usable_calibration(cals, sampler)
        assert cal is not None and cal.mocks["n_objects"] == 6
        # the plug-in λ (bound "none") of the 68 % interval exists in every bin, inside the
        # grid (measured 0.9-5 on the random tiny prior; at 95 % some bins pass the grid's
        # λ = 50)
        assert all(v is not None and 0 < v < 50 for v in cal.lambdas["68"])
    # the dps folder's cached samples are not reused for another sampler config
    with pytest.raises(SystemExit, match="use another --work"):
        job.main([*common, "--work", str(tmp_path / "dps"), "--sampler", json.dumps(dds)])


def test_a_record_older_than_a_sampler_field_is_read_as_it_was_sampled(tmp_path):
    """A work folder sampled before ``gauss_newton`` / ``clip_data_step`` existed (one
    Gauss-Newton iteration, clipped data step) is not taken for today's default sampler."""
    job = load_job("calibrate_prior")
    old = to_dict(RunConfig())
    for key in ("gauss_newton", "clip_data_step"):
        del old["sampler"][key]
    (tmp_path / "run_config.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="use another --work"):
        job.sampled_config(tmp_path, RunConfig())
    as_sampled = replace(RunConfig().sampler, gauss_newton=1, clip_data_step=True)
    config = job.sampled_config(tmp_path, RunConfig(sampler=as_sampled))
    assert config.sampler == as_sampled
