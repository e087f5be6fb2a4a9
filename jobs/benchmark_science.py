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

import pandas as pd
import torch

from d4a_batch.config import RunConfig
from d4a_batch.figures import run_report, science_figure
from d4a_batch.mock.survey import MockSurveyConfig, ensure_mock_survey
from d4a_batch.prior.artifact import read_prior_config
from d4a_batch.sampler_spec import SPEC_HELP, sampler_arg, sampler_from_args
from d4a_batch.schema import DEMO_PRIOR_DIR, REPO_ROOT, SHARED_DATA_DIR, Col
from d4a_batch.survey.packs import SCALE
from d4a_batch.validation.frontier import NCHW, frontier_figure, run_frontier
from d4a_batch.validation.report import markdown_table, write_json
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
from d4a_batch.validation.science_report import (
    FRONTIER_COLUMNS,
    SCIENCE_SAMPLER,
    calibration_section,
    real_source_records,
    run_inputs,
    science_markdown,
    summarise,
)

REAL_NPZ = SHARED_DATA_DIR / "scarlet" / "hsc_cosmos_35.npz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prior", default=str(DEMO_PRIOR_DIR), help="prior artifact folder")
    p.add_argument("--out", type=Path, help="output folder (default runs/science-<time>)")
    p.add_argument("--survey", type=Path, help="mock survey folder (default <out>/survey)")
    p.add_argument("--n-objects", type=int, default=24, help="mock objects (tuning + scored)")
    p.add_argument("--n-tune", type=int, default=6, help="held-out objects that tune RL")
    p.add_argument("--survey-seed", type=int, default=1)
    p.add_argument("--samples", type=int, help="default 16")
    p.add_argument("--steps", type=int, help="default 50")
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--batch-size", type=int, default=8, help="objects per sampler call")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the sampler")
    p.add_argument("--rl-iters", default="5,10,20,40,80,160", help="RL iterations to try")
    p.add_argument("--true-z", action="store_true", help="sample at the true z, not the photo-z")
    p.add_argument("--figures", type=int, default=4, help="per-object figures to draw")
    p.add_argument("--no-real", action="store_true", help="skip the real HSC cutout")
    p.add_argument("--real-z", type=float, default=0.5, help="redshift assumed for real sources")
    p.add_argument("--sampler", type=sampler_arg,
                   help="the main run's: dps | dds | daps or any " + SPEC_HELP)  # fmt: skip
    p.add_argument("--inner-steps", type=int, help="daps")
    p.add_argument("--cg", type=int, help="dds, daps")
    p.add_argument("--gauss-newton", type=int, help="dds")
    p.add_argument("--clip-data-step", choices=("true", "false"),
                   help="dds/daps: clip the data step's output to [-1, 1]")  # fmt: skip
    p.add_argument("--i-mag-range", default=None, help="mock i magnitudes lo,hi (e.g. 18,24)")
    p.add_argument("--compare", nargs="*", default=[],
                   help="sampler frontier specs, the first is the time reference, e.g. "
                        "dps:50 dps:25 dds:25:10 daps:30:4:20 (any SPEC of sampler_spec, over "
                        "the main run's sampler; validation/frontier.py); a "
                        "last ':nchw' runs that spec's network in NCHW, the layout before "
                        "2026-12-08")  # fmt: skip
    p.add_argument("--compare-only", action="store_true",
                   help="run only the --compare specs (no main run): a paired comparison")  # fmt: skip
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[science] {msg}", flush=True)


def real_hsc(args, out: Path, config: RunConfig, prior_cfg, sampler, spec) -> dict:
    """Deconvolve the sources of the real HSC cutout; χ²/dof and figures."""
    rows = hsc_npz_rows(REAL_NPZ, out / "real" / "fits", prior_cfg.bands, args.real_z)
    objs = stage_objects(rows, str(out / "real" / "fits"), prior_cfg, config)
    errors = {int(o.ident[Col.OBJECT_ID]): o.error for o in objs if o.error}
    ok = [o for o in objs if o.error is None]
    results = run_packs(sampler, spec, ok, args.batch_size, log)
    for arrays, df, maps in results:
        object_plots(out / "real", arrays, maps, df, arrays[SCALE], prior_cfg, k=len(df))
    records = [r for _, df, _ in results for r in real_source_records(df)]
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
    config = RunConfig(sampler=sampler_from_args(args, SCIENCE_SAMPLER))
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
        **run_inputs(args.prior, args.true_z, config, prior_cfg, prior_meta, survey, survey_cfg),
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
    (out / "science.md").write_text(science_markdown(doc, table) + "\n")
    log(f"wrote {out} in {doc['seconds']:.0f} s")
    print(science_markdown(doc, table))
    return 0


def compare_only(args, out, config, scored, truth, prior_cfg, prior_meta, rl_best, survey,
                 survey_cfg, t_start) -> int:  # fmt: skip
    """``--compare-only``: the frontier of the ``--compare`` specs alone, in this process."""
    doc = {
        **run_inputs(args.prior, args.true_z, config, prior_cfg, prior_meta, survey, survey_cfg),
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
    (out / "frontier.md").write_text(
        markdown_table(table.to_dict("records"), FRONTIER_COLUMNS) + "\n"
    )
    log("frontier:\n" + markdown_table(table.to_dict("records"), FRONTIER_COLUMNS))
    return table.to_dict("records")


if __name__ == "__main__":
    sys.exit(main())
