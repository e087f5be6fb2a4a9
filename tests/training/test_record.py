"""training.record: entries merge by (step, phase), sort by CPU time, and draw."""

from __future__ import annotations

import json

from d4a_batch.training.record import add_entry, curve_figure, read_record


def _entry(step, ds, hours, fd, real=()):
    return {"step": step, "downsample": ds, "cpu_hours": hours, "frechet_distance": fd,
            "frechet_floor": 0.1, "real_hst": list(real)}  # fmt: skip


def test_entries_merge_sort_and_plot(tmp_path):
    assert read_record(tmp_path) == []
    add_entry(tmp_path, _entry(2000, 2, 1.0, 9.0))
    add_entry(tmp_path, _entry(1000, 2, 0.5, 20.0))
    entries = add_entry(tmp_path, _entry(2000, 2, 1.0, 8.0))  # the same checkpoint re-scored
    assert [(e["step"], e["frechet_distance"]) for e in entries] == [(1000, 20.0), (2000, 8.0)]
    real = [{"z": 0.3, "chi2": 2.0}, {"z": 0.8, "chi2": 3.0}]
    entries = add_entry(tmp_path, _entry(2000, 1, 1.5, 6.0, real))  # same step, next phase
    assert len(entries) == 3 and entries[-1]["downsample"] == 1
    assert json.loads((tmp_path / "record.json").read_text())["entries"] == entries
    png = curve_figure(entries, tmp_path / "curve.png")
    assert png.stat().st_size > 10_000


def test_training_record_job_scores_a_checkpoint(tmp_path):
    """jobs/training_record.py: a real checkpoint exported, scored by evaluate_prior, added to
    the record with its step, phase, CPU time and FD (the metric's floor beside it)."""
    import torch

    from d4a_batch.config import PriorConfig
    from d4a_batch.testing import load_job
    from d4a_batch.training.data import mock_images, quantise_u8
    from d4a_batch.training.loop import TrainConfig
    from d4a_batch.training.single import train_single_process

    tiny = PriorConfig(name="tiny", image_size=16, channel_mult=(1, 2), attention_resolutions=(),
                       kpc_per_pixel=2.0, parameterization="v", mock_structure="realistic")  # fmt: skip
    images = torch.from_numpy(quantise_u8(mock_images(range(12), 1, tiny)))
    cfg = TrainConfig(prior=tiny, batch_size=4, warmup_steps=1, max_steps=3, checkpoint_every=3,
                      downsample=2, lr_schedule="constant", loss_weighting="min_snr")  # fmt: skip
    last = train_single_process(cfg, images, tmp_path / "run")
    out = tmp_path / "record"
    assert load_job("training_record").main([
        "--checkpoint", str(last), "--out", str(out), "--n-samples", "16", "--steps", "3",
        "--stats-samples", "256", "--n-heldout", "32", "--session", "test",
    ]) == 0  # fmt: skip
    [entry] = read_record(out)
    assert (entry["step"], entry["downsample"], entry["session"]) == (3, 2, "test")
    assert entry["images_seen"] == 12 and entry["cpu_hours"] > 0
    assert entry["frechet_distance"] > 0 and entry["frechet_floor"] > 0
    assert entry["objective"]["loss_weighting"] == "min_snr"
    assert (out / "curve.png").exists() and (out / "samples_step0000003_ds2.png").exists()
