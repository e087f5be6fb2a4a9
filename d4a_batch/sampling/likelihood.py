"""The data step shared by ``dds`` and ``daps``: likelihoods and the perturbed Gauss-Newton step.

Likelihoods of rows r = o*S + k (``rows``), each with ``residual(x) -> r[R,...]`` (row r
depends on row r only), ``linearize(x) -> (r(x), v ↦ J v, u ↦ Jᵀu)`` and
``curvature_rowsum(x) -> [R,C,N,N]`` (≥ 0): ``OperatorLikelihood`` (the physics likelihood
of an ``ObservationBatch``, α and β profiled, closed-form Jacobian) and
``ResidualLikelihood`` (any row-wise whitened residual, by JVP/VJP).

``perturbed_gauss_newton``: one perturb-and-optimise (randomise-then-optimise) Gauss-Newton
step on ½‖r(x) + ξ_y‖² + ½‖(x − x̂0)/r − ξ_x‖², solved by preconditioned CG with JVP/VJP
products through the operator only: for a linear residual and enough iterations it is an
exact draw of N(x̂0, r²)·p(y | x) however ill-conditioned (bright objects: data curvature
10⁴-10⁵ x the prior's); CG needs ~√(condition number) iterations where Langevin needs
~condition number steps. ``perturbed_objective`` evaluates that objective per row.

Moved here from ``daps.py`` (issue 32) so that neither algorithm imports the other.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from d4a_batch.physics.operator import (
    ForwardOperator,
    ObservationBatch,
    whitened_residual,
)

VAR_FLOOR = 1e-6  # floor on the prior pixel variance λ (x-space)


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


# --------------------------------------------------------------------------- Gauss-Newton
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

    ``objective`` (with ``backtrack`` > 0): return (x + t·δ, F(x)[R], F(x + t·δ)[R]), F as
    above, from the backtracking's own evaluations.
    ``trace`` (a list): gets, per CG iteration, the preconditioned residual norm relative to
    the start, √(rᵀM⁻¹r / r₀ᵀM⁻¹r₀) per row [R] (``jobs/profile_sampler.py --cg-trace``).
    """
    if objective and backtrack <= 0:
        raise ValueError("perturbed_gauss_newton: objective needs backtrack > 0")
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
    return torch.where(torch.isfinite(out), out, x)


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
