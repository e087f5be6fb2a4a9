"""Diffusion posterior sampling (DPS, Chung et al. 2022) over objects × samples in one batch.

Rows: object o, sample k -> row ``r = o*S + k`` (R = B·S rows in one network batch); each
row carries its own forward operator (PSF, model pixel scale, offset, mask, variance).
One reverse step at spaced index i (DESIGN.md section 2):

    ε = ε_θ(x_t, timestep_map[i])                  (bfloat16 autocast on CUDA only)
    x̂0 = (x_t − √(1−ᾱ_i) ε)/√ᾱ_i, clipped to [−1, 1] when ``clip_x0``
    x' = coef1_i x̂0 + coef2_i x_t + σ_i z          (coefficients of the spaced process,
                                                      z = 0 at i = 0)
    g  = ∇_{x_t} ‖r(x̂0)‖                            (whitened residual of that row only)
    x_{t−1} = x' − ζ · g / rms(g)   ("rms" rule)    or    x' − ζ · g   ("raw" rule)
    x_{t−1} = x' − ζ (50/steps) · g / rms(g)          ("rms_total" rule)

Step rules: "rms" and "raw" take ζ per step (the paper's semantics; "rms" is what
docs/sampler_tuning.md tuned at 50 steps), so their total pull toward the data, Σ ζ, grows
with the step count. "rms_total" spreads the pull ζ·50 over the steps (ζ_step = ζ·50/steps):
at 50 steps it equals "rms", and 25 or 100 steps pull as far in total
(tests/sampling/test_dps.py checks χ² at 25 and 100 steps on a bright mock).

σ_i² is the reverse variance the prior's own sampler uses (improved-diffusion semantics of
the *spaced* process: learned with ``learn_sigma``, posterior variance with ``sigma_small``,
else β_i), so that with ζ = 0 the samples follow the same process as the prior statistics
(``stats_var``) they are compared against. Measured with the exact ε of a per-pixel
Gaussian prior (variance 0.04, 100 steps, 400 samples): the posterior variance alone gives
0.84 of the prior variance, β_i gives 1.04; 1000 steps: 0.98 and 1.01.

Per-sample independence: the guidance of a row is the gradient of that row's residual norm
(the network and the likelihood act row by row), and every random draw of row (o, k) --
x_T, each step's z, its photo-z -- comes from its own generator seeded by
``(seed, object_id, k)`` only (``sampling.rows``). So a sample does not depend on the batch
it runs in (to float tolerance). Generators live on the sampling device: results are
reproducible per device type, not across CPU and CUDA.

``dps_sample`` is also the ancestral loop of ``sampling.dds`` (its ``consistency`` hook), the
one import between algorithm modules; the entry point that picks an algorithm is
``sampling.deconvolve.deconvolve``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from d4a_batch.config import GUIDANCE_RULES
from d4a_batch.prior.artifact import Prior
from d4a_batch.sampling.rows import (
    ConsistencyFn,
    ResidualFn,
    StepCallback,
    network_autocast,
    randn_rows,
)

TOTAL_REFERENCE_STEPS = 50  # "rms_total": ζ is the per-step value at this many steps


# --------------------------------------------------------------------------- the sampler
def scale_guidance(grad: torch.Tensor, rule: str) -> torch.Tensor:
    """The guidance direction of each row of grad[R, ...]: unit RMS per row ("rms",
    "rms_total") or as is ("raw")."""
    if rule == "raw":
        return grad
    if rule in ("rms", "rms_total"):
        rms = grad.pow(2).flatten(1).mean(1).sqrt().reshape(-1, *([1] * (grad.ndim - 1)))
        return torch.where(rms > 0, grad / torch.where(rms > 0, rms, 1.0), 0.0)
    raise ValueError(f"unknown guidance rule {rule!r}; expected one of {GUIDANCE_RULES}")


def dps_sample(
    prior: Prior,
    residual_fn: ResidualFn | None,
    generators: Sequence[torch.Generator],
    *,
    steps: int,
    guidance: float,
    rule: str = "rms",
    clip_x0: bool = True,
    callback: StepCallback | None = None,
    consistency: ConsistencyFn | None = None,
    posterior_variance: bool = False,
    clip_consistent: bool = True,
    network_precision: str = "auto",
) -> torch.Tensor:
    """DPS samples x0[R,C,N,N] (float32, on the prior's device, detached).

    ``residual_fn(x̂0[R,C,N,N]) -> r[R, ...]``: whitened residual of each row (row r
    may only depend on row r); None or ``guidance == 0`` samples the prior. ``steps``:
    respaced reverse steps of the prior's diffusion; the network gets the original
    timesteps. ``generators[r]`` draws row r's noise. ``callback(i, x)`` sees the state
    after each step (spaced index i, counting down). Only x_t carries a gradient, one step
    at a time: memory does not grow with ``steps``.

    ``consistency(i, x̂0) -> x̂0'`` (``sampling.dds``): replaces Tweedie's estimate by a
    data-consistent one before the step, x' = coef1_i x̂0' + coef2_i x_t + σ_i z (no gradient
    through the network). ``clip_x0`` clips the network's x̂0 to [−1, 1] (the prior's range);
    x̂0' and the final sample are clipped too only with ``clip_consistent`` (the data may
    want what the prior's range excludes: negative flux where noise dips below an empty sky,
    a core brighter than the normaliser; ``sampling.dds``). None: the DPS step above,
    unchanged. ``posterior_variance``: σ_i² is the variance of q(x_{t−1} | x_t, x0) whatever
    the prior's own choice -- the exact step when ``consistency`` draws x0 from
    p(x0 | x_t, y) (``dds_sample(randomize=True)``). ``network_precision``: the network's
    arithmetic (``SamplerConfig.network_precision``, ``rows.network_autocast``).
    """
    if rule not in GUIDANCE_RULES:
        raise ValueError(f"unknown guidance rule {rule!r}; expected one of {GUIDANCE_RULES}")
    cfg = prior.config
    device = prior.device
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    spaced = prior.spaced(steps)
    rows = len(generators)
    guided = residual_fn is not None and guidance != 0
    zeta = guidance * TOTAL_REFERENCE_STEPS / steps if rule == "rms_total" else guidance
    autocast = network_autocast(network_precision, device)
    model = spaced.wrap_model(prior.model)
    x = randn_rows(generators, shape, device)
    for i in reversed(range(spaced.num_timesteps)):
        t = torch.full((rows,), i, dtype=torch.long, device=device)
        x = x.detach().requires_grad_(guided)
        with torch.set_grad_enabled(guided):
            with autocast():
                out = model(x, t)
            step = spaced.p_mean_variance_from_output(out.float(), x, t, clip_denoised=clip_x0)
            if guided:
                r = residual_fn(step["pred_xstart"])
                norms = r.flatten(1).pow(2).sum(1).clamp_min(1e-30).sqrt()
                (grad,) = torch.autograd.grad(norms.sum(), x)
        log_var = step["log_variance"]
        if consistency is None:
            x_next = step["mean"].detach()
        else:
            with torch.no_grad():
                x0c = consistency(i, step["pred_xstart"].detach())
                if clip_x0 and clip_consistent:
                    x0c = x0c.clamp(-1.0, 1.0)
                x_next, _, q_log_var = spaced.q_posterior_mean_variance(x0c, x.detach(), t)
            if posterior_variance:
                log_var = q_log_var
        if i > 0:
            sigma = torch.exp(0.5 * log_var.detach())
            x_next = x_next + sigma * randn_rows(generators, shape, device)
        if guided:
            x_next = x_next - zeta * scale_guidance(grad, rule)
        x = x_next.detach()
        if callback is not None:
            callback(i, x)
    if clip_x0 and (consistency is None or clip_consistent):
        return x.clamp(-1.0, 1.0)
    return x
