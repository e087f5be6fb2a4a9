"""Where a sampler's time goes: network, operator passes, and the rest (CG, Python).

    python jobs/profile_sampler.py                       # default sampler, demo prior
    python jobs/profile_sampler.py --mags 18 20 22 24 --samples 8 --steps 50 \
        --sampler dds --gauss-newton 3 --cg 10 --out docs/results/profile_sampler

The magnitude experiment's galaxy (``validation.magnitude``) at each ``--mags`` is one object
of one batch, deconvolved by ``sampling.deconvolve`` exactly as the engine does it. The
network (``prior.model``'s forward), the operator's linear map and adjoint
(``ForwardOperator.linear`` / ``adjoint``) are timed around every call (single-threaded CPU
ops are synchronous, so wall time inside a call is that call's), and counted; the remainder
of the sampler's wall time is CG and Gauss-Newton arithmetic, the profiled amplitudes,
backtracking objectives and Python. Prints a table and writes profile.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import d4a_batch.sampling.dds as dds
from d4a_batch.config import SamplerConfig
from d4a_batch.physics.operator import ForwardOperator
from d4a_batch.prior.artifact import load_prior
from d4a_batch.sampler_spec import SPEC_HELP, sampler_arg, sampler_from_args
from d4a_batch.sampling.deconvolve import deconvolve
from d4a_batch.schema import DEMO_PRIOR_DIR
from d4a_batch.validation.magnitude import MagnitudeConfig, make_observations
from d4a_batch.validation.report import markdown_table, run_header, write_json


class Timers:
    """Wall-time and call counters around named callables."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1

        return timed


def cg_traced(records: list[dict], state: dict):
    """``dds.perturbed_gauss_newton`` recording each call's CG residual trace (see --cg-trace)."""
    real = dds.perturbed_gauss_newton

    def traced(*args, **kwargs):
        trace: list[torch.Tensor] = []
        out = real(*args, **kwargs, trace=trace)
        if trace:
            rel = torch.stack(trace).numpy()  # [iterations, rows]
            records.append({"step": state["step"], "call": state["call"], "rows": rel.shape[1],
                             "median": np.median(rel, axis=1).tolist(),
                             "max": rel.max(axis=1).tolist()})  # fmt: skip
        state["call"] += 1
        return out

    return traced


def cg_table(records: list[dict], steps: int) -> list[dict]:
    """Per Gauss-Newton iteration and third of the steps: the median over calls of the rows'
    median and maximum relative residual after the first, third and last CG iteration."""
    out = []
    for k in sorted({r["call"] for r in records}):
        for third, name in enumerate(("early", "middle", "late")):
            sel = [r for r in records
                   if r["call"] == k and third * steps // 3 <= r["step"] < (third + 1) * steps // 3]  # fmt: skip
            if not sel:
                continue
            row = {"gauss_newton": k + 1, "steps": name, "calls": len(sel)}
            for j, label in ((0, "1"), (2, "3"), (-1, "last")):
                row[f"median_after_{label}"] = float(np.median([r["median"][j] for r in sel]))
                row[f"max_after_{label}"] = float(np.median([r["max"][j] for r in sel]))
            out.append(row)
    return out


def profile(prior, cfg: SamplerConfig, mags, z: float, cg_trace: bool = False) -> dict:
    """Run ``deconvolve`` on the magnitude galaxy at ``mags`` with timers installed (and,
    with ``cg_trace``, each data step's CG residual trace)."""
    pcfg = prior.config
    obs = make_observations(
        pcfg.bands, pcfg.kpc_per_pixel, pcfg.image_size,
        dataclasses.replace(MagnitudeConfig(), magnitudes=tuple(mags), z=z),
        cfg.aperture_radius_frac,
    )  # fmt: skip
    timers = Timers()
    net_forward = prior.model.forward
    lin, adj = ForwardOperator.linear, ForwardOperator.adjoint
    prior.model.forward = timers.wrap("network", net_forward)
    ForwardOperator.linear = timers.wrap("operator (linear)", lin)
    ForwardOperator.adjoint = timers.wrap("operator (adjoint)", adj)
    records: list[dict] = []
    state = {"step": 0, "call": 0}
    real_pgn = dds.perturbed_gauss_newton
    if cg_trace:
        dds.perturbed_gauss_newton = cg_traced(records, state)

    def next_step(i, x):
        state["step"], state["call"] = state["step"] + 1, 0

    try:
        t0 = time.perf_counter()
        deconvolve(obs.obs, [z] * len(mags), prior, cfg, list(range(1, len(mags) + 1)),
                   callback=next_step)  # fmt: skip
        total = time.perf_counter() - t0
    finally:
        prior.model.forward = net_forward
        ForwardOperator.linear, ForwardOperator.adjoint = lin, adj
        dds.perturbed_gauss_newton = real_pgn
    rows = []
    for name in ("network", "operator (linear)", "operator (adjoint)"):
        rows.append({"part": name, "seconds": timers.seconds[name], "calls": timers.calls[name],
                     "share": timers.seconds[name] / total})  # fmt: skip
    rest = total - sum(r["seconds"] for r in rows)
    rows.append({"part": "rest (CG, GN, amplitudes, Python)", "seconds": rest, "calls": 0,
                 "share": rest / total})  # fmt: skip
    rows.append({"part": "total", "seconds": total, "calls": 0, "share": 1.0})
    out = {"rows": rows, "objects": len(mags), "rows_per_batch": len(mags) * cfg.samples}
    if cg_trace:
        out["cg_trace"] = cg_table(records, cfg.steps)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prior", default=str(DEMO_PRIOR_DIR))
    p.add_argument("--mags", type=float, nargs="+", default=[18.0, 20.0, 22.0, 24.0])
    p.add_argument("--z", type=float, default=0.5)
    p.add_argument("--sampler", type=sampler_arg, help="dps | dds | daps or any " + SPEC_HELP)
    p.add_argument("--steps", type=int)
    p.add_argument("--samples", type=int, help="default 8")
    p.add_argument("--cg", type=int)
    p.add_argument("--gauss-newton", type=int)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cg-trace", action="store_true",
                   help="also record how far each data step's CG gets: the preconditioned "
                        "residual relative to its start after 1, 3 and all iterations, per "
                        "Gauss-Newton iteration and third of the steps (dds)")  # fmt: skip
    p.add_argument("--out", type=Path, help="folder for profile.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    prior = load_prior(args.prior)
    cfg = sampler_from_args(args, SamplerConfig(samples=8))
    result = profile(prior, cfg, args.mags, args.z, args.cg_trace)
    print(markdown_table(result["rows"], ("part", "seconds", "calls", "share"), ".3g"))
    if args.cg_trace:
        cols = ("gauss_newton", "steps", "calls", "median_after_1", "median_after_3",
                "median_after_last", "max_after_1", "max_after_3", "max_after_last")  # fmt: skip
        print(markdown_table(result["cg_trace"], cols, ".2g"))
    if args.out is not None:
        doc = {**run_header(), "sampler": dataclasses.asdict(cfg), "mags": args.mags,
               "threads": args.threads, **result}  # fmt: skip
        print(f"wrote {write_json(args.out / 'profile.json', doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
