"""Measure DPS settings on mock galaxies whose truth is known, and pick the sampler defaults.

    python jobs/tune_sampler.py                       # priors/demo-64, the default grid
    python jobs/tune_sampler.py --prior /path/checkpoint_0000200 --objects 2 --samples 8 \\
        --steps 20 --grid rms:0.02 raw:0.003 --out-json /tmp/t.json --out-md /tmp/t.md

Mocks: ``--objects`` GalSim galaxies (``mock.galaxies``) per i-band magnitude in ``--mags``,
drawn at the prior's kpc/pixel and N, at redshift ``--z``, scaled to the magnitude (zero
point 27), observed through the physics operator (area-overlap resampling, then a Moffat
PSF at the mock survey's median seeing per band) with the mock survey's noise (sky
variance + source/gain). Every setting of the grid (``rule:zeta,...``) samples the same
mocks with the same seeds, in one ``deconvolve`` call.

Metrics per object (medians per magnitude in the table):
- psnr_x: 10 log10(2² / MSE) of the posterior mean x against the truth in x-space (the
  truth stretched as the training data are: per-band peak normaliser, a = prior's);
- psnr_flux: 10 log10(1 / MSE) of the mean flux image against the true flux image, each
  band divided by its true peak (counts per model pixel);
- chi2: reduced chi² of the re-convolved posterior mean (``PosteriorSummaries.chi2``);
- cov68: fraction of core pixels (x-space, all bands, the hallucination aperture) whose
  truth lies inside the per-pixel 16-84 % interval of the samples (calibrated: 0.68);
- flux68: fraction of bands whose true total flux lies within flux ± flux_err;
- halluc: hallucination score (core variance ratio).

Choice (``choose``): the best worst-magnitude median psnr_x among settings whose median
hallucination score is <= 1 at every magnitude and, where any setting manages it, whose
median chi² is <= ``FlagThresholds.chi2_max`` at every magnitude.
Writes the JSON (every object's metrics, the table, the choice) and a short Markdown page.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from d4a_batch.config import FlagThresholds, SamplerConfig
from d4a_batch.sampling.deconvolve import deconvolve
from d4a_batch.sampling.summaries import aperture_mask
from d4a_batch.schema import DEMO_PRIOR_DIR, REPO_ROOT
from d4a_batch.validation.tuning import (
    MOCK_NOISE,
    MOCK_PSF,
    choose,
    format_table,
    get_prior,
    make_mocks,
    object_metrics,
    parse_grid,
    per_mag_medians,
    previous_results,
    write_outputs,
)

DOCS = REPO_ROOT / "docs"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--prior", type=Path, default=DEMO_PRIOR_DIR, help="artifact or checkpoint folder"
    )
    p.add_argument("--stats-steps", type=int, default=50, help="prior stats of a checkpoint")
    p.add_argument("--mags", type=float, nargs="+", default=[20.0, 21.0, 22.0, 23.0, 24.0])
    p.add_argument("--objects", type=int, default=3, help="mock galaxies per magnitude")
    p.add_argument("--blank", type=int, default=2, help="source-free stamps (noise only)")
    p.add_argument("--z", type=float, default=0.4)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument(
        "--grid",
        nargs="+",
        default=["rms:0.005,0.01,0.02,0.05", "raw:0.001,0.003,0.01"],
        help="rule:zeta,zeta,... entries",
    )
    p.add_argument("--extra-steps", type=int, nargs="*", default=[], help="rerun the choice")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--resume", action="store_true", help="keep the results already in --out-json (same mocks)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-json", type=Path, default=DOCS / "sampler_tuning.json")
    p.add_argument("--out-md", type=Path, default=DOCS / "sampler_tuning.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    prior = get_prior(args.prior, args.device, args.stats_steps)
    truths, obs, mags = make_mocks(prior, args.mags, args.objects, args.z, args.seed, args.blank)
    ids = list(range(len(truths)))
    n = prior.config.image_size
    base = SamplerConfig(samples=args.samples, steps=args.steps, seed=args.seed)
    base = replace(base, keep_samples=args.samples)
    core = aperture_mask(n, base.aperture_radius_frac)
    grid = parse_grid(args.grid)
    print(
        f"[tune] prior {prior.prior_id}: {len(ids)} mocks (i = {args.mags}, z = {args.z}),"
        f" {args.samples} samples, {args.steps} steps, {len(grid)} settings",
        flush=True,
    )

    def run(rule: str, zeta: float, steps: int) -> dict:
        cfg = replace(base, guidance_rule=rule, guidance=zeta, steps=steps)
        t0 = time.perf_counter()
        s = deconvolve(obs, [args.z] * len(ids), prior, cfg, ids)
        objs = object_metrics(s, truths, prior.config.stretch.a, core)
        res = {
            "rule": rule,
            "zeta": zeta,
            "steps": steps,
            "seconds": time.perf_counter() - t0,
            "per_mag": per_mag_medians(objs, mags),
            "objects": objs,
        }
        print(format_table([res]).split("\n", 2)[2], f"  ({res['seconds']:.0f} s)", flush=True)
        return res

    mocks = {
        "mags_i": args.mags,
        "objects_per_mag": args.objects,
        "blank": args.blank,
        "z": args.z,
        "seed": args.seed,
        "samples": args.samples,
        "psf": MOCK_PSF,
        "noise": MOCK_NOISE,
    }
    prior_doc = {"id": prior.prior_id, "sha256": prior.sha256, "path": str(args.prior)}
    results = previous_results(args.out_json, prior_doc, mocks) if args.resume else []
    done = {(r["rule"], r["zeta"], r["steps"]) for r in results}
    print(format_table(results), flush=True)
    for rule, zeta in grid:
        if (rule, zeta, args.steps) not in done:
            results.append(run(rule, zeta, args.steps))
            write_outputs(args, prior_doc, mocks, base, results, t_start)
    best = choose([r for r in results if r["steps"] == args.steps], FlagThresholds().chi2_max)
    for steps in args.extra_steps:
        if (best["rule"], best["zeta"], steps) not in done:
            results.append(run(best["rule"], best["zeta"], steps))
    chosen = write_outputs(args, prior_doc, mocks, base, results, t_start)
    print(f"[tune] chosen {chosen}; wrote {args.out_json} and {args.out_md}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
