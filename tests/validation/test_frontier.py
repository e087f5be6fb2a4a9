"""validation.frontier: sampler specs, budgets and the per-magnitude frontier table."""

from __future__ import annotations

import pytest

from d4a_batch.config import RunConfig, SamplerConfig
from d4a_batch.validation.frontier import budget, parse_spec, run_frontier


def test_specs_parse_to_sampler_fields():
    assert parse_spec("dps:50") == {"sampler": "dps", "steps": 50}
    assert parse_spec("daps:30:4:20") == {
        "sampler": "daps", "steps": 30, "inner_steps": 4, "cg_iterations": 20,
    }  # fmt: skip
    assert parse_spec("dds:25:10") == {"sampler": "dds", "steps": 25, "cg_iterations": 10}
    assert parse_spec("dds:25:10:mode") == {
        "sampler": "dds", "steps": 25, "cg_iterations": 10, "dds_randomize": False,
    }  # fmt: skip
    assert parse_spec("dds:50:10:gn3") == {
        "sampler": "dds", "steps": 50, "cg_iterations": 10, "gauss_newton": 3,
    }  # fmt: skip
    assert parse_spec("dds:50:10:mode:gn2")["gauss_newton"] == 2
    assert parse_spec("dds:50:10:gn3:free") == {
        "sampler": "dds", "steps": 50, "cg_iterations": 10, "gauss_newton": 3,
        "clip_data_step": False,
    }  # fmt: skip
    assert parse_spec("dds:50:10:clip:gn1")["clip_data_step"] is True
    assert parse_spec("dds:50:10:gn3:rcg4:tol0.05:bf16") == {
        "sampler": "dds", "steps": 50, "cg_iterations": 10, "gauss_newton": 3,
        "refine_cg_iterations": 4, "gauss_newton_tol": 0.05, "network_precision": "bfloat16",
    }  # fmt: skip
    assert parse_spec("dds:50:10:gn3:nchw") == parse_spec("dds:50:10:gn3")
    assert parse_spec("dps:50:fp32")["network_precision"] == "float32"
    for bad in ("dsp:50", "daps", "dps:x", "dds:25:10:draw", "dds:25:10:gn0", "dds:25:10:gnx",
                "dds:50:10:tol1.5", "dds:50:10:rcgx", "dds:50:10:nchw:gn3"):  # fmt: skip
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_frontier_rows_per_spec_and_magnitude():
    seen = []

    def run_spec(cfg, spec):
        seen.append(cfg.sampler)
        k = 1.0 if cfg.sampler.sampler == "dps" else 2.0
        return [
            {"mag_i_true": m, "psnr_mean": 30 + k, "psnr_rl": 29.0, "ssim_mean": 0.9,
             "ssim_rl": 0.8, "chi2": k, "coverage68": 0.5, "coverage95": 0.9}
            for m in (18.2, 18.4, 21.6)
        ]  # fmt: skip

    table = run_frontier(["dps:50", "daps:20:2:5"], RunConfig(), run_spec)
    assert [s.sampler for s in seen] == ["dps", "daps"]
    assert seen[1].steps == 20 and seen[1].inner_steps == 2 and seen[1].cg_iterations == 5
    assert list(table["mag_i"]) == ["all", "18", "22"] * 2
    assert list(table["objects"]) == [3, 2, 1] * 2
    assert table["time_ratio"].iloc[0] == 1.0 and table["cpu_ratio"].iloc[0] == 1.0
    assert budget(seen[1]) == (20, 20 * (2 + 1 + 10))
    dds = SamplerConfig(steps=50, cg_iterations=10, gauss_newton=3)
    assert budget(dds) == (50, 50 * 3 * (1 + 20))
    refined = SamplerConfig(steps=50, cg_iterations=10, gauss_newton=3, refine_cg_iterations=4)
    assert budget(refined) == (50, 50 * ((1 + 20) + 2 * (1 + 8)))
    assert table[table["spec"] == "daps:20:2:5"]["chi2"].eq(2.0).all()
    assert table["coverage68_cal"].isna().all()
