"""A real three-node Ray cluster on this machine (``ray start``): a node dies mid-run.

Head (0 CPUs: the job's driver only) and two worker nodes, each started with its own
``--temp-dir`` and its own custom resource, all on loopback with ports of their own
(other Ray clusters run on this machine at the same time). Catalog, cutouts and output
live on moto's S3 server; the prior travels with the job's working dir (``ray job
submit --working-dir``: each node unpacks its own copy, and the actors get its path
relative to it, see ``ray_setup.node_local_path``). The code itself is the installed
package, as on a cluster built from one image.

The reference "single-node run" is the same job on worker node a alone (before node b
joins); then the job runs on both workers, node a is killed (SIGKILL to its whole process
group) once the first partition is committed, and the job, or a rerun, must finish with
every object once and the reference's values.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from d4a_batch.ray_setup import LOCAL_RAY_ENV
from d4a_batch.schema import LEDGER_DIR, Col
from tests.faults import moto_s3

STEPS, SAMPLES, SEED = 30, 2, 11


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_range(n: int) -> tuple[int, int]:
    """A window of ``n`` ports that are free now (for a node's worker processes)."""
    for _ in range(200):
        lo = random.randint(20000, 60000 - n)
        try:
            socks = []
            for p in range(lo, lo + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return lo, lo + n - 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port window")


def _cluster_env() -> dict:
    """LOCAL_RAY_ENV, but with multi-node clusters on loopback allowed (Ray refuses nodes
    joining a 127.0.0.1 head otherwise; every node is given --node-ip-address)."""
    env = dict(os.environ) | LOCAL_RAY_ENV | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


@dataclass
class Cluster:
    """Nodes started with ``ray start --block`` (each its own process group)."""

    env: dict
    gcs: int = field(default_factory=_free_port)
    dashboard: int = field(default_factory=_free_port)
    nodes: dict = field(default_factory=dict)  # name -> Popen
    temp_dirs: list = field(default_factory=list)
    args: dict = field(default_factory=dict)  # name -> (ray start argv, temp dir)
    retries: dict = field(default_factory=dict)  # name -> restarts so far

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def start(self, name: str, cpus: float, head: bool = False) -> None:
        tmp = tempfile.mkdtemp(prefix=f"rmn_{name}_", dir="/tmp")  # short: unix sockets
        self.temp_dirs.append(tmp)
        lo, hi = _free_range(24)
        args = ["ray", "start", "--block", "--disable-usage-stats",
                "--node-ip-address=127.0.0.1", f"--temp-dir={tmp}", f"--num-cpus={cpus}",
                f"--resources={json.dumps({f'd4a_node_{name}': 1})}",
                f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
                f"--metrics-export-port={_free_port()}",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--dashboard-agent-grpc-port={_free_port()}",
                f"--runtime-env-agent-port={_free_port()}",
                f"--min-worker-port={lo}", f"--max-worker-port={hi}",
                "--object-store-memory=200000000"]  # fmt: skip
        if head:
            args += ["--head", f"--port={self.gcs}", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
                     f"--ray-client-server-port={_free_port()}"]  # fmt: skip
        else:
            args += [f"--address=127.0.0.1:{self.gcs}"]
        self.args[name] = (args, tmp)
        self._launch(name)

    def _launch(self, name: str) -> None:
        args, tmp = self.args[name]
        self.nodes[name] = subprocess.Popen(
            args, env=self.env, start_new_session=True,
            stdout=open(f"{tmp}.log", "wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ray", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def alive_nodes(self) -> int:
        r = self.ray("list", "nodes", "--address", self.address, "--format", "json")
        try:  # while the head starts, the CLI may answer with an error text
            return sum(n["state"] == "ALIVE" for n in json.loads(r.stdout))
        except (ValueError, TypeError, KeyError):
            return 0

    def wait_for(self, n_nodes: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=5)
                if self.alive_nodes() >= n_nodes:
                    return
            except OSError:
                pass
            for name, p in list(self.nodes.items()):
                if p.poll() is None:
                    continue
                # on a loaded machine a node can miss Ray's fixed 30 s start-up window
                if self.retries.get(name, 0) < 3:
                    self.retries[name] = self.retries.get(name, 0) + 1
                    self._launch(name)
                    continue
                with open(self.args[name][1] + ".log", errors="replace") as f:
                    tail = f.read()[-3000:]
                raise RuntimeError(f"ray node {name} exited while starting:\n{tail}")
            time.sleep(3)
        raise TimeoutError(f"{n_nodes} nodes not alive after {timeout} s")

    def kill(self, name: str) -> None:
        """The whole node: its raylet, object store, agents and workers (its process group)."""
        proc = self.nodes.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)

    def stop(self) -> None:
        for name in list(self.nodes):
            proc = self.nodes.pop(name)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for tmp in self.temp_dirs:
            shutil.rmtree(tmp, ignore_errors=True)
            if os.path.exists(f"{tmp}.log"):
                os.unlink(f"{tmp}.log")


def _job_status(cluster: Cluster, job_id: str) -> str:
    r = cluster.ray("job", "status", "--address", cluster.address, job_id)
    for state in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING"):
        if state in r.stdout:
            return state
    return "UNKNOWN"


def _submit(cluster: Cluster, job_id: str, workdir, args: list[str]) -> None:
    r = cluster.ray(
        "job", "submit", "--address", cluster.address, "--submission-id", job_id,
        "--working-dir", str(workdir), "--no-wait", "--",
        "python", "-m", "d4a_batch.cli.deconvolve", *args,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def _wait_job(cluster: Cluster, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _job_status(cluster, job_id)
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return state
        time.sleep(5)
    return "TIMEOUT"


def _logs(cluster: Cluster, job_id: str) -> str:
    r = cluster.ray("job", "logs", "--address", cluster.address, job_id)
    return r.stdout[-6000:] + r.stderr[-2000:]


def _ok_partitions(fs, output: str) -> int:
    n = 0
    for f in fs.find(f"{output}/{LEDGER_DIR}/partitions"):
        if f.endswith(".json"):
            n += json.loads(fs.cat_file(f))["status"] == "ok"
    return n


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.skipif(
    os.environ.get("D4A_MULTINODE") != "1",
    reason="opt-in (D4A_MULTINODE=1) until it has passed once: on the shared 2-core dev box "
    "Ray nodes missed Ray's fixed 30 s start-up window (load 40-60), so it never ran through",
)
def test_a_node_dies_mid_run_and_every_object_ends_once_as_on_one_node(
    tiny_survey, tiny_prior, tmp_path
):
    import s3fs

    workdir = tmp_path / "job"
    shutil.copytree(tiny_prior, workdir / "prior")
    cluster = Cluster(_cluster_env())
    with moto_s3("survey") as s3:
        so = s3.options()
        fs = s3fs.S3FileSystem(**so)
        fs.put(str(tiny_survey), "survey/in", recursive=True)
        n_parts = len(fs.glob("survey/in/dataset/Norder=*/Dir=*/Npix=*.parquet"))

        def args(output: str) -> list[str]:
            return ["--catalog", "s3://survey/in", "--output", output, "--prior", "prior",
                    "--steps", str(STEPS), "--samples", str(SAMPLES), "--seed", str(SEED),
                    "--batch-size", "1", "--actors", "2", "--cpus-per-actor", "1",
                    "--storage-options", json.dumps(so)]  # fmt: skip

        try:
            cluster.start("head", 0, head=True)
            cluster.wait_for(1)  # a worker gives up on a head that has not registered yet
            cluster.start("a", 3)
            cluster.wait_for(2)
            # the single-node run: worker node a alone, same seed
            _submit(cluster, "d4a-single-node", workdir, args("s3://survey/ref"))
            assert _wait_job(cluster, "d4a-single-node", 900) == "SUCCEEDED", _logs(
                cluster, "d4a-single-node"
            )
            cluster.start("b", 3)
            cluster.wait_for(3)
            _submit(cluster, "d4a-multinode-1", workdir, args("s3://survey/out"))
            # kill worker node a once the first partition is committed (mid-run)
            deadline = time.monotonic() + 900
            while _ok_partitions(fs, "survey/out") < 1:
                assert _job_status(cluster, "d4a-multinode-1") in ("RUNNING", "PENDING"), _logs(
                    cluster, "d4a-multinode-1"
                )
                assert time.monotonic() < deadline, "no partition committed in 900 s"
                time.sleep(2)
            assert _ok_partitions(fs, "survey/out") < n_parts, "the run ended before the kill"
            cluster.kill("a")
            state = _wait_job(cluster, "d4a-multinode-1", 900)
            print(_logs(cluster, "d4a-multinode-1"))
            if state != "SUCCEEDED":  # a rerun on the survivor finishes it
                _submit(cluster, "d4a-multinode-2", workdir, args("s3://survey/out"))
                state = _wait_job(cluster, "d4a-multinode-2", 900)
                print(_logs(cluster, "d4a-multinode-2"))
            assert state == "SUCCEEDED"
        finally:
            cluster.stop()
        signed = {"storage_options": so | {"anon": False}}
        ref = pd.read_parquet("s3://survey/ref/dataset", **signed).set_index(Col.OBJECT_ID)
        out = pd.read_parquet("s3://survey/out/dataset", **signed)
    # every object exactly once
    assert out[Col.OBJECT_ID].is_unique and sorted(out[Col.OBJECT_ID]) == sorted(ref.index)
    out = out.set_index(Col.OBJECT_ID).loc[ref.index]
    # placement does not change results: per-object seeds
    assert (out[Col.STATUS] == ref[Col.STATUS]).all()
    for col in (Col.CHI2, "flux_i", Col.HALLUCINATION):
        np.testing.assert_allclose(out[col].to_numpy(), ref[col].to_numpy(), rtol=1e-4)
