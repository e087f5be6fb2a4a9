"""Data-consistency steps on Tweedie's estimate, inside the ancestral sampler of ``dps``.

References: DDS, Chung, Lee & Ye 2024 ("Decomposed diffusion sampling for accelerating
large-scale inverse problems", ICLR 2024: a few CG steps on x̂0 under the forward operator,
then re-noise); the likelihood step of DAPS (Zhang et al. 2024, arXiv 2407.01521) and PnP-DM
(Wu et al. 2024, arXiv 2405.18782). Written from the papers; no code copied.

One reverse step at spaced index i (rows r = o*S + k, ``sampling.rows``), no gradient through the
network:

    x̂0  = x̂0(x_t)                                   one network forward pass
    x̂0' = argmin_x ½‖r(x)‖² + ½‖(x − x̂0)/r_i‖²       Gauss-Newton at x̂0, ``cg`` PCG iterations
    x_{t−1} = coef1_i x̂0' + coef2_i x_t + σ_i z         (the prior's own reverse step)

r(x): the object's whitened residual (own operator, per-pixel variance, mask, profiled α, β:
``likelihood.OperatorLikelihood``); r_i² = λ s_i² / (λ + s_i²), s_i² = (1 − ᾱ_i)/ᾱ_i, λ the prior's
pixel variance (``stats_var``): the variance of p(x0 | x_t) for a per-pixel Gaussian prior,
so the weight of the data against x̂0 comes from the data's own noise and the prior, with no
step size to tune per object. Bright objects (data curvature 10⁴-10⁵ × the prior's) are
pulled onto the data as far as their S/N allows; faint ones barely move. As t → 0, r_i → 0
and the last steps leave x̂0 alone: the final sample is the network's denoised state.

``randomize=True`` (perturb-and-optimise, ``likelihood.perturbed_gauss_newton``): x̂0' is a
draw of N(x̂0, r_i²)·p(y | x) instead of its mode. For a Gaussian prior and a linear operator,
that is an exact draw of p(x0 | x_t, y), and the step above an exact draw of
p(x_{t−1} | x_t, y): the sampler is exact (tests/sampling/test_dds.py). The mode (False)
drops the p(x0 | x_t, y) variance from each step, like DDS.

``gauss_newton`` > 1: the perturbed objective is minimised by that many Gauss-Newton
iterations, each re-linearised at the last iterate and safeguarded by backtracking (the step
halved up to ``BACKTRACK`` times until the objective falls). The asinh stretch makes the
residual strongly non-linear in bright pixels (v ∝ e^{x·asinh(1/a)/2}: a step of 0.1 in x is
~30 % in flux), so one linearisation leaves bright objects off their data, and an undamped
second one overshoots. On draws of the demo prior itself observed at i = 18 (S/N ~900;
``validation.prior_truth``, where the prior cannot be blamed) the posterior mean's χ²/dof
is 4.1-4.7 with one linearisation and 1.7-2.0 with three; 30 CG iterations in one
linearisation reach 1.8-2.1 at about the same cost (docs/HISTORY.md, 2026-12-03).

``clip_data_step`` (the clip after the data step). ``clip_x0`` clips the network's x̂0 to
the prior's range [−1, 1]; clipping x̂0' as well was the only behaviour before 2026-12-03.
It is not part of the derivation above, and it is biased where the data want what the
prior's range excludes. In empty sky the demo network's x̂0 sits at x ≈ −0.99 (a trace of
positive flux), and noise makes about half the pixels the data want lie below −1 (negative
flux). Clipped, those are pinned at zero flux: a positive pedestal inside the model
footprint that the background β, one constant over the whole stamp, cannot absorb. On the
GalSim galaxy of the magnitude experiment at i = 18 (S/N ~950) the per-sample χ²/dof of x̂0'
at the last step was 2.2 unclipped and 4.9 clipped. Unclipped, the sample keeps the negative-flux sky
pixels that its noise implies, as any linear deconvolution does (docs/HISTORY.md,
2026-12-03 "the clip after the data step").

Cost per sample: ``steps`` network forward passes (DPS: forward + backward) plus
``steps · gauss_newton · (2·cg + 2)`` operator passes (and up to ``BACKTRACK + 2`` residual
evaluations per Gauss-Newton iteration when ``gauss_newton`` > 1). Randomness: the perturbations of row (o, k) come from
its own generator (``rows.row_generators``), before that step's z.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from d4a_batch.prior.artifact import Prior
from d4a_batch.sampling.dps import dps_sample
from d4a_batch.sampling.likelihood import VAR_FLOOR, perturbed_gauss_newton
from d4a_batch.sampling.rows import ConsistencyFn, StepCallback, randn_rows

BACKTRACK = 3  # step halvings tried per Gauss-Newton iteration (t = 1, ½, ¼, ⅛, else 0)


def tweedie_variance(prior_var: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """r² = λ s² / (λ + s²), s² = (1 − ᾱ)/ᾱ: Var[x0 | x_t] of a per-pixel Gaussian prior λ [C,N,N]."""
    s2 = (1.0 - alpha_bar) / alpha_bar
    lam = prior_var.clamp_min(VAR_FLOOR)
    return lam * s2 / (lam + s2)


def consistency_step(
    prior: Prior,
    likelihood,
    steps: int,
    cg: int,
    generators: Sequence[torch.Generator] | None = None,
    prior_var: torch.Tensor | None = None,
    gauss_newton: int = 1,
    refine_cg: int = 0,
    gauss_newton_tol: float = 0.0,
) -> ConsistencyFn:
    """The data-consistency map ``(i, x̂0[R,C,N,N]) -> x̂0'`` of the sampler with ``steps`` steps.

    ``likelihood``: ``likelihood.OperatorLikelihood`` or ``likelihood.ResidualLikelihood`` (row r of the
    residual depends on row r only). ``cg``: PCG iterations of the Gauss-Newton system.
    ``generators`` (one per row): randomise the step (see the module docstring); None: the mode.
    ``prior_var[C,N,N]``: λ (default ``prior.stats_var``). ``gauss_newton``: Gauss-Newton
    iterations on the same perturbed objective (re-linearised at each iterate; with more than
    one, every step is safeguarded by backtracking, ``likelihood.perturbed_gauss_newton``).
    ``refine_cg``: CG iterations of the Gauss-Newton iterations after the first (0: ``cg``).
    ``gauss_newton_tol`` > 0: a row whose Gauss-Newton iteration lowered its perturbed
    objective by less than this fraction of it takes no more; the later iterations run on
    the other rows only (``likelihood.select``; a likelihood without it runs every row).
    Which rows stop depends on each row's own objective only, never on its batch mates.
    """
    if gauss_newton < 1:
        raise ValueError(f"consistency_step: gauss_newton must be >= 1, got {gauss_newton}")
    cfg = prior.config
    device = prior.device
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    lam = (prior.stats_var if prior_var is None else prior_var).to(device, torch.float32)
    if tuple(lam.shape) != shape:
        raise ValueError(f"consistency_step: prior_var must be {shape}, got {tuple(lam.shape)}")
    alpha_bar = np.asarray(prior.spaced(steps).alphas_cumprod, dtype=np.float64)
    zero = torch.zeros((), device=device)
    res_shape: list[tuple[int, ...]] = []

    def step(i: int, x_hat: torch.Tensor) -> torch.Tensor:
        if cg <= 0:
            return x_hat
        inv_r2 = 1.0 / tweedie_variance(lam, float(alpha_bar[i]))
        xi_y = xi_x = zero
        if generators is not None:
            if not res_shape:
                res_shape.append(tuple(likelihood.residual(x_hat).shape[1:]))
            xi_y = randn_rows(generators, res_shape[0], device)
            xi_x = randn_rows(generators, shape, device)
        if gauss_newton == 1:
            return perturbed_gauss_newton(likelihood, x_hat, x_hat, inv_r2, xi_y, xi_x, cg)
        adaptive = gauss_newton_tol > 0 and hasattr(likelihood, "select")
        x, active = x_hat, None  # active: the rows still iterating (None: all)
        for k in range(gauss_newton):
            iters = cg if k == 0 or refine_cg <= 0 else refine_cg
            if active is None:
                lik, sub = likelihood, (x, x_hat, xi_y, xi_x)
            else:
                lik = likelihood.select(active)
                sub = tuple(t[active] if t.ndim else t for t in (x, x_hat, xi_y, xi_x))
            out, f0, f1 = perturbed_gauss_newton(
                lik, sub[0], sub[1], inv_r2, sub[2], sub[3], iters, BACKTRACK, objective=True
            )
            x = out if active is None else x.index_copy(0, active, out)
            if not adaptive or k + 1 == gauss_newton:
                continue
            going = torch.isfinite(f0) & (f0 - f1 >= gauss_newton_tol * f0.abs())
            if bool(going.all()):
                continue
            keep = torch.nonzero(going).flatten()
            active = keep if active is None else active[keep]
            if active.numel() == 0:
                break
        return x

    return step


def dds_sample(
    prior: Prior,
    likelihood,
    generators: Sequence[torch.Generator],
    *,
    steps: int,
    cg: int,
    randomize: bool = True,
    clip_x0: bool = True,
    prior_var: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    gauss_newton: int = 1,
    clip_data_step: bool = True,
    refine_cg: int = 0,
    gauss_newton_tol: float = 0.0,
    network_precision: str = "auto",
) -> torch.Tensor:
    """Posterior samples x0[R,C,N,N] (float32, on the prior's device, detached).

    The ancestral sampler of ``dps.dps_sample`` with no guidance gradient and the
    data-consistency step of ``consistency_step`` on x̂0 at every step (module docstring).
    ``randomize``: x̂0' is a draw (re-noised with the q-posterior variance: exact for a
    Gaussian prior and a linear residual), else the mode (re-noised as the prior samples).
    ``likelihood`` None samples the prior. ``clip_x0`` clips the network's x̂0 to [−1, 1];
    ``clip_data_step`` clips x̂0' (and so the sample) too (module docstring). ``refine_cg``,
    ``gauss_newton_tol``: ``consistency_step``; ``network_precision``: ``rows.network_autocast``.
    """
    consistency = None
    if likelihood is not None:
        gens = generators if randomize else None
        consistency = consistency_step(
            prior, likelihood, steps, cg, gens, prior_var, gauss_newton, refine_cg,
            gauss_newton_tol,
        )  # fmt: skip
    return dps_sample(
        prior,
        None,
        generators,
        steps=steps,
        guidance=0.0,
        clip_x0=clip_x0,
        callback=callback,
        consistency=consistency,
        posterior_variance=randomize and consistency is not None,
        clip_consistent=clip_data_step,
        network_precision=network_precision,
    )
