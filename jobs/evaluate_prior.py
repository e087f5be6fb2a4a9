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
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from d4a_batch.config import PriorConfig
from d4a_batch.prior.artifact import load_prior
from d4a_batch.prior.diffusion import build_diffusion
from d4a_batch.prior.unet import build_unet
from d4a_batch.training.data import mock_images
from d4a_batch.training.evaluate import (
    FEATURE_NAMES,
    frechet_distance,
    morphology_features,
    pca_fit,
    pca_project,
    sample_grid_rgb,
    standardise,
)
from d4a_batch.training.loop import STATE_FILE, load_checkpoint_dir


def load_model(path: Path) -> tuple[torch.nn.Module, PriorConfig, dict]:
    """(eval-mode UNet, PriorConfig, info) of an artifact folder or a training checkpoint."""
    if (path / STATE_FILE).exists():
        state, cfg = load_checkpoint_dir(path)
        model = build_unet(cfg.prior)
        model.load_state_dict(state["ema"])
        info = {"kind": "checkpoint", "steps_trained": int(state["step"])}
        return model.eval().requires_grad_(False), cfg.prior, info
    prior = load_prior(path)
    steps = prior.metadata.get("training", {}).get("steps")
    info = {"kind": "artifact", "prior_id": prior.prior_id, "steps_trained": steps}
    return prior.model, prior.config, info


@torch.no_grad()
def draw_samples(model, cfg: PriorConfig, n: int, steps: int, seed: int, batch: int) -> np.ndarray:
    """``n`` ancestral samples ``[n, C, N, N]`` of the prior, respaced to ``steps``."""
    spaced = build_diffusion(cfg, steps)
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    out = [
        spaced.p_sample_loop(model, (min(batch, n - i), *shape), generator=gen).numpy()
        for i in range(0, n, batch)
    ]
    return np.concatenate(out)


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
    args = p.parse_args(argv)

    priors = []
    for spec in args.prior:
        label, _, path = spec.rpartition("=")
        path = Path(path)
        priors.append((label or path.name, path, *load_model(path)))
    cfg0 = priors[0][3]
    t0 = time.perf_counter()
    heldout = mock_images(np.arange(args.n_heldout), args.heldout_seed, cfg0)
    f_held = morphology_features(heldout, cfg0.stretch.a, cfg0.bands)
    half = args.n_heldout // 2
    fa, fb = standardise(f_held[:half], f_held[half:])
    floor = frechet_distance(fa, fb)
    print(f"[eval] held-out: {args.n_heldout} mocks in {time.perf_counter() - t0:.0f} s, "
          f"floor FD (half vs half) {floor:.4f}", flush=True)  # fmt: skip

    results, projections, last = [], [], None
    mean, comps = pca_fit(standardise(f_held)[0], 2)
    for label, path, model, cfg, info in priors:
        if cfg.image_size != cfg0.image_size or cfg.bands != cfg0.bands:
            raise ValueError(f"{path}: priors to compare must share image size and bands")
        t0 = time.perf_counter()
        x = draw_samples(model, cfg, args.n_samples, args.steps, args.seed, args.batch_size)
        f = morphology_features(x, cfg.stretch.a, cfg.bands)
        ref, fs = standardise(f_held, f)
        fd = frechet_distance(ref, fs)
        secs = time.perf_counter() - t0
        print(f"[eval] {label}: FD {fd:.4f} ({args.n_samples} samples, {secs:.0f} s)", flush=True)
        results.append({
            "label": label, "path": str(path), **info, "frechet_distance": fd,
            "n_samples": args.n_samples, "sampling_steps": args.steps, "seconds": secs,
            "feature_mean": dict(zip(FEATURE_NAMES, f.mean(axis=0).tolist())),
            "feature_std": dict(zip(FEATURE_NAMES, f.std(axis=0).tolist())),
        })  # fmt: skip
        projections.append((label, pca_project(fs, mean, comps)))
        last = x

    report = {
        "features": list(FEATURE_NAMES),
        "heldout": {
            "n": args.n_heldout, "seed": args.heldout_seed, "floor_frechet_distance": floor,
            "feature_mean": dict(zip(FEATURE_NAMES, f_held.mean(axis=0).tolist())),
            "feature_std": dict(zip(FEATURE_NAMES, f_held.std(axis=0).tolist())),
        },
        "priors": results,
    }  # fmt: skip
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(report, indent=2) + "\n")
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
        k = min(args.grid**2, len(last))
        grid = sample_grid_rgb(last[:k], ncol=args.grid, bands=cfg0.bands)
        plt.imsave(args.samples_png, grid)
        print(f"[eval] wrote {args.samples_png}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
