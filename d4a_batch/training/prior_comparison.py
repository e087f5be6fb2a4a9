"""Priors against held-out mock galaxies (``jobs/evaluate_prior.py``): the report's parts.

- ``load_model``: the eval-mode UNet of a prior artifact folder or of a training checkpoint
  folder (its EMA weights).
- ``heldout_set``: ``n`` fresh mocks of one mock population, their morphology features
  (``training.evaluate``), robust shape features and the metric's noise floor (the Fréchet
  distance between the set's two halves, standardised on the first).
- ``evaluate_prior``: one prior's samples (drawn here, or read from an npz drawn elsewhere),
  their Fréchet distance to every held-out set (standardised on the held-out features),
  feature means, standard deviations and quantiles.
- ``real_galaxy_entry``: a real galaxy's features and their percentiles among the samples
  and the held-out mocks; ``heldout_entry``: a held-out set's part of the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d4a_batch.config import PriorConfig
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
    morphology_features,
    robust_shape_features,
    standardise,
)
from d4a_batch.training.loop import STATE_FILE, load_checkpoint_dir


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


@dataclass(frozen=True)
class HeldoutSet:
    """Held-out mocks of one population: features ``[n, D]``, robust features ``[n, 2]``,
    the half-vs-half Fréchet distance and the seconds it took."""

    structure: str
    features: np.ndarray
    robust: np.ndarray
    floor: float
    seconds: float


def heldout_set(cfg: PriorConfig, structure: str, n: int, seed: int) -> HeldoutSet:
    """``n`` mocks of ``structure`` on the prior's grid, from ``seed``."""
    t0 = time.perf_counter()
    heldout = mock_images(np.arange(n), seed, replace(cfg, mock_structure=structure))
    f_h = morphology_features(heldout, cfg.stretch.a, cfg.bands)
    rob_h = robust_shape_features(heldout, cfg.stretch.a, cfg.bands)
    fa, fb = standardise(f_h[: n // 2], f_h[n // 2 :])
    return HeldoutSet(structure, f_h, rob_h, frechet_distance(fa, fb), time.perf_counter() - t0)


@dataclass(frozen=True)
class Sampling:
    """How a prior's samples come: ``n_samples`` ancestral samples at ``steps`` respaced
    steps from ``seed`` in batches of ``batch_size``, or, with ``samples``, an npz
    (``x [n, C, N, N]``) drawn elsewhere."""

    n_samples: int = 256
    steps: int = 100
    seed: int = 0
    batch_size: int = 64
    samples: Path | None = None


def prior_samples(model: torch.nn.Module, cfg: PriorConfig, sampling: Sampling) -> np.ndarray:
    """The prior's samples ``x [n, C, N, N]`` (float32)."""
    if sampling.samples is None:
        s = sampling
        return draw_samples(model, cfg, s.n_samples, s.steps, s.seed, s.batch_size)
    x = np.load(sampling.samples)["x"].astype(np.float32)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if x.ndim != 4 or x.shape[1:] != shape:
        raise ValueError(f"{sampling.samples}: samples {x.shape} do not fit the prior {shape}")
    return x


def evaluate_prior(
    label: str, path: Path, model: torch.nn.Module, cfg: PriorConfig, info: dict,
    heldout: list[HeldoutSet], sampling: Sampling,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:  # fmt: skip
    """(the prior's report entry, its samples x, their features) against the held-out sets;
    the first set is the reference of ``frechet_distance``."""
    t0 = time.perf_counter()
    x = prior_samples(model, cfg, sampling)
    f = morphology_features(x, cfg.stretch.a, cfg.bands)
    fds = {h.structure: frechet_distance(*standardise(h.features, f)) for h in heldout}
    result = {
        "label": label, "path": str(path), **info, "frechet_distance": fds[heldout[0].structure],
        "frechet_distance_by_heldout": fds, "mock_structure": cfg.mock_structure,
        "n_samples": len(x), "sampling_steps": sampling.steps,
        "seconds": time.perf_counter() - t0,
        "feature_mean": dict(zip(FEATURE_NAMES, f.mean(axis=0).tolist())),
        "feature_std": dict(zip(FEATURE_NAMES, f.std(axis=0).tolist())),
        "feature_quantiles": feature_quantiles(f),
        "robust_feature_quantiles": robust_quantiles(
            robust_shape_features(x, cfg.stretch.a, cfg.bands)
        ),
    }  # fmt: skip
    return result, x, f


def same_grid(a: PriorConfig, b: PriorConfig) -> bool:
    """Whether two priors' samples compare: same image size, bands and kpc/pixel."""
    return (a.image_size, a.bands, a.kpc_per_pixel) == (b.image_size, b.bands, b.kpc_per_pixel)


def real_galaxy_entry(
    xr: np.ndarray, cfg: PriorConfig, sample_features: np.ndarray, heldout: list[HeldoutSet]
) -> dict[str, Any]:
    """A real galaxy ``xr [1, C, N, N]`` on the prior's grid: its features and their
    percentiles among the samples' and each held-out set's."""
    fr = morphology_features(xr, cfg.stretch.a, cfg.bands)[0]
    rr = robust_shape_features(xr, cfg.stretch.a, cfg.bands)[0]
    return {
        "features": dict(zip(FEATURE_NAMES, fr.tolist())),
        "robust_features": dict(zip(ROBUST_FEATURE_NAMES, rr.tolist())),
        "percentile_in_samples": percentile_of(fr, sample_features),
        "percentile_in_heldout": {h.structure: percentile_of(fr, h.features) for h in heldout},
    }


def heldout_entry(h: HeldoutSet, n: int, seed: int) -> dict[str, Any]:
    """A held-out set's part of the report."""
    return {
        "n": n, "seed": seed, "structure": h.structure, "floor_frechet_distance": h.floor,
        "feature_mean": dict(zip(FEATURE_NAMES, h.features.mean(axis=0).tolist())),
        "feature_std": dict(zip(FEATURE_NAMES, h.features.std(axis=0).tolist())),
        "feature_quantiles": feature_quantiles(h.features),
        "robust_feature_quantiles": robust_quantiles(h.robust),
    }  # fmt: skip
