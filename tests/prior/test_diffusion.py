from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from d4a_batch.config import PriorConfig
from d4a_batch.prior.diffusion import (
    GaussianDiffusion,
    SpacedDiffusion,
    build_diffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    normal_kl,
    space_timesteps,
)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedules_monotone_in_unit_interval(name):
    d = GaussianDiffusion(get_named_beta_schedule(name, 1000))
    ac = d.alphas_cumprod
    assert ac.dtype == np.float64 and ac.shape == (1000,)
    assert (np.diff(ac) < 0).all()
    assert (ac > 0).all() and (ac <= 1).all()
    assert (d.betas > 0).all() and (d.betas <= 0.999).all()
    assert d.alphas_cumprod_prev[0] == 1.0 and d.alphas_cumprod_next[-1] == 0.0
    np.testing.assert_allclose(d.alphas_cumprod_prev[1:], ac[:-1])


def test_linear_schedule_endpoints():
    b = get_named_beta_schedule("linear", 1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    b4 = get_named_beta_schedule("linear", 4000)  # scaled by 1000 / T
    assert b4[0] == pytest.approx(2.5e-5) and b4[-1] == pytest.approx(0.005)


def test_cosine_matches_closed_form():
    T, s = 1000, 0.008
    betas = get_named_beta_schedule("cosine", T)
    d = GaussianDiffusion(betas)

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    clipped = np.flatnonzero(betas >= 0.999)
    assert clipped.size >= 1 and clipped.min() > 990  # the clip acts only at the very end
    first = int(clipped.min())
    expected = np.array([f((i + 1) / T) / f(0) for i in range(first)])
    np.testing.assert_allclose(d.alphas_cumprod[:first], expected, rtol=1e-10)
    # past the clip the product follows 1 - 0.999 per step
    assert d.alphas_cumprod[first] == pytest.approx(d.alphas_cumprod[first - 1] * 0.001)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        get_named_beta_schedule("quadratic", 10)


def test_posterior_matches_bayes_rule():
    d = GaussianDiffusion(get_named_beta_schedule("cosine", 1000))
    t = torch.tensor([1, 17, 500, 999])
    x0 = torch.linspace(-1, 1, 4, dtype=torch.float64).reshape(4, 1, 1, 1)
    xt = torch.tensor([0.3, -1.2, 2.0, 0.1], dtype=torch.float64).reshape(4, 1, 1, 1)
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    for r, ti in enumerate(t.tolist()):
        ac_prev, beta = d.alphas_cumprod_prev[ti], d.betas[ti]
        # prior x_{t-1} ~ N(sqrt(ac_prev) x0, 1 - ac_prev); likelihood x_t ~ N(sqrt(1-beta) x_{t-1}, beta)
        prec = 1 / (1 - ac_prev) + (1 - beta) / beta
        m = (
            math.sqrt(ac_prev) * x0[r].item() / (1 - ac_prev)
            + math.sqrt(1 - beta) * xt[r].item() / beta
        ) / prec
        assert mean[r].item() == pytest.approx(m, rel=1e-9)
        assert var[r].item() == pytest.approx(1 / prec, rel=1e-9)
        assert log_var[r].item() == pytest.approx(math.log(1 / prec), rel=1e-9)


def test_predict_xstart_inverts_q_sample():
    d = GaussianDiffusion(get_named_beta_schedule("linear", 1000))
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 300, 700, 999])
    xt = d.q_sample(x0, t, noise=noise)
    torch.testing.assert_close(d.predict_xstart_from_eps(xt, t, noise), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(d.predict_eps_from_xstart(xt, t, x0), noise, rtol=0, atol=1e-9)


def test_q_sample_statistics():
    d = GaussianDiffusion(get_named_beta_schedule("cosine", 1000))
    n, c, ti = 200_000, 0.6, 400
    x0 = torch.full((n, 1, 1, 1), c)
    g = torch.Generator().manual_seed(7)
    xt = d.q_sample(x0, torch.full((n,), ti), generator=g).double().flatten()
    ac = d.alphas_cumprod[ti]
    se_mean = math.sqrt((1 - ac) / n)
    assert abs(xt.mean().item() - math.sqrt(ac) * c) < 5 * se_mean
    se_var = (1 - ac) * math.sqrt(2 / (n - 1))
    assert abs(xt.var().item() - (1 - ac)) < 5 * se_var


def test_space_timesteps_hand_cases():
    assert space_timesteps(10, [4]) == {0, 3, 6, 9}
    assert space_timesteps(10, "2,3") == {0, 4, 5, 7, 9}
    assert space_timesteps(10, 10) == set(range(10))
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(10, [11])
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim3000")


@pytest.mark.parametrize(("steps", "gaps"), [(250, {4, 5}), (100, {10, 11}), ("ddim50", {20})])
def test_respacing_1000(steps, gaps):
    kept = sorted(space_timesteps(1000, steps))
    count = 50 if steps == "ddim50" else steps
    assert len(kept) == count and kept[0] == 0
    assert set(np.diff(kept).tolist()) == gaps
    if steps == "ddim50":
        assert kept == list(range(0, 1000, 20))
    else:
        assert kept[-1] == 999


@pytest.mark.parametrize("steps", [250, 100, "ddim50"])
def test_spaced_alphas_cumprod_equal_base(steps):
    betas = get_named_beta_schedule("cosine", 1000)
    base = GaussianDiffusion(betas)
    sp = SpacedDiffusion(space_timesteps(1000, steps), betas)
    assert sp.num_timesteps == len(sp.timestep_map) and sp.original_num_steps == 1000
    assert (np.diff(sp.timestep_map) > 0).all()
    np.testing.assert_allclose(sp.alphas_cumprod, base.alphas_cumprod[sp.timestep_map], rtol=1e-10)
    assert base.respace(steps).timestep_map.tolist() == sp.timestep_map.tolist()
    with pytest.raises(ValueError, match="base diffusion"):
        sp.respace(10)


def _record_timesteps(model):
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[1].clone()))
    return seen


def test_spaced_model_receives_original_timesteps(tiny_cfg, random_unet):
    model = random_unet(tiny_cfg).eval()
    seen = _record_timesteps(model)
    sp = build_diffusion(tiny_cfg, "ddim10")
    sp.p_sample_loop(model, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    assert len(seen) == 10
    assert all(s.dtype == torch.long and s.shape == (2,) and s[0] == s[1] for s in seen)
    assert [int(s[0]) for s in seen] == list(range(900, -1, -100))

    seen.clear()
    x0 = torch.zeros(3, 3, 16, 16)
    build_diffusion(tiny_cfg, "ddim50").training_losses(model, x0, torch.tensor([0, 1, 49]))
    build_diffusion(tiny_cfg, 250).p_mean_variance(model, x0, torch.tensor([0, 1, 249]))
    assert [s.tolist() for s in seen] == [[0, 20, 980], [0, 4, 999]]


def test_rescaled_timesteps_reach_network_as_1000_scale(tiny_cfg, random_unet):
    cfg = replace(tiny_cfg, diffusion_steps=500, rescale_timesteps=True)
    model = random_unet(cfg).eval()
    seen = _record_timesteps(model)
    sp = build_diffusion(cfg, [5])
    sp.p_mean_variance(model, torch.zeros(2, 3, 16, 16), torch.tensor([4, 1]))
    orig = sp.timestep_map[[4, 1]]
    assert seen[0].dtype == torch.float32
    assert seen[0].tolist() == pytest.approx((orig * 2.0).tolist())


def test_p_sample_loop_reproducible(tiny_cfg, random_unet):
    model = random_unet(tiny_cfg).eval()
    sp = build_diffusion(tiny_cfg, 5)
    a = sp.p_sample_loop(model, (2, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    b = sp.p_sample_loop(model, (2, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    c = sp.p_sample_loop(model, (2, 3, 16, 16), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all()


def test_p_sample_final_step_is_noise_free_mean(tiny_cfg, random_unet):
    model = random_unet(tiny_cfg).eval()
    d = build_diffusion(tiny_cfg)
    x = torch.randn(2, 3, 16, 16)
    t = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        out = d.p_mean_variance(model, x, t)
        s1 = d.p_sample(model, x, t, generator=torch.Generator().manual_seed(0))["sample"]
        s2 = d.p_sample(model, x, t, generator=torch.Generator().manual_seed(1))["sample"]
    assert torch.equal(s1, out["mean"]) and torch.equal(s1, s2)
    assert out["pred_xstart"].abs().max() <= 1.0
    assert out["eps"].shape == x.shape


def test_fixed_variances():
    betas = get_named_beta_schedule("linear", 100)
    x = torch.zeros(3, 1, 2, 2)
    t = torch.tensor([0, 1, 50])
    eps = torch.zeros_like(x)
    large = GaussianDiffusion(betas).p_mean_variance_from_output(eps, x, t)
    small = GaussianDiffusion(betas, sigma_small=True).p_mean_variance_from_output(eps, x, t)
    d = GaussianDiffusion(betas)
    assert large["variance"][1:, 0, 0, 0].tolist() == pytest.approx(d.betas[[1, 50]].tolist())
    assert large["variance"][0, 0, 0, 0].item() == pytest.approx(d.posterior_variance[1])
    assert small["variance"][2, 0, 0, 0].item() == pytest.approx(d.posterior_variance[50])


def test_training_losses_mse_and_hybrid_vb(tiny_cfg, random_unet):
    model = random_unet(tiny_cfg)
    d = build_diffusion(tiny_cfg)
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 300, 999])
    terms = d.training_losses(model, x0, t, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"}
    assert all(v.shape == (3,) for v in terms.values())
    eps = model(d.q_sample(x0, t, noise=noise), t)[:, :3]
    torch.testing.assert_close(terms["mse"], ((noise - eps) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    assert (terms["vb"] >= 0).all()
    # the VLB term trains only the variance channels: no gradient into the ε outputs
    terms["vb"].sum().backward()
    w = model.out[2].weight.grad
    assert w[:3].abs().max() == 0 and w[3:].abs().max() > 0


def test_training_losses_mse_only_without_learn_sigma(tiny_cfg, random_unet):
    cfg = replace(tiny_cfg, learn_sigma=False)
    model = random_unet(cfg)
    d = build_diffusion(cfg)
    terms = d.training_losses(model, torch.zeros(2, 3, 16, 16), torch.tensor([3, 4]))
    assert set(terms) == {"loss", "mse"}
    terms["loss"].mean().backward()
    assert model.input_blocks[0][0].weight.grad.abs().max() > 0


def test_kl_and_discretized_likelihood_identities():
    m = torch.tensor([0.3, -0.2])
    lv = torch.tensor([-1.0, 0.5])
    assert normal_kl(m, lv, m, lv).abs().max() < 1e-7
    # KL(N(0,1) || N(1, e^0)) = 1/2
    assert normal_kl(
        torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.0)
    ).item() == pytest.approx(0.5)
    # probabilities of the 256 bins on [-1, 1] sum to one
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.1, -2.0), (-0.7, -4.0), (0.0, 0.3)]:
        logp = discretized_gaussian_log_likelihood(
            bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale)
        )
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


# --------------------------------------------------------------------------- v-parameterisation
def _oracle(d: GaussianDiffusion, x0: torch.Tensor, noise: torch.Tensor, kind: str):
    """A 'network' that returns the exact ε or v of the x_t it is given (x0, noise fixed)."""

    def model(x_t, t_model):
        t = torch.as_tensor(np.searchsorted(d.timestep_map, t_model.numpy()))
        return noise if kind == "eps" else d.v_target(x0, t, noise)

    return model


@pytest.mark.parametrize("steps", [None, 50])
def test_v_parameterisation_recovers_eps_and_xstart_exactly(steps):
    cfg = replace(PriorConfig(), parameterization="v")
    d = build_diffusion(cfg, steps)
    assert d.parameterization == "v"
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, d.num_timesteps // 2, d.num_timesteps - 1])
    xt = d.q_sample(x0, t, noise=noise)
    v = d.v_target(x0, t, noise)
    eps, xs = d.eps_and_xstart(v, xt, t)
    # exact even at the last step, where an ε-model's x̂_0 divides by √ᾱ ≈ 0
    torch.testing.assert_close(eps, noise, rtol=0, atol=1e-9)
    torch.testing.assert_close(xs, x0, rtol=0, atol=1e-9)
    # v-MSE is zero for the v-oracle, and an ε-diffusion reads the ε-oracle the same way
    oracle = _oracle(d, x0, noise, "v")
    assert d.training_losses(oracle, x0, t, noise=noise)["mse"].abs().max() < 1e-18
    out = d.p_mean_variance(oracle, xt, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=0, atol=1e-9)
    e = build_diffusion(replace(cfg, parameterization="eps"), steps)
    ref = e.p_mean_variance(_oracle(e, x0, noise, "eps"), xt, t, clip_denoised=False)
    torch.testing.assert_close(out["mean"], ref["mean"], rtol=0, atol=1e-8)
    torch.testing.assert_close(out["eps"], ref["eps"], rtol=0, atol=1e-9)


def test_v_target_is_unit_variance_and_loss_weights_x0_at_high_noise():
    d = GaussianDiffusion(get_named_beta_schedule("cosine", 1000), parameterization="v")
    g = torch.Generator().manual_seed(3)
    x0 = torch.full((50_000, 1, 1, 1), -1.0, dtype=torch.float64)  # sky: the data's mean
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    for ti in (0, 500, 999):
        t = torch.full((x0.shape[0],), ti)
        v = d.v_target(x0, t, noise)
        ac = d.alphas_cumprod[ti]
        assert v.mean().item() == pytest.approx(math.sqrt(1 - ac), abs=0.02)  # -√(1-ᾱ) x0
        assert v.var().item() == pytest.approx(ac, abs=0.02 + 0.02 * ac)
    # at t = T-1 the v-model that outputs the data mean -(-1) gets x̂_0 = -1 exactly
    t = torch.full((1,), 999)
    xt = d.q_sample(x0[:1], t, noise=noise[:1])
    _, xs = d.eps_and_xstart(torch.ones_like(xt), xt, t)
    assert xs.item() == pytest.approx(-1.0, abs=1e-3)


def test_unknown_parameterisation_is_refused():
    with pytest.raises(ValueError, match="parameterization"):
        GaussianDiffusion(get_named_beta_schedule("linear", 10), parameterization="x0")


@pytest.mark.parametrize("parameterization", ["v", "eps"])
def test_v_model_learns_a_constant_sky_eps_model_does_not(tiny_cfg, random_unet, parameterization):
    """60 Adam steps on images of pure sky (x = -1); then x̂_0 (clipped, as sampling does) at t = T-1.

    This is the failure the v-parameterisation is for: at the start of sampling
    an ε-model's x̂_0 needs ε to O(√ᾱ) accuracy, a v-model predicts -x_0 directly.
    """
    cfg = replace(tiny_cfg, learn_sigma=False, parameterization=parameterization)
    torch.manual_seed(0)
    model = random_unet(cfg)
    d = build_diffusion(cfg)
    g = torch.Generator().manual_seed(4)
    x0 = torch.full((8, 3, 16, 16), -1.0)
    t_last = torch.full((8,), d.num_timesteps - 1)

    def x0_error() -> float:
        with torch.no_grad():
            xt = d.q_sample(x0, t_last, generator=g)
            out = d.p_mean_variance(model, xt, t_last, clip_denoised=True)
            return (out["pred_xstart"] - x0).abs().mean().item()

    before = x0_error()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(60):
        t = torch.randint(0, d.num_timesteps, (8,), generator=g)
        loss = d.training_losses(model, x0, t, generator=g)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = x0_error()
    print(f"{parameterization}: |x̂_0 - x_0| at t = T-1: {before:.3f} -> {after:.3f}")
    if parameterization == "v":
        assert after < 0.4  # measured 0.99 -> 0.26
    else:
        assert after > 0.8  # measured 0.99 -> 0.94
