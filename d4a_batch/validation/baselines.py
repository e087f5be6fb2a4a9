"""Classical baselines on the model grid: Richardson-Lucy and the resampled observation.

Both start from the HSC stamp [C,H,W] (counts per HSC pixel) and end as flux per model
pixel [C,N,N] on the grid of the posterior (same centre, pixel width ``scale`` HSC
pixels), so they are scored against the truth exactly like the posterior mean.

- Background: per band, the 3σ-clipped median of the stamp's valid pixels (stamps are
  mostly sky). It is subtracted; invalid pixels are set to 0 (the background level).
- Richardson-Lucy (``skimage.restoration.richardson_lucy``, ``clip=False``) needs a
  non-negative image: the background-subtracted stamp is clipped at 0 before it runs
  (this biases the faintest pixels up, which is part of what the baseline is).
- Resampling to the model grid is the physics area-overlap resampler run the other way:
  input = the stamp (pixel width 1/scale model pixels), output = the model grid, the
  stamp centre at −offset/scale model pixels from the model centre. Flux is conserved
  for stamp pixels inside the model footprint; the rest is cut.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from astropy.stats import sigma_clipped_stats
from skimage.restoration import richardson_lucy

from d4a_batch.physics.resample import resample


def background(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-band sky level [B,C]: 3σ-clipped median of the valid pixels of image[B,C,H,W]."""
    b, c = image.shape[:2]
    out = np.zeros((b, c))
    for i in range(b):
        for j in range(c):
            pix = image[i, j][np.asarray(valid[i, j], bool)]
            if pix.size:
                out[i, j] = sigma_clipped_stats(pix, sigma=3.0, maxiters=5)[1]
    return out


def subtract_background(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """image[B,C,H,W] minus its per-band background, 0 at invalid pixels (float64)."""
    img = np.asarray(image, dtype=np.float64) - background(image, valid)[..., None, None]
    return np.where(np.asarray(valid, bool), img, 0.0)


def richardson_lucy_stamps(
    image: np.ndarray, valid: np.ndarray, psf: np.ndarray, num_iter: int
) -> np.ndarray:
    """Richardson-Lucy deconvolution of each band of image[B,C,H,W] by psf[B,C,P,P].

    Returns flux per HSC pixel [B,C,H,W] (background removed; see the module docstring).
    """
    if image.ndim != 4 or psf.shape[:2] != image.shape[:2]:
        raise ValueError(f"richardson_lucy_stamps: image {image.shape}, psf {psf.shape}")
    data = np.clip(subtract_background(image, valid), 0.0, None)
    out = np.zeros_like(data)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            peak = data[i, j].max()
            if peak <= 0:
                continue
            kernel = np.asarray(psf[i, j], dtype=np.float64)
            out[i, j] = (
                richardson_lucy(
                    data[i, j] / peak,
                    kernel / kernel.sum(),
                    num_iter=int(num_iter),
                    clip=False,
                    filter_epsilon=1e-12,
                )
                * peak
            )
    return out


def stamp_to_model(
    stamp: np.ndarray, scale: np.ndarray, offset: np.ndarray, n_model: int
) -> np.ndarray:
    """Flux per HSC pixel stamp[B,C,H,W] -> flux per model pixel [B,C,N,N] (area overlap).

    ``scale[B]``: model pixel width in HSC pixels; ``offset[B,2]``: the object (model centre)
    from the stamp centre, HSC pixels.
    """
    s = np.asarray(scale, dtype=np.float64).reshape(-1)
    off = np.asarray(offset, dtype=np.float64).reshape(-1, 2)
    t = torch.as_tensor(np.asarray(stamp, dtype=np.float64))
    with torch.no_grad():
        out = resample(t, 1.0 / s, -off / s[:, None], (n_model, n_model))
    return out.numpy()


def tune_iterations(
    image: np.ndarray,
    valid: np.ndarray,
    psf: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    truth: np.ndarray,
    candidates: Sequence[int],
    score: Callable[[np.ndarray, np.ndarray], float],
) -> tuple[int, dict[int, float]]:
    """The Richardson-Lucy iteration count with the best mean ``score(estimate, truth)`` on a
    held-out set (higher is better); returns (best, {iterations: mean score}).

    image, valid [B,C,H,W], psf [B,C,P,P], scale [B], offset [B,2], truth [B,C,N,N].
    """
    means: dict[int, float] = {}
    for k in candidates:
        est = stamp_to_model(
            richardson_lucy_stamps(image, valid, psf, k), scale, offset, truth.shape[-1]
        )
        means[int(k)] = float(np.mean([score(e, t) for e, t in zip(est, truth)]))
    best = max(means, key=means.__getitem__)
    return best, means
