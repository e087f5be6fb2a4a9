"""sampler_spec: one spelling of a sampler configuration for every job and the engine."""

from __future__ import annotations

import json

import pytest

from d4a_batch.config import ConfigError, RunConfig, SamplerConfig, to_dict
from d4a_batch.sampler_spec import DEMO_SAMPLER, run_config_sampler, sampler_config


def test_names_tokens_json_and_files_name_the_same_configs(tmp_path):
    assert sampler_config("default") == SamplerConfig()
    assert sampler_config("demo") == DEMO_SAMPLER
    fast = sampler_config("fast")
    assert (fast.network_precision, fast.gauss_newton_tol) == ("bfloat16", 0.1)
    assert fast.steps == SamplerConfig().steps and fast.samples == SamplerConfig().samples
    assert sampler_config("") == sampler_config(None) == SamplerConfig()
    dds = sampler_config("dds:25:10")
    assert (dds.sampler, dds.steps, dds.cg_iterations) == ("dds", 25, 10)
    assert sampler_config('{"sampler": "dds", "steps": 25, "cg_iterations": 10}') == dds
    (tmp_path / "s.json").write_text(
        json.dumps({"sampler": "dds", "steps": 25, "cg_iterations": 10})
    )
    assert sampler_config(str(tmp_path / "s.json")) == dds
    # a run config file (an earlier run's _d4a_run_config.json): its sampler section
    run = to_dict(RunConfig(sampler=dds))
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert sampler_config(str(tmp_path / "run.json")) == dds
    assert sampler_config("dps").sampler == "dps" and sampler_config("dps").steps == 50


def test_fields_go_over_the_base_and_flags_over_the_spec():
    base = SamplerConfig(steps=7, samples=3)
    assert sampler_config("dds", base).steps == 7  # tokens and JSON: over the base
    assert sampler_config('{"samples": 5}', base).steps == 7
    assert sampler_config("demo", base) == DEMO_SAMPLER  # a named config is taken whole
    flagged = sampler_config("dds:25", base, steps=9, samples=None)
    assert (flagged.steps, flagged.samples) == (9, 3)  # None: a flag not given


def test_bad_specs_say_what_is_expected():
    for bad in ("dsp:50", "dps:x", "dds:25:10:draw", "no/such/file.json", '{"steps": 0}',
                '{"nope": 1}', "[1, 2]", "{not json"):  # fmt: skip
        with pytest.raises(ConfigError):
            sampler_config(bad)


def test_a_run_config_sampler_section_may_be_a_spec():
    assert run_config_sampler("demo") == to_dict(DEMO_SAMPLER)
    assert run_config_sampler({"steps": 3}) == {"steps": 3}


def test_the_engine_takes_the_same_spec_in_sampler_and_config(tmp_path):
    from d4a_batch.cli.deconvolve import parse_args, run_config

    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"sampler": "dds:30:5", "write_maps": False}))
    cfg = run_config(parse_args(["--config", str(cfg_file), "--samples", "3"]), demo=False)
    assert (cfg.sampler.sampler, cfg.sampler.steps, cfg.sampler.cg_iterations) == ("dds", 30, 5)
    assert cfg.sampler.samples == 3 and cfg.write_maps is False
    cfg = run_config(parse_args(["--sampler", "demo", "--seed", "4"]), demo=False)
    assert cfg.sampler == sampler_config("demo", seed=4)
    assert run_config(parse_args([]), demo=True).sampler == DEMO_SAMPLER


def test_the_fast_sampler_has_the_shipped_priors_calibration():
    from d4a_batch.prior.artifact import load_prior
    from d4a_batch.sampler_spec import FAST_SAMPLER
    from d4a_batch.sampling.calibrate import usable_calibration
    from d4a_batch.schema import DEMO_PRIOR_DIR

    cals = load_prior(DEMO_PRIOR_DIR).calibrations
    assert usable_calibration(cals, FAST_SAMPLER) is not None
    assert usable_calibration(cals, SamplerConfig()) is not None
