"""Training across nodes: ``jobs/train_prior.py`` on a three-node Ray cluster, checkpoints on S3.

Head (0 CPUs: the job's driver and Ray Train's controller) and two worker nodes
(tests/cluster.py); two training workers spread over the worker nodes; training images
and checkpoints on moto's S3 server (no disk shared between nodes). Once the first
checkpoint is registered, a worker node holding a training worker is killed as a whole; Ray Train restarts the
worker group from the last checkpoint (``--max-failures``) or, if the run fails, a rerun
of the same command resumes it: the step counter goes on from the checkpoint and the loss
history is continuous.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest

from d4a_batch.config import to_dict
from d4a_batch.schema import REPO_ROOT
from d4a_batch.testing import TINY_PRIOR
from d4a_batch.training.loop import fetch_checkpoint, list_checkpoints, load_checkpoint_dir
from tests.cluster import Cluster, cluster_env, ray_cli_available
from tests.faults import moto_s3

STEPS, EVERY = 30, 10


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not ray_cli_available(), reason="the `ray` command line is not installed")
def test_a_worker_node_dies_and_training_resumes_from_the_s3_checkpoint(tmp_path):
    s3fs = pytest.importorskip("s3fs")
    workdir = tmp_path / "job"
    workdir.mkdir()
    shutil.copy(REPO_ROOT / "jobs" / "train_prior.py", workdir / "train_prior.py")
    (workdir / "tiny.json").write_text(json.dumps(to_dict(TINY_PRIOR)))
    cluster = Cluster(cluster_env())
    t0 = time.monotonic()
    with moto_s3("train") as s3:
        so = s3.options()
        fs = s3fs.S3FileSystem(**so)
        storage = "s3://train/runs"
        cmd = ["python", "train_prior.py", "--storage", storage,
               "--storage-options", json.dumps(so), "--name", "mn",
               "--prior-config", "tiny.json", "--n-images", "128", "--steps", str(STEPS),
               "--checkpoint-every", str(EVERY), "--batch-size", "8", "--workers", "2",
               "--placement-strategy", "SPREAD", "--max-failures", "3", "--lr", "1e-3",
               "--warmup-steps", "5"]  # fmt: skip
        snapshot = "train/runs/mn/checkpoint_manager_snapshot.json"
        logs = ""
        try:
            cluster.start("head", 0, head=True)
            cluster.wait_for(1)
            cluster.start("a", 2)
            cluster.start("b", 2)
            cluster.wait_for(3)
            t_up = time.monotonic() - t0
            cluster.submit("d4a-train-1", workdir, cmd)
            deadline = time.monotonic() + 600
            # Ray Train registers a checkpoint in this snapshot once it is complete on S3
            while not fs.exists(snapshot):
                state = cluster.job_status("d4a-train-1")
                assert state in ("RUNNING", "PENDING"), cluster.logs("d4a-train-1")
                assert time.monotonic() < deadline, "no checkpoint within 600 s"
                time.sleep(1)
                fs.invalidate_cache()
            registered = [
                int(s) for s in re.findall(r"checkpoint_(\d{7})", fs.cat(snapshot).decode())
            ]
            assert registered and max(registered) < STEPS, "the run ended before the kill"
            # the kill takes a training worker away (the workers are spread over a and b)
            victim = cluster.node_holding("RayTrainWorker")
            assert victim is not None, "no training worker on a worker node"
            cluster.kill(victim)
            t_kill = time.monotonic() - t0
            state = cluster.wait_job("d4a-train-1", 600)
            logs = cluster.logs("d4a-train-1", 40000)
            reruns = 0
            if state != "SUCCEEDED":  # the same command again resumes from S3
                reruns = 1
                cluster.submit("d4a-train-2", workdir, cmd)
                state = cluster.wait_job("d4a-train-2", 600)
                logs += cluster.logs("d4a-train-2", 40000)
            assert state == "SUCCEEDED", logs[-6000:]
        finally:
            cluster.stop()
        print(logs[-4000:])
        print(f"[multinode-train] 3 nodes up at {t_up:.0f} s, node {victim} killed at {t_kill:.0f} s "
              f"(checkpoints {registered}), done at {time.monotonic() - t0:.0f} s "
              f"({reruns} reruns)")  # fmt: skip
        ckpts = list_checkpoints(storage, "mn", so)
        assert [c.rsplit("/", 1)[-1] for c in ckpts] == [
            f"checkpoint_{s:07d}" for s in range(EVERY, STEPS + 1, EVERY)
        ]
        state, _ = load_checkpoint_dir(fetch_checkpoint(ckpts[-1], tmp_path / "ckpt", so))
    resumed = [int(s) for s in re.findall(r"resumed from checkpoint at step (\d+)", logs)]
    # resumed from a checkpoint registered by the time of the kill or later, never from 0
    assert resumed and min(resumed) >= max(registered) and max(resumed) < STEPS, logs[-4000:]
    # continuous: the steps before the checkpoint are kept, none is counted twice
    assert state["step"] == STEPS and state["world_size"] == 2
    assert [h[0] for h in state["history"]] == list(range(1, STEPS + 1))


def test_checkpoints_on_s3_are_listed_in_order_and_fetched(tmp_path):
    """The storage side without Ray: checkpoints under an s3:// storage path, through the
    filesystem Ray Train gets (``train_storage``), listed and fetched as local folders."""
    import torch

    from d4a_batch.training.loop import TrainConfig, save_checkpoint_dir, train_storage

    cfg = TrainConfig(prior=TINY_PRIOR, max_steps=20)
    with moto_s3("ckpt") as s3:
        so = s3.options()
        path, pyfs = train_storage("s3://ckpt/runs", so)
        assert path == "ckpt/runs"
        for step in (20, 10):  # written out of order; one folder without its state: skipped
            local = save_checkpoint_dir(tmp_path / f"c{step}", {"step": torch.tensor(step)}, cfg)
            for f in local.iterdir():
                with pyfs.open_output_stream(f"{path}/mn/checkpoint_{step:07d}/{f.name}") as out:
                    out.write(f.read_bytes())
        with pyfs.open_output_stream(f"{path}/mn/checkpoint_0000030/config.json") as out:
            out.write(b"{}")
        ckpts = list_checkpoints("s3://ckpt/runs", "mn", so)
        assert ckpts == [
            "s3://ckpt/runs/mn/checkpoint_0000010",
            "s3://ckpt/runs/mn/checkpoint_0000020",
        ]
        state, saved = load_checkpoint_dir(fetch_checkpoint(ckpts[-1], tmp_path / "got", so))
    assert int(state["step"]) == 20 and saved == cfg
    assert (tmp_path / "got" / "checkpoint_0000020").is_dir()
    # local storage paths are unchanged: absolute, no filesystem
    assert train_storage(tmp_path / "x") == (str((tmp_path / "x").resolve()), None)
