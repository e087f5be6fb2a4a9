"""The paper's magnitude experiment: one galaxy at magnitudes 18..23, variance ratio vs S/N.

    python jobs/magnitude_experiment.py                              # demo prior, S = 64
    python jobs/magnitude_experiment.py --prior /path/prior --samples 64 --steps 100 --z 0.3

One mock galaxy (fixed seed) is set to i = 18..23 mag, seen through the physics operator
(area-overlap resampling to 0.168''/pixel, circular Gaussian PSF of the HSC median seeing
per band) with HSC coadd noise, and deconvolved with S posterior samples per magnitude
(``validation.magnitude``). Reports, per magnitude, the aperture S/N (beside the paper's
values), the hallucination score (variance ratio in the aperture), the mean variance
ratio, χ²/dof, 68/95% coverage of the core pixels, PSNR of the posterior mean against the
truth and the sampling time; draws the mean and variance-ratio maps per magnitude.

Writes magnitude.json, magnitude.md and magnitude.png to ``--out`` (default
runs/magnitude-<time>, git-ignored).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from d4a_batch.config import SamplerConfig, to_dict
from d4a_batch.figures import magnitude_figure
from d4a_batch.prior.artifact import load_prior
from d4a_batch.sampler_spec import SPEC_HELP, sampler_arg, sampler_from_args
from d4a_batch.schema import DEMO_PRIOR_DIR, REPO_ROOT
from d4a_batch.validation.magnitude import (
    PAPER_MAGNITUDES,
    MagnitudeConfig,
    run_magnitude_experiment,
)
from d4a_batch.validation.report import markdown_table, run_header, write_json

COLUMNS = ("mag", "snr", "snr_paper", "hallucination", "variance_ratio_mean", "chi2",
           "coverage68", "coverage95", "psnr", "psnr_asinh", "seconds")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prior", default=str(DEMO_PRIOR_DIR), help="prior artifact folder")
    p.add_argument("--out", type=Path, help="output folder (default runs/magnitude-<time>)")
    p.add_argument("--samples", type=int, help="posterior samples per magnitude (default 64)")
    p.add_argument("--steps", type=int, help="DPS steps (default 100; fewer on a CPU)")
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--z", type=float, default=MagnitudeConfig().z)
    p.add_argument("--galaxy-seed", type=int, default=MagnitudeConfig().galaxy_seed)
    p.add_argument("--magnitudes", default=",".join(f"{m:g}" for m in PAPER_MAGNITUDES))
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--sampler", type=sampler_arg, help="dps | dds | daps or any " + SPEC_HELP)
    p.add_argument("--inner-steps", type=int, help="daps")
    p.add_argument("--cg", type=int, help="dds, daps")
    p.add_argument("--gauss-newton", type=int, help="dds")
    p.add_argument("--clip-data-step", choices=("true", "false"),
                   help="dds/daps: clip the data step's output to [-1, 1]")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or REPO_ROOT / "runs" / f"magnitude-{time.strftime('%Y%m%dT%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prior = load_prior(args.prior, device=device)
    sampler = sampler_from_args(args, SamplerConfig(steps=100, samples=64, seed=0))
    cfg = MagnitudeConfig(
        magnitudes=tuple(float(m) for m in args.magnitudes.split(",")),
        z=args.z,
        galaxy_seed=args.galaxy_seed,
    )
    t0 = time.perf_counter()
    data, res = run_magnitude_experiment(
        prior, sampler, cfg, progress=lambda m: print(f"[magnitude] {m}", flush=True)
    )
    rows = [
        {"mag": m, **{k: res[k][i] for k in COLUMNS if k != "mag"}}
        for i, m in enumerate(res["magnitudes"])
    ]
    magnitude_figure(
        out / "magnitude.png", res["magnitudes"], res["snr"], data.obs.image.double().numpy(),
        res["mean_flux"], res["variance_ratio"], res["hallucination"], truth=data.truth,
    )  # fmt: skip
    doc = {
        **run_header(),
        "device": device,
        "prior": {
            "path": str(Path(args.prior).resolve()),
            "prior_id": prior.prior_id,
            "sha256": prior.sha256,
            **prior.metadata,
        },
        "sampler": to_dict(sampler),
        "experiment": to_dict(cfg),
        "geometry": {
            k: res[k] for k in ("scale", "upsampling", "stamp_size", "aperture_radius_hsc")
        },
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    write_json(out / "magnitude.json", doc)
    text = markdown(doc)
    (out / "magnitude.md").write_text(text + "\n")
    print(text)
    print(f"[magnitude] wrote {out} in {doc['seconds']:.0f} s", flush=True)
    return 0


def markdown(doc: dict) -> str:
    g, s, e = doc["geometry"], doc["sampler"], doc["experiment"]
    training = doc["prior"].get("training", {})
    head = (
        f"Prior `{doc['prior']['prior_id']}` (training steps: {training.get('steps', '?')}), "
        f"z = {e['z']}, u = {g['upsampling']:.2f}, stamp {g['stamp_size']} px, S/N aperture "
        f"radius {g['aperture_radius_hsc']:.2f} HSC px; {s['samples']} samples, {s['steps']} "
        f"steps, guidance {s['guidance']} ({s['guidance_rule']}); device {doc['device']}."
    )
    return head + "\n\n" + markdown_table(doc["rows"], COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
