"""Annealed decoupled posterior sampling (DAPS-style) without gradients through the network.

References: DAPS, Zhang et al. 2024 ("Improving diffusion inverse problem solving with
decoupled noise annealing", arXiv 2407.01521); split Gibbs / PnP-DM, Wu et al. 2024
("Principled probabilistic imaging using diffusion models as plug-and-play priors",
arXiv 2405.18782). Written from the papers; no code copied.

Rows: object o, sample k -> row ``r = o*S + k`` (as in ``dps``). Levels: K original
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
products through the operator only (``perturbed_gauss_newton``): for a linear residual
and enough iterations it is an exact draw of π_t however ill-conditioned (bright objects:
data curvature 10⁴-10⁵ x the prior's); CG needs ~√(condition number) iterations where
Langevin needs ~condition number steps.

Likelihood step, part 2 (MALA, ``inner`` steps per level, exact for π_t): U(x) = ½‖r(x)‖² + ½‖(x − x̂0)/r_t‖²,
proposal x' = x − h P∇U + √(2h) P^½ ξ with a diagonal preconditioner P = 1/D fixed per
level, D = (J_GNᵀ W J_GN) 𝟙 + 1/r_t² -- the Gauss-Newton curvature row sums at the chain's
start (α held fixed; J_GN = α PSF ⊛ R · diag(v'(x)) is non-negative, so D⁻¹H has spectral
radius ≤ 1: the step follows each row's curvature, which spans 10⁵ between bright and
faint objects and 10⁴ across one image through the asinh stretch). Computed with one
forward and one adjoint pass of the operator (``OperatorLikelihood``), or a JVP + VJP of a
generic residual (``ResidualLikelihood``). Metropolis-Hastings accepts per row; each row's
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

from collections.abc import Callable, Sequence

import numpy as np
import torch

from d4a_batch.physics.operator import (
    ForwardOperator,
    ObservationBatch,
    whitened_residual,
)
from d4a_batch.prior.artifact import Prior
from d4a_batch.sampling.dps import network_autocast, randn_rows

TARGET_ACCEPT = 0.6
STEP_INIT = 0.1  # MALA step h in preconditioned units (D⁻¹H has spectral radius ≤ 1)
STEP_RANGE = (1e-4, 2.0)
VAR_FLOOR = 1e-6  # floor on the prior pixel variance λ (x-space)

StepCallback = Callable[[int, torch.Tensor], None]


# --------------------------------------------------------------------------- likelihoods
class ResidualLikelihood:
    """-log p(y|x) = ½‖r(x)‖² for a row-wise whitened residual ``residual_fn(x[R,...]) -> r[R,...]``.

    The curvature row sums |Jᵀ(J 𝟙)| come from a JVP and a VJP of ``residual_fn`` (exact
    Gauss-Newton row sums when J ≥ 0, e.g. a blur).
    """

    def __init__(self, residual_fn: Callable[[torch.Tensor], torch.Tensor]):
        self.residual_fn = residual_fn

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual_fn(x)

    def linearize(self, x: torch.Tensor):
        """(r(x), v ↦ J v, u ↦ Jᵀu) at x (JVP by forward-mode AD, VJP by a kept graph)."""
        x = x.detach()
        r0, vjp_fn = torch.func.vjp(self.residual_fn, x)

        def jvp(v: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(self.residual_fn, (x,), (v,))[1].detach()

        return r0.detach(), jvp, lambda u: vjp_fn(u)[0].detach()

    def curvature_rowsum(self, x: torch.Tensor) -> torch.Tensor:
        _, jvp, vjp = self.linearize(x)
        return vjp(jvp(torch.ones_like(x))).abs()


class OperatorLikelihood:
    """The HSC likelihood of ``rows``: r = √w (y − α A(x) − β), α, β profiled (``whitened_residual``).

    Curvature row sums, Gauss-Newton with α fixed at its value at x:
    D = α² v'(x) ⊙ Aᵀ_lin(w ⊙ A_lin(v'(x)))  [R,C,N,N], all terms ≥ 0.
    """

    def __init__(self, rows: ObservationBatch, op: ForwardOperator, ridge: float):
        self.rows, self.op, self.ridge = rows, op, ridge
        self.weight = rows.weight()

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return whitened_residual(x, self.rows, self.op, self.ridge)[0]

    def select(self, rows: torch.Tensor) -> OperatorLikelihood:
        """The likelihood of rows ``rows`` (an index tensor [K]) only."""
        return OperatorLikelihood(self.rows.select(rows), self.op.select(rows), self.ridge)

    def _dv(self, x: torch.Tensor) -> torch.Tensor:
        """dv/dx of the inverse stretch v(x) = a sinh((x + 1) s/2), s = asinh(1/a)."""
        s = float(np.arcsinh(1.0 / self.op.stretch_a))
        return self.op.stretch_a * torch.cosh((x + 1) * (s / 2)) * (s / 2)

    @torch.no_grad()
    def linearize(self, x: torch.Tensor):
        """(r(x), v ↦ J v, u ↦ Jᵀu) at x, α and β profiled (the exact Jacobian of ``residual``).

        J = J_m · A_lin · diag(v'(x)): one operator pass per product; J_m, the Jacobian of
        the profiled residual in the model stamp m = A(x), in closed form
        (``profiled_residual_jacobian``).
        """
        m = self.op(x)
        dv = self._dv(x)
        r0, jm, jm_t = profiled_residual_jacobian(
            m, self.rows.masked_image(), self.weight, self.ridge
        )
        shape = tuple(x.shape[-2:])
        return (
            r0,
            lambda v: jm(self.op.linear(dv * v)),
            lambda u: dv * self.op.adjoint(jm_t(u), shape),
        )

    @torch.no_grad()
    def curvature_rowsum(self, x: torch.Tensor) -> torch.Tensor:
        _, alpha, _ = whitened_residual(x, self.rows, self.op, self.ridge)
        dv = self._dv(x)
        back = self.op.adjoint(self.weight * self.op.linear(dv), tuple(x.shape[-2:]))
        return (alpha[..., None, None] ** 2) * dv * back


def profiled_residual_jacobian(m: torch.Tensor, y: torch.Tensor, w: torch.Tensor, ridge: float):
    """r(m) = √w (y − α(m) m − β(m)) with α, β profiled (``profile_amplitude``), linearised.

    m, y, w [R,C,H,W]. In the weighted-centred basis (m̃ = m − m̄, ỹ = y − ȳ):
    r = √w (ỹ − α m̃), α = c_my / ((1 + ε) c_mm + ε W), so
    dα = Σ g dm with g = w (ỹ − 2 α (1 + ε) m̃) / den (0 where α is clamped at 0) and
    J_m dm = −√w (dα m̃ + α (dm − d̄m)),  J_mᵀ u = −g Σ(√w u m̃) − α √w u + α w Σ(√w u) / W.
    Returns (r(m), dm ↦ J_m dm, u ↦ J_mᵀ u); sums are per row and band.
    """
    dims = (-2, -1)
    w_sum = w.sum(dims, keepdim=True)
    safe_w = torch.where(w_sum > 0, w_sum, torch.ones_like(w_sum))
    mt = m - (w * m).sum(dims, keepdim=True) / safe_w
    yt = y - (w * y).sum(dims, keepdim=True) / safe_w
    c_mm = (w * mt * mt).sum(dims, keepdim=True)
    c_my = (w * mt * yt).sum(dims, keepdim=True)
    den = c_mm + ridge * (c_mm + w_sum)
    safe_den = torch.where(den > 0, den, torch.ones_like(den))
    alpha_raw = c_my / safe_den
    alpha = alpha_raw.clamp(min=0.0)
    sw = w.sqrt()
    r0 = sw * (yt - alpha * mt)
    free = (alpha_raw > 0) & (den > 0)
    g = torch.where(free, w * (yt - 2 * alpha * (1 + ridge) * mt) / safe_den, 0.0)

    def jvp(dm: torch.Tensor) -> torch.Tensor:
        d_alpha = (g * dm).sum(dims, keepdim=True)
        dm_bar = (w * dm).sum(dims, keepdim=True) / safe_w
        return -sw * (d_alpha * mt + alpha * (dm - dm_bar))

    def vjp(u: torch.Tensor) -> torch.Tensor:
        su = sw * u
        return (
            -g * (su * mt).sum(dims, keepdim=True)
            - alpha * su
            + alpha * w * su.sum(dims, keepdim=True) / safe_w
        )

    return r0, jvp, vjp


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


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1)


def perturbed_gauss_newton(
    lik,
    x: torch.Tensor,
    center: torch.Tensor,
    inv_r2: torch.Tensor,
    xi_y: torch.Tensor,
    xi_x: torch.Tensor,
    iterations: int,
    backtrack: int = 0,
    objective: bool = False,
    trace: list | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One perturb-and-optimise Gauss-Newton step, solved by preconditioned CG per row.

    Minimises ½‖r(x) + Jδ + ξ_y‖² + ½‖(x + δ − center)/r − ξ_x‖² over δ (J: the Jacobian of
    the residual at x, by JVP/VJP), i.e. (JᵀJ + 1/r²) δ = −Jᵀ(r(x) + ξ_y) − (x − center)/r² + ξ_x/r,
    with ``iterations`` CG steps preconditioned by the curvature row sums. For a linear
    residual the exact solution is an exact draw of π (randomise-then-optimise), whatever
    the conditioning; CG converges in ~√(condition number) iterations where Langevin needs
    ~condition number steps. x, center, xi_x [R,C,N,N]; xi_y like r(x). Returns x + t·δ.

    ``backtrack`` > 0 safeguards the step for a non-linear residual (the asinh stretch: a
    step of 0.1 in x changes a bright pixel's flux by ~30 %, far outside the linear model):
    per row, t is the largest of 1, ½, …, 2^−backtrack whose step lowers the perturbed
    objective F(x) = ½‖r(x) + ξ_y‖² + ½‖(x − center)/r − ξ_x‖², else 0 (the row stays at x).
    For a linear residual F equals its quadratic model, which every CG iterate lowers, so
    t = 1 and the draw stays exact. Costs one residual evaluation per trial (``perturbed_objective``).

    ``objective``: return (x + t·δ, F(x)[R], F(x + t·δ)[R]) (F as above; with ``backtrack``
    they come from the backtracking's own evaluations, else at the cost of two more).
    ``trace`` (a list): gets, per CG iteration, the preconditioned residual norm relative to
    the start, √(rᵀM⁻¹r / r₀ᵀM⁻¹r₀) per row [R] (``jobs/profile_sampler.py --cg-trace``).
    """
    x = x.detach()
    r0, jvp, vjp = lik.linearize(x)

    def hess(v: torch.Tensor) -> torch.Tensor:
        return vjp(jvp(v)) + inv_r2 * v

    with torch.no_grad():
        d = lik.curvature_rowsum(x) + inv_r2
        m_inv = torch.where(torch.isfinite(d) & (d > 0), 1.0 / d, 1.0 / inv_r2.expand_as(d))
    b = (-vjp(r0 + xi_y) - (x - center) * inv_r2 + xi_x * inv_r2.sqrt()).detach()
    delta = torch.zeros_like(x)
    res = b
    z = m_inv * res
    p = z
    rz = _rowdot(res, z)
    rz0 = rz
    shape = (-1, *([1] * (x.ndim - 1)))
    for _ in range(iterations):
        ap = hess(p)
        pap = _rowdot(p, ap)
        a = torch.where(pap > 0, rz / torch.where(pap > 0, pap, 1.0), 0.0).reshape(shape)
        delta = delta + a * p
        res = res - a * ap
        z = m_inv * res
        rz_new = _rowdot(res, z)
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, 1.0), 0.0).reshape(shape)
        p = z + beta * p
        rz = rz_new
        if trace is not None:
            trace.append((rz / torch.where(rz0 > 0, rz0, 1.0)).clamp_min(0).sqrt())
    if backtrack > 0:
        out, f0, f1 = _backtrack(lik, x, delta, center, inv_r2, xi_y, xi_x, backtrack, r0)
        return (out, f0, f1) if objective else out
    out = x + delta
    out = torch.where(torch.isfinite(out), out, x)
    if not objective:
        return out
    f0 = perturbed_objective(lik, x, center, inv_r2, xi_y, xi_x, r0.detach())
    return out, f0, perturbed_objective(lik, out, center, inv_r2, xi_y, xi_x)


def perturbed_objective(
    lik,
    x: torch.Tensor,
    center: torch.Tensor,
    inv_r2: torch.Tensor,
    xi_y: torch.Tensor,
    xi_x: torch.Tensor,
    r: torch.Tensor | None = None,
) -> torch.Tensor:
    """F[R] = ½‖r(x) + ξ_y‖² + ½‖(x − center)/r − ξ_x‖² per row (``r``: r(x) if known);
    +inf where not finite."""
    with torch.no_grad():
        res = lik.residual(x) if r is None else r
        f = 0.5 * (res + xi_y).pow(2).flatten(1).sum(1)
        f = f + 0.5 * ((x - center) * inv_r2.sqrt() - xi_x).pow(2).flatten(1).sum(1)
    return torch.where(torch.isfinite(f), f, torch.full_like(f, float("inf")))


def _backtrack(lik, x, delta, center, inv_r2, xi_y, xi_x, halvings: int, r0):
    """(x + t·δ, F(x), F(x + t·δ)) per row, t the largest of 1, ½, … (``halvings`` halvings)
    that lowers F, else 0 (then F(x + t·δ) = F(x))."""
    shape = (-1, *([1] * (x.ndim - 1)))
    f0 = perturbed_objective(lik, x, center, inv_r2, xi_y, xi_x, r0.detach())
    t = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    f_at = f0.clone()
    todo = torch.ones_like(t, dtype=torch.bool)
    trial = 1.0
    for _ in range(halvings + 1):
        f = perturbed_objective(lik, x + trial * delta, center, inv_r2, xi_y, xi_x)
        ok = todo & (f < f0)
        t = torch.where(ok, torch.full_like(t, trial), t)
        f_at = torch.where(ok, f, f_at)
        todo = todo & ~ok
        if not bool(todo.any()):
            break
        trial *= 0.5
    out = x + t.reshape(shape) * delta
    return torch.where(torch.isfinite(out), out, x), f0, f_at


def adapt_step(step: torch.Tensor, acceptance: torch.Tensor) -> torch.Tensor:
    """Per row: h · exp(2 (acceptance − TARGET_ACCEPT)), clamped to ``STEP_RANGE``."""
    return (step * torch.exp(2.0 * (acceptance - TARGET_ACCEPT))).clamp(*STEP_RANGE)


def rand_rows(generators: Sequence[torch.Generator], n: int, device) -> torch.Tensor:
    """Uniforms [n, R] in (0, 1), column r from ``generators[r]``."""
    out = torch.empty((len(generators), n), device=device, dtype=torch.float32)
    for r, g in enumerate(generators):
        out[r].uniform_(generator=g)
    return out.T.clamp_min(1e-12)


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

    ``likelihood``: ``OperatorLikelihood``, ``ResidualLikelihood`` or anything with
    ``residual(x) -> r[R,...]`` (row r depends on row r only) and
    ``curvature_rowsum(x) -> [R,C,N,N]`` (≥ 0); None samples the prior (then π_t is
    N(x̂0, r_t²), drawn exactly). ``levels``: annealing levels (respaced timesteps of the
    prior's diffusion; network calls per sample); ``inner``: MALA steps per level.
    ``prior_var[C,N,N]``: λ (default ``prior.stats_var``). ``callback(i, x0)`` after each
    level (i counts down to 0). ``diagnostics`` (a dict) receives the mean acceptance per
    level and the final per-row step sizes. ``clip_x0`` clips the network's x̂0 to [−1, 1];
    ``clip_data_step`` clips the returned sample too (the likelihood steps are never clipped
    between levels). ``network_precision``: ``dps.network_autocast``.
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
