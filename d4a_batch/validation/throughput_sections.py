"""The sections of ``jobs/benchmark_throughput.py`` that time the sampler in this process, and
the run's markdown report.

- ``batched_vs_naive`` (section 1-2): one batched ``deconvolve`` call over B objects x S
  samples against a naive per-object loop, interleaved, best of ``repeats``; the FLOPs of
  one DPS step and the achieved FLOP/s;
- ``batch_sweep`` (3): throughput and peak memory against objects per call;
- ``gpu_variants`` (5): fp32, bf16 autocast, torch.compile, CUDA graphs, per-step time;
- ``paper_config`` (5): the paper's 256-px UNet (``PAPER_PRIOR``, random weights) in seconds
  per posterior sample at its ``PAPER_STEPS`` steps, from the measured per-step time;
- ``report`` / ``engine_report``: the tables of a run's ``throughput.json`` (the engine
  sections 4, 6 and 7 run in ``validation.engine_throughput``).

The measurements themselves (timing, FLOPs, peak, memory) are ``validation.throughput``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from d4a_batch import testing
from d4a_batch.config import PriorConfig, to_dict
from d4a_batch.prior.artifact import Prior
from d4a_batch.validation.report import markdown_table
from d4a_batch.validation.throughput import (
    VARIANTS,
    PeakMemory,
    dps_step_flops,
    naive_loop,
    per_step_seconds,
    sample_once,
    select,
    synthetic_batch,
    variant_prior,
)

# the published diffusion4astro prior (arXiv:2411.19158): 256 px, improved-diffusion flags
PAPER_PRIOR = PriorConfig(
    name="paper-256-random", image_size=256, num_channels=192, num_res_blocks=3,
    channel_mult=(1, 1, 2, 2, 4, 4), attention_resolutions=(16, 8), num_heads=4,
    noise_schedule="cosine", rescale_timesteps=True, learn_sigma=False,
)  # fmt: skip
PAPER_STEPS = 1000


def random_prior(cfg: PriorConfig, device: str | torch.device) -> Prior:
    """A prior with random weights (the UNet's initialisation plus N(0, 0.02²) on every
    parameter, so the zero-initialised output layers are not zero) and unit prior variance."""
    return testing.random_prior(cfg, weight_std=0.02, keep_init=True, device=device)


@dataclass(frozen=True)
class SamplerTiming:
    """What the sampler sections time: B = ``objects`` per batched call, S = ``samples``,
    ``steps`` DPS steps, ``naive_batch`` samples per naive call, best of ``repeats``, on the
    ``clock`` ("wall" or "cpu": this process's CPU time)."""

    objects: int = 4
    samples: int = 4
    steps: int = 10
    naive_batch: int = 1
    repeats: int = 2
    clock: str = "wall"


def batched_vs_naive(prior: Prior, timing: SamplerTiming) -> dict[str, Any]:
    """Section 1-2: batched against naive, FLOPs of a step, achieved FLOP/s."""
    obs, z, ids = synthetic_batch(prior, timing.objects)
    n_samples = timing.objects * timing.samples
    sample_once(prior, select(obs, slice(0, 1)), z[:1], ids[:1], 2, 2)  # warm-up
    t_batched, t_naive, peak = float("inf"), float("inf"), 0
    for _ in range(timing.repeats):  # interleaved, best of each: the machine may be shared
        with PeakMemory(prior.device) as mem:
            t = sample_once(prior, obs, z, ids, timing.steps, timing.samples, clock=timing.clock)
        t_batched, peak = min(t_batched, t), max(peak, mem.peak)
        t = naive_loop(
            prior, obs, z, ids, timing.steps, timing.samples, timing.naive_batch, timing.clock
        )
        t_naive = min(t_naive, t)
    flops = dps_step_flops(prior, obs, z, timing.samples)
    return {
        "objects": timing.objects, "samples": timing.samples, "steps": timing.steps,
        "naive_batch": timing.naive_batch,
        "batched_seconds": t_batched, "naive_seconds": t_naive,
        "batched_objects_per_s": timing.objects / t_batched,
        "naive_objects_per_s": timing.objects / t_naive,
        "batched_samples_per_s": n_samples / t_batched,
        "naive_samples_per_s": n_samples / t_naive,
        "speedup": t_naive / t_batched,
        "repeats": timing.repeats,
        "batched_peak_memory_bytes": peak, "memory_kind": mem.kind,
        "flops_per_step": flops, "flops_per_row_step": flops / n_samples,
        "achieved_flops_per_s": flops * timing.steps / t_batched,
    }  # fmt: skip


def batch_sweep(
    prior: Prior,
    timing: SamplerTiming,
    batch_sizes: Sequence[int],
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Section 3: one batched call per number of objects in ``batch_sizes``."""
    rows = []
    for b in batch_sizes:
        obs, z, ids = synthetic_batch(prior, b)
        with PeakMemory(prior.device) as mem:
            t = sample_once(prior, obs, z, ids, timing.steps, timing.samples, clock=timing.clock)
        rows.append({
            "objects_per_call": b, "rows": b * timing.samples, "seconds": t,
            "objects_per_s": b / t, "samples_per_s": b * timing.samples / t,
            "peak_memory_mib": mem.peak / 2**20,
        })  # fmt: skip
        log(f"B={b}: {b / t:.3f} objects/s, peak memory {mem.peak / 2**20:.0f} MiB")
    return rows


def gpu_variants(
    prior: Prior, timing: SamplerTiming, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Section 5: per-step time and memory of each of ``VARIANTS`` (an error is a row too)."""
    obs, z, ids = synthetic_batch(prior, timing.objects)
    rows = []
    for variant in VARIANTS:
        try:
            p = variant_prior(prior, variant)
            sample_once(p, obs, z, ids, 3, timing.samples)  # warm-up / compile
            with PeakMemory(prior.device) as mem:
                step = per_step_seconds(p, obs, z, ids, timing.samples, clock=timing.clock)
            rows.append({"variant": variant, "step_seconds": step,
                         "row_steps_per_s": timing.objects * timing.samples / step,
                         "peak_memory_mib": mem.peak / 2**20})  # fmt: skip
        except Exception as e:  # a variant that does not run is a result too
            rows.append({"variant": variant, "error": f"{type(e).__name__}: {e}"[:300]})
        log(f"{variant}: {rows[-1]}")
    return rows


def paper_config(device: torch.device, rows: int, clock: str) -> dict[str, Any]:
    """Seconds per posterior sample of the paper's 256-px UNet (random weights) at 1000 steps."""
    prior = random_prior(PAPER_PRIOR, device)
    n_params = sum(p.numel() for p in prior.model.parameters())
    obs, z, ids = synthetic_batch(prior, rows)
    sample_once(prior, obs, z, ids, 2, 1)  # warm-up
    with PeakMemory(device) as mem:
        step = per_step_seconds(prior, obs, z, ids, 1, steps=(2, 4), clock=clock)
    return {
        "config": to_dict(PAPER_PRIOR), "parameters": n_params, "rows": rows,
        "step_seconds": step, "seconds_per_sample_1000_steps": step / rows * PAPER_STEPS,
        "peak_memory_mib": mem.peak / 2**20,
        "autocast": "bf16" if device.type == "cuda" else "none (CPU)",
    }  # fmt: skip


def engine_report(doc: dict[str, Any]) -> list[str]:
    """Markdown of sections 6 and 7."""
    lines: list[str] = []
    if doc.get("engine_vs_loop"):
        e = doc["engine_vs_loop"]
        s = e["sampler"]
        lines += ["", f"Engine vs a plain loop in one process, same mock objects, wall clock "
                  f"(Ray start-up excluded); sampler {s['sampler']} {s['steps']} steps x "
                  f"{s['samples']} samples, {s['gauss_newton']} Gauss-Newton x "
                  f"{s['cg_iterations']} CG; packs of <= {e['batch_size']}; load average "
                  f"{doc['load_average_at_start'][0]:.1f} at the start:", "",
                  markdown_table([{**r, "loop_load": r["loop"]["load_before"],
                                   "engine_load": r["engine"]["load_before"]} for r in e["rows"]],
                                 ["objects", "loop_seconds", "engine_seconds",
                                  "loop_objects_per_s", "engine_objects_per_s",
                                  "engine_over_loop", "loop_load", "engine_load"])]  # fmt: skip
    if doc.get("layouts"):
        e = doc["layouts"]
        s = e["sampler"]
        lines += ["", f"The engine on {e['objects']} objects in three actor layouts (sampler "
                  f"{s['sampler']} {s['steps']} steps x {s['samples']} samples):", "",
                  markdown_table([{**r, "load": r["load_before"]} for r in e["rows"]],
                                 ["layout", "round", "seconds", "objects_per_s", "load",
                                  "chosen"])]  # fmt: skip
    return lines


def report(doc: dict[str, Any]) -> str:
    """Markdown tables of a throughput run."""
    if "batched_vs_naive" not in doc:  # --engine-only
        return "\n".join(engine_report(doc)).strip()
    b = doc["batched_vs_naive"]
    lines = [
        f"{doc['machine']['processor']}, {doc['machine']['cpu_count']} CPUs, "
        f"{doc['machine']['torch_threads']} torch threads, device {doc['device']}; prior: "
        f"{doc['prior']}; B={b['objects']} objects × S={b['samples']} samples, {b['steps']} steps; "
        f"sampler timings on the {doc['clock']} clock.",
        "",
        markdown_table([
            {"sampler": "batched (one call, B·S rows)", "seconds": b["batched_seconds"],
             "objects/s": b["batched_objects_per_s"], "samples/s": b["batched_samples_per_s"]},
            {"sampler": f"naive (per object, {b['naive_batch']} sample(s)/call)",
             "seconds": b["naive_seconds"], "objects/s": b["naive_objects_per_s"],
             "samples/s": b["naive_samples_per_s"]},
        ], ["sampler", "seconds", "objects/s", "samples/s"]),
        "",
        f"Best of {b['repeats']} interleaved timings each. Speed-up batched/naive: ×{b['speedup']:.2f}. One DPS step over the batch: "
        f"{b['flops_per_step'] / 1e9:.3g} GFLOP ({b['flops_per_row_step'] / 1e6:.4g} MFLOP per "
        f"row); achieved {b['achieved_flops_per_s'] / 1e9:.3g} GFLOP/s = "
        f"{100 * b['fraction_of_peak']:.1f}% of the measured peak "
        f"(matmul {doc['peak']['matmul'] / 1e9:.3g}, conv3x3 {doc['peak']['conv3x3'] / 1e9:.3g} "
        f"GFLOP/s). Peak memory of the batched call: {b['batched_peak_memory_bytes'] / 2**20:.0f} "
        f"MiB ({b['memory_kind']}).",
        "",
        markdown_table(doc["batch_sweep"], ["objects_per_call", "rows", "seconds",
                                            "objects_per_s", "samples_per_s", "peak_memory_mib"]),
    ]  # fmt: skip
    if doc.get("actor_sweep"):
        lines += ["", "Engine (Ray Data, mock survey, wall clock, Ray cluster start-up excluded) vs actors:", "",
                  markdown_table(doc["actor_sweep"], ["actors", "objects", "batch_size",
                                                      "seconds", "objects_per_s"])]  # fmt: skip
    if doc.get("gpu_variants"):
        lines += ["", markdown_table(doc["gpu_variants"], ["variant", "step_seconds",
                                     "row_steps_per_s", "peak_memory_mib", "error"])]  # fmt: skip
    if doc.get("paper_config"):
        p = doc["paper_config"]
        lines += ["", f"Paper configuration (256 px, {p['parameters'] / 1e6:.1f} M parameters, "
                  f"random weights, {p['autocast']}): {p['step_seconds']:.3g} s per DPS step for "
                  f"{p['rows']} rows -> {p['seconds_per_sample_1000_steps']:.3g} s per posterior "
                  f"sample at {PAPER_STEPS} steps; peak memory {p['peak_memory_mib']:.0f} MiB."]  # fmt: skip
    lines += engine_report(doc)
    return "\n".join(lines)
