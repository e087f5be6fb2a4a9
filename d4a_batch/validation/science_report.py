"""The science benchmark's summaries and report (``jobs/benchmark_science.py``'s logic).

``summarise``: medians of the per-object scores (``science.score_pack``) and the scores per
observed-S/N bin; ``calibration_section``: coverage per S/N bin of the scored objects
(``validation.calibration``); ``real_source_records``: the real HSC sources' rows;
``run_inputs``: what science.json records of the run's inputs; ``science_markdown``: the
run's Markdown report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from d4a_batch.config import RunConfig, SamplerConfig, to_dict
from d4a_batch.schema import Col
from d4a_batch.validation.calibration import engine_report, pack_inputs
from d4a_batch.validation.metrics import core_mask
from d4a_batch.validation.report import markdown_table, run_header

# the benchmark's sampler before its flags: 50 steps x 16 samples, seed 0
SCIENCE_SAMPLER = SamplerConfig(steps=50, samples=16, seed=0)
SNR_BINS = (0, 10, 30, 100, 300, np.inf)
SUMMARY_COLUMNS = ("psnr_mean", "psnr_rl", "psnr_obs", "ssim_mean", "ssim_rl", "ssim_obs",
                   "psnr_asinh_mean", "psnr_asinh_rl", "psnr_asinh_obs", "chi2", "chi2_rl",
                   "coverage68", "coverage95", "hallucination")  # fmt: skip
FRONTIER_COLUMNS = ["spec", "mag_i", "objects", "net_evals", "op_grads", "time_ratio", "cpu_ratio",
                    "psnr_mean", "psnr_rl", "ssim_mean", "ssim_rl", "chi2", "coverage68",
                    "coverage95"]  # fmt: skip


def summarise(df: pd.DataFrame) -> dict:
    """Median (and mean for coverage) of the per-object scores, and the score per S/N bin."""
    summary = {c: float(df[c].median()) for c in SUMMARY_COLUMNS}
    summary |= {f"{c}_mean": float(df[c].mean()) for c in ("coverage68", "coverage95")}
    summary["objects"] = len(df)
    summary["mean_better_than_rl"] = float((df["psnr_mean"] > df["psnr_rl"]).mean())
    bins = pd.cut(df["snr"], SNR_BINS)
    by_bin = []
    for interval, g in df.groupby(bins, observed=True):
        by_bin.append({
            "snr_bin": f"{interval.left:g}–{interval.right:g}", "objects": len(g),
            "hallucination": float(g["hallucination"].median()),
            "coverage68": float(g["coverage68"].mean()), "coverage95": float(g["coverage95"].mean()),
            "psnr_mean": float(g["psnr_mean"].median()), "psnr_rl": float(g["psnr_rl"].median()),
            "chi2": float(g["chi2"].median()),
        })  # fmt: skip
    summary["by_snr"] = by_bin
    return summary


def calibration_section(results, truth, prior_cfg, config: RunConfig) -> dict | None:
    """Coverage per observed-S/N bin (core and stamp, raw and with the catalog's calibrated λ),
    PIT and TARP of the scored objects (``validation.calibration``)."""
    if not results:
        return None
    packs = [pack_inputs(a, df, m, truth, prior_cfg.stretch.a, config.physics.profile_ridge)
             for a, df, m in results]  # fmt: skip
    radius = config.sampler.aperture_radius_frac
    core = core_mask(prior_cfg.image_size, radius)
    return engine_report(packs, SNR_BINS, core, core_radius=radius * prior_cfg.image_size)


def run_inputs(prior: str, true_z: bool, config, prior_cfg, prior_meta, survey, survey_cfg) -> dict:
    """What science.json records of the run's inputs: machine, prior, run config, survey."""
    return {
        **run_header(),
        "prior": {
            "path": str(Path(prior).resolve()),
            **prior_meta,
            "config": to_dict(prior_cfg),
        },
        "run_config": to_dict(config),
        "survey": {"path": str(survey), "config": to_dict(survey_cfg), "true_z": true_z},
    }


def science_markdown(doc: dict, table: pd.DataFrame) -> str:
    """The run's markdown report: summary, S/N bins, per-object table, real HSC."""
    s = doc["summary"]
    prior = doc["prior"]
    sam = doc["run_config"]["sampler"]
    lines = [
        f"Prior `{prior.get('prior_id')}` (training steps: "
        f"{prior.get('training', {}).get('steps', '?')}), {sam['steps']} steps, "
        f"{sam['samples']} samples, guidance {sam['guidance']} ({sam['guidance_rule']}); "
        f"{s['objects']} scored mock objects (photo-z{' replaced by true z' if doc['survey']['true_z'] else ''}); "
        f"RL {doc['rl']['iterations']} iterations (tuned on {len(doc['rl']['tuned_on'])} held-out objects).",
        "",
        markdown_table([
            {"estimate": "posterior mean", "PSNR": s["psnr_mean"], "SSIM": s["ssim_mean"],
             "PSNR asinh": s["psnr_asinh_mean"], "χ²/dof": s["chi2"]},
            {"estimate": "Richardson-Lucy", "PSNR": s["psnr_rl"], "SSIM": s["ssim_rl"],
             "PSNR asinh": s["psnr_asinh_rl"], "χ²/dof": s["chi2_rl"]},
            {"estimate": "resampled observation", "PSNR": s["psnr_obs"], "SSIM": s["ssim_obs"],
             "PSNR asinh": s["psnr_asinh_obs"], "χ²/dof": None},
        ], ["estimate", "PSNR", "SSIM", "PSNR asinh", "χ²/dof"]),
        "",
        f"Medians over objects (PSNR in dB). Posterior mean beats RL in PSNR for "
        f"{100 * s['mean_better_than_rl']:.0f}% of objects. Coverage of core pixels (mean): "
        f"68% interval {s['coverage68_mean']:.3f}, 95% interval {s['coverage95_mean']:.3f}.",
        "",
        markdown_table(s["by_snr"], ["snr_bin", "objects", "hallucination", "coverage68",
                                     "coverage95", "psnr_mean", "psnr_rl", "chi2"]),
        "",
        markdown_table(table.to_dict("records"), ["object_id", "mag_i_true", "z_true", "upsampling",
                       "snr", "psnr_mean", "psnr_rl", "psnr_obs", "ssim_mean", "chi2",
                       "coverage68", "coverage95", "hallucination", "flag_names"]),
    ]  # fmt: skip
    cal = doc.get("calibration")
    if cal:
        cols = ["snr_bin", "n", "cov68_core_quantile", "cov68_core_gauss", "cov68_core_calibrated",
                "cov95_core_quantile", "cov95_core_gauss", "cov95_core_calibrated",
                "cov68_stamp_gauss", "cov95_stamp_gauss"]  # fmt: skip
        groups = [g | {"tarp_dev": g["tarp_core"]["max_deviation"]}
                  for g in [*cal["bins"], cal["pooled"]] if g["n"]]  # fmt: skip
        lines += ["", "Coverage by observed S/N (`validation.calibration`; core pixels, flux "
                  "space; quantile = equal-tailed sample interval, gauss = mean ± z·std, "
                  "calibrated = mean ± λ·z·std with the catalog's λ):", "",
                  markdown_table(groups, [*cols, "tarp_dev"])]  # fmt: skip
    real = doc.get("real_hsc")
    if real:
        lines += ["", f"Real HSC ({Path(real['file']).name}, bands g, r, i, z = "
                  f"{real['assumed_z']} assumed):", "",
                  markdown_table(real["sources"], ["source", "chi2", "hallucination",
                                 "upsampling", "stamp_size", "masked_fraction", "flags"])]  # fmt: skip
    return "\n".join(lines)


def real_source_records(df: pd.DataFrame) -> list[dict]:
    """One record per real HSC source of a sampled pack's rows."""
    return [
        {
            "source": int(row[Col.OBJECT_ID]), "chi2": float(row[Col.CHI2]),
            "hallucination": float(row[Col.HALLUCINATION]),
            "upsampling": float(row[Col.UPSAMPLING]), "stamp_size": int(row[Col.STAMP_SIZE]),
            "masked_fraction": float(row[Col.MASKED_FRACTION]),
            "mag_i": float(row.get("mag_i", np.nan)), "flags": str(row[Col.FLAG_NAMES]),
        }
        for _, row in df.iterrows()
    ]  # fmt: skip
