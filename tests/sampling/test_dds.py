"""The DDS sampler (data consistency on Tweedie's x̂0): exact Gaussian posteriors, seeds, fits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from d4a_batch.config import SamplerConfig
from d4a_batch.sampling.dds import dds_sample, tweedie_variance
from d4a_batch.sampling.deconvolve import deconvolve
from d4a_batch.sampling.dps import dps_sample
from d4a_batch.sampling.likelihood import (
    ResidualLikelihood,
    perturbed_gauss_newton,
    perturbed_objective,
)
from d4a_batch.sampling.rows import row_generators
from tests.sampling.conftest import (
    assert_matches_gaussian_posterior,
    galaxy_prior,
    gaussian_prior,
    observe,
)
from tests.sampling.test_daps import _linear_gaussian
from tests.sampling.test_dps import _stamps


@pytest.mark.parametrize(("sigma", "steps", "cg"), [(0.02, 30, 10), (0.002, 30, 64)])
def test_randomised_samples_match_the_exact_linear_gaussian_posterior(sigma, steps, cg):
    """y = A x + n, x ~ N(−0.3, 0.04 I): with the exact ε, every step draws p(x_{t−1} | x_t, y)
    exactly, so per pixel the sample mean is within 5 Monte-Carlo sd of the exact posterior
    mean and the variance within 35 % (400 samples: sd of one pixel's ratio 0.07).
    σ = 0.002 makes the posterior 10⁴-fold ill-conditioned (data vs prior): CG then needs
    all 64 iterations (40 left a bias of 5.8 Monte-Carlo sd in one pixel)."""
    prior, residual, m_post, cov = _linear_gaussian(sigma)
    s = 400
    x = dds_sample(
        prior, ResidualLikelihood(residual), row_generators(0, [1], s), steps=steps, cg=cg,
        clip_x0=False,
    )  # fmt: skip
    x = x.reshape(s, -1).double().numpy()
    assert_matches_gaussian_posterior(x, m_post, cov, f"dds, linear-Gaussian sigma={sigma}")


def test_gauss_newton_iterations_keep_the_linear_gaussian_posterior_exact():
    """With a linear residual the perturbed objective is its own quadratic model: the first
    Gauss-Newton iteration solves it (CG converged), backtracking accepts the full step, and
    the next iterations start at the optimum and stay there -- still an exact draw."""
    prior, residual, m_post, cov = _linear_gaussian(0.02)
    s = 400
    x = dds_sample(
        prior, ResidualLikelihood(residual), row_generators(0, [1], s), steps=30, cg=10,
        clip_x0=False, gauss_newton=2,
    )  # fmt: skip
    x = x.reshape(s, -1).double().numpy()
    assert_matches_gaussian_posterior(x, m_post, cov, "dds gauss_newton=2, linear-Gaussian")


def test_backtracking_keeps_a_nonlinear_step_from_raising_the_objective():
    """r(x) = (exp(4x) − exp(4x*))/σ, like a bright pixel seen through the inverse asinh stretch
    (v ∝ e^{x·asinh(1/a)/2}): from x far below x*, the Gauss-Newton step of the linearised
    residual overshoots (measured: F × 10³-10⁵ in every row); with backtracking F never rises,
    and a few iterations reach the perturbed optimum (F from ~10⁷ to ~20, ½‖ξ‖²'s scale)."""
    torch.manual_seed(0)
    rows, n = 6, 16
    target = torch.linspace(-0.2, 0.9, n).repeat(rows, 1)
    lik = ResidualLikelihood(lambda x: (torch.exp(4 * x) - torch.exp(4 * target)) / 0.01)
    x0 = target - 0.4 + 0.1 * torch.randn(rows, n)
    inv_r2 = torch.full((n,), 1 / 0.3**2)
    xi_y, xi_x = torch.randn(rows, n), torch.randn(rows, n)

    def f(x):
        return perturbed_objective(lik, x, x0, inv_r2, xi_y, xi_x)

    plain = perturbed_gauss_newton(lik, x0, x0, inv_r2, xi_y, xi_x, 10)
    assert bool((f(plain) > 100 * f(x0)).all()), "the test needs a step that overshoots"
    x, values = x0, [f(x0)]
    for _ in range(6):
        x = perturbed_gauss_newton(lik, x, x0, inv_r2, xi_y, xi_x, 10, backtrack=3)
        values.append(f(x))
    for before, after in itertools.pairwise(values):
        assert bool((after <= before).all())
    assert bool((values[-1] < 1e-4 * values[0]).all())
    assert bool((values[-1] < 2 * n).all())


def test_the_mode_variant_lands_near_the_posterior_mean():
    """randomize=False (DDS proper): not exact, but the sample mean lands near the exact
    posterior mean (measured: 0.10 of the prior-to-posterior gap; the variance then depends on
    the prior's own re-noising, 1.3x the exact one with this prior's β_t)."""
    prior, residual, m_post, cov = _linear_gaussian(0.02)
    s = 200
    x = dds_sample(
        prior, ResidualLikelihood(residual), row_generators(0, [1], s), steps=30, cg=10,
        randomize=False, clip_x0=False,
    )  # fmt: skip
    x = x.reshape(s, -1).double().numpy()
    bias = np.sqrt(np.mean((x.mean(0) - m_post) ** 2))
    prior_gap = np.sqrt(np.mean((-0.3 - m_post) ** 2))
    ratio = float(np.mean(x.var(0, ddof=1) / np.diag(cov)))
    print(f"\n[dds] mode: bias {bias:.4f} (prior gap {prior_gap:.4f}), var/exact {ratio:.2f}")
    assert bias < 0.2 * prior_gap
    assert 0.5 < ratio < 2.0


def test_without_likelihood_it_is_the_prior_sampler():
    prior = gaussian_prior(torch.zeros(1, 8, 8), torch.full((1, 8, 8), 0.25))
    gens = lambda: row_generators(0, [1, 2], 3)  # noqa: E731
    a = dds_sample(prior, None, gens(), steps=10, cg=5, clip_x0=False)
    b = dps_sample(prior, None, gens(), steps=10, guidance=0.0, clip_x0=False)
    assert torch.equal(a, b)


def test_tweedie_variance_limits():
    lam = torch.tensor([0.04, 1.0])
    np.testing.assert_allclose(tweedie_variance(lam, 1e-8).numpy(), lam.numpy(), rtol=1e-6)
    assert torch.all(tweedie_variance(lam, 1 - 1e-8) < 1.1e-8)


ADAPTIVE = {"gauss_newton": 3, "gauss_newton_tol": 0.2, "refine_cg_iterations": 2}


@pytest.mark.parametrize(
    ("randomize", "extra"),
    [(True, {}), (False, {}), (True, ADAPTIVE)],
    ids=["draw", "mode", "adaptive"],
)
def test_samples_do_not_depend_on_the_batch(tiny_unet_prior, rng, randomize, extra):
    """Object 7's samples through ``deconvolve`` (real UNet and operator): alone, first or
    last in a batch -> the same; another seed -> different. "adaptive": rows stop their
    Gauss-Newton iterations on their own objective, so batch mates that go on change nothing."""
    obs = _stamps(3, rng)
    z = np.array([0.3, 0.4, 0.5])
    ids = np.array([5, 7, 9])
    cfg = SamplerConfig(
        sampler="dds", steps=6, samples=3, keep_samples=3, cg_iterations=5,
        dds_randomize=randomize, **extra,
    )  # fmt: skip

    def run(order, config=cfg):
        sub = type(obs)(*(getattr(obs, f)[order] for f in obs.__dataclass_fields__))
        return deconvolve(sub, z[order], tiny_unet_prior, config, ids[order].tolist())

    alone = run([1]).samples_x[0]
    np.testing.assert_allclose(run([1, 0, 2]).samples_x[0], alone, atol=1e-4)
    np.testing.assert_allclose(run([2, 0, 1]).samples_x[2], alone, atol=1e-4)
    assert np.array_equal(run([1]).samples_x[0], alone)
    other_seed = run([1], SamplerConfig(**{**cfg.__dict__, "seed": 1})).samples_x[0]
    assert np.abs(other_seed - alone).mean() > 0.05
    assert np.abs(alone[0] - alone[1]).mean() > 0.05


@pytest.mark.slow
def test_bright_mock_fits_where_dps_underfits():
    """A bright mock (α = 2000, real operator, Gaussian-galaxy prior) at 25 steps: DPS
    (rms_total, ζ = 0.01) leaves χ²/dof well above 1 (3.6 measured), DDS fits it without
    fitting the noise (χ²/dof of the mean not far below 1)."""
    prior = galaxy_prior(n=16, bands=2)
    truth = dps_sample(prior, None, row_generators(1, [0], 1), steps=100, guidance=0.0)[0]
    obs, _ = observe(truth, prior, 0.3, 2000.0, 1.0, np.random.default_rng(3))
    chi2 = {}
    for name, kw in (("dps", {"sampler": "dps"}), ("dds", {"sampler": "dds", "cg_iterations": 10})):
        cfg = SamplerConfig(steps=25, samples=8, **kw)
        chi2[name] = float(deconvolve(obs, [0.3], prior, cfg, [3]).chi2[0])
    print(f"\n[dds] bright mock chi2/dof at 25 steps: {chi2}")
    assert chi2["dps"] > 2.0
    assert 0.7 < chi2["dds"] < 1.5


def test_only_clip_data_step_keeps_the_data_step_inside_the_prior_range():
    """A prior near the bottom of the range (x ≈ −0.9, like faint sky) and data that want
    x = −1.1 (negative flux, as noise in empty sky does; exact posterior −1.072 ± 0.019):
    ``clip_x0`` alone clips the network's x̂0, and the data step may leave [−1, 1]; with
    ``clip_data_step`` every step's x̂0' and the sample are clipped (the old sampler, which
    pins such pixels at −1). This Gaussian prior's own x̂0 ≈ x_t goes below −1 late in the
    chain, so here ``clip_x0`` still pulls the free sample up (measured mean −1.009); the
    demo network's x̂0 in empty sky stays near −0.99 (docs/HISTORY.md, 2026-12-03)."""
    prior = gaussian_prior(torch.full((1, 8, 8), -0.9), torch.full((1, 8, 8), 0.05**2))
    y = torch.full((1, 8, 8), -1.1)
    lik = ResidualLikelihood(lambda x: ((y - x) / 0.02).flatten(1))

    def run(**kw):
        return dds_sample(prior, lik, row_generators(0, [1], 16), steps=20, cg=10, **kw)

    clipped, free = run(clip_x0=True), run(clip_x0=True, clip_data_step=False)
    assert float(clipped.min()) >= -1.0
    assert float((free < -1.0).float().mean()) > 0.9
    unclipped = run(clip_x0=False)
    np.testing.assert_allclose(float(unclipped.mean()), -1.072, atol=0.01)
    assert torch.equal(unclipped, run(clip_x0=False, clip_data_step=False))


def test_rows_whose_objective_stops_falling_take_no_more_gauss_newton_iterations(
    tiny_unet_prior, rng, monkeypatch
):
    """``gauss_newton_tol``: after each Gauss-Newton iteration, the rows whose perturbed
    objective fell by less than that fraction leave; the next iteration runs on the others
    (a sliced operator, ``refine_cg_iterations`` CG steps). At 0 every row runs every one."""
    import d4a_batch.sampling.dds as dds

    calls: list[tuple[int, int, int]] = []  # (rows, CG iterations, rows that kept going)
    real = dds.perturbed_gauss_newton

    def counted(lik, x, center, inv_r2, xi_y, xi_x, iterations, backtrack=0, objective=False):
        out = real(lik, x, center, inv_r2, xi_y, xi_x, iterations, backtrack, objective)
        if objective:
            _, f0, f1 = out
            calls.append((x.shape[0], iterations, int((f0 - f1 >= 0.2 * f0.abs()).sum())))
        return out

    monkeypatch.setattr(dds, "perturbed_gauss_newton", counted)
    obs, z, ids = _stamps(3, rng), [0.3, 0.4, 0.5], [5, 7, 9]
    base = SamplerConfig(sampler="dds", steps=4, samples=2, cg_iterations=5, gauss_newton=3)
    deconvolve(obs, z, tiny_unet_prior, base, ids)
    assert {(r, it) for r, it, _ in calls} == {(6, 5)} and len(calls) == 4 * 3
    calls.clear()
    deconvolve(obs, z, tiny_unet_prior, SamplerConfig(**{**base.__dict__, **ADAPTIVE}), ids)
    steps: list[list[tuple[int, int, int]]] = []
    for call in calls:  # a step's first iteration is the only one with 5 CG iterations
        if call[1] == 5:
            steps.append([])
        steps[-1].append(call)
    assert len(steps) == 4
    for step in steps:
        assert step[0][0] == 6 and all(it == 2 for _, it, _ in step[1:]) and len(step) <= 3
        for (_, _, going), (rows, _, _) in itertools.pairwise(step):
            assert rows == going  # exactly the rows whose objective kept falling go on
        if len(step) < 3:
            assert step[-1][2] == 0  # stopped early: no row was still falling
    assert sum(len(step) for step in steps) < 12 or min(c[0] for c in calls) < 6, (
        "the test needs rows that stop early"
    )
