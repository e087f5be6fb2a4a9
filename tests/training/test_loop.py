from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from d4a_batch.config import PriorConfig, to_dict
from d4a_batch.prior.artifact import load_prior
from d4a_batch.schema import REPO_ROOT
from d4a_batch.training.loop import (
    TrainConfig,
    ema_update,
    export_prior,
    list_checkpoints,
    load_checkpoint_dir,
    lr_at,
    training_record,
)

TINY = PriorConfig(
    name="tiny", image_size=16, channel_mult=(1, 2), attention_resolutions=(), kpc_per_pixel=2.0
)


def test_lr_schedule_warmup_then_cosine_by_steps_or_time():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_fraction=0.1)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 60) == pytest.approx(0.55e-3)  # halfway through the cosine
    assert lr_at(cfg, 110) == pytest.approx(1e-4)
    timed = dataclasses.replace(cfg, max_train_seconds=100.0)
    # time further along than steps: the cosine follows the time
    assert lr_at(timed, 20, seconds=100.0) == pytest.approx(1e-4)
    assert lr_at(timed, 60, seconds=0.0) == pytest.approx(0.55e-3)


def test_ema_update_is_a_convex_step():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    wa, wb = a.weight.detach().clone(), b.weight.detach().clone()
    ema_update(a, b, decay=0.75)
    torch.testing.assert_close(a.weight.detach(), 0.75 * wa + 0.25 * wb)


def _run_log(storage: Path, name: str) -> list[list[float]]:
    state, _ = load_checkpoint_dir(list_checkpoints(storage, name)[-1])
    return state["history"]


def _wait_for_dead_job_actors(ray, timeout_s: float = 300.0) -> None:
    """Block until no actor of another (the killed) job is alive in the test cluster.

    Ray reaps a dead driver's actors asynchronously; a fixed sleep is a race on a loaded
    machine. The rerun would otherwise queue behind workers that still hold the CPUs.
    Detached actors (Ray Data's stats actor) outlive every job and are not waited for.
    """
    # the GCS actor table (the public state API needs the dashboard, off in these tests)
    from ray._private.state import actors

    own_job = ray.get_runtime_context().get_job_id()
    deadline = time.time() + timeout_s
    while True:
        others = [
            a["ActorClassName"]
            for a in actors().values()
            if a["State"] != "DEAD" and a["JobID"] != own_job and not a["IsDetached"]
        ]
        if not others:
            return
        assert time.time() < deadline, f"actors of the killed job still alive: {others}"
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_killed_driver_resumes_from_last_checkpoint(ray_local, tmp_path):
    """Two CPU workers (DDP over gloo) train the tiny prior; the job is killed (SIGKILL)
    after its first checkpoint and run again: it resumes there, finishes the run once,
    learns, and exports the EMA weights as a prior artifact with its training record."""
    prior_json = tmp_path / "tiny.json"
    prior_json.write_text(json.dumps(to_dict(TINY)))
    address = ray_local.get_runtime_context().gcs_address
    cmd = [
        sys.executable, str(REPO_ROOT / "jobs" / "train_prior.py"),
        "--address", address, "--storage", str(tmp_path), "--name", "killme",
        "--prior-config", str(prior_json), "--n-images", "128", "--steps", "30",
        "--checkpoint-every", "10", "--batch-size", "8", "--workers", "2", "--lr", "2e-3",
        "--warmup-steps", "5", "--out", str(tmp_path / "artifact"), "--stats-steps", "5",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    snapshot = tmp_path / "killme" / "checkpoint_manager_snapshot.json"
    log1 = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(
        cmd, stdout=log1, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        deadline = time.time() + 600
        # Ray Train registers a checkpoint in this snapshot once it is complete
        while not snapshot.exists():
            assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 600 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log1.close()
    assert proc.returncode == -signal.SIGKILL
    registered = [int(s) for s in re.findall(r"checkpoint_(\d{7})", snapshot.read_text())]
    assert registered and max(registered) < 30
    _wait_for_dead_job_actors(ray_local)
    run2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run2.returncode == 0, run2.stdout[-3000:] + run2.stderr[-3000:]
    out = run2.stdout + run2.stderr
    resumed = [int(s) for s in re.findall(r"resumed from checkpoint at step (\d+)", out)]
    assert resumed and resumed[0] == max(registered), out[-3000:]
    hist = _run_log(tmp_path, "killme")
    # continuous: the steps before the checkpoint are kept, none is counted twice
    assert [h[0] for h in hist] == list(range(1, 31))
    ckpts = list_checkpoints(tmp_path, "killme")
    assert [c.name for c in ckpts][-1] == "checkpoint_0000030"
    state, saved_cfg = load_checkpoint_dir(ckpts[-1])
    assert saved_cfg.prior == TINY and saved_cfg.batch_size == 8 and saved_cfg.max_steps == 30
    assert state["step"] == 30 and state["world_size"] == 2
    assert set(state) >= {"model", "ema", "optimizer", "history", "train_seconds"}
    first, last = sum(h[1] for h in hist[:5]) / 5, sum(h[1] for h in hist[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    # the EMA differs from the raw weights and is what gets exported
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    prior = load_prior(tmp_path / "artifact")
    assert prior.config == TINY
    for k, v in prior.model.state_dict().items():
        torch.testing.assert_close(v, state["ema"][k])
    assert prior.stats_var.shape == (3, 16, 16) and float(prior.stats_var.mean()) > 0
    record = json.loads((tmp_path / "artifact" / "training_record.json").read_text())
    expect = json.loads(json.dumps(training_record(state, saved_cfg)))
    # the job's process exported it: its torch thread count is its own, not this process's
    record["machine"].pop("torch_threads"), expect["machine"].pop("torch_threads")
    assert {k: record[k] for k in expect} == expect
    assert record["steps"] == 30 and record["images_seen"] == 480
    assert record["stats_samples"] == 256 and record["stats_steps"] == 5


def test_single_process_training_checkpoints_resumes_and_exports(tmp_path, capsys):
    """``train_single_process`` (no Ray): the same step, schedule, EMA and checkpoint folders
    as the Ray Train worker; a second call continues the run; the export loads as a prior."""
    import numpy as np

    from d4a_batch.training.data import mock_images, quantise_u8
    from d4a_batch.training.single import latest_checkpoint, train_single_process

    images = torch.from_numpy(quantise_u8(mock_images(range(40), 1, TINY)))
    assert images.dtype == torch.uint8 and images.shape == (40, 3, 16, 16)
    cfg = TrainConfig(
        prior=TINY, batch_size=8, lr=2e-3, warmup_steps=5, max_steps=30, checkpoint_every=10
    )
    run = tmp_path / "run"
    last = train_single_process(cfg, images, run, log_every=5)
    assert [p.name for p in sorted(run.glob("checkpoint_*"))] == [
        "checkpoint_0000010", "checkpoint_0000020", "checkpoint_0000030",
    ]  # fmt: skip
    assert last == latest_checkpoint(run) == run / "checkpoint_0000030"
    state, saved = load_checkpoint_dir(last)
    assert saved == cfg and state["world_size"] == 1
    hist = state["history"]
    assert [h[0] for h in hist] == list(range(1, 31))
    assert all(np.isfinite(h[1]) and h[2] > 0 for h in hist)
    first, final = np.mean([h[1] for h in hist[:5]]), np.mean([h[1] for h in hist[-5:]])
    assert final < 0.8 * first, (first, final)
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])

    # the same run folder with more steps continues from step 30, not from scratch
    more = dataclasses.replace(cfg, max_steps=40)
    last = train_single_process(more, images, run, log_every=5)
    assert "resumed from checkpoint_0000030 at step 30" in capsys.readouterr().out
    state2, _ = load_checkpoint_dir(last)
    assert [h[0] for h in state2["history"]] == list(range(1, 41))
    assert state2["history"][:30] == hist
    with pytest.raises(ValueError, match="do not fit"):
        train_single_process(cfg, images[:, :2], tmp_path / "bad")

    out = export_prior(last, tmp_path / "artifact", n_stats=256, stats_steps=3)
    prior = load_prior(out)
    for k, v in prior.model.state_dict().items():
        torch.testing.assert_close(v, state2["ema"][k])
    assert json.loads((out / "training_record.json").read_text())["steps"] == 40


def test_train_prior_job_single_process_from_an_image_file(tmp_path):
    """``jobs/train_prior.py --single-process --data FILE``: the path the GPU machine ran
    (no Ray): a .npy.xz of 8-bit mocks from ``jobs/make_training_set.py`` in, an artifact
    and a sample file out."""
    import numpy as np

    from d4a_batch.testing import load_job
    from d4a_batch.training.inputs import load_image_file

    cfg_json = tmp_path / "tiny.json"
    cfg_json.write_text(json.dumps(to_dict(TINY)))
    data = tmp_path / "mocks.npy.xz"
    make = load_job("make_training_set")
    assert make.main(["--prior-config", str(cfg_json), "--n-images", "24", "--chunk", "10",
                      "--out", str(data)]) == 0  # fmt: skip
    recipe = json.loads(Path(str(data) + ".json").read_text())
    assert recipe["shape"] == [24, 3, 16, 16] and recipe["seed"] == 0
    job = load_job("train_prior")
    images = load_image_file(data)
    assert images.dtype == torch.uint8 and tuple(images.shape) == (24, 3, 16, 16)
    args = ["--single-process", "--data", str(data), "--prior-config", str(cfg_json),
            "--storage", str(tmp_path / "train"), "--name", "t", "--steps", "6",
            "--batch-size", "8", "--checkpoint-every", "3", "--warmup-steps", "2",
            "--device", "cpu", "--stats-samples", "256", "--stats-steps", "2",
            "--out", str(tmp_path / "prior"), "--samples-out", str(tmp_path / "s.npz"),
            "--n-samples-out", "5"]  # fmt: skip
    assert job.main(args) == 0
    prior = load_prior(tmp_path / "prior")
    assert prior.config == TINY
    record = json.loads((tmp_path / "prior" / "training_record.json").read_text())
    assert record["steps"] == 6 and record["single_process"] is True
    assert record["training_images"]["recipe"]["shape"] == [24, 3, 16, 16]
    x = np.load(tmp_path / "s.npz")["x"]
    assert x.shape == (5, 3, 16, 16) and x.dtype == np.float16 and np.all(np.abs(x) <= 1.01)


def test_unpack_gpu_prior_rebuilds_the_artifact_from_the_calls_files(tmp_path):
    """What hsc-64-gpu.sh returns (the artifact without its weights, the last checkpoint as
    tar parts) is rebuilt by jobs/unpack_gpu_prior.py into the same artifact."""
    import io
    import tarfile

    from d4a_batch.testing import load_job
    from d4a_batch.training.data import mock_images, quantise_u8
    from d4a_batch.training.single import train_single_process

    images = torch.from_numpy(quantise_u8(mock_images(range(16), 2, TINY)))
    cfg = TrainConfig(prior=TINY, batch_size=8, warmup_steps=1, max_steps=3, checkpoint_every=3)
    last = train_single_process(cfg, images, tmp_path / "run")
    export_prior(last, tmp_path / "prior", n_stats=256, stats_steps=2)
    returned = tmp_path / "returned"
    returned.mkdir()
    with tarfile.open(returned / "prior.tar", "w") as t:  # as the script: weights left out
        t.add(tmp_path / "prior", "prior", filter=lambda m: None if m.name.endswith(
            "weights.safetensors") else m)  # fmt: skip
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        t.add(last, last.name)
    data = buf.getvalue()
    for k, i in enumerate(range(0, len(data), 100_000)):  # `split -b`: parts in order
        (returned / f"ckpt.tar.part-a{chr(97 + k)}").write_bytes(data[i : i + 100_000])
    assert len(list(returned.glob("ckpt.tar.part-*"))) > 1
    job = load_job("unpack_gpu_prior")
    report = job.unpack(returned, tmp_path / "rebuilt", tmp_path / "ckpts")
    assert report["steps"] == 3 and report["sha256_matches"]
    a, b = load_prior(tmp_path / "prior"), load_prior(tmp_path / "rebuilt")
    assert a.sha256 == b.sha256 and a.config == b.config
    torch.testing.assert_close(a.stats_var, b.stats_var)
    assert (tmp_path / "rebuilt" / "training_record.json").exists()
    state, _ = load_checkpoint_dir(tmp_path / "ckpts" / last.name)  # resumable where it landed
    assert state["step"] == 3
