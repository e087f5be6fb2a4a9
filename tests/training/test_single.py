"""training.single: exact resume across calls, atomic checkpoints, the committed compact
state, progressive resolution."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from d4a_batch.config import PriorConfig
from d4a_batch.prior.artifact import load_prior
from d4a_batch.training.data import mock_images, quantise_u8
from d4a_batch.training.loop import TrainConfig, export_prior, load_checkpoint_dir
from d4a_batch.training.single import (
    latest_checkpoint,
    save_resumable_state,
    train_single_process,
)

TINY = PriorConfig(
    name="tiny", image_size=16, channel_mult=(1, 2), attention_resolutions=(), kpc_per_pixel=2.0,
    parameterization="v",
)  # fmt: skip


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.from_numpy(quantise_u8(mock_images(range(20), 3, TINY)))


def _cfg(**kw) -> TrainConfig:
    base = dict(
        prior=TINY, batch_size=6, lr=2e-3, warmup_steps=2, max_steps=8, checkpoint_every=4,
        lr_schedule="constant", loss_weighting="min_snr", timestep_sampling="logsnr_laplace",
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_resume_replays_nothing_and_skips_nothing(tmp_path, images):
    """8 steps in one call == 4 steps, then a second call from the step-4 checkpoint: the
    same weights, EMA, optimiser and loss history bit for bit (RNG and data order saved;
    20 images at batch 6 also cross an epoch boundary)."""
    cfg = _cfg()
    a = train_single_process(cfg, images, tmp_path / "a")
    assert a.name == "checkpoint_0000008"
    b = tmp_path / "b"
    b.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint_0000004", b / "checkpoint_0000004")
    last = train_single_process(cfg, images, b)
    sa, _ = load_checkpoint_dir(a)
    sb, _ = load_checkpoint_dir(last)
    for part in ("model", "ema"):
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), (part, k)
    assert [h[:2] for h in sa["history"]] == [h[:2] for h in sb["history"]]
    assert torch.equal(sa["data_order"], sb["data_order"]) and sa["data_pos"] == sb["data_pos"]
    ea = sa["optimizer"]["state"][0]["exp_avg_sq"]
    assert torch.equal(ea, sb["optimizer"]["state"][0]["exp_avg_sq"])


def test_stop_after_seconds_checkpoints_and_no_partial_is_read(tmp_path, images):
    cfg = _cfg(max_steps=10_000, checkpoint_every=10_000, keep_checkpoints=2)
    run = tmp_path / "run"
    first = train_single_process(cfg, images, run, stop_after_seconds=1e-9)
    assert first.name == "checkpoint_0000001"  # one step, then this call stops
    (run / "checkpoint_0000099.partial").mkdir()  # a kill while writing: ignored, removed
    assert latest_checkpoint(run) == first
    second = train_single_process(cfg, images, run, stop_after_seconds=1e-9)
    assert second.name == "checkpoint_0000002"
    third = train_single_process(cfg, images, run, stop_after_seconds=1e-9)
    assert sorted(p.name for p in run.iterdir()) == [second.name, third.name]  # pruned to 2


def test_committed_state_resumes_the_run(tmp_path, images):
    """save_resumable_state: float32 weights and EMA, bf16 Adam moments; a fresh run folder
    resumed from it continues at its step with its weights and data order."""
    cfg = _cfg()
    a = train_single_process(cfg, images, tmp_path / "a")
    mid = tmp_path / "a" / "checkpoint_0000004"
    state_dir = save_resumable_state(mid, tmp_path / "state")
    st, saved_cfg = load_checkpoint_dir(state_dir)
    assert saved_cfg == cfg and st["step"] == 4
    assert all(v.dtype == torch.float32 for v in st["model"].values())
    assert st["optimizer"]["state"][0]["exp_avg"].dtype == torch.bfloat16
    assert (state_dir / "record.json").exists()
    small = (state_dir / "state.pt").stat().st_size
    assert small < (mid / "state.pt").stat().st_size
    resumed = train_single_process(cfg, images, tmp_path / "c", resume_from=state_dir)
    sr, _ = load_checkpoint_dir(resumed)
    sa, _ = load_checkpoint_dir(a)
    assert sr["step"] == 8 and [h[0] for h in sr["history"]] == list(range(1, 9))
    assert sr["history"][:4] == sa["history"][:4]
    # the same trajectory up to the moments' rounding: the same batches, nearly the same weights
    assert torch.equal(sr["data_order"], sa["data_order"])
    for k, v in sa["model"].items():
        torch.testing.assert_close(sr["model"][k], v, rtol=0.05, atol=2e-3)


def test_progressive_phase_then_full_size_with_the_same_weights(tmp_path, images):
    """downsample=2 trains the half-size prior on binned images (shifted schedule) and
    exports as that prior; the run continues at full size from the same weights."""
    half_cfg = _cfg(downsample=2, max_steps=4)
    run = tmp_path / "run"
    half = train_single_process(half_cfg, images, run)
    prior = load_prior(export_prior(half, tmp_path / "half", n_stats=256, stats_steps=2))
    assert prior.config.image_size == 8 and prior.config.kpc_per_pixel == 4.0
    assert prior.config.logsnr_shift > 1.3
    full_cfg = dataclasses.replace(half_cfg, downsample=1, max_steps=6)
    full = train_single_process(full_cfg, images, run)
    s_half, _ = load_checkpoint_dir(half)
    s_full, saved = load_checkpoint_dir(full)
    assert saved.downsample == 1 and s_full["step"] == 6
    assert [h[0] for h in s_full["history"]] == list(range(1, 7))
    moved = [not torch.equal(s_half["model"][k], s_full["model"][k]) for k in s_half["model"]]
    assert any(moved)  # continued training of the same tensors
    assert load_prior(export_prior(full, tmp_path / "full", 256, 2)).config.image_size == 16
