"""A real multi-node Ray cluster on this machine for tests: nodes started with ``ray start``.

Head and worker nodes each get their own ``--temp-dir``, their own ports (other Ray
clusters run on this machine at the same time: never ``ray stop``, which would end them
all) and a custom resource ``d4a_node_<name>``. Every node is one process group
(``ray start --block`` in a new session), so a node is killed as a whole: raylet, object
store, agents and every worker it started. Jobs go in with ``ray job submit``; their
state and logs come from the job REST API (``JobSubmissionClient``).

    cluster = Cluster(cluster_env())
    try:
        cluster.start("head", 0, head=True); cluster.wait_for(1)
        cluster.start("a", 2); cluster.start("b", 2); cluster.wait_for(3)
        cluster.submit("job-1", workdir, ["python", "-m", "..."])
        cluster.kill("a")
    finally:
        cluster.stop()
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

from d4a_batch.ray_setup import LOCAL_RAY_ENV

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free now (all bound at once, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_range(n: int) -> tuple[int, int]:
    """A window of ``n`` ports that are free now (for a node's worker processes)."""
    for _ in range(200):
        lo = random.randint(20000, 60000 - n)
        socks = []
        try:
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


def ray_cli_available() -> bool:
    return shutil.which("ray") is not None


def cluster_env() -> dict:
    """LOCAL_RAY_ENV, but with multi-node clusters on loopback allowed (Ray refuses nodes
    joining a 127.0.0.1 head otherwise; every node is given --node-ip-address)."""
    env = dict(os.environ) | LOCAL_RAY_ENV | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


@dataclass
class Cluster:
    """Nodes started with ``ray start --block`` (each its own process group)."""

    env: dict
    gcs: int = 0  # picked in __post_init__ (distinct)
    dashboard: int = 0
    nodes: dict = field(default_factory=dict)  # name -> Popen
    temp_dirs: list = field(default_factory=list)
    args: dict = field(default_factory=dict)  # name -> (cpus, head, temp dir)
    retries: dict = field(default_factory=dict)  # name -> restarts so far

    def __post_init__(self) -> None:
        if not (self.gcs and self.dashboard):
            self.gcs, self.dashboard = free_ports(2)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def start(self, name: str, cpus: float, head: bool = False) -> None:
        tmp = tempfile.mkdtemp(prefix=f"rmn_{name}_", dir="/tmp")  # short: unix sockets
        self.temp_dirs.append(tmp)
        self.args[name] = (cpus, head, tmp)
        self._launch(name)

    def _argv(self, name: str) -> list[str]:
        """``ray start`` arguments of node ``name``, with ports picked now (a relaunch after a
        failed start gets fresh ones; the head's GCS and dashboard ports stay)."""
        cpus, head, tmp = self.args[name]
        lo, hi = free_range(24)
        while lo <= self.gcs <= hi or lo <= self.dashboard <= hi:
            lo, hi = free_range(24)
        used = {self.gcs, self.dashboard, *range(lo, hi + 1)}
        ports = [p for p in free_ports(12) if p not in used][:7]
        assert len(ports) == 7, "no free ports"
        node_manager, object_manager, metrics, agent_http, agent_grpc, runtime_env, client = ports
        args = ["ray", "start", "--block", "--disable-usage-stats",
                "--node-ip-address=127.0.0.1", f"--temp-dir={tmp}", f"--num-cpus={cpus}",
                f"--resources={json.dumps({f'd4a_node_{name}': 1})}",
                f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
                f"--metrics-export-port={metrics}",
                f"--dashboard-agent-listen-port={agent_http}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={runtime_env}",
                f"--min-worker-port={lo}", f"--max-worker-port={hi}",
                "--object-store-memory=200000000"]  # fmt: skip
        if head:
            args += ["--head", f"--port={self.gcs}", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
                     f"--ray-client-server-port={client}"]  # fmt: skip
        else:
            args += [f"--address=127.0.0.1:{self.gcs}"]
        return args

    def _launch(self, name: str) -> None:
        tmp = self.args[name][2]
        with open(f"{tmp}.log", "ab") as log:
            self.nodes[name] = subprocess.Popen(
                self._argv(name),
                env=self.env,
                start_new_session=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log_tail(self, name: str, n: int = 3000) -> str:
        with open(self.args[name][2] + ".log", errors="replace") as f:
            return f.read()[-n:]

    def alive_nodes(self) -> int:
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(address=self.address, timeout=20, raise_on_missing_output=False)
        except Exception:  # while the head starts, the state API may not answer yet
            return 0
        return sum(n.state == "ALIVE" for n in nodes)

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
                raise RuntimeError(f"ray node {name} exited while starting:\n{self.log_tail(name)}")
            time.sleep(2)
        raise TimeoutError(f"{n_nodes} nodes not alive after {timeout} s")

    # ----------------------------------------------------------------------- jobs
    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)

    def submit(self, job_id: str, workdir, entrypoint: list[str]) -> None:
        """``ray job submit --no-wait`` of ``entrypoint`` with ``workdir`` as working dir."""
        r = subprocess.run(
            ["ray", "job", "submit", "--address", self.address, "--submission-id", job_id,
             "--working-dir", str(workdir), "--no-wait", "--", *entrypoint],
            env=self.env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"ray job submit failed:\n{r.stdout}\n{r.stderr}")

    def job_status(self, job_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        return str(self.client().get_job_status(job_id).value)

    def wait_job(self, job_id: str, timeout: float) -> str:
        """The job's final state, or ``"TIMEOUT"``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_status(job_id)
            if state in TERMINAL:
                return state
            time.sleep(2)
        return "TIMEOUT"

    def logs(self, job_id: str, n: int = 8000) -> str:
        try:
            return self.client().get_job_logs(job_id)[-n:]
        except Exception as e:  # the head may be gone
            return f"(no logs: {e})"

    # ----------------------------------------------------------------------- nodes
    def node_id(self, name: str) -> str:
        """Ray's id of node ``name`` (the alive node holding resource ``d4a_node_<name>``)."""
        from ray.util.state import list_nodes

        for n in list_nodes(address=self.address, timeout=30, detail=True):
            if n.state == "ALIVE" and f"d4a_node_{name}" in (n.resources_total or {}):
                return n.node_id
        raise LookupError(f"no alive node {name}")

    def actors_on(self, name: str, class_part: str) -> list[str]:
        """Class names of the alive actors on node ``name`` whose class name has ``class_part``."""
        from ray.util.state import list_actors

        node = self.node_id(name)
        actors = list_actors(
            address=self.address, filters=[("state", "=", "ALIVE")], timeout=30, detail=True
        )
        return [a.class_name for a in actors if a.node_id == node and class_part in a.class_name]

    def node_holding(self, class_part: str, names: tuple[str, ...] = ("a", "b")) -> str | None:
        """The first of ``names`` with an alive actor of ``class_part`` (None: none yet): the
        node to kill so that the kill takes work away, wherever Ray placed the actors."""
        for name in names:
            if self.actors_on(name, class_part):
                return name
        return None

    def kill(self, name: str) -> None:
        """The whole node: its raylet, object store, agents and workers (its process group)."""
        proc = self.nodes.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)

    def stop(self) -> None:
        """Kill every node of this cluster (worker nodes first), remove their temp dirs."""
        for name in sorted(self.nodes, key=lambda n: n == "head"):
            self.kill(name)
        for tmp in self.temp_dirs:
            shutil.rmtree(tmp, ignore_errors=True)
            if os.path.exists(f"{tmp}.log"):
                os.unlink(f"{tmp}.log")
