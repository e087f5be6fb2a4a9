"""Annealed decoupled posterior sampling (DAPS-style) without gradients through the network.

References: DAPS, Zhang et al. 2024 ("Improving diffusion inverse problem solving with
decoupled noise annealing", arXiv 2407.01521); split Gibbs / PnP-DM, Wu et al. 2024
("Principled probabilistic imaging using diffusion models as plug-and-play priors",
arXiv 2405.18782). Written from the papers; no code copied.

Rows: object o, sample k -> row ``r = o*S + k`` (``sampling.rows``). Levels: K original
timesteps t_K > ... > t_1 = 0 of the prior's diffusion (the respaced schedule of
``levels`` steps). At each level, per row:

    x̂0 = x̂0(x_t)                 one network call (no gradient), clipped when ``clip_x0``
    r_t² = λ σ_t² / (λ + σ_t²),   σ_t² = (1 − ᾱ_t)/ᾱ_t,  λ = prior pixel variance map
    x0 ~ π_t(x0) ∝ N(x0; x̂0, r_t² I) · p(y | x0)          (perturbed Gauss-Newton + MALA)
    x_{t'} = √ᾱ_{t'} x0 + √(1 − ᾱ_{t'}) ε                  (t' = next level)

The last level's x0 is the sample. r_t² is the exact p(x0 | x_t) variance of a Gaussian
prior with the artifact's pixel variances (``stats_var``): no per-object tuning; the
likelihood p(y | x0) is the object's own (operator, per-pixel variance, mask, profiled
α, β). Why it targets the posterior: if x_t ~ p(x_t | y) and x0 ~ p(x0 | x_t, y), then
x0 ~ p(x0 | y); with a Gaussian prior π_t *is* p(x0 | x_t, y), so every level is an exact
(data-augmentation) Gibbs step. The MALA chain of a level starts at the previous level's x0
(which, given the x_t drawn from it, is itself a draw of p(x0 | x_t, y): an exact warm
start); the first level starts from a draw of N(x̂0, r²).

Likelihood step, part 1 (``cg`` > 0): one perturb-and-optimise Gauss-Newton step
(randomise-then-optimise), solved by ``cg`` preconditioned CG iterations with JVP/VJP
products through the operator only (``likelihood.perturbed_gauss_newton``): for a linear residual
and enough iterations it is an exact draw of π_t however ill-conditioned (bright objects:
data curvature 10⁴-10⁵ x the prior's); CG needs ~√(condition number) iterations where
Langevin needs ~condition number steps.

Likelihood step, part 2 (MALA, ``inner`` steps per level, exact for π_t): U(x) = ½‖r(x)‖² + ½‖(x − x̂0)/r_t‖²,
proposal x' = x − h P∇U + √(2h) P^½ ξ with a diagonal preconditioner P = 1/D fixed per
level, D = (J_GNᵀ W J_GN) 𝟙 + 1/r_t² -- the Gauss-Newton curvature row sums at the chain's
start (α held fixed; J_GN = α PSF ⊛ R · diag(v'(x)) is non-negative, so D⁻¹H has spectral
radius ≤ 1: the step follows each row's curvature, which spans 10⁵ between bright and
faint objects and 10⁴ across one image through the asinh stretch). Computed with one
forward and one adjoint pass of the operator (``likelihood.OperatorLikelihood``), or a JVP +
VJP of a generic residual (``likelihood.ResidualLikelihood``). Metropolis-Hastings accepts per row; each row's
step h adapts between levels to its own acceptance rate (target ``TARGET_ACCEPT``).

Cost per sample: ``levels`` network forward passes (DPS: ``steps`` forward + backward
passes, ~1.7x a forward on CPU) plus ~``levels · (inner + 1 + 2 cg)`` operator passes.

Status (docs/HISTORY.md, 2026-12-02): exact on Gaussian priors (tests/sampling/test_daps.py),
but on the demo prior it under-fits bright objects (the Gaussian approximation of
p(x0 | x_t) is too loose along the flux scale that the profiled likelihood leaves free), so
"dds" (sampling/dds.py) is the default sampler, "dps" the paper's.
Randomness: every draw of row (o, k) comes from its own generator seeded by
``(seed, object_id, k)``, so a sample does not depend on its batch (to float tolerance).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from d4a_batch.prior.artifact import Prior
from d4a_batch.sampling.likelihood import VAR_FLOOR, perturbed_gauss_newton
from d4a_batch.sampling.rows import StepCallback, network_autocast, rand_rows, randn_rows

TARGET_ACCEPT = 0.6
STEP_INIT = 0.1  # MALA step h in preconditioned units (D⁻¹H has spectral radius ≤ 1)
STEP_RANGE = (1e-4, 2.0)


# --------------------------------------------------------------------------- MALA
def _energy_and_grad(
    lik, x: torch.Tensor, center: torch.Tensor, inv_r2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """U[R] = ½‖r(x)‖² + ½ Σ (x − center)²/r² and ∇U [R,C,N,N] (rows independent)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        r = lik.residual(x)
        u = 0.5 * r.flatten(1).pow(2).sum(1) + 0.5 * ((x - center).pow(2) * inv_r2).flatten(1).sum(
            1
        )
        (g,) = torch.autograd.grad(u.sum(), x)
    return u.detach(), g.detach()


def mala_chain(
    lik,
    x: torch.Tensor,
    center: torch.Tensor,
    inv_r2: torch.Tensor,
    step: torch.Tensor,
    noise: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``inner`` preconditioned MALA steps on π(x) ∝ exp(−U(x)), per row.

    x, center [R,C,N,N]; inv_r2 broadcastable to x; step h [R]; noise [inner,R,C,N,N];
    uniforms [inner,R]. The preconditioner P = 1/D (D: curvature row sums + 1/r²) is
    computed once at the start. Returns (x [R,C,N,N], acceptance rate [R]).
    """
    inner = noise.shape[0]
    shape = (-1, *([1] * (x.ndim - 1)))
    d = lik.curvature_rowsum(x) + inv_r2
    d = torch.where(torch.isfinite(d), d, inv_r2.expand_as(d))
    p = 1.0 / d
    h = step.reshape(shape)
    u, g = _energy_and_grad(lik, x, center, inv_r2)
    accepted = torch.zeros_like(step)
    for j in range(inner):
        mean_fwd = x - h * p * g
        prop = mean_fwd + torch.sqrt(2 * h * p) * noise[j]
        u_p, g_p = _energy_and_grad(lik, prop, center, inv_r2)
        mean_bwd = prop - h * p * g_p
        # log q(x | x') − log q(x' | x), q(a | b) = N(a; b − hP∇U(b), 2hP)
        log_q = -((x - mean_bwd).pow(2) * d).flatten(1).sum(1) / (4 * step)
        log_q = log_q + ((prop - mean_fwd).pow(2) * d).flatten(1).sum(1) / (4 * step)
        log_a = (u - u_p) + log_q
        ok = torch.isfinite(log_a) & torch.isfinite(u_p) & (torch.log(uniforms[j]) < log_a)
        okb = ok.reshape(shape)
        x = torch.where(okb, prop, x)
        g = torch.where(okb, g_p, g)
        u = torch.where(ok, u_p, u)
        accepted += ok.to(accepted.dtype)
    return x.detach(), accepted / max(inner, 1)


def adapt_step(step: torch.Tensor, acceptance: torch.Tensor) -> torch.Tensor:
    """Per row: h · exp(2 (acceptance − TARGET_ACCEPT)), clamped to ``STEP_RANGE``."""
    return (step * torch.exp(2.0 * (acceptance - TARGET_ACCEPT))).clamp(*STEP_RANGE)


# --------------------------------------------------------------------------- the sampler
def daps_sample(
    prior: Prior,
    likelihood,
    generators: Sequence[torch.Generator],
    *,
    levels: int,
    inner: int,
    cg: int = 0,
    prior_var: torch.Tensor | None = None,
    clip_x0: bool = True,
    callback: StepCallback | None = None,
    diagnostics: dict | None = None,
    clip_data_step: bool = True,
    network_precision: str = "auto",
) -> torch.Tensor:
    """Posterior samples x0[R,C,N,N] (float32, on the prior's device, detached).

    ``likelihood``: ``likelihood.OperatorLikelihood``, ``likelihood.ResidualLikelihood`` or anything with
    ``residual(x) -> r[R,...]`` (row r depends on row r only) and
    ``curvature_rowsum(x) -> [R,C,N,N]`` (≥ 0); None samples the prior (then π_t is
    N(x̂0, r_t²), drawn exactly). ``levels``: annealing levels (respaced timesteps of the
    prior's diffusion; network calls per sample); ``inner``: MALA steps per level.
    ``prior_var[C,N,N]``: λ (default ``prior.stats_var``). ``callback(i, x0)`` after each
    level (i counts down to 0). ``diagnostics`` (a dict) receives the mean acceptance per
    level and the final per-row step sizes. ``clip_x0`` clips the network's x̂0 to [−1, 1];
    ``clip_data_step`` clips the returned sample too (the likelihood steps are never clipped
    between levels). ``network_precision``: ``rows.network_autocast``.
    """
    cfg = prior.config
    device = prior.device
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    rows = len(generators)
    lam = (prior.stats_var if prior_var is None else prior_var).to(device, torch.float32)
    if tuple(lam.shape) != shape:
        raise ValueError(f"daps_sample: prior_var must be {shape}, got {tuple(lam.shape)}")
    lam = lam.clamp_min(VAR_FLOOR)
    base = prior.diffusion
    ts = np.array(sorted(prior.spaced(levels).timestep_map.tolist()), dtype=np.int64)
    abar = base.alphas_cumprod[ts]
    model = base.wrap_model(prior.model)
    autocast = network_autocast(network_precision, device)
    step = torch.full((rows,), STEP_INIT, device=device)
    x_t = randn_rows(generators, shape, device) * float(np.sqrt(1.0 - abar[-1]))
    x0 = None
    res_shape = None
    acc_log: list[float] = []
    for i in reversed(range(len(ts))):
        t = torch.full((rows,), int(ts[i]), dtype=torch.long, device=device)
        with torch.no_grad(), autocast():
            out = model(x_t, t)
        with torch.no_grad():
            _, x_hat = base.eps_and_xstart(out.float()[:, : shape[0]], x_t, t)
        if clip_x0:
            x_hat = x_hat.clamp(-1.0, 1.0)
        s2 = (1.0 - abar[i]) / abar[i]
        r2 = lam * s2 / (lam + s2)  # [C,N,N]
        if x0 is None or likelihood is None:
            x0 = x_hat + r2.sqrt() * randn_rows(generators, shape, device)
        if likelihood is not None and cg > 0:
            if res_shape is None:
                with torch.no_grad():
                    res_shape = tuple(likelihood.residual(x0).shape[1:])
            xi_y = randn_rows(generators, res_shape, device)
            xi_x = randn_rows(generators, shape, device)
            x0 = perturbed_gauss_newton(likelihood, x0, x_hat, 1.0 / r2, xi_y, xi_x, cg)
        if likelihood is not None and inner > 0:
            noise = randn_rows(generators, (inner, *shape), device).transpose(0, 1)
            uniforms = rand_rows(generators, inner, device)
            x0, acc = mala_chain(likelihood, x0, x_hat, 1.0 / r2, step, noise, uniforms)
            step = adapt_step(step, acc)
            acc_log.append(float(acc.mean()))
        if i > 0:
            a_next = float(abar[i - 1])
            x_t = a_next**0.5 * x0 + (1 - a_next) ** 0.5 * randn_rows(generators, shape, device)
        if callback is not None:
            callback(i, x0)
    if diagnostics is not None:
        diagnostics["acceptance"] = acc_log
        diagnostics["step"] = step.detach().cpu().numpy()
    return x0.clamp(-1.0, 1.0) if clip_x0 and clip_data_step else x0.detach()
