"""Science benchmark: posteriors of a mock HSC survey scored against the truth, and real HSC data.

    python jobs/benchmark_science.py                       # demo prior, 24 mock objects
    python jobs/benchmark_science.py --prior /path/to/prior --n-objects 64 --samples 32 \\
        --steps 100 --out runs/science

What runs: the engine's own staging (``survey.staging.Stager``) and sampling stage
(``pack_sampler.PackSampler``, which the engine's actor wraps: ``sampling.deconvolve`` plus
the output rows and flags), in this process, without Ray (``validation.science``). The
sampler keeps all samples so the posterior's coverage can be measured.

Mock survey (``mock.survey``, truth kept aside): the first ``--n-tune`` objects (by id) tune
the Richardson-Lucy iterations and are not scored; the others are deconvolved and scored:
PSNR/SSIM of the posterior mean, RL and the resampled observation against the truth (flux
and asinh space), reduced χ² of the re-convolved mean, 68/95% coverage of the core pixels,
hallucination score against the truth's aperture S/N. Real HSC (``../shared/data``, scarlet
COSMOS cutout, bands g, r, i, written as HSC FITS and staged like any catalog): χ²/dof and
figures; the sources have no redshift, ``--real-z`` is assumed for all.

Writes to ``--out`` (default runs/science-<time>, git-ignored): science.json, science.md,
catalog.parquet (the output rows), science.png, report.png, objects/*.png, real/*.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from d4a_batch.config import RunConfig, SamplerConfig, to_dict
from d4a_batch.figures import run_report, science_figure
from d4a_batch.mock.survey import MockSurveyConfig, ensure_mock_survey
from d4a_batch.prior.artifact import read_prior_config
from d4a_batch.schema import DEMO_PRIOR_DIR, REPO_ROOT, SHARED_DATA_DIR, Col
from d4a_batch.survey.packs import SCALE
from d4a_batch.validation.calibration import engine_report, pack_inputs
from d4a_batch.validation.frontier import NCHW, frontier_figure, run_frontier
from d4a_batch.validation.metrics import core_mask
from d4a_batch.validation.report import markdown_table, run_header, write_json
from d4a_batch.validation.science import (
    hsc_npz_rows,
    make_sampler,
    object_plots,
    read_rows,
    read_truth,
    run_packs,
    score_pack,
    stage_objects,
    tune_rl,
)

REAL_NPZ = SHARED_DATA_DIR / "scarlet" / "hsc_cosmos_35.npz"
SNR_BINS = (0, 10, 30, 100, 300, np.inf)
SUMMARY_COLUMNS = ("psnr_mean", "psnr_rl", "psnr_obs", "ssim_mean", "ssim_rl", "ssim_obs",
                   "psnr_asinh_mean", "psnr_asinh_rl", "psnr_asinh_obs", "chi2", "chi2_rl",
                   "coverage68", "coverage95", "hallucination")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prior", default=str(DEMO_PRIOR_DIR), help="prior artifact folder")
    p.add_argument("--out", type=Path, help="output folder (default runs/science-<time>)")
    p.add_argument("--survey", type=Path, help="mock survey folder (default <out>/survey)")
    p.add_argument("--n-objects", type=int, default=24, help="mock objects (tuning + scored)")
    p.add_argument("--n-tune", type=int, default=6, help="held-out objects that tune RL")
    p.add_argument("--survey-seed", type=int, default=1)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=SamplerConfig().guidance)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="objects per sampler call")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the sampler")
    p.add_argument("--rl-iters", default="5,10,20,40,80,160", help="RL iterations to try")
    p.add_argument("--true-z", action="store_true", help="sample at the true z, not the photo-z")
    p.add_argument("--figures", type=int, default=4, help="per-object figures to draw")
    p.add_argument("--no-real", action="store_true", help="skip the real HSC cutout")
    p.add_argument("--real-z", type=float, default=0.5, help="redshift assumed for real sources")
    p.add_argument("--sampler", default=SamplerConfig().sampler, help="dps | dds | daps (main run)")
    p.add_argument("--inner-steps", type=int, default=SamplerConfig().inner_steps)
    p.add_argument("--cg", type=int, default=SamplerConfig().cg_iterations)
    p.add_argument("--gauss-newton", type=int, default=SamplerConfig().gauss_newton, help="dds")
    p.add_argument("--clip-data-step", choices=("true", "false"),
                   default=str(SamplerConfig().clip_data_step).lower(),
                   help="dds/daps: clip the data step's output to [-1, 1]")  # fmt: skip
    p.add_argument("--i-mag-range", default=None, help="mock i magnitudes lo,hi (e.g. 18,24)")
    p.add_argument("--compare", nargs="*", default=[],
                   help="sampler frontier specs, the first is the time reference, e.g. "
                        "dps:50 dps:25 dds:25:10 daps:30:4:20 (validation/frontier.py); a "
                        "last ':nchw' runs that spec's network in NCHW, the layout before "
                        "2026-12-08")  # fmt: skip
    p.add_argument("--compare-only", action="store_true",
                   help="run only the --compare specs (no main run): a paired comparison")  # fmt: skip
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[science] {msg}", flush=True)


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


def real_hsc(args, out: Path, config: RunConfig, prior_cfg, sampler, spec) -> dict:
    """Deconvolve the sources of the real HSC cutout; χ²/dof and figures."""
    rows = hsc_npz_rows(REAL_NPZ, out / "real" / "fits", prior_cfg.bands, args.real_z)
    objs = stage_objects(rows, str(out / "real" / "fits"), prior_cfg, config)
    errors = {int(o.ident[Col.OBJECT_ID]): o.error for o in objs if o.error}
    ok = [o for o in objs if o.error is None]
    results = run_packs(sampler, spec, ok, args.batch_size, log)
    records = []
    for arrays, df, maps in results:
        object_plots(out / "real", arrays, maps, df, arrays[SCALE], prior_cfg, k=len(df))
        for _, row in df.iterrows():
            records.append({
                "source": int(row[Col.OBJECT_ID]), "chi2": float(row[Col.CHI2]),
                "hallucination": float(row[Col.HALLUCINATION]),
                "upsampling": float(row[Col.UPSAMPLING]), "stamp_size": int(row[Col.STAMP_SIZE]),
                "masked_fraction": float(row[Col.MASKED_FRACTION]),
                "mag_i": float(row.get("mag_i", np.nan)), "flags": str(row[Col.FLAG_NAMES]),
            })  # fmt: skip
    return {"file": str(REAL_NPZ), "assumed_z": args.real_z, "sources": records,
            "staging_errors": errors}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out = args.out or REPO_ROOT / "runs" / f"science-{time.strftime('%Y%m%dT%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    prior_cfg, prior_meta = read_prior_config(args.prior)
    survey_cfg = MockSurveyConfig(
        n_objects=args.n_objects, seed=args.survey_seed, bands=tuple(prior_cfg.bands),
        kpc_per_pixel=prior_cfg.kpc_per_pixel, n_model=prior_cfg.image_size,
        **({"i_mag_range": tuple(float(v) for v in args.i_mag_range.split(","))}
           if args.i_mag_range else {}),
    )  # fmt: skip
    survey = ensure_mock_survey(args.survey or out / "survey", survey_cfg)
    truth = read_truth(survey)
    rows = read_rows(str(survey), prior_cfg.bands)
    if args.true_z:
        rows = [{**r, Col.PHOTOZ: truth[int(r[Col.OBJECT_ID])]["z_true"]} for r in rows]
    sampler = SamplerConfig(steps=args.steps, samples=args.samples, guidance=args.guidance,
                            seed=args.seed, sampler=args.sampler, inner_steps=args.inner_steps,
                            cg_iterations=args.cg, gauss_newton=args.gauss_newton,
                            clip_data_step=args.clip_data_step == "true")  # fmt: skip
    config = RunConfig(sampler=sampler)
    objs = stage_objects(rows, str(survey), prior_cfg, config)
    errors = {int(o.ident[Col.OBJECT_ID]): o.error for o in objs if o.error}
    ok = [o for o in objs if o.error is None]
    tune, scored = ok[: args.n_tune], ok[args.n_tune :]
    log(f"{len(objs)} objects staged ({len(errors)} errors); {len(tune)} tune RL, "
        f"{len(scored)} scored")  # fmt: skip
    iters = [int(v) for v in args.rl_iters.split(",")]
    rl_best, rl_means = tune_rl(tune, truth, iters) if tune else (iters[0], {})
    log(f"Richardson-Lucy: {rl_best} iterations (mean PSNR by iterations {rl_means})")
    if args.compare_only:
        return compare_only(args, out, config, scored, truth, prior_cfg, prior_meta, rl_best,
                            survey, survey_cfg, t_start)  # fmt: skip
    sampler, spec = make_sampler(args.prior, config, args.threads)
    t0 = time.perf_counter()
    results = run_packs(sampler, spec, scored, args.batch_size, log)
    sample_seconds = time.perf_counter() - t0
    records = [
        r
        for arrays, df, maps in results
        for r in score_pack(arrays, df, maps, truth, prior_cfg, config, rl_best)
    ]
    table = pd.DataFrame(records)
    catalog = pd.concat([df for _, df, _ in results], ignore_index=True)
    catalog.to_parquet(out / "catalog.parquet")
    summary = summarise(table)
    calibration = calibration_section(results, truth, prior_cfg, config)
    science_figure(out / "science.png", table)
    run_report(out / "report.png", catalog, prior_cfg.bands, config.sampler.flags)
    if results and args.figures > 0:
        arrays, df, maps = results[0]
        object_plots(out / "objects", arrays, maps, df, arrays[SCALE], prior_cfg, truth,
                     args.figures)  # fmt: skip
    real = None
    if not args.no_real and REAL_NPZ.exists():
        real = real_hsc(args, out, config, prior_cfg, sampler, spec)
    doc = {
        **run_inputs(args, config, prior_cfg, prior_meta, survey, survey_cfg),
        "engine_path": "Stager -> make_packs -> PackSampler.process in-process (no Ray)",
        "staging_errors": errors,
        "rl": {
            "iterations": rl_best,
            "mean_psnr_by_iterations": rl_means,
            "tuned_on": [int(o.ident[Col.OBJECT_ID]) for o in tune],
        },
        "sampling_seconds": sample_seconds,
        "objects_per_s": len(table) / sample_seconds if sample_seconds > 0 else None,
        "summary": summary,
        "calibration": calibration,
        "objects": records,
        "real_hsc": real,
        "seconds": time.perf_counter() - t_start,
    }
    if args.compare:
        doc["frontier"] = frontier(args, out, config, scored, truth, prior_cfg, rl_best)
    write_json(out / "science.json", doc)
    (out / "science.md").write_text(markdown(doc, table) + "\n")
    log(f"wrote {out} in {doc['seconds']:.0f} s")
    print(markdown(doc, table))
    return 0


def run_inputs(args, config, prior_cfg, prior_meta, survey, survey_cfg) -> dict:
    """What science.json records of the run's inputs: machine, prior, run config, survey."""
    return {
        **run_header(),
        "prior": {
            "path": str(Path(args.prior).resolve()),
            **prior_meta,
            "config": to_dict(prior_cfg),
        },
        "run_config": to_dict(config),
        "survey": {"path": str(survey), "config": to_dict(survey_cfg), "true_z": args.true_z},
    }


def compare_only(args, out, config, scored, truth, prior_cfg, prior_meta, rl_best, survey,
                 survey_cfg, t_start) -> int:  # fmt: skip
    """``--compare-only``: the frontier of the ``--compare`` specs alone, in this process."""
    doc = {
        **run_inputs(args, config, prior_cfg, prior_meta, survey, survey_cfg),
        "rl": {"iterations": rl_best},
        "frontier": frontier(args, out, config, scored, truth, prior_cfg, rl_best),
    }
    doc["seconds"] = time.perf_counter() - t_start
    write_json(out / "science.json", doc)
    log(f"wrote {out} in {doc['seconds']:.0f} s")
    return 0


def frontier(args, out: Path, config, scored, truth, prior_cfg, rl_best) -> list[dict]:
    """Sampler specs (``--compare``) on the same scored objects, in turn (validation.frontier)."""

    def run_spec(cfg, spec_text: str) -> list[dict]:
        sampler, spec = make_sampler(args.prior, cfg, args.threads)
        if spec_text.endswith(":" + NCHW):  # the network's layout before 2026-12-08
            sampler.prior.model.to(memory_format=torch.contiguous_format)
        res = run_packs(sampler, spec, scored, args.batch_size, log)
        return [r for arrays, df, maps in res
                for r in score_pack(arrays, df, maps, truth, prior_cfg, cfg, rl_best)]  # fmt: skip

    table = run_frontier(args.compare, config, run_spec)
    frontier_figure(out / "frontier.png", table)
    cols = ["spec", "mag_i", "objects", "net_evals", "op_grads", "time_ratio", "cpu_ratio", "psnr_mean",
            "psnr_rl", "ssim_mean", "ssim_rl", "chi2", "coverage68", "coverage95"]  # fmt: skip
    (out / "frontier.md").write_text(markdown_table(table.to_dict("records"), cols) + "\n")
    log("frontier:\n" + markdown_table(table.to_dict("records"), cols))
    return table.to_dict("records")


def markdown(doc: dict, table: pd.DataFrame) -> str:
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


if __name__ == "__main__":
    sys.exit(main())
