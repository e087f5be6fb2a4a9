"""DPS core: analytic Gaussian prior moments and posterior, respacing, seeds, memory, batches."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from d4a_batch.config import SamplerConfig
from d4a_batch.prior.diffusion import space_timesteps
from d4a_batch.sampling.deconvolve import deconvolve
from d4a_batch.sampling.dps import dps_sample, scale_guidance
from d4a_batch.sampling.rows import draw_photoz, row_generators, sample_seed
from tests.sampling.conftest import gaussian_prior, observe

N = 8


def _diag_prior(var: float = 0.25):
    mu = torch.linspace(-0.5, 0.3, N * N).reshape(1, N, N)
    return gaussian_prior(mu, torch.full((1, N, N), var))


def _blur_matrix(n: int, width: float) -> np.ndarray:
    c = np.arange(n) + 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    p = np.stack([yy.ravel(), xx.ravel()], 1)
    a = np.exp(-((p[:, None] - p[None]) ** 2).sum(-1) / (2 * width**2))
    return a / a.sum(1, keepdims=True)


def test_sample_seeds_are_stable_and_distinct():
    base = sample_seed(0, 42, 3)
    assert base == sample_seed(0, 42, 3)
    others = {sample_seed(1, 42, 3), sample_seed(0, 43, 3), sample_seed(0, 42, 4)}
    others |= {sample_seed(0, 42, 3, stream=1), sample_seed(0, -42, 3), base}
    assert len(others) == 6
    assert 0 <= sample_seed(7, 2**63 - 1, 0) < 2**64


def test_zero_guidance_reproduces_the_prior_moments():
    """ζ = 0: samples follow the prior; mean and variance within Monte-Carlo error."""
    prior = _diag_prior(0.25)
    s = 400
    x = dps_sample(prior, None, row_generators(0, [1], s), steps=100, guidance=0.0, clip_x0=False)
    x = x.reshape(s, -1).double().numpy()
    mu, var = prior.stats_mean.reshape(-1).numpy(), prior.stats_var.reshape(-1).numpy()
    z_mean = (x.mean(0) - mu) / np.sqrt(var / s)
    assert abs(z_mean.mean()) * np.sqrt(z_mean.size) < 4 and np.abs(z_mean).max() < 5
    ratio = (x.var(0, ddof=1) / var).mean()
    # MC std of the pixel-averaged ratio: sqrt(2/s)/sqrt(64) = 0.009
    print(f"\n[dps] zeta=0, 100 steps, {s} samples: var/prior var = {ratio:.4f}")
    assert abs(ratio - 1) < 0.05


@pytest.mark.parametrize(("rule", "zeta"), [("rms", 0.03), ("raw", 0.01)])
def test_guided_samples_approach_the_exact_linear_gaussian_posterior(rule, zeta):
    """y = A x + n with a Gaussian prior: the exact posterior is Gaussian and known."""
    rng = np.random.default_rng(0)
    prior = gaussian_prior(torch.full((1, N, N), -0.3), torch.full((1, N, N), 0.04))
    mu, s2 = np.full(N * N, -0.3), np.full(N * N, 0.04)
    a = _blur_matrix(N, 1.0)
    sigma = 0.02
    truth = mu + np.sqrt(s2) * rng.standard_normal(N * N)
    y = a @ truth + sigma * rng.standard_normal(N * N)
    cov = np.linalg.inv(np.diag(1 / s2) + a.T @ a / sigma**2)
    m_post = cov @ (mu / s2 + a.T @ y / sigma**2)
    a_t, y_t = torch.tensor(a, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)

    def residual(x0: torch.Tensor) -> torch.Tensor:
        return (y_t - x0.reshape(x0.shape[0], -1) @ a_t.T) / sigma

    s = 200
    x = dps_sample(
        prior, residual, row_generators(0, [1], s), steps=100, guidance=zeta, rule=rule,
        clip_x0=False,
    )  # fmt: skip
    x = x.reshape(s, -1).double().numpy()
    m = x.mean(0)
    rms = lambda d: float(np.sqrt(np.mean(d**2)))  # noqa: E731
    chi2 = lambda mean: float(np.mean(((y - a @ mean) / sigma) ** 2))  # noqa: E731
    bias, prior_gap = rms(m - m_post), rms(mu - m_post)
    var_ratio = float(np.mean(x.var(0, ddof=1) / np.diag(cov)))
    print(
        f"\n[dps] linear-Gaussian, {rule} zeta={zeta}: |mean - exact posterior mean| = {bias:.4f}"
        f" (prior mean: {prior_gap:.4f}, posterior sd {np.sqrt(np.diag(cov)).mean():.4f}),"
        f" var/exact var = {var_ratio:.2f}, chi2/dof of the mean = {chi2(m):.2f}"
        f" (exact posterior mean: {chi2(m_post):.2f})"
    )
    assert bias < 0.5 * prior_gap
    assert 0.2 < chi2(m) < 2.0 < chi2(mu)


def test_network_gets_original_timesteps_for_respaced_schedules():
    prior = _diag_prior()
    seen: list[int] = []
    hook = prior.model.register_forward_pre_hook(lambda _m, args: seen.append(int(args[1][0])))
    try:
        for steps in (1000, 250, 100, 50):
            seen.clear()
            dps_sample(prior, None, row_generators(0, [1], 2), steps=steps, guidance=0.0)
            assert seen == sorted(space_timesteps(1000, steps), reverse=True)
            assert len(seen) == steps and seen[0] == 999 and seen[-1] == 0
    finally:
        hook.remove()


def _live_tensors() -> int:
    gc.collect()
    return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


def test_no_graph_or_memory_carried_between_steps(tiny_unet_prior):
    target = torch.zeros(4, 3, 16, 16)
    states, counts = [], []

    def record(i: int, x: torch.Tensor) -> None:
        states.append((x.grad_fn is None, x.requires_grad, x.is_leaf))
        if i in (6, 0):  # after the second and the last of 8 steps
            counts.append(_live_tensors())

    dps_sample(
        tiny_unet_prior, lambda x0: x0 - target, row_generators(0, [1, 2], 2), steps=8,
        guidance=0.05, callback=record,
    )  # fmt: skip
    assert states == [(True, False, True)] * 8
    assert counts[1] <= counts[0], counts


def test_scale_guidance_rules():
    g = torch.tensor([[[3.0, -4.0]], [[0.0, 0.0]], [[1e-8, 1e-8]]])
    unit = scale_guidance(g, "rms")
    assert torch.allclose(unit.pow(2).mean((1, 2)), torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(scale_guidance(g, "raw"), g)
    with pytest.raises(ValueError, match="unknown guidance rule"):
        scale_guidance(g, "adam")


def _stamps(n: int, rng: np.random.Generator):
    """n observations (3 bands, 20² stamps) of random blobs, for batch tests."""
    from d4a_batch.physics.operator import ObservationBatch

    prior_like = gaussian_prior(torch.zeros(3, 16, 16), torch.full((3, 16, 16), 0.05))
    obs = []
    for k in range(n):
        x = torch.as_tensor(rng.uniform(-1, 0.2, (3, 16, 16)), dtype=torch.float32)
        obs.append(observe(x, prior_like, 0.3 + 0.1 * k, 200.0 * (k + 1), 1.0, rng, stamp=20)[0])
    cat = lambda name: torch.cat([getattr(o, name) for o in obs])  # noqa: E731
    return ObservationBatch(*(cat(f) for f in ("image", "variance", "valid", "psf", "offset")))


def test_samples_do_not_depend_on_the_batch(tiny_unet_prior, rng):
    """Object 7's samples: alone, first, or last in a batch -> the same (real UNet, physics)."""
    obs = _stamps(3, rng)
    z = np.array([0.3, 0.4, 0.5])
    ids = np.array([5, 7, 9])
    cfg = SamplerConfig(sampler="dps", steps=6, samples=3, keep_samples=3, guidance=0.05)

    def run(order, config=cfg):
        sub = type(obs)(*(getattr(obs, f)[order] for f in obs.__dataclass_fields__))
        return deconvolve(sub, z[order], tiny_unet_prior, config, ids[order].tolist())

    alone = run([1]).samples_x[0]
    first = run([1, 0, 2]).samples_x[0]
    last = run([2, 0, 1]).samples_x[2]
    np.testing.assert_allclose(first, alone, atol=1e-4)
    np.testing.assert_allclose(last, alone, atol=1e-4)
    assert np.array_equal(run([1]).samples_x[0], alone)  # same seed: bit-identical
    other_seed = run([1], SamplerConfig(**{**cfg.__dict__, "seed": 1})).samples_x[0]
    assert np.abs(other_seed - alone).mean() > 0.05
    # samples of one object differ from each other, and a later sample does not change
    # when more samples are drawn
    assert np.abs(alone[0] - alone[1]).mean() > 0.05
    more = run([1], SamplerConfig(**{**cfg.__dict__, "samples": 4, "keep_samples": 4}))
    np.testing.assert_allclose(more.samples_x[0, :3], alone, atol=1e-4)


def test_photoz_draws_follow_a_split_normal():
    z, lo, hi = 0.5, 0.45, 0.62
    s = 4000
    d = draw_photoz([z], [[lo, hi]], [3], s, seed=0, z_range=(0.02, 1.5))
    p_low = (z - lo) / (hi - lo)
    tol = 4 * np.sqrt(0.25 / s)
    assert abs(np.mean(d < z) - p_low) < tol
    assert abs(np.mean((d >= lo) & (d <= hi)) - 0.6827) < tol
    # per-sample streams: the same draws inside another batch; NaN bounds keep z
    d2 = draw_photoz([0.9, z], [[np.nan, 1.0], [lo, hi]], [8, 3], 5, seed=0, z_range=(0.02, 1.5))
    np.testing.assert_array_equal(d2[5:], d[:5])
    np.testing.assert_array_equal(d2[:5], 0.9)
    clipped = draw_photoz([0.05], [[0.0, 0.1]], [1], 500, seed=0, z_range=(0.02, 1.5))
    assert clipped.min() >= 0.02 and clipped.min() == 0.02


@pytest.mark.gpu
def test_cuda_runs_the_network_in_bfloat16(tiny_unet_prior):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    prior = tiny_unet_prior
    prior.model.to("cuda")
    dtypes = []
    hook = prior.model.out.register_forward_hook(lambda _m, _a, out: dtypes.append(out.dtype))
    x = dps_sample(
        prior, lambda x0: x0 - 0.1, row_generators(0, [1], 2, "cuda"), steps=4, guidance=0.05
    )
    hook.remove()
    assert set(dtypes) == {torch.bfloat16} and x.dtype == torch.float32
    assert torch.isfinite(x).all()


@pytest.mark.slow
def test_rms_total_rule_pulls_as_far_at_25_and_100_steps():
    """The "rms_total" rule spreads ζ·50 over the steps: on a bright mock (real operator, Gaussian
    galaxy prior) 25 and 100 steps fit the data alike, where "rms" (ζ per step) does not."""
    from d4a_batch.config import SamplerConfig
    from tests.sampling.conftest import galaxy_prior

    prior = galaxy_prior(n=16, bands=2)
    truth = dps_sample(prior, None, row_generators(1, [0], 1), steps=100, guidance=0.0)[0]
    obs, _ = observe(truth, prior, 0.3, 2000.0, 1.0, np.random.default_rng(3))
    chi2 = {}
    for rule in ("rms_total", "rms"):
        for steps in (25, 100):
            cfg = SamplerConfig(sampler="dps", steps=steps, samples=8, guidance=0.01,
                                guidance_rule=rule)  # fmt: skip
            chi2[rule, steps] = float(deconvolve(obs, [0.3], prior, cfg, [3]).chi2[0])
    print(f"\n[dps] bright mock chi2/dof by (rule, steps): {chi2}")
    total = chi2["rms_total", 25] / chi2["rms_total", 100]
    per_step = chi2["rms", 25] / chi2["rms", 100]
    assert 0.5 < total < 2.0
    assert abs(np.log(total)) < abs(np.log(per_step))


def test_network_precision_bfloat16_is_close_to_float32_and_auto_is_float32_on_cpu(
    tiny_unet_prior, rng
):
    """``network_precision``: "auto" on CPU is float32 (the samples as before, bit for bit);
    "bfloat16" autocasts only the network (x_t and the data step stay float32): near, not
    equal."""
    obs = _stamps(2, rng)
    cfg = SamplerConfig(sampler="dds", steps=6, samples=2, keep_samples=2, cg_iterations=5)

    def run(precision):
        c = SamplerConfig(**{**cfg.__dict__, "network_precision": precision})
        return deconvolve(obs, [0.3, 0.4], tiny_unet_prior, c, [5, 7]).samples_x

    auto, f32, bf16 = run("auto"), run("float32"), run("bfloat16")
    assert np.array_equal(auto, f32)
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, f32)
    assert np.abs(bf16 - f32).mean() < 0.05 * np.abs(f32).mean()
    with pytest.raises(ValueError, match="network_precision"):
        SamplerConfig(network_precision="float16")
