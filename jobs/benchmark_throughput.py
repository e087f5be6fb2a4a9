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
from d4a_batch.config import PriorConfig, to_dict
from d4a_batch.prior.artifact import load_prior
from d4a_batch.sampler_spec import SPEC_HELP, sampler_arg, sampler_config
from d4a_batch.schema import DEMO_PRIOR_DIR, REPO_ROOT
from d4a_batch.validation.engine_throughput import EngineSections, actor_sweep, engine_sections
from d4a_batch.validation.report import run_header, write_json
from d4a_batch.validation.throughput import measured_peak, return_freed_memory
from d4a_batch.validation.throughput_sections import (
    SamplerTiming,
    batch_sweep,
    batched_vs_naive,
    gpu_variants,
    paper_config,
    random_prior,
    report,
)

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


def ints(text: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4] ('' -> [])."""
    return [int(v) for v in text.split(",") if v]


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
    sections = EngineSections(
        tuple(ints(args.engine_sizes)), sampler_config(args.engine_sampler), args.engine_batch,
        args.layout_objects, sampler_config(args.layout_sampler), args.layout_repeats,
    )  # fmt: skip
    if args.engine_only:
        doc.update(engine_sections(prior_path, sections, work, log))
        return finish(doc, out, t0)
    timing = SamplerTiming(args.objects, args.samples, args.steps, args.naive_batch,
                           args.repeats, args.clock)  # fmt: skip
    doc["peak"] = measured_peak(device, clock=args.clock)
    log(f"measured peak FLOP/s: {doc['peak']}")
    doc["batched_vs_naive"] = bvn = batched_vs_naive(prior, timing)
    bvn["fraction_of_peak"] = bvn["achieved_flops_per_s"] / max(doc["peak"].values())
    log(f"batched {bvn['batched_samples_per_s']:.2f} samples/s, naive "
        f"{bvn['naive_samples_per_s']:.2f} samples/s: x{bvn['speedup']:.2f}")  # fmt: skip
    doc["batch_sweep"] = batch_sweep(prior, timing, ints(args.batch_sizes), log)
    if args.actors:
        doc["actor_sweep"] = actor_sweep(prior_path, prior.config, ints(args.actors),
                                         args.actor_objects, args.steps, args.samples, work, log)  # fmt: skip
    if device.type == "cuda":
        doc["gpu_variants"] = gpu_variants(prior, timing, log)
    if device.type == "cuda" or args.paper:
        doc["paper_config"] = paper_config(device, args.paper_rows, args.clock)
        log(f"paper config: {doc['paper_config']['seconds_per_sample_1000_steps']:.1f} s/sample")
    doc.update(engine_sections(prior_path, sections, work, log))
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


if __name__ == "__main__":
    sys.exit(main())
