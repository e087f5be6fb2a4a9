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
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from d4a_batch.config import PriorConfig
from d4a_batch.physics.cosmology import model_pixel_arcsec
from d4a_batch.prior.artifact import load_prior
from d4a_batch.prior.unet import build_unet
from d4a_batch.training.data import mock_images
from d4a_batch.training.evaluate import (
    FEATURE_NAMES,
    QUANTILES,
    ROBUST_FEATURE_NAMES,
    draw_samples,
    feature_quantiles,
    frechet_distance,
    image_on_prior_grid,
    morphology_features,
    pca_fit,
    pca_project,
    robust_shape_features,
    sample_grid_rgb,
    standardise,
)
from d4a_batch.training.loop import STATE_FILE, load_checkpoint_dir

DEFAULT_REAL = (
    Path(__file__).resolve().parents[1].parent / "shared/data/galsim/cosmos_147246_f814w.fits"
)
HST_PIXEL_ARCSEC = 0.03


def load_model(path: Path) -> tuple[torch.nn.Module, PriorConfig, dict]:
    """(eval-mode UNet, PriorConfig, info) of an artifact folder or a training checkpoint."""
    if (path / STATE_FILE).exists():
        state, cfg = load_checkpoint_dir(path)
        model = build_unet(cfg.trained_prior)
        model.load_state_dict(state["ema"])
        info = {"kind": "checkpoint", "steps_trained": int(state["step"])}
        return model.eval().requires_grad_(False), cfg.trained_prior, info
    prior = load_prior(path)
    steps = prior.metadata.get("training", {}).get("steps")
    info = {"kind": "artifact", "prior_id": prior.prior_id, "steps_trained": steps}
    return prior.model, prior.config, info


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


def percentile_of(
    value: np.ndarray, population: np.ndarray, names: tuple[str, ...] = FEATURE_NAMES
) -> dict[str, float]:
    """Per feature: the fraction of ``population[K, D]`` below ``value[D]`` (in %)."""
    return {name: float(100 * np.mean(population[:, j] < value[j])) for j, name in enumerate(names)}


def robust_quantiles(r: np.ndarray) -> dict[str, dict[str, float]]:
    """Quantiles (10/25/50/75/90 %) of ``robust_shape_features`` ``r[K, 2]`` (NaN-free rows)."""
    r = r[np.all(np.isfinite(r), axis=1)]
    qs = np.quantile(r, QUANTILES, axis=0)
    return {
        name: {f"q{round(100 * q):02d}": float(qs[k, j]) for k, q in enumerate(QUANTILES)}
        for j, name in enumerate(ROBUST_FEATURE_NAMES)
    }


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
    structures = args.heldout_structure or [cfg0.mock_structure]
    heldout_sets, robust_held = [], {}
    for structure in structures:
        t0 = time.perf_counter()
        cfg_h = dataclasses.replace(cfg0, mock_structure=structure)
        heldout = mock_images(np.arange(args.n_heldout), args.heldout_seed, cfg_h)
        f_h = morphology_features(heldout, cfg0.stretch.a, cfg0.bands)
        rob_h = robust_shape_features(heldout, cfg0.stretch.a, cfg0.bands)
        half = args.n_heldout // 2
        fa, fb = standardise(f_h[:half], f_h[half:])
        floor = frechet_distance(fa, fb)
        print(f"[eval] held-out {structure}: {args.n_heldout} mocks in "
              f"{time.perf_counter() - t0:.0f} s, floor FD (half vs half) {floor:.4f}", flush=True)  # fmt: skip
        heldout_sets.append((structure, f_h, floor))
        robust_held[structure] = rob_h
    f_held = heldout_sets[0][1]

    results, projections, last = [], [], None
    mean, comps = pca_fit(standardise(f_held)[0], 2)
    for label, path, model, cfg, info in priors:
        if (cfg.image_size, cfg.bands, cfg.kpc_per_pixel) != (
            cfg0.image_size,
            cfg0.bands,
            cfg0.kpc_per_pixel,
        ):
            raise ValueError(f"{path}: priors to compare must share image size, bands, kpc/pixel")
        t0 = time.perf_counter()
        if args.samples is not None:
            if len(priors) != 1:
                raise ValueError("--samples goes with exactly one --prior")
            x = np.load(args.samples)["x"].astype(np.float32)
            shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
            if x.ndim != 4 or x.shape[1:] != shape:
                raise ValueError(f"{args.samples}: samples {x.shape} do not fit the prior {shape}")
            args.n_samples = len(x)
        else:
            x = draw_samples(model, cfg, args.n_samples, args.steps, args.seed, args.batch_size)
        f = morphology_features(x, cfg.stretch.a, cfg.bands)
        fds = {st: frechet_distance(*standardise(fh, f)) for st, fh, _ in heldout_sets}
        fd = fds[structures[0]]
        secs = time.perf_counter() - t0
        by = ", ".join(f"{k} {v:.3f}" for k, v in fds.items())
        print(f"[eval] {label}: FD {by} ({args.n_samples} samples, {secs:.0f} s)", flush=True)
        results.append({
            "label": label, "path": str(path), **info, "frechet_distance": fd,
            "frechet_distance_by_heldout": fds, "mock_structure": cfg.mock_structure,
            "n_samples": args.n_samples, "sampling_steps": args.steps, "seconds": secs,
            "feature_mean": dict(zip(FEATURE_NAMES, f.mean(axis=0).tolist())),
            "feature_std": dict(zip(FEATURE_NAMES, f.std(axis=0).tolist())),
            "feature_quantiles": feature_quantiles(f),
            "robust_feature_quantiles": robust_quantiles(
                robust_shape_features(x, cfg.stretch.a, cfg.bands)
            ),
        })  # fmt: skip
        projections.append((label, pca_project(standardise(f_held, f)[1], mean, comps)))
        last = (x, f)

    real = None
    if args.real is not None and args.real.exists():
        real = {"path": str(args.real), "by_z": {}}
        for z in args.real_z:
            xr = real_galaxy_x(args.real, cfg0, z)
            fr = morphology_features(xr, cfg0.stretch.a, cfg0.bands)[0]
            rr = robust_shape_features(xr, cfg0.stretch.a, cfg0.bands)[0]
            real["by_z"][str(z)] = {
                "features": dict(zip(FEATURE_NAMES, fr.tolist())),
                "robust_features": dict(zip(ROBUST_FEATURE_NAMES, rr.tolist())),
                "percentile_in_samples": percentile_of(fr, last[1]),
                "percentile_in_heldout": {st: percentile_of(fr, fh) for st, fh, _ in heldout_sets},
            }
            print(f"[eval] real galaxy at z = {z}: "
                  + ", ".join(f"{k} {v:.3g}" for k, v in zip(FEATURE_NAMES, fr)), flush=True)  # fmt: skip

    heldout_report = {
        st: {
            "n": args.n_heldout, "seed": args.heldout_seed, "structure": st,
            "floor_frechet_distance": floor,
            "feature_mean": dict(zip(FEATURE_NAMES, fh.mean(axis=0).tolist())),
            "feature_std": dict(zip(FEATURE_NAMES, fh.std(axis=0).tolist())),
            "feature_quantiles": feature_quantiles(fh),
            "robust_feature_quantiles": robust_quantiles(robust_held[st]),
        }
        for st, fh, floor in heldout_sets
    }  # fmt: skip
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
