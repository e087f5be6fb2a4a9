"""Posterior samples in flux units, as the sampler's summaries define them.

``deconvolve`` keeps ``config.keep_samples`` raw samples x_k [C,N,N] per object but only
the mean amplitude. Sample k's flux image is F_k = alpha_k · v(x_k), with alpha_k the
amplitude profiled for that sample against the observation (closed-form weighted least
squares, the same ``whitened_residual`` call ``deconvolve`` makes after sampling), so
recomputing alpha_k from x_k reproduces the sampler's flux samples exactly (at the
nominal redshift, i.e. without photo-z marginalisation).
"""

from __future__ import annotations

import numpy as np
import torch

from d4a_batch.config import PhysicsConfig
from d4a_batch.physics.operator import ObservationBatch, whitened_residual
from d4a_batch.physics.stretch import DEFAULT_A, inverse_stretch
from d4a_batch.validation.metrics import flux_operator


def flux_samples(
    samples_x: np.ndarray,
    obs: ObservationBatch,
    scale: np.ndarray,
    stretch_a: float = DEFAULT_A,
    ridge: float = PhysicsConfig().profile_ridge,
) -> tuple[np.ndarray, np.ndarray]:
    """(flux[B,S,C,N,N], alpha[B,S,C]) of x-space samples samples_x[B,S,C,N,N].

    ``obs``: the B objects' observations; ``scale[B]``: model pixel width in HSC pixels.
    """
    x = torch.as_tensor(np.array(samples_x), dtype=obs.image.dtype)
    if x.ndim != 5 or x.shape[0] != obs.image.shape[0] or x.shape[2] != obs.image.shape[1]:
        raise ValueError(f"flux_samples: samples {tuple(x.shape)} vs obs {tuple(obs.image.shape)}")
    b, s = x.shape[:2]
    rows = obs.repeat_interleave(s)
    op = flux_operator(rows, np.repeat(np.asarray(scale, dtype=np.float64), s), stretch_a)
    flat = x.reshape(b * s, *x.shape[2:])
    with torch.no_grad():
        _, alpha, _ = whitened_residual(flat, rows, op, ridge)
        flux = alpha[..., None, None] * inverse_stretch(flat, stretch_a)
    return (
        flux.reshape(x.shape).double().numpy(),
        alpha.reshape(b, s, -1).double().numpy(),
    )
