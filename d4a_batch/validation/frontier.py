"""Sampler frontier: DPS and DAPS at several budgets on the same scored mocks, in one run.

A spec is a sampler SPEC (``sampler_spec``), usually its tokens ``sampler:steps`` or
``daps:steps:inner:cg`` (e.g. ``dps:50``, ``dps:25``, ``daps:30:4:20``), set over the run's
sampler. Each spec re-runs the engine's sampling stage (``make_sampler`` /
``run_packs`` of ``validation.science``) on the same staged objects with the same seeds and
is scored against the truth like the main run (``score_pack``). Budget columns:
- ``net_evals``: network evaluations per sample (DPS: ``steps`` forward + backward passes;
  DAPS: ``steps`` forward passes, no network gradient);
- ``op_grads``: likelihood (operator) gradients or Jacobian products per sample;
- ``time_ratio``: wall time / wall time of the reference spec (the first, DPS-50 by
  default) measured in this process, on this machine, in this run;
- ``cpu_ratio``: the same with this process's CPU time (``time.process_time``), which a
  shared machine's other load does not inflate (single-threaded torch: CPU time is the
  work done).
Per i-magnitude bin (rounded to the nearest magnitude): median PSNR/SSIM of the posterior
mean and of Richardson-Lucy against the truth, median χ²/dof, mean 68/95 % core coverage.
``coverage68_cal``/``coverage95_cal`` are hooks for the calibrated intervals (None until a
calibration is applied; the calibration layer fills them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from d4a_batch.config import RunConfig
from d4a_batch.sampler_spec import sampler_config, spec_fields

# a spec's last token: the network in NCHW, as before 2026-12-08 (not a sampler field)
NCHW = "nchw"


def parse_spec(spec: str) -> dict:
    """A frontier spec -> SamplerConfig fields: the token SPEC of ``sampler_spec``
    (``dps:50``, ``daps:30:4:20``, ``dds:25:10[:gnK][:mode][:clip|:free][:rcgK][:tolX]``,
    ``bf16``/``fp32``) with its STEPS required, and a last ``nchw`` (``NCHW``), which the
    caller applies to the network itself."""
    text = spec.removesuffix(":" + NCHW)
    fields = spec_fields(text)
    if "steps" not in fields:
        raise ValueError(f"sampler spec {spec!r}: a frontier spec names its STEPS (dps:50)")
    return fields


def budget(cfg) -> tuple[int, int]:
    """(network evaluations, operator gradients) per sample of a SamplerConfig (DDS: at most;
    ``gauss_newton_tol`` stops rows early)."""
    if cfg.sampler == "daps":
        return cfg.steps, cfg.steps * (cfg.inner_steps + 1 + 2 * cfg.cg_iterations)
    if cfg.sampler == "dds":
        refine = cfg.refine_cg_iterations or cfg.cg_iterations
        per_step = 1 + 2 * cfg.cg_iterations + (cfg.gauss_newton - 1) * (1 + 2 * refine)
        return cfg.steps, cfg.steps * per_step
    return cfg.steps, cfg.steps


def run_frontier(
    specs: list[str],
    config: RunConfig,
    run_spec: Callable[[RunConfig], list[dict]],
) -> pd.DataFrame:
    """One row per (spec, magnitude bin) and one per spec over all magnitudes ("all").

    ``run_spec(config, spec) -> records`` samples and scores the scored objects (per-object
    dicts with mag_i_true, psnr_mean, psnr_rl, ssim_mean, ssim_rl, chi2, coverage68,
    coverage95); ``spec`` is passed for what is not a sampler field (``NCHW``).
    """
    rows, ref_seconds, ref_cpu = [], None, None
    for spec in specs:
        # any sampler SPEC (sampler_spec) over the run's sampler, less a last ':nchw'
        cfg = replace(config, sampler=sampler_config(spec.removesuffix(":" + NCHW), config.sampler))
        t0, c0 = time.perf_counter(), time.process_time()
        records = run_spec(cfg, spec)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        ref_seconds = ref_seconds or seconds
        ref_cpu = ref_cpu or cpu
        nets, ops = budget(cfg.sampler)
        df = pd.DataFrame(records)
        df["mag_bin"] = np.round(df["mag_i_true"]).astype(int).astype(str)
        groups = [("all", df)] + [(k, g) for k, g in df.groupby("mag_bin")]
        for key, g in groups:
            rows.append({
                "spec": spec, "mag_i": key, "objects": len(g), "net_evals": nets,
                "op_grads": ops, "seconds": seconds, "time_ratio": seconds / ref_seconds,
                "cpu_seconds": cpu, "cpu_ratio": cpu / ref_cpu if ref_cpu else None,
                "psnr_mean": float(g["psnr_mean"].median()),
                "psnr_rl": float(g["psnr_rl"].median()),
                "ssim_mean": float(g["ssim_mean"].median()),
                "ssim_rl": float(g["ssim_rl"].median()),
                "chi2": float(g["chi2"].median()),
                "coverage68": float(g["coverage68"].mean()),
                "coverage95": float(g["coverage95"].mean()),
                "coverage68_cal": None, "coverage95_cal": None,
            })  # fmt: skip
    return pd.DataFrame(rows)


def frontier_figure(path: Path, table: pd.DataFrame) -> Path:
    """PSNR of the posterior mean and χ²/dof per magnitude, one line per spec; RL dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    per_mag = table[table["mag_i"] != "all"].copy()
    per_mag["m"] = per_mag["mag_i"].astype(float)
    for spec, g in per_mag.groupby("spec", sort=False):
        g = g.sort_values("m")
        axes[0].plot(g["m"], g["psnr_mean"], "o-", label=spec)
        axes[1].semilogy(g["m"], g["chi2"], "o-", label=spec)
    rl = per_mag.groupby("m")["psnr_rl"].median()
    axes[0].plot(rl.index, rl.values, "k--", label="Richardson-Lucy")
    axes[0].set(xlabel="i mag (true)", ylabel="PSNR of the mean (dB)")
    axes[1].axhline(1.5, color="gray", lw=0.8)
    axes[1].set(xlabel="i mag (true)", ylabel="median χ²/dof")
    allm = table[table["mag_i"] == "all"]
    axes[2].scatter(allm["time_ratio"], allm["psnr_mean"])
    for _, r in allm.iterrows():
        axes[2].annotate(r["spec"], (r["time_ratio"], r["psnr_mean"]), fontsize=8)
    axes[2].set(xlabel="wall time / reference spec", ylabel="median PSNR (dB)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
