"""Prior-drawn truths: does the sampler fit and cover when the prior is right?

    python jobs/prior_truth_check.py                                  # default sampler
    python jobs/prior_truth_check.py --n-truths 8 --sampler '{"gauss_newton": 3}'
    python jobs/prior_truth_check.py --compare '{"gauss_newton": 3}'  # second sampler

Draws ``--n-truths`` unconditional samples of the prior, observes each at i = 18..24 with
HSC noise and PSF (as the magnitude experiment observes its galaxy) and deconvolves them
(``validation.prior_truth``). The truth is then a draw of the prior itself, so an exact
sampler fits every magnitude to χ²/dof ≈ 1 and its intervals cover like S exchangeable
draws; a sampler that misfits here is at fault, not the prior. Prints, per magnitude and
sampler: median S/N, median χ²/dof of the posterior mean (and of the truth), raw and
calibrated 68/95 % core coverage (beside an exact posterior's through S samples), PSNR and
PSNR − Richardson-Lucy (iterations tuned on each truth); the PIT histogram per magnitude.

Writes prior_truth.json, prior_truth.md and prior_truth.png to ``--out`` (default
runs/prior-truth-<time>, git-ignored).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from d4a_batch.config import SamplerConfig, to_dict
from d4a_batch.prior.artifact import load_prior
from d4a_batch.sampler_spec import SPEC_HELP, sampler_arg, sampler_config
from d4a_batch.schema import DEMO_PRIOR_DIR, REPO_ROOT
from d4a_batch.validation.magnitude import MagnitudeConfig
from d4a_batch.validation.prior_truth import run_prior_truth_check, summarise
from d4a_batch.validation.report import markdown_table, run_header, write_json

COLUMNS = ("mag", "n", "snr", "chi2_median", "chi2_max", "chi2_truth", "cov68", "cov95",
           "cal68", "cal95", "psnr", "psnr_minus_rl", "seconds")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prior", default=str(DEMO_PRIOR_DIR), help="prior artifact folder")
    p.add_argument("--out", type=Path, help="output folder (default runs/prior-truth-<time>)")
    p.add_argument("--n-truths", type=int, default=4, help="prior draws (each at every mag)")
    p.add_argument("--truth-seed", type=int, default=0)
    p.add_argument("--magnitudes", default="18,19,20,21,22,23,24")
    p.add_argument("--z", type=float, default=MagnitudeConfig().z)
    p.add_argument("--sampler", default="", type=sampler_arg,
                   help="SamplerConfig overrides (JSON) or any " + SPEC_HELP)  # fmt: skip
    p.add_argument("--compare", default="", type=sampler_arg,
                   help="a second sampler: overrides (JSON) or any SPEC")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    return p.parse_args(argv)


def run_one(prior, sampler: SamplerConfig, args, cfg: MagnitudeConfig) -> dict:
    t0 = time.perf_counter()
    res = run_prior_truth_check(
        prior, sampler, args.n_truths, cfg, truth_seed=args.truth_seed,
        progress=lambda m: print(f"[prior-truth] {m}", flush=True),
    )  # fmt: skip
    rows = summarise(res["records"])
    for row in rows:
        row["seconds"] = float(
            np.mean([r["seconds"] for r in res["records"] if r["mag"] == row["mag"]])
        )
    return {
        "sampler": to_dict(sampler),
        "rows": rows,
        "records": res["records"],
        "pit": {f"{m:g}": h for m, h in res["pit"].items()},
        "reference": res["reference"],
        "calibrated": res["calibrated"],
        "seconds": time.perf_counter() - t0,
    }


def figure(path: Path, runs: list[dict], labels: list[str]) -> Path:
    """χ²/dof per magnitude (every truth, median line) and the PIT histogram per magnitude."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mags = [r["mag"] for r in runs[0]["rows"]]
    fig, axes = plt.subplots(1 + len(runs), 1, figsize=(8, 3.2 * (1 + len(runs))))
    ax = axes[0]
    for run, label, colour in zip(runs, labels, ("C0", "C1")):
        pts = np.array([(r["mag"], r["chi2"]) for r in run["records"]])
        ax.scatter(pts[:, 0], pts[:, 1], s=10, color=colour, alpha=0.5)
        ax.plot(mags, [r["chi2_median"] for r in run["rows"]], color=colour, label=label)
    ax.axhline(1.5, color="k", ls=":", lw=1, label="χ²/dof 1.5")
    ax.set(yscale="log", xlabel="i magnitude", ylabel="χ²/dof of the posterior mean")
    ax.legend(fontsize=8)
    for ax, run, label in zip(axes[1:], runs, labels):
        for k, m in enumerate(mags):
            h = np.asarray(run["pit"][f"{m:g}"])
            ax.step(np.arange(h.size) + k * (h.size + 2), h, where="mid", color="C2")
            ax.text(k * (h.size + 2) + h.size / 2, 0.05, f"i={m:g}", ha="center", fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(ylabel="PIT density (1 = flat)", xticks=[], title=f"{label}: rank of the truth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or REPO_ROOT / "runs" / f"prior-truth-{time.strftime('%Y%m%dT%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prior = load_prior(args.prior, device=device)
    cfg = MagnitudeConfig(magnitudes=tuple(float(m) for m in args.magnitudes.split(",")), z=args.z)
    samplers = [sampler_config(args.sampler)] + (
        [sampler_config(args.compare)] if args.compare else []
    )
    runs = [run_one(prior, s, args, cfg) for s in samplers]
    labels = [label(s) for s in samplers]
    figure(out / "prior_truth.png", runs, labels)
    doc = {
        **run_header(),
        "device": device,
        "prior": {
            "path": str(Path(args.prior).resolve()),
            "prior_id": prior.prior_id,
            "sha256": prior.sha256,
        },
        "experiment": to_dict(cfg) | {"n_truths": args.n_truths, "truth_seed": args.truth_seed},
        "runs": runs,
    }
    write_json(out / "prior_truth.json", doc)
    text = markdown(doc, labels)
    (out / "prior_truth.md").write_text(text + "\n")
    print(text)
    print(f"[prior-truth] wrote {out}", flush=True)
    return 0


def label(s: SamplerConfig) -> str:
    text = f"{s.sampler} {s.steps}×{s.samples}"
    if s.sampler in ("dds", "daps"):
        text += f", {s.cg_iterations} CG"
    if s.sampler == "dds" and s.gauss_newton > 1:
        text += f", {s.gauss_newton} Gauss-Newton"
    return text


def markdown(doc: dict, labels: list[str]) -> str:
    parts = []
    for run, name in zip(doc["runs"], labels):
        ref = run["reference"]
        parts.append(
            f"**{name}** ({doc['experiment']['n_truths']} prior draws, {run['seconds']:.0f} s; "
            f"an exact posterior through {run['sampler']['samples']} samples covers "
            f"{ref['0.68']:.3f} / {ref['0.95']:.3f}; calibrated: "
            f"{'yes' if run['calibrated'] else 'no calibration for this sampler'})\n\n"
            + markdown_table(run["rows"], COLUMNS)
        )
    return "\n\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
