from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from d4a_batch.config import PriorConfig
from d4a_batch.prior.artifact import (
    PriorFormatError,
    PriorStats,
    PriorStatsMissing,
    compute_prior_stats,
    config_from_flags,
    load_prior,
    save_prior,
)
from d4a_batch.prior.diffusion import build_diffusion
from d4a_batch.prior.unet import build_unet
from d4a_batch.schema import PRIOR_CONFIG, PRIOR_STATS, PRIOR_WEIGHTS

UNPICKLED: list[str] = []


def _mark_unpickled(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Payload:
    """An arbitrary object whose unpickling would run ``_mark_unpickled``."""

    def __reduce__(self):
        return (_mark_unpickled, ("payload ran",))


def _stats(cfg: PriorConfig, seed: int = 0) -> PriorStats:
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    return PriorStats(torch.randn(shape, generator=g), torch.rand(shape, generator=g), 256, 10)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_save_load_round_trip(tmp_path, tiny_cfg, random_unet):
    model = random_unet(tiny_cfg, seed=1).eval()
    stats = _stats(tiny_cfg)
    folder = save_prior(tmp_path / "p", model.state_dict(), tiny_cfg, stats, {"train_steps": 12})
    assert {p.name for p in folder.iterdir()} == {PRIOR_WEIGHTS, PRIOR_CONFIG, PRIOR_STATS}

    prior = load_prior(folder)
    assert prior.config == tiny_cfg
    assert prior.prior_id == "tiny"
    assert prior.sha256 == _sha(folder / PRIOR_WEIGHTS)
    assert prior.metadata["train_steps"] == 12
    assert not prior.model.training
    assert not any(p.requires_grad for p in prior.model.parameters())
    torch.testing.assert_close(prior.stats_mean, stats.mean, rtol=0, atol=0)
    torch.testing.assert_close(prior.stats_var, stats.var, rtol=0, atol=0)
    assert prior.stats.n_samples == 256 and prior.stats.steps == 10

    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    t = torch.tensor([0, 10, 500, 999])
    eps = prior.eps(x, t)
    assert eps.shape == (4, 3, 16, 16)
    with torch.no_grad():
        # the same weights; on CPU the loaded model runs NHWC (channels_last), which sums in
        # another order: equal to float32 rounding, not bit for bit
        assert all(torch.equal(a, b) for a, b in zip(prior.model.parameters(), model.parameters()))
        torch.testing.assert_close(eps, model(x, t)[:, :3], rtol=1e-5, atol=1e-5)
    eps.sum().backward()  # differentiable in x (DPS needs it)
    assert x.grad is not None and x.grad.abs().max() > 0
    with pytest.raises(ValueError, match="shape"):
        prior.eps(torch.zeros(1, 3, 8, 8), t[:1])

    sp = prior.spaced(100)
    assert sp.num_timesteps == 100 and sp.timestep_map[-1] == 999
    assert prior.diffusion.num_timesteps == 1000


def test_tampered_weights_detected(tmp_path, tiny_cfg, random_unet):
    folder = save_prior(tmp_path / "p", random_unet(tiny_cfg).state_dict(), tiny_cfg, None)
    sd = random_unet(tiny_cfg, seed=9).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / PRIOR_WEIGHTS)
    with pytest.raises(PriorFormatError, match="sha256"):
        load_prior(folder)


def test_improved_diffusion_checkpoint_with_flags(tmp_path, random_unet):
    flags = {
        "image_size": 32,
        "num_channels": 32,
        "num_res_blocks": 1,
        "attention_resolutions": "16",
        "learn_sigma": "True",
        "noise_schedule": "cosine",
        "lr": 1e-4,  # training flags are ignored
        "batch_size": 8,
    }
    cfg = config_from_flags(flags, name="ema_0.9999")
    assert cfg.channel_mult == (1, 2, 2, 2)  # implied by image_size 32, as in script_util
    assert cfg.attention_resolutions == (16,)
    assert cfg.rescale_timesteps and cfg.use_scale_shift_norm and cfg.learn_sigma
    assert cfg.num_heads == 4 and cfg.diffusion_steps == 1000

    model = random_unet(cfg, seed=2).eval()
    path = tmp_path / "ema_0.9999_000100.pt"
    torch.save(model.state_dict(), path)
    prior = load_prior(path, flags=flags)
    assert prior.config.name == "ema_0.9999_000100" and prior.prior_id == prior.config.name
    assert prior.sha256 == _sha(path)
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([3, 600])
    with torch.no_grad():
        # NHWC on CPU (``Prior``): equal to float32 rounding
        torch.testing.assert_close(prior.eps(x, t), model(x, t)[:, :3], rtol=1e-5, atol=1e-5)
    with pytest.raises(PriorStatsMissing, match="no prior statistics"):
        _ = prior.stats_var
    # a PriorConfig works as flags too
    assert load_prior(path, flags=cfg).config == cfg


def test_safetensors_checkpoint_with_config(tmp_path, tiny_cfg, random_unet):
    model = random_unet(tiny_cfg)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    assert load_prior(path, flags=tiny_cfg).config == tiny_cfg
    with pytest.raises(ValueError, match="flags"):
        load_prior(path)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"time_embed.0.weight": torch.zeros(2), "x": _Payload()}, path)
    UNPICKLED.clear()
    with pytest.raises(PriorFormatError, match="refusing"):
        load_prior(path, flags={"image_size": 32, "num_channels": 32})
    assert UNPICKLED == []
    # whole-object pickles (a model instead of its state dict) are refused too
    torch.save(build_unet(PriorConfig(image_size=16, num_channels=32, channel_mult=(1,))), path)
    with pytest.raises(PriorFormatError, match="refusing"):
        load_prior(path, flags={"image_size": 16, "num_channels": 32, "channel_mult": "1"})


def test_config_weight_mismatch_names_the_key(tmp_path, tiny_cfg, random_unet):
    sd = random_unet(tiny_cfg).state_dict()
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    with pytest.raises(PriorFormatError, match=r"'time_embed\.0\.weight' has shape \(128, 32\)"):
        load_prior(path, flags=replace(tiny_cfg, num_channels=64))
    with pytest.raises(PriorFormatError, match=r"out\.2\.weight"):
        load_prior(path, flags=replace(tiny_cfg, learn_sigma=False))
    del sd["middle_block.1.qkv.weight"]
    torch.save(sd, path)
    with pytest.raises(PriorFormatError, match=r"lack key 'middle_block\.1\.qkv\.weight'"):
        load_prior(path, flags=tiny_cfg)
    with pytest.raises(PriorFormatError, match="lack key"):
        save_prior(tmp_path / "bad", sd, tiny_cfg, None)


def test_flags_validation():
    with pytest.raises(PriorFormatError, match="unknown flags"):
        config_from_flags({"num_channel": 32})
    with pytest.raises(PriorFormatError, match="class_cond"):
        config_from_flags({"class_cond": True})
    with pytest.raises(PriorFormatError, match="channel_mult"):
        config_from_flags({"image_size": 48})
    paper = config_from_flags(
        {
            "image_size": 256,
            "num_channels": 192,
            "num_res_blocks": 3,
            "attention_resolutions": "16,8",
            "noise_schedule": "cosine",
            "learn_sigma": False,
            "kpc_per_pixel": 0.3,
        }
    )
    assert paper.kpc_per_pixel == 0.3 and paper.channel_mult == (1, 1, 2, 2, 4, 4)
    n = sum(p.numel() for p in build_unet(paper, device="meta").parameters())
    assert n == 369_547_779


def test_compute_prior_stats(tmp_path, tiny_cfg, random_unet):
    cfg = replace(tiny_cfg, image_size=8, attention_resolutions=(4,))
    model = random_unet(cfg, seed=4).eval()
    diffusion = build_diffusion(cfg)
    shape = (3, 8, 8)
    stats = compute_prior_stats(
        model,
        diffusion,
        shape,
        n=256,
        steps=3,
        batch_size=256,
        generator=torch.Generator().manual_seed(0),
    )
    assert stats.mean.shape == shape and stats.var.shape == shape
    assert stats.n_samples == 256 and stats.steps == 3
    assert torch.isfinite(stats.mean).all() and (stats.var > 0).all()
    # same draws, reduced independently
    samples = diffusion.respace(3).p_sample_loop(
        model, (256, *shape), generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(stats.mean, samples.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.var, samples.var(0), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="256"):
        compute_prior_stats(model, diffusion, shape, n=255, steps=3)

    # a prior without stats computes them on demand and saves them
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    prior = load_prior(path, flags=cfg)
    prior.compute_stats(n=256, steps=3, batch_size=256, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prior.stats_var, stats.var)
    folder = save_prior(tmp_path / "art", prior.model.state_dict(), prior.config, prior.stats)
    again = load_prior(folder)
    assert torch.equal(again.stats_mean, prior.stats_mean)
    doc = json.loads((folder / PRIOR_CONFIG).read_text())
    assert doc["metadata"]["weights_sha256"] == again.sha256


def test_v_prior_round_trip_and_eps(tmp_path, tiny_cfg, random_unet):
    cfg = replace(tiny_cfg, parameterization="v", sigma_small=True)
    model = random_unet(cfg, seed=2).eval()
    prior = load_prior(save_prior(tmp_path / "v", model.state_dict(), cfg, _stats(cfg), {}))
    assert prior.config.parameterization == "v" and prior.diffusion.parameterization == "v"
    assert prior.spaced(10).parameterization == "v"
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0, 400, 999])
    with torch.no_grad():
        v = model(x, t)[:, :3]
        eps = prior.eps(x, t)
    ac = torch.from_numpy(prior.diffusion.alphas_cumprod)[t].reshape(-1, 1, 1, 1).float()
    torch.testing.assert_close(eps, (1 - ac).sqrt() * x + ac.sqrt() * v)
    assert not torch.allclose(eps, v)


def test_prior_config_without_parameterization_is_an_eps_model(tmp_path, tiny_cfg, random_unet):
    """Artifacts written before the field existed load as ε-models."""
    folder = save_prior(tmp_path / "old", random_unet(tiny_cfg).state_dict(), tiny_cfg,
                        _stats(tiny_cfg), {})  # fmt: skip
    doc = json.loads((folder / PRIOR_CONFIG).read_text())
    doc.pop("parameterization")
    (folder / PRIOR_CONFIG).write_text(json.dumps(doc))
    assert load_prior(folder).config.parameterization == "eps"
