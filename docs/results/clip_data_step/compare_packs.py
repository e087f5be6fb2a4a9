"""Paired comparison of two samplers on the same calibration mocks (the script that made
``default_vs_previous.{json,md}`` here).

``jobs/calibrate_prior.py`` caches every sampled pack under ``<work>/packs`` (observation
arrays, output rows, maps with all samples, truths). Two calibration runs with the same
mock recipe and seeds (``--n-calib 160 --n-score 80``, seeds 1001 / 2002) sampled the same
240 mock objects, so their packs can be scored object by object with the science
benchmark's own scoring (``validation.science.score_pack``: χ²/dof of the re-convolved
posterior mean, PSNR against the truth and against Richardson-Lucy, raw 68/95 % coverage
of the core pixels, flags). No sampling happens here.

    python docs/results/clip_data_step/compare_packs.py OLD_WORK NEW_WORK OUT_STEM \
        [--rl-iterations 160]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch

from d4a_batch.config import RunConfig
from d4a_batch.prior.artifact import read_prior_config
from d4a_batch.schema import DEMO_PRIOR_DIR
from d4a_batch.validation.science import read_sampled_pack, score_pack


def score_work(work: Path, prior_cfg, config: RunConfig, rl_iterations: int) -> pd.DataFrame:
    records = []
    for path in sorted((work / "packs").glob("*.npz")):
        arrays, rows, maps, truth = read_sampled_pack(path)
        for rec in score_pack(arrays, rows, maps, truth, prior_cfg, config, rl_iterations):
            rec["set"] = path.name.split("_")[0]
            records.append(rec)
    return pd.DataFrame.from_records(records)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("out", type=Path, help="output stem (writes .json and .md)")
    p.add_argument("--rl-iterations", type=int, default=160)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    prior_cfg, _ = read_prior_config(str(DEMO_PRIOR_DIR))
    config = RunConfig()
    old = score_work(args.old, prior_cfg, config, args.rl_iterations)
    new = score_work(args.new, prior_cfg, config, args.rl_iterations)
    both = old.merge(new, on="object_id", suffixes=("_old", "_new"))
    both["mag"] = both["mag_i_true_old"].round().astype(int)
    both["poor_old"] = both["flag_names_old"].str.contains("POOR_FIT")
    both["poor_new"] = both["flag_names_new"].str.contains("POOR_FIT")
    rows = []
    for mag, g in [*both.groupby("mag"), ("all", both)]:
        rows.append({
            "i": mag, "n": len(g),
            "snr_median": float(g["snr_old"].median()),
            "chi2_old": float(g["chi2_old"].median()), "chi2_new": float(g["chi2_new"].median()),
            "chi2_rl": float(g["chi2_rl_old"].median()),
            "psnr_old": float(g["psnr_mean_old"].median()),
            "psnr_new": float(g["psnr_mean_new"].median()),
            "psnr_rl": float(g["psnr_rl_old"].median()),
            "cov68_old": float(g["coverage68_old"].mean()),
            "cov68_new": float(g["coverage68_new"].mean()),
            "cov95_old": float(g["coverage95_old"].mean()),
            "cov95_new": float(g["coverage95_new"].mean()),
            "poor_fit_old": int(g["poor_old"].sum()), "poor_fit_new": int(g["poor_new"].sum()),
            "hallucination_old": float(g["hallucination_old"].median()),
            "hallucination_new": float(g["hallucination_new"].median()),
        })  # fmt: skip
    doc = {
        "command": "python " + " ".join(sys.argv),
        "old": str(args.old), "new": str(args.new), "rl_iterations": args.rl_iterations,
        "old_sampler": json.loads((args.old / "run_config.json").read_text())["sampler"],
        "new_sampler": json.loads((args.new / "run_config.json").read_text())["sampler"],
        "by_magnitude": rows,
        "objects": both.to_dict(orient="records"),
    }  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str))
    head = (
        "| i | n | S/N median | χ²/dof median, old → new | RL χ²/dof | PSNR median, old → new "
        "| RL PSNR | raw cov68, old → new | raw cov95, old → new | POOR_FIT, old → new "
        "| hallucination median, old → new |\n" + "|---" * 11 + "|\n"
    )
    lines = [
        f"| {r['i']} | {r['n']} | {r['snr_median']:.0f} | {r['chi2_old']:.2f} → "
        f"{r['chi2_new']:.2f} | {r['chi2_rl']:.2f} | {r['psnr_old']:.1f} → {r['psnr_new']:.1f} "
        f"| {r['psnr_rl']:.1f} | {r['cov68_old']:.3f} → {r['cov68_new']:.3f} | "
        f"{r['cov95_old']:.3f} → {r['cov95_new']:.3f} | {r['poor_fit_old']} → "
        f"{r['poor_fit_new']} | {r['hallucination_old']:.3f} → {r['hallucination_new']:.3f} |"
        for r in rows
    ]
    table = head + "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
