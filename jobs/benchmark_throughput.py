"""Throughput of the batched DPS sampler: batched vs naive, FLOP/s vs peak, batch size, actors.

    python jobs/benchmark_throughput.py                    # demo prior (or random weights)
    python jobs/benchmark_throughput.py --objects 8 --samples 8 --steps 20 --actors 1,2
    python jobs/benchmark_throughput.py --random --paper    # + the paper's 256-px UNet

All in one run, with identical prior, steps and samples:

1. batched: one ``sampling.deconvolve`` call over B objects × S samples (what the engine's
   actor does with a pack) against a naive loop (one object at a time, ``--naive-batch``
   samples per call, like the reference code); objects/s, samples/s and their ratio;
2. FLOPs of one DPS step (``FlopCounterMode``) and the achieved FLOP/s of the batched
   run against this machine's measured peak (a large matmul and a 3×3 conv, timed here);
3. throughput and peak memory against objects per call (B);
4. throughput of the whole engine (``pipeline.engine.run_survey`` on a small mock survey)
   against the number of Ray actors;
5. with a GPU: fp32 vs bf16 autocast, torch.compile and CUDA graphs (per-step time), and the
   paper's 256-pixel configuration (random weights) in seconds per posterior sample at its
   1000 steps (from the measured per-step time);
6. the whole engine against a plain loop in one process over the same mock objects, for
   ``--engine-sizes`` objects (default 5, 32, 256), at ``--engine-sampler`` (default: DDS,
   4 steps x 2 samples, 1 Gauss-Newton x 2 CG: small, so that 256 objects fit a session;
   ``validation/engine_throughput.py``);
7. the engine on a ``--layout-objects`` (5) object catalog in three actor layouts: one pack
   on one single-threaded actor (before issue 30), packs split over one single-threaded
   actor per CPU (the default), one actor with every CPU as torch threads.

``--engine-only`` runs sections 6 and 7 alone:

    python jobs/benchmark_throughput.py --engine-only --out runs/engine-vs-loop

Prints a table and writes throughput.json to ``--out`` (default runs/throughput-<time>).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from d4a_batch import testing
from d4a_batch.config import PriorConfig, RunConfig, SamplerConfig, to_dict
from d4a_batch.prior.artifact import Prior, load_prior
from d4a_batch.sampler_spec import SPEC_HELP, sampler_arg, sampler_config
from d4a_batch.schema import DEMO_PRIOR_DIR, REPO_ROOT
from d4a_batch.validation.report import markdown_table, run_header, write_json
from d4a_batch.validation.throughput import (
    THROUGHPUT_SAMPLER,
    VARIANTS,
    PeakMemory,
    dps_step_flops,
    measured_peak,
    naive_loop,
    per_step_seconds,
    return_freed_memory,
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
# section 6: small, so that 256 objects twice (loop and engine) fit a session on 2 CPUs;
# section 7: the default's 16 samples per object (the rows a pack feeds the network), fewer steps
ENGINE_SAMPLER = {"sampler": "dds", "steps": 4, "samples": 2, "gauss_newton": 1, "cg_iterations": 2}
LAYOUT_SAMPLER = {"sampler": "dds", "steps": 5, "samples": 16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prior", default=str(DEMO_PRIOR_DIR), help="prior artifact folder")
    p.add_argument("--random", action="store_true", help="random weights of PriorConfig()")
    p.add_argument("--out", type=Path, help="output folder (default runs/throughput-<time>)")
    p.add_argument("--objects", type=int, default=4, help="objects per batched call (B)")
    p.add_argument("--samples", type=int, default=4, help="posterior samples per object (S)")
    p.add_argument("--steps", type=int, default=10, help="DPS steps")
    p.add_argument("--naive-batch", type=int, default=1, help="samples per naive call")
    p.add_argument("--repeats", type=int, default=2, help="timings per sampler (best kept)")
    p.add_argument("--batch-sizes", default="1,2,4,8", help="objects per call to sweep")
    p.add_argument("--actors", default="1,2", help="Ray actor counts to sweep ('' skips)")
    p.add_argument("--actor-objects", type=int, default=8, help="mock objects per engine run")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--paper", action="store_true", help="time the 256-px paper UNet on CPU too")
    p.add_argument("--paper-rows", type=int, default=4, help="rows of the paper-config timing")
    p.add_argument(
        "--engine-sizes",
        default="5,32,256",
        help="catalog sizes of the engine-vs-loop section ('' skips it)",
    )
    p.add_argument(
        "--engine-sampler",
        default=json.dumps(ENGINE_SAMPLER),
        type=sampler_arg,
        help="SamplerConfig fields (JSON) of the engine-vs-loop section, or any " + SPEC_HELP,
    )
    p.add_argument("--engine-batch", type=int, default=8, help="objects per pack (both)")
    p.add_argument(
        "--layout-objects",
        type=int,
        default=5,
        help="objects of the actor-layout section (0 skips it)",
    )
    p.add_argument(
        "--layout-sampler",
        default=json.dumps(LAYOUT_SAMPLER),
        type=sampler_arg,
        help="SamplerConfig fields (JSON) of the actor-layout section, or any SPEC",
    )
    p.add_argument("--layout-repeats", type=int, default=1, help="rounds of the layouts")
    p.add_argument("--engine-only", action="store_true", help="sections 6 and 7 alone")
    p.add_argument(
        "--clock", choices=("wall", "cpu"),
        help="sampler timings: wall or this process's CPU time (default: cpu on a CPU, which a "
        "shared machine's other load does not distort; wall on a GPU)",
    )  # fmt: skip
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[throughput] {msg}", flush=True)


def random_prior(cfg: PriorConfig, device: str | torch.device) -> Prior:
    """A prior with random weights (the UNet's initialisation plus N(0, 0.02²) on every
    parameter, so the zero-initialised output layers are not zero) and unit prior variance."""
    return testing.random_prior(cfg, weight_std=0.02, keep_init=True, device=device)


def batched_vs_naive(prior: Prior, args) -> dict[str, Any]:
    obs, z, ids = synthetic_batch(prior, args.objects)
    n_samples = args.objects * args.samples
    sample_once(prior, select(obs, slice(0, 1)), z[:1], ids[:1], 2, 2)  # warm-up
    t_batched, t_naive, peak = float("inf"), float("inf"), 0
    for _ in range(args.repeats):  # interleaved, best of each: the machine may be shared
        with PeakMemory(prior.device) as mem:
            t = sample_once(prior, obs, z, ids, args.steps, args.samples, clock=args.clock)
        t_batched, peak = min(t_batched, t), max(peak, mem.peak)
        t = naive_loop(prior, obs, z, ids, args.steps, args.samples, args.naive_batch, args.clock)
        t_naive = min(t_naive, t)
    flops = dps_step_flops(prior, obs, z, args.samples)
    return {
        "objects": args.objects, "samples": args.samples, "steps": args.steps,
        "naive_batch": args.naive_batch,
        "batched_seconds": t_batched, "naive_seconds": t_naive,
        "batched_objects_per_s": args.objects / t_batched,
        "naive_objects_per_s": args.objects / t_naive,
        "batched_samples_per_s": n_samples / t_batched,
        "naive_samples_per_s": n_samples / t_naive,
        "speedup": t_naive / t_batched,
        "repeats": args.repeats,
        "batched_peak_memory_bytes": peak, "memory_kind": mem.kind,
        "flops_per_step": flops, "flops_per_row_step": flops / n_samples,
        "achieved_flops_per_s": flops * args.steps / t_batched,
    }  # fmt: skip


def batch_sweep(prior: Prior, args) -> list[dict[str, Any]]:
    rows = []
    for b in (int(v) for v in args.batch_sizes.split(",") if v):
        obs, z, ids = synthetic_batch(prior, b)
        with PeakMemory(prior.device) as mem:
            t = sample_once(prior, obs, z, ids, args.steps, args.samples, clock=args.clock)
        rows.append({
            "objects_per_call": b, "rows": b * args.samples, "seconds": t,
            "objects_per_s": b / t, "samples_per_s": b * args.samples / t,
            "peak_memory_mib": mem.peak / 2**20,
        })  # fmt: skip
        log(f"B={b}: {b / t:.3f} objects/s, peak memory {mem.peak / 2**20:.0f} MiB")
    return rows


def actor_sweep(prior_path: str, prior_cfg: PriorConfig, args, work: Path) -> list[dict]:
    """The whole engine (Ray Data: read, stage, sample, write) on a small mock survey."""
    from d4a_batch.mock.survey import MockSurveyConfig, ensure_mock_survey
    from d4a_batch.pipeline.engine import ExecutionOptions, run_survey
    from d4a_batch.ray_setup import init_ray

    # small HATS partitions: the read tasks then feed the actor pool several blocks at once
    survey = ensure_mock_survey(work / "survey", MockSurveyConfig(
        n_objects=args.actor_objects, bands=tuple(prior_cfg.bands),
        kpc_per_pixel=prior_cfg.kpc_per_pixel, n_model=prior_cfg.image_size,
        partition_rows=max(2, args.actor_objects // 4),
    ))  # fmt: skip
    ray = init_ray(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    config = RunConfig(sampler=SamplerConfig(sampler=THROUGHPUT_SAMPLER, steps=args.steps,
                                             samples=args.samples))  # fmt: skip
    rows = []
    try:
        for n in (int(v) for v in args.actors.split(",") if v):
            opts = ExecutionOptions(actors=n, batch_size=max(1, args.actor_objects // (2 * n)),
                                    overwrite=True)  # fmt: skip
            s = run_survey(str(survey), str(work / f"out-{n}"), prior_path, config, opts)
            rows.append({"actors": n, "objects": s.objects, "seconds": s.seconds,
                         "objects_per_s": s.objects_per_s, "batch_size": opts.batch_size})  # fmt: skip
            log(f"{n} actor(s): {s.line()}")
    finally:
        ray.shutdown()
    return rows


def engine_sections(prior_path: str, args, work: Path) -> dict[str, Any]:
    """Sections 6 and 7 on one local Ray cluster (its start-up not counted)."""
    from d4a_batch.ray_setup import init_ray
    from d4a_batch.validation.engine_throughput import engine_vs_loop, small_run_layouts

    doc: dict[str, Any] = {}
    ray = init_ray(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    try:
        sizes = [int(v) for v in args.engine_sizes.split(",") if v]
        if sizes:
            sampler = sampler_config(args.engine_sampler)
            config = RunConfig(sampler=sampler, write_maps=False)
            doc["engine_vs_loop"] = {
                "sampler": to_dict(sampler), "batch_size": args.engine_batch,
                "rows": engine_vs_loop(prior_path, sizes, config, work, args.engine_batch, log),
            }  # fmt: skip
        if args.layout_objects:
            sampler = sampler_config(args.layout_sampler)
            config = RunConfig(sampler=sampler, write_maps=False)
            doc["layouts"] = {
                "sampler": to_dict(sampler), "objects": args.layout_objects,
                "rows": small_run_layouts(prior_path, args.layout_objects, config, work,
                                          args.engine_batch, args.layout_repeats, log),
            }  # fmt: skip
    finally:
        ray.shutdown()
    return doc


def gpu_variants(prior: Prior, args) -> list[dict[str, Any]]:
    obs, z, ids = synthetic_batch(prior, args.objects)
    rows = []
    for variant in VARIANTS:
        try:
            p = variant_prior(prior, variant)
            sample_once(p, obs, z, ids, 3, args.samples)  # warm-up / compile
            with PeakMemory(prior.device) as mem:
                step = per_step_seconds(p, obs, z, ids, args.samples, clock=args.clock)
            rows.append({"variant": variant, "step_seconds": step,
                         "row_steps_per_s": args.objects * args.samples / step,
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        return_freed_memory()
    args.clock = args.clock or ("wall" if device.type == "cuda" else "cpu")
    out = args.out or REPO_ROOT / "runs" / f"throughput-{time.strftime('%Y%m%dT%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="throughput-", dir=out))
    if args.random or not Path(args.prior).is_dir():
        prior = random_prior(PriorConfig(name="demo-arch-random"), device)
        prior_path = str(testing.write_prior(work / "prior", prior))
        label = "random weights, PriorConfig() architecture"
    else:
        prior, prior_path = load_prior(args.prior, device=device), args.prior
        label = f"{prior.prior_id} ({prior.metadata.get('training', {})})"
    log(f"prior: {label}; device {device}; {torch.get_num_threads()} torch threads")
    t0 = time.perf_counter()
    doc: dict[str, Any] = {**run_header(), "device": str(device), "prior": label,
                           "prior_config": to_dict(prior.config)}  # fmt: skip
    doc["clock"] = args.clock
    doc["load_average_at_start"] = os.getloadavg()
    if args.engine_only:
        doc.update(engine_sections(prior_path, args, work))
        return finish(doc, out, t0)
    doc["peak"] = measured_peak(device, clock=args.clock)
    log(f"measured peak FLOP/s: {doc['peak']}")
    doc["batched_vs_naive"] = bvn = batched_vs_naive(prior, args)
    bvn["fraction_of_peak"] = bvn["achieved_flops_per_s"] / max(doc["peak"].values())
    log(f"batched {bvn['batched_samples_per_s']:.2f} samples/s, naive "
        f"{bvn['naive_samples_per_s']:.2f} samples/s: x{bvn['speedup']:.2f}")  # fmt: skip
    doc["batch_sweep"] = batch_sweep(prior, args)
    if args.actors:
        doc["actor_sweep"] = actor_sweep(prior_path, prior.config, args, work)
    if device.type == "cuda":
        doc["gpu_variants"] = gpu_variants(prior, args)
    if device.type == "cuda" or args.paper:
        doc["paper_config"] = paper_config(device, args.paper_rows, args.clock)
        log(f"paper config: {doc['paper_config']['seconds_per_sample_1000_steps']:.1f} s/sample")
    doc.update(engine_sections(prior_path, args, work))
    return finish(doc, out, t0)


def finish(doc: dict[str, Any], out: Path, t0: float) -> int:
    """Write throughput.json and .md, print the tables."""
    doc["load_average_at_end"] = os.getloadavg()
    doc["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    doc["seconds"] = time.perf_counter() - t0
    write_json(out / "throughput.json", doc)
    text = report(doc)
    (out / "throughput.md").write_text(text + "\n")
    print(text)
    log(f"wrote {out} in {doc['seconds']:.0f} s")
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
