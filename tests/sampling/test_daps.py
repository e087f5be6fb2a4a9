"""The DAPS sampler: exact Gaussian posteriors, the closed-form Jacobian, seeds, the physics path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d4a_batch.config import SamplerConfig
from d4a_batch.physics.operator import (
    ForwardOperator,
    model_pixel_scale,
    profile_amplitude,
    whitened_residual,
)
from d4a_batch.physics.stretch import inverse_stretch
from d4a_batch.sampling.daps import daps_sample
from d4a_batch.sampling.deconvolve import deconvolve
from d4a_batch.sampling.dps import dps_sample
from d4a_batch.sampling.likelihood import (
    OperatorLikelihood,
    ResidualLikelihood,
    profiled_residual_jacobian,
)
from d4a_batch.sampling.rows import row_generators
from tests.sampling.conftest import (
    assert_matches_gaussian_posterior,
    galaxy_prior,
    gaussian_prior,
    observe,
)
from tests.sampling.test_dps import _blur_matrix, _stamps

N = 8


def _linear_gaussian(sigma: float):
    """y = A x + n, x ~ N(-0.3, 0.04 I): prior, residual_fn and the exact posterior."""
    rng = np.random.default_rng(0)
    prior = gaussian_prior(torch.full((1, N, N), -0.3), torch.full((1, N, N), 0.04))
    mu, s2 = np.full(N * N, -0.3), np.full(N * N, 0.04)
    a = _blur_matrix(N, 1.0)
    truth = mu + np.sqrt(s2) * rng.standard_normal(N * N)
    y = a @ truth + sigma * rng.standard_normal(N * N)
    cov = np.linalg.inv(np.diag(1 / s2) + a.T @ a / sigma**2)
    m_post = cov @ (mu / s2 + a.T @ y / sigma**2)
    a_t, y_t = torch.tensor(a, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)

    def residual(x0: torch.Tensor) -> torch.Tensor:
        return (y_t - x0.reshape(x0.shape[0], -1) @ a_t.T) / sigma

    return prior, residual, m_post, cov


@pytest.mark.parametrize(
    ("sigma", "levels", "inner", "cg"), [(0.02, 20, 5, 10), (0.002, 20, 5, 40)]
)
def test_samples_match_the_exact_linear_gaussian_posterior(sigma, levels, inner, cg):
    """Per pixel: the sample mean within 5 Monte-Carlo sd of the exact posterior mean, and the
    sample variance within 35 % of the exact variance (400 samples: sd of one pixel's ratio
    0.07). σ = 0.002 makes the posterior 10⁴-fold ill-conditioned (data vs prior)."""
    prior, residual, m_post, cov = _linear_gaussian(sigma)
    s = 400
    diag: dict = {}
    x = daps_sample(
        prior, ResidualLikelihood(residual), row_generators(0, [1], s), levels=levels,
        inner=inner, cg=cg, clip_x0=False, diagnostics=diag,
    )  # fmt: skip
    x = x.reshape(s, -1).double().numpy()
    print(f"\n[daps] acceptance at the last levels {diag['acceptance'][-5:]}")
    assert_matches_gaussian_posterior(x, m_post, cov, f"daps, linear-Gaussian sigma={sigma}")
    assert 0.3 < np.mean(diag["acceptance"][2:]) < 0.95


def test_without_likelihood_it_samples_the_prior():
    prior = gaussian_prior(
        torch.linspace(-0.5, 0.3, N * N).reshape(1, N, N), torch.full((1, N, N), 0.25)
    )
    s = 400
    x = daps_sample(prior, None, row_generators(0, [1], s), levels=30, inner=0, clip_x0=False)
    x = x.reshape(s, -1).double().numpy()
    mu, var = prior.stats_mean.reshape(-1).numpy(), prior.stats_var.reshape(-1).numpy()
    z = (x.mean(0) - mu) / np.sqrt(var / s)
    assert np.abs(z).max() < 5
    assert abs((x.var(0, ddof=1) / var).mean() - 1) < 0.05


def test_profiled_jacobian_matches_autograd():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(3, 2, 10, 10, generator=g, dtype=torch.float64)
    y = 3 * m + 0.5 + 0.1 * torch.randn(m.shape, generator=g, dtype=torch.float64)
    w = torch.rand(m.shape, generator=g, dtype=torch.float64)
    w[0, 0, :3] = 0  # masked pixels
    w[1, 1] = 0  # a band without valid pixels
    y[2, 1] = -y[2, 1]  # anti-correlated: alpha clamped at 0

    def r_of_m(m_):
        a, b = profile_amplitude(m_, y, w, 1e-6)
        return w.sqrt() * (y - a[..., None, None] * m_ - b[..., None, None])

    r0, jvp, vjp = profiled_residual_jacobian(m, y, w, 1e-6)
    v = torch.randn(m.shape, generator=g, dtype=torch.float64)
    u = torch.randn(m.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(r0, r_of_m(m))
    torch.testing.assert_close(jvp(v), torch.func.jvp(r_of_m, (m,), (v,))[1])
    torch.testing.assert_close(vjp(u), torch.func.vjp(r_of_m, m)[1](u)[0])


def test_operator_likelihood_jacobian_is_the_residual_jacobian(rng):
    """J v and Jᵀu of the physics likelihood against autograd through the real operator,
    the adjoint identity <J v, u> = <v, Jᵀ u>, and the row-sum preconditioner bound:
    the Gauss-Newton Hessian scaled by its row sums has spectral radius <= 1."""
    prior = galaxy_prior(n=8, bands=2)
    x_true = torch.as_tensor(rng.uniform(-1, 0.5, (2, 8, 8)), dtype=torch.float32)
    obs, _ = observe(x_true, prior, 0.3, 500.0, 1.0, rng, stamp=16)
    obs = obs.to(dtype=torch.float64)
    scale = torch.as_tensor(model_pixel_scale(np.array([0.3]), prior.config))
    op = ForwardOperator.for_observations(obs, scale, prior.config.stretch.a)
    lik = OperatorLikelihood(obs, op, 1e-6)
    x = x_true[None].double() + 0.05
    r0, jvp, vjp = lik.linearize(x)
    v, u = torch.randn_like(x), torch.randn_like(r0)
    torch.testing.assert_close(r0, lik.residual(x))
    torch.testing.assert_close(jvp(v), torch.func.jvp(lik.residual, (x,), (v,))[1])
    torch.testing.assert_close(vjp(u), torch.func.vjp(lik.residual, x)[1](u)[0])
    assert torch.isclose((jvp(v) * u).sum(), (v * vjp(u)).sum(), rtol=1e-10)
    # Gauss-Newton (alpha fixed) Hessian as a dense matrix; its row sums bound its spectrum
    _, alpha, _ = whitened_residual(x, obs, op, 1e-6)
    d = lik.curvature_rowsum(x).reshape(-1)
    h = torch.stack(list(_gn_columns(lik, x, alpha)))
    assert float(h.min()) >= -1e-12 * float(h.max())
    torch.testing.assert_close(h.sum(0), d, rtol=1e-8, atol=1e-8 * float(d.abs().max()))
    scaled = h / torch.sqrt(d[:, None] * d[None, :])
    assert float(torch.linalg.eigvalsh(scaled).max()) <= 1 + 1e-8


def _gn_columns(lik: OperatorLikelihood, x: torch.Tensor, alpha: torch.Tensor):
    """Columns of H = α² diag(v') A_linᵀ W A_lin diag(v') (alpha fixed), one per pixel."""
    dv = lik._dv(x)
    shape = tuple(x.shape[-2:])
    a2 = alpha[..., None, None] ** 2
    for k in range(x.numel()):
        e = torch.zeros(x.numel(), dtype=x.dtype)
        e[k] = 1
        e = e.reshape(x.shape)
        col = a2 * dv * lik.op.adjoint(lik.weight * lik.op.linear(dv * e), shape)
        yield col.reshape(-1)


def test_samples_do_not_depend_on_the_batch(tiny_unet_prior, rng):
    obs = _stamps(3, rng)
    z = np.array([0.3, 0.4, 0.5])
    ids = np.array([5, 7, 9])
    cfg = SamplerConfig(sampler="daps", steps=4, samples=2, keep_samples=2, inner_steps=2,
                        cg_iterations=3)  # fmt: skip

    def run(order):
        sub = type(obs)(*(getattr(obs, f)[order] for f in obs.__dataclass_fields__))
        return deconvolve(sub, z[order], tiny_unet_prior, cfg, ids[order].tolist())

    alone = run([1]).samples_x[0]
    # float32 rounding differs with the batch (batched FFTs and matmuls accumulate in other
    # orders) and MALA's accept/reject can amplify it: measured 1.0e-4 at most; a batch mate
    # that truly leaked into a row would move it by far more
    np.testing.assert_allclose(run([1, 0, 2]).samples_x[0], alone, atol=5e-4)
    np.testing.assert_allclose(run([2, 0, 1]).samples_x[2], alone, atol=5e-4)
    assert np.abs(alone[0] - alone[1]).mean() > 0.01


@pytest.mark.slow
def test_bright_galaxy_fits_the_data_and_conserves_flux():
    """Real operator, Gaussian galaxy prior, alpha = 2·10⁴ (S/N ~ 10⁴): χ²/dof of the
    re-convolved mean near 1, flux within 1 %, mean closer to the truth than the prior mean."""
    prior = galaxy_prior(n=16, bands=2)
    truth = dps_sample(prior, None, row_generators(1, [0], 1), steps=100, guidance=0.0)[0]
    alpha = 2.0e4
    obs, _ = observe(truth, prior, 0.3, alpha, 1.0, np.random.default_rng(3))
    cfg = SamplerConfig(sampler="daps", steps=30, samples=8, cg_iterations=20)
    s = deconvolve(obs, [0.3], prior, cfg, [101])
    t = truth.numpy()
    true_flux = alpha * inverse_stretch(t).sum((1, 2))
    err = float(np.sqrt(np.mean((s.mean_x[0] - t) ** 2)))
    err_prior = float(np.sqrt(np.mean((prior.stats_mean.numpy() - t) ** 2)))
    print(f"\n[daps] bright: chi2 {s.chi2[0]:.2f}, rmse {err:.3f} (prior {err_prior:.3f}), "
          f"flux {s.flux[0].round(0)} (true {true_flux.round(0)})")  # fmt: skip
    assert s.chi2[0] < 1.5
    np.testing.assert_allclose(s.flux[0], true_flux, rtol=0.01)
    assert err < err_prior
