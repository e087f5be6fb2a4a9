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
    run_training,
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


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_two_cpu_workers_train_checkpoint_and_export(ray_local, tmp_path):
    from d4a_batch.training.data import mock_dataset

    cfg = TrainConfig(
        prior=TINY, batch_size=8, lr=2e-3, warmup_steps=5, max_steps=40, checkpoint_every=20
    )
    ds = mock_dataset(2 * 8 * 40, TINY, seed=1).materialize()  # one epoch
    result = run_training(cfg, ds, tmp_path, "tiny", num_workers=2, cpus_per_worker=1)
    assert result.metrics["step"] == 40
    ckpts = list_checkpoints(tmp_path, "tiny")
    assert [c.name for c in ckpts] == ["checkpoint_0000020", "checkpoint_0000040"]
    state, saved_cfg = load_checkpoint_dir(ckpts[-1])
    assert saved_cfg == cfg
    assert state["step"] == 40 and state["world_size"] == 2
    assert set(state) >= {"model", "ema", "optimizer", "history", "train_seconds"}
    hist = state["history"]
    assert [h[0] for h in hist] == list(range(1, 41))
    first, last = sum(h[1] for h in hist[:5]) / 5, sum(h[1] for h in hist[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    # the EMA differs from the raw weights and is what gets exported
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    out = export_prior(ckpts[-1], tmp_path / "artifact", n_stats=256, stats_steps=5)
    prior = load_prior(out)
    assert prior.config == TINY
    for k, v in prior.model.state_dict().items():
        torch.testing.assert_close(v, state["ema"][k])
    assert prior.stats_var.shape == (3, 16, 16) and float(prior.stats_var.mean()) > 0
    record = json.loads((out / "training_record.json").read_text())
    assert record == json.loads(
        json.dumps(
            training_record(state, cfg)
            | {"stats_seconds": record["stats_seconds"], "stats_samples": 256, "stats_steps": 5}
        )
    )
    assert record["steps"] == 40 and record["images_seen"] == 640


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
    """Kill the training job (SIGKILL) after its first checkpoint, run it again: it resumes."""
    prior_json = tmp_path / "tiny.json"
    prior_json.write_text(json.dumps(to_dict(TINY)))
    address = ray_local.get_runtime_context().gcs_address
    cmd = [
        sys.executable, str(REPO_ROOT / "jobs" / "train_prior.py"),
        "--address", address, "--storage", str(tmp_path), "--name", "killme",
        "--prior-config", str(prior_json), "--n-images", "128", "--steps", "30",
        "--checkpoint-every", "10", "--batch-size", "8", "--workers", "2", "--lr", "1e-3",
        "--warmup-steps", "5",
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
