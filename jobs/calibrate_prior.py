"""Fit the conformal interval scale λ of a prior (``calibration.json``) on held-out mocks.

    python jobs/calibrate_prior.py                        # demo prior, small sets, default sampler
    python jobs/calibrate_prior.py --n-calib 64 --n-score 32 --work runs/calibration

What runs (``validation.calibration``, ``validation.conformal``; DESIGN.md §2b;
Angelopoulos et al. 2022, arXiv 2202.05265):

1. Two mock HSC surveys (``mock.survey``) with disjoint seeds: the *calibration* mocks
   (``--calib-seed``) fit λ, the *score* mocks (``--score-seed``) measure coverage before
   and after. Galaxies i = ``--mags`` (default 18–24), z 0.25–1.0, with the mock survey's
   neighbours, stars, cosmic rays and bad columns. The noise is **mock** noise (Gaussian with
   the HSC COSMOS coadd sky variance and gain, ``mock.survey``), not real HSC noise: the
   guarantee holds for data exchangeable with these mocks, and real stamps are not exactly
   (real noise is correlated by the coadd's resampling, real galaxies differ from GalSim's).
2. Both sets go through the engine's staging and sampling stage in this process
   (``validation.science``) with the sampler config of ``--sampler`` (the engine's default
   ``RunConfig().sampler``, the demo's, or given fields: any SPEC of ``sampler_spec``; all samples kept). Packs are cached under ``--work`` (one ``.npz`` per pack), alternating between the
   two sets, so that an interrupted run keeps what it sampled and a rerun only fits.
3. λ per S/N bin and per level (68 %, 95 %): the smallest λ whose upper confidence bound
   (``--bound``, default the Waudby-Smith–Ramdas betting bound) of the per-galaxy miscovered fraction of the interval
   mean ± λ·z_p·std (flux space, core pixels) is ≤ α = 1 − p, with probability ≥ 1 − δ.
   Written to ``<prior>/calibration.json`` (``--write``: added beside the entries of other
   sampler configs, replacing this config's) or ``<work>/calibration.json``.
4. Coverage before/after on the score mocks, per S/N bin and pooled, PIT and TARP:
   ``<work>/calibration_report.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from d4a_batch.config import RunConfig, to_dict
from d4a_batch.mock.survey import MockSurveyConfig, ensure_mock_survey
from d4a_batch.prior.artifact import read_prior_config
from d4a_batch.prior.calibration import (
    Calibration,
    sampler_fingerprint,
    write_calibration,
)
from d4a_batch.sampler_spec import sampler_arg, sampler_config
from d4a_batch.schema import DEMO_PRIOR_DIR, REPO_ROOT
from d4a_batch.validation.calibration_run import (
    load_set,
    report_markdown,
    sampled_config,
    score_sets,
)
from d4a_batch.validation.conformal import fit_calibration
from d4a_batch.validation.metrics import core_mask
from d4a_batch.validation.report import run_header, write_json
from d4a_batch.validation.science import (
    make_sampler,
    read_rows,
    read_truth,
    run_packs,
    save_sampled_pack,
    stage_objects,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prior", default=str(DEMO_PRIOR_DIR), help="prior artifact folder")
    p.add_argument("--work", type=Path, default=REPO_ROOT / "runs" / "calibration",
                   help="mock surveys, cached samples and reports")  # fmt: skip
    p.add_argument("--n-calib", type=int, default=16, help="calibration mock objects")
    p.add_argument("--n-score", type=int, default=12, help="score mock objects (disjoint)")
    p.add_argument("--calib-seed", type=int, default=1001)
    p.add_argument("--score-seed", type=int, default=2002)
    p.add_argument("--mags", type=float, nargs=2, default=(18.0, 24.0), help="i mag range")
    p.add_argument("--batch-size", type=int, default=4, help="objects per sampler call")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the sampler")
    p.add_argument("--alpha", type=float, nargs="+", default=(0.32, 0.05))
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument(
        "--bound",
        default="wsr",
        choices=("wsr", "hb", "hoeffding", "none"),
        help="upper confidence bound of the risk (wsr: Waudby-Smith–Ramdas betting)",
    )
    # two bins: with ~200 calibration mocks over i = 18-24 a bin holds ~100, where the WSR
    # bound's slack is ~0.03; three bins (0, 30, 100, inf) left ~40 in the faint ones and
    # over-covered there (68 %: 0.75 on held-out mocks, docs/HISTORY.md)
    p.add_argument("--snr-edges", type=float, nargs="+", default=(0.0, 100.0, np.inf),
                   help="S/N bin edges (observed aperture S/N per pixel)")  # fmt: skip
    p.add_argument("--min-per-bin", type=int, default=3,
                   help="bins with fewer calibration objects take the pooled λ")  # fmt: skip
    p.add_argument("--sampler", default="default", type=sampler_arg,
                   help="the sampler config to calibrate: 'default' (the engine's SamplerConfig()),"
                        " 'demo' (the demo job's), a JSON object of SamplerConfig fields over the "
                        "default, tokens (dds:25:10) or a JSON file (sampler_spec)")  # fmt: skip
    p.add_argument("--stage", default="all", choices=("sample", "fit", "all"))
    p.add_argument("--write", action="store_true", help="write calibration.json into the prior")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[calibrate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def survey_config(args, prior_cfg, seed: int, n: int) -> MockSurveyConfig:
    """The mock survey recipe of one set (the seed makes it disjoint from the other)."""
    return MockSurveyConfig(
        n_objects=n, seed=seed, bands=tuple(prior_cfg.bands),
        kpc_per_pixel=prior_cfg.kpc_per_pixel, n_model=prior_cfg.image_size,
        i_mag_range=(float(args.mags[0]), float(args.mags[1])),
    )  # fmt: skip


def sample_sets(args, prior_cfg, config: RunConfig) -> None:
    """Sample both mock sets pack by pack (alternating), caching each pack under --work."""
    sets = {}
    for name, seed, n in (("calib", args.calib_seed, args.n_calib),
                          ("score", args.score_seed, args.n_score)):  # fmt: skip
        scfg = survey_config(args, prior_cfg, seed, n)
        root = ensure_mock_survey(args.work / f"survey_{name}", scfg)
        objs = stage_objects(read_rows(str(root), prior_cfg.bands), str(root), prior_cfg, config)
        ok = [o for o in objs if o.error is None]
        log(f"{name}: {len(objs)} objects staged, {len(objs) - len(ok)} staging errors")
        (args.work / "packs").mkdir(parents=True, exist_ok=True)
        sets[name] = (root, ok)
    sampler, spec = make_sampler(args.prior, config, args.threads)
    chunks = {
        name: [ok[i : i + args.batch_size] for i in range(0, len(ok), args.batch_size)]
        for name, (_, ok) in sets.items()
    }
    for k in range(max(len(c) for c in chunks.values())):
        for name, (root, _) in sets.items():
            if k >= len(chunks[name]):
                continue
            done = args.work / "packs" / f"{name}_{k:03d}.done"
            if done.exists():
                continue
            truth = read_truth(root)
            chunk = chunks[name][k]
            for j, (arrays, df, maps) in enumerate(
                run_packs(sampler, spec, chunk, len(chunk), log)
            ):
                save_sampled_pack(
                    args.work / "packs" / f"{name}_{k:03d}_{j}.npz", arrays, df, maps, truth
                )
            done.write_text(f"{len(chunk)} objects\n")
            log(f"{name} chunk {k} saved")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    prior_cfg, _ = read_prior_config(args.prior)
    config = sampled_config(args.work, RunConfig(sampler=sampler_config(args.sampler)))
    if args.stage in ("sample", "all"):
        sample_sets(args, prior_cfg, config)
    log(f"sampler {sampler_fingerprint(config.sampler)}: {to_dict(config.sampler)}")
    if args.stage in ("fit", "all"):
        fit_and_score(args, prior_cfg, config)
    return 0


def fit_and_score(args, prior_cfg, config: RunConfig) -> dict:
    """Fit λ on the calibration set, write calibration.json, score both sets before/after."""
    sampler = config.sampler
    edges = tuple(float(e) for e in args.snr_edges)
    levels = tuple(round(1 - a, 10) for a in args.alpha)
    core = core_mask(prior_cfg.image_size, sampler.aperture_radius_frac)
    core_radius = sampler.aperture_radius_frac * prior_cfg.image_size
    cal_set, score_set = (load_set(args.work, n, prior_cfg, config) for n in ("calib", "score"))
    log(f"calibration set: {len(cal_set['snr'])} objects; score set: {len(score_set['snr'])}")
    lambdas, counts, details = fit_calibration(
        cal_set["flux"], cal_set["truth"], cal_set["snr"], edges, core, levels, args.delta,
        args.bound, args.min_per_bin,
    )  # fmt: skip
    recipe = to_dict(survey_config(args, prior_cfg, args.calib_seed, args.n_calib))
    cal = Calibration(
        snr_edges=edges, levels=levels, lambdas={k: tuple(v) for k, v in lambdas.items()},
        sampler_fingerprint=sampler_fingerprint(sampler), delta=args.delta, bound=args.bound,
        n_per_bin=tuple(counts), sampler=to_dict(sampler),
        prior_sha256=str(read_prior_config(args.prior)[1].get("weights_sha256", "")),
        mocks={
            "recipe": "d4a_batch.mock.survey.MockSurveyConfig", "config": recipe,
            "seed": args.calib_seed, "n_objects": len(cal_set["snr"]),
            "object_ids": [int(v) for v in cal_set["object_id"]],
            "noise": "mock: Gaussian, HSC COSMOS coadd sky variance + source/gain "
                     "(mock.survey); not real HSC noise",
            "pixels": "core (hallucination-score aperture), flux space",
        },
        details={"fitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "prior": str(Path(args.prior).resolve()), "fits": details},
    )  # fmt: skip
    path = write_calibration(args.work, cal)
    log(f"wrote {path}")
    if args.write:
        log(f"wrote {write_calibration(args.prior, cal)}")
    sets = {"score": score_set, "calib": cal_set}
    reports = score_sets(cal, details, sets, edges, core, levels, core_radius)
    doc = {
        **run_header(),
        "sampler": to_dict(sampler), "sampler_fingerprint": cal.sampler_fingerprint,
        "calibration": cal.to_json(), "reports": reports,
        "score_mocks": to_dict(survey_config(args, prior_cfg, args.score_seed, args.n_score)),
    }  # fmt: skip
    write_json(args.work / "calibration_report.json", doc)
    md = report_markdown(doc)
    (args.work / "calibration_report.md").write_text(md + "\n")
    print(md)
    return doc


if __name__ == "__main__":
    sys.exit(main())
