"""validation.throughput_sections on the tiny prior: the sampler sections' rows and the report's
tables of them."""

from __future__ import annotations

from d4a_batch.validation.report import run_header
from d4a_batch.validation.throughput_sections import (
    SamplerTiming,
    batch_sweep,
    batched_vs_naive,
    report,
)
from tests.validation.test_experiments import tiny_prior


def test_batched_vs_naive_and_the_batch_sweep_fill_the_report():
    prior = tiny_prior()
    timing = SamplerTiming(objects=2, samples=1, steps=2, repeats=1)
    bvn = batched_vs_naive(prior, timing)
    assert bvn["objects"] == 2 and bvn["speedup"] > 0 and bvn["flops_per_step"] > 0
    assert (
        bvn["achieved_flops_per_s"] > 0 and bvn["flops_per_row_step"] * 2 == bvn["flops_per_step"]
    )
    lines: list[str] = []
    sweep = batch_sweep(prior, timing, [1], lines.append)
    assert [r["objects_per_call"] for r in sweep] == [1] and len(lines) == 1
    bvn["fraction_of_peak"] = 0.5
    doc = {**run_header(), "device": "cpu", "prior": "tiny", "clock": "wall",
           "peak": {"matmul": 1e9, "conv3x3": 2e9}, "batched_vs_naive": bvn, "batch_sweep": sweep,
           "actor_sweep": [{"actors": 1, "objects": 8, "batch_size": 4, "seconds": 2.0,
                            "objects_per_s": 4.0}]}  # fmt: skip
    text = report(doc)
    assert (
        "| sampler | seconds | objects/s | samples/s |" in text and "50.0% of the measured" in text
    )
    assert "| objects_per_call | rows |" in text and "| actors | objects |" in text
