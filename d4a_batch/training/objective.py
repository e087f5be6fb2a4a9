"""What a training step optimises: timestep sampling, loss weighting, progressive resolution.

Cheaper training per CPU-hour (issue 29) comes from spending the network's passes where they
teach the most. Three knobs, each a field of ``TrainConfig`` and each tested on its own:

- **loss weighting** ``"min_snr"``: Min-SNR-γ (Hang et al. 2023). For a v-prediction
  network the per-sample v-MSE is weighted by ``min(SNR, γ) / (SNR + 1)`` (for ε-prediction
  ``min(SNR, γ) / SNR``), which equals the x₀-MSE weighted by ``min(SNR, γ)``: the nearly
  noise-free steps, whose x₀ error is tiny but whose weight in plain x₀-MSE is huge, stop
  dominating the gradient. ``"uniform"`` is the plain MSE of ``training_losses``.
- **timestep sampling** ``"logsnr_normal"`` / ``"logsnr_laplace"``: draw log-SNR from a
  normal (EDM's log-normal σ, in log-SNR = −2 ln σ) or a Laplace (Hang et al. 2024)
  around ``logsnr_loc`` and take the nearest of the T discrete timesteps, instead of t
  uniform on 0..T-1 (which the cosine schedule spreads over log-SNR ≈ −17..+12).
- **progressive resolution**: pre-train at half the image size on 2×-binned images
  (2× the kpc per pixel) with the schedule shifted by log-SNR + 2 ln 2 (Hoogeboom et al.
  2023, "simple diffusion": the same t then destroys the same amount of large-scale
  structure at either size), then continue at full size with the same weights. The UNet is
  convolutional and its attention layers sit at downsample factors, so the weights are the
  same tensors at both sizes; ``phase_prior`` gives the half-size PriorConfig.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from d4a_batch.config import PriorConfig
from d4a_batch.physics.stretch import inverse_stretch, stretch
from d4a_batch.training.data import dequantise_u8

LOSS_WEIGHTINGS = ("uniform", "min_snr")
TIMESTEP_SAMPLINGS = ("uniform", "logsnr_normal", "logsnr_laplace")


def log_snr_table(alphas_cumprod: np.ndarray) -> np.ndarray:
    """log-SNR[T] = ln(ᾱ / (1 − ᾱ)) of a schedule (decreasing in t)."""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.log(ac) - np.log1p(-ac)


def sample_timesteps(
    alphas_cumprod: np.ndarray,
    n: int,
    generator: torch.Generator,
    how: str = "uniform",
    loc: float = 0.0,
    scale: float = 2.0,
) -> torch.Tensor:
    """``n`` training timesteps [n] (int64, CPU) of a T-step schedule.

    ``how = "uniform"``: t ~ U{0..T-1} (as ``torch.randint``: the same draws as before).
    ``"logsnr_normal"``: log-SNR ~ N(loc, scale²); ``"logsnr_laplace"``: Laplace(loc, scale);
    each mapped to the timestep whose log-SNR is nearest (clamped to the schedule's range).
    """
    T = len(alphas_cumprod)
    if how == "uniform":
        return torch.randint(0, T, (n,), generator=generator)
    if how not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"timestep sampling must be one of {TIMESTEP_SAMPLINGS}, got {how!r}")
    if how == "logsnr_normal":
        lam = loc + scale * torch.randn(n, generator=generator, dtype=torch.float64)
    else:  # Laplace by the inverse CDF of a uniform in (-1/2, 1/2)
        u = torch.rand(n, generator=generator, dtype=torch.float64) - 0.5
        u = u.clamp(-0.5 + 1e-12, 0.5 - 1e-12)
        lam = loc - scale * torch.sign(u) * torch.log1p(-2 * u.abs())
    table = torch.from_numpy(-log_snr_table(alphas_cumprod))  # increasing in t
    idx = torch.searchsorted(table, -lam).clamp(1, T - 1)
    lo, hi = table[idx - 1], table[idx]
    nearer_lo = (-lam - lo).abs() <= (hi - -lam).abs()
    return torch.where(nearer_lo, idx - 1, idx).to(torch.int64)


def loss_weights(
    alphas_cumprod: np.ndarray,
    t: torch.Tensor,
    how: str = "uniform",
    gamma: float = 5.0,
    parameterization: str = "v",
) -> torch.Tensor:
    """Per-sample weights [B] (float32, on t's device) of the network-target MSE at ``t``.

    ``"uniform"``: 1. ``"min_snr"``: min(SNR, γ)/(SNR + 1) for v-prediction, min(SNR, γ)/SNR
    for ε-prediction, so that the weighted loss is min(SNR, γ)·‖x₀ − x̂₀‖² in both.
    """
    if how == "uniform":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    if how not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {how!r}")
    ac = torch.as_tensor(np.asarray(alphas_cumprod), dtype=torch.float64)[t.cpu()]
    snr = ac / (1 - ac)
    denom = snr + 1 if parameterization == "v" else snr
    return (snr.clamp(max=gamma) / denom).to(torch.float32).to(t.device)


# --------------------------------------------------------------------------- progressive
def phase_prior(prior: PriorConfig, factor: int) -> PriorConfig:
    """The PriorConfig of a pre-training phase at ``image_size / factor``.

    Same network (attention at the same downsample factors, so the resolutions in pixels
    shrink by ``factor``), ``factor``× the kpc per pixel (the same field), and the schedule
    shifted by log-SNR + 2 ln(factor) on top of the prior's own shift.
    """
    if factor == 1:
        return prior
    if (
        factor < 1
        or prior.image_size % factor
        or any(r % factor for r in prior.attention_resolutions)
    ):
        raise ValueError(
            f"factor {factor} must divide the image size {prior.image_size} and the attention"
            f" resolutions {prior.attention_resolutions}"
        )
    return replace(
        prior,
        name=f"{prior.name}@{prior.image_size // factor}",
        image_size=prior.image_size // factor,
        kpc_per_pixel=prior.kpc_per_pixel * factor,
        attention_resolutions=tuple(r // factor for r in prior.attention_resolutions),
        logsnr_shift=prior.logsnr_shift + 2 * math.log(factor),
    )


def bin_images(x: torch.Tensor, factor: int, a: float) -> torch.Tensor:
    """x-space images [K, C, N, N] -> the same galaxies on a ``factor``× coarser grid
    [K, C, N/factor, N/factor] (float32, x-space).

    The binning is done on flux: v = inverse_stretch(x), summed over factor×factor blocks
    (flux-conserving), renormalised so each band's brightest pixel is 1 again (the training
    images' normalisation), and stretched back. ``x`` may be uint8 (``quantise_u8``);
    processed in chunks, so 20,000 images need no more than a chunk's float copy.
    """
    if x.ndim != 4 or x.shape[-1] % factor or x.shape[-2] % factor:
        raise ValueError(
            f"expected [K, C, N, N] with N divisible by {factor}, got {tuple(x.shape)}"
        )
    k, c, n, _ = x.shape
    m = n // factor
    out = torch.empty((k, c, m, m), dtype=torch.float32)
    for s in range(0, k, 1024):
        chunk = x[s : s + 1024]
        xf = dequantise_u8(chunk) if chunk.dtype == torch.uint8 else chunk.float()
        v = inverse_stretch(xf.double(), a).clamp_min(0.0)
        vb = v.reshape(-1, c, m, factor, m, factor).sum(dim=(3, 5))
        peak = vb.amax(dim=(2, 3), keepdim=True).clamp_min(1e-30)
        out[s : s + 1024] = stretch(vb / peak, a).float()
    return out
