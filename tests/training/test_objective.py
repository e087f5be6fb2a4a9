"""training.objective: each knob of the training objective against what it must equal."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from d4a_batch.config import PriorConfig
from d4a_batch.prior.diffusion import build_diffusion, get_named_beta_schedule, shift_log_snr
from d4a_batch.prior.unet import build_unet
from d4a_batch.training.data import mock_images, normaliser, quantise_u8, to_model_space
from d4a_batch.training.objective import (
    bin_images,
    log_snr_table,
    loss_weights,
    phase_prior,
    sample_timesteps,
)

HSC64 = PriorConfig(
    name="hsc-64", image_size=64, channel_mult=(1, 1, 2, 4), attention_resolutions=(16, 8),
    parameterization="v", kpc_per_pixel=0.75,
)  # fmt: skip


def test_shifted_schedule_adds_the_shift_to_every_log_snr():
    betas = get_named_beta_schedule("cosine", 1000)
    base = log_snr_table(np.cumprod(1 - betas))
    shifted = log_snr_table(np.cumprod(1 - shift_log_snr(betas, 2 * math.log(2))))
    np.testing.assert_allclose(shifted, base + 2 * math.log(2), atol=1e-6)
    assert shift_log_snr(betas, 0.0) is not None and np.array_equal(
        shift_log_snr(betas, 0.0), betas
    )
    # the prior's own field reaches every diffusion built from it
    d = build_diffusion(phase_prior(HSC64, 2))
    np.testing.assert_allclose(log_snr_table(d.alphas_cumprod), base + 2 * math.log(2), atol=1e-6)


def test_uniform_timesteps_are_the_plain_randint_draws():
    ac = build_diffusion(HSC64).alphas_cumprod
    a = sample_timesteps(ac, 64, torch.Generator().manual_seed(3))
    b = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("how", ["logsnr_normal", "logsnr_laplace"])
def test_logsnr_sampling_has_the_asked_centre_and_width(how):
    ac = build_diffusion(HSC64).alphas_cumprod
    t = sample_timesteps(ac, 40_000, torch.Generator().manual_seed(0), how, loc=0.5, scale=1.5)
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= 999
    lam = log_snr_table(ac)[t.numpy()]
    assert np.median(lam) == pytest.approx(0.5, abs=0.05)
    spread = np.std(lam) if how == "logsnr_normal" else np.mean(np.abs(lam - 0.5))
    assert spread == pytest.approx(1.5, rel=0.05)  # Laplace: mean |λ - loc| = b
    # the table is strictly monotone, so the nearest-timestep lookup is well defined
    table = log_snr_table(ac)
    assert np.all(np.diff(table) < 0)


def test_min_snr_weight_makes_the_v_loss_the_min_snr_x0_loss():
    """min(SNR, γ)/(SNR + 1) · |v - v̂|² = min(SNR, γ) · |x0 - x̂0|² for a v-predicting model."""
    d = build_diffusion(HSC64)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 10, 200, 500, 800, 999])
    xt = d.q_sample(x0, t, noise=noise)
    v = d.v_target(x0, t, noise)
    v_hat = v + 0.1 * torch.randn(v.shape, generator=g)
    ac = torch.as_tensor(d.alphas_cumprod[t.numpy()], dtype=torch.float32)[:, None, None, None]
    x0_hat = ac.sqrt() * xt - (1 - ac).sqrt() * v_hat
    snr = (ac / (1 - ac)).flatten()
    w = loss_weights(d.alphas_cumprod, t, "min_snr", gamma=5.0, parameterization="v")
    lhs = w * ((v - v_hat) ** 2).mean(dim=(1, 2, 3))
    rhs = snr.clamp(max=5.0) * ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(lhs, rhs, rtol=2e-3, atol=1e-7)
    assert torch.equal(loss_weights(d.alphas_cumprod, t, "uniform"), torch.ones(6))
    assert float(w[0]) < 0.2 and float(w[-1]) == pytest.approx(float(snr[-1] / (snr[-1] + 1)))


def test_binning_conserves_flux_and_halves_sizes():
    """bin_images = the flux image summed over 2x2 blocks, renormalised and stretched."""
    n = 64
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    sig = np.array([3.0, 4.0, 5.0])[:, None, None]
    flux = np.exp(-(xx**2 + yy**2) / (2 * sig**2))  # [3, 64, 64]
    x = torch.from_numpy(to_model_space(flux, 0.01))[None]
    binned = bin_images(x, 2, 0.01)
    assert binned.shape == (1, 3, 32, 32) and binned.dtype == torch.float32
    summed = flux.reshape(3, 32, 2, 32, 2).sum(axis=(2, 4))
    np.testing.assert_allclose(binned[0].numpy(), to_model_space(summed, 0.01), atol=2e-5)
    # second moments of the light: sigma halves in pixels
    from d4a_batch.physics.stretch import inverse_stretch

    v = inverse_stretch(binned[0].double().numpy(), 0.01)
    _, xb = np.mgrid[:32, :32] - 15.5
    s2 = (v * xb**2).sum(axis=(1, 2)) / v.sum(axis=(1, 2))
    np.testing.assert_allclose(np.sqrt(s2), sig.ravel() / 2, rtol=0.02)
    assert np.all(normaliser(summed) > 0)
    # uint8 input (the committed training set) is dequantised first
    q = torch.from_numpy(quantise_u8(x.numpy()))
    assert float((bin_images(q, 2, 0.01) - binned).abs().max()) < 0.02


def test_phase_prior_trains_the_same_tensors_at_half_size():
    half = phase_prior(HSC64, 2)
    assert (half.image_size, half.kpc_per_pixel, half.attention_resolutions) == (32, 1.5, (8, 4))
    assert half.logsnr_shift == pytest.approx(2 * math.log(2))
    full_net, half_net = build_unet(HSC64), build_unet(half)
    assert {k: v.shape for k, v in full_net.state_dict().items()} == {
        k: v.shape for k, v in half_net.state_dict().items()
    }
    half_net.load_state_dict(full_net.state_dict())
    out = half_net(torch.zeros(2, 3, 32, 32), torch.tensor([10, 900]))
    assert out.shape == (2, 3, 32, 32)
    assert phase_prior(HSC64, 1) is HSC64
    with pytest.raises(ValueError, match="must divide"):
        phase_prior(HSC64, 3)


def test_binned_mocks_match_mocks_drawn_at_the_coarser_scale():
    """The 2x-binned 0.75 kpc mocks are the galaxies GalSim draws at 1.5 kpc (same seed)."""
    tiny = PriorConfig(name="t", image_size=32, channel_mult=(1, 2), attention_resolutions=(),
                       kpc_per_pixel=0.75, mock_structure="realistic")  # fmt: skip
    fine = torch.from_numpy(mock_images(range(4), 5, tiny))
    coarse = mock_images(range(4), 5, phase_prior(tiny, 2))
    binned = bin_images(fine, 2, tiny.stretch.a).numpy()
    # not identical (the sub-pixel offset is in pixels of each grid, GalSim's pixel
    # response differs); the same galaxy: bright pixels agree
    bright = coarse > 0
    assert np.corrcoef(binned[bright], coarse[bright])[0, 1] > 0.8
