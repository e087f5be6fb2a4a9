"""Compare prior samples with held-out mock galaxies: Fréchet distance on morphology features.

    python jobs/evaluate_prior.py --prior early=/path/checkpoint_0000200 --prior final=priors/demo-64 \
        --out-json eval.json --out-png eval_pca.png --samples-png samples.png

Each ``--prior`` is ``[label=]path`` to a prior artifact folder or a training
checkpoint folder (its EMA weights). Every prior draws ``--n-samples``
unconditional samples (ancestral, ``--steps`` respaced steps); the held-out set
is ``--n-heldout`` fresh mock galaxies from ``--heldout-seed`` (training data
uses other seeds). Features are standardised on the held-out set. The JSON also
holds the distance between two independent held-out halves (the noise floor of
the metric at that sample size); the PNG shows both sets in the held-out PCA plane.

``--heldout-structure`` (repeatable: ``smooth``, ``realistic``; default: the first
prior's ``mock_structure``) compares the same samples with held-out sets of each mock
population; the first one is the reference of ``frechet_distance`` and the PCA plot.
The JSON also holds quantiles (10/25/50/75/90 %) of every feature (size r50,
ellipticity, concentration, asymmetry, the g/r and i/r colour-extent ratios, ...) for
the samples and each held-out set, and a sanity check against a real galaxy:
``--real`` (default: the HST/ACS F814W COSMOS galaxy in ../shared/data, skipped when
absent), sky-subtracted and cut to 3.5", moved onto the prior's grid at each
``--real-z`` (flux-conserving rebin to p * arcsec_per_kpc(z)) and copied into every band
(one band: its colour features are 0 by construction), with the percentile of each of
its features among the samples and the held-out mocks. ``robust_feature_quantiles``
are ``training.evaluate.robust_shape_features`` (sky-subtracted, thresholded r50 and
ellipticity): the all-pixel moments are dominated by a sample's faint sky.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from d4a_batch.config import PriorConfig
from d4a_batch.physics.cosmology import model_pixel_arcsec
from d4a_batch.training.evaluate import (
    FEATURE_NAMES,
    image_on_prior_grid,
    pca_fit,
    pca_project,
    sample_grid_rgb,
    standardise,
)
from d4a_batch.training.prior_comparison import (
    Sampling,
    evaluate_prior,
    heldout_entry,
    heldout_set,
    load_model,
    real_galaxy_entry,
    same_grid,
)

DEFAULT_REAL = (
    Path(__file__).resolve().parents[1].parent / "shared/data/galsim/cosmos_147246_f814w.fits"
)
HST_PIXEL_ARCSEC = 0.03


def real_galaxy_x(path: Path, cfg: PriorConfig, z: float) -> np.ndarray:
    """The HST galaxy at ``path`` on the prior's grid at redshift z, in x space ``[1, C, N, N]``.

    Sky-subtracted and cut to 3.5" of its centroid (its neighbours are masked with noise
    beyond), as in the physics tests: ``validation.real_hst.hst_galaxy``.
    """
    from d4a_batch.training.data import to_model_space
    from d4a_batch.validation.real_hst import hst_galaxy

    gal = hst_galaxy(path)
    theta = float(model_pixel_arcsec(z, cfg.kpc_per_pixel))
    img = np.clip(image_on_prior_grid(gal, HST_PIXEL_ARCSEC, theta, cfg.image_size), 0, None)
    return to_model_space(np.repeat(img[None], cfg.in_channels, axis=0), cfg.stretch.a)[None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prior", action="append", required=True, help="[label=]path (repeatable)")
    p.add_argument("--n-samples", type=int, default=256)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--n-heldout", type=int, default=512)
    p.add_argument("--heldout-seed", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out-json", type=Path, required=True)
    p.add_argument("--out-png", type=Path, help="PCA plot")
    p.add_argument("--samples-png", type=Path, help="grid of the last prior's samples")
    p.add_argument("--grid", type=int, default=8, help="grid side of --samples-png")
    p.add_argument(
        "--heldout-structure",
        action="append",
        choices=("smooth", "realistic"),
        help="mock population(s) of the held-out sets (repeatable; default: the prior's)",
    )
    p.add_argument("--real", type=Path, default=DEFAULT_REAL, help="real galaxy FITS (HST)")
    p.add_argument("--real-z", type=float, nargs="+", default=[0.3, 0.6, 1.0])
    p.add_argument("--save-samples", type=Path, help="npz of the last prior's samples (x)")
    p.add_argument(
        "--samples",
        type=Path,
        help="npz (x [n, C, N, N]) of samples of the one --prior drawn elsewhere (e.g. on a"
        " GPU with training.evaluate.draw_samples) instead of drawing them here",
    )
    args = p.parse_args(argv)

    priors = []
    for spec in args.prior:
        label, _, path = spec.rpartition("=")
        path = Path(path)
        priors.append((label or path.name, path, *load_model(path)))
    cfg0 = priors[0][3]
    if args.samples is not None and len(priors) != 1:
        raise ValueError("--samples goes with exactly one --prior")
    structures = args.heldout_structure or [cfg0.mock_structure]
    heldout_sets = []
    for structure in structures:
        h = heldout_set(cfg0, structure, args.n_heldout, args.heldout_seed)
        print(f"[eval] held-out {structure}: {args.n_heldout} mocks in "
              f"{h.seconds:.0f} s, floor FD (half vs half) {h.floor:.4f}", flush=True)  # fmt: skip
        heldout_sets.append(h)
    f_held = heldout_sets[0].features

    sampling = Sampling(args.n_samples, args.steps, args.seed, args.batch_size, args.samples)
    results, projections, last = [], [], None
    mean, comps = pca_fit(standardise(f_held)[0], 2)
    for label, path, model, cfg, info in priors:
        if not same_grid(cfg, cfg0):
            raise ValueError(f"{path}: priors to compare must share image size, bands, kpc/pixel")
        res, x, f = evaluate_prior(label, path, model, cfg, info, heldout_sets, sampling)
        by = ", ".join(f"{k} {v:.3f}" for k, v in res["frechet_distance_by_heldout"].items())
        print(f"[eval] {label}: FD {by} ({res['n_samples']} samples, {res['seconds']:.0f} s)",
              flush=True)  # fmt: skip
        results.append(res)
        projections.append((label, pca_project(standardise(f_held, f)[1], mean, comps)))
        last = (x, f)

    real = None
    if args.real is not None and args.real.exists():
        real = {"path": str(args.real), "by_z": {}}
        for z in args.real_z:
            entry = real_galaxy_entry(
                real_galaxy_x(args.real, cfg0, z), cfg0, last[1], heldout_sets
            )
            real["by_z"][str(z)] = entry
            print(f"[eval] real galaxy at z = {z}: "
                  + ", ".join(f"{k} {v:.3g}" for k, v in entry["features"].items()), flush=True)  # fmt: skip

    heldout_report = {
        h.structure: heldout_entry(h, args.n_heldout, args.heldout_seed) for h in heldout_sets
    }
    report = {
        "features": list(FEATURE_NAMES),
        "heldout": heldout_report[structures[0]],
        "heldout_sets": heldout_report,
        "priors": results,
        "real_galaxy": real,
    }
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(report, indent=2) + "\n")
    if args.save_samples is not None:
        np.savez_compressed(args.save_samples, x=last[0].astype(np.float32))
    print(f"[eval] wrote {args.out_json}", flush=True)

    if args.out_png or args.samples_png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    if args.out_png:
        held_proj = pca_project(standardise(f_held)[0], mean, comps)
        fig, axes = plt.subplots(
            1, len(projections), figsize=(4.2 * len(projections), 4), squeeze=False
        )
        for ax, (label, proj), res in zip(axes[0], projections, results):
            ax.scatter(held_proj[:, 0], held_proj[:, 1], s=5, alpha=0.5, label="held-out mocks")
            ax.scatter(proj[:, 0], proj[:, 1], s=5, alpha=0.5, label=f"prior samples ({label})")
            ax.set_title(f"{label}: FD {res['frechet_distance']:.3f}")
            ax.set_xlabel("PC 1")
            ax.set_ylabel("PC 2")
            ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(args.out_png, dpi=80)
        print(f"[eval] wrote {args.out_png}", flush=True)
    if args.samples_png:
        k = min(args.grid**2, len(last[0]))
        grid = sample_grid_rgb(last[0][:k], ncol=args.grid, bands=cfg0.bands)
        plt.imsave(args.samples_png, grid)
        print(f"[eval] wrote {args.samples_png}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
