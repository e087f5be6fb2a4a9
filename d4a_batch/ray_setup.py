"""How every d4a-batch entry point starts or joins Ray.

Local clusters are kept on the loopback interface (127.0.0.1), and token auth is
set explicitly: recent Ray switches it on for local clusters depending on machine
state. A job that joins an existing cluster (``RAY_ADDRESS`` set, e.g. under
``ray job submit``) passes no resources to ``ray.init()``.
"""

from __future__ import annotations

import logging
import os

LOOPBACK = "127.0.0.1"

#: Environment for local clusters and the processes they start.
LOCAL_RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    # makes Ray resolve this node's address to 127.0.0.1 instead of the eth0 address
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def apply_local_env() -> None:
    """Set the local-cluster environment (without overriding what the user set)."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(
    address: str | None = None,
    num_cpus: float | None = None,
    num_gpus: int | None = None,
    **kwargs,
):
    """Join ``address`` (or ``RAY_ADDRESS``) if given, else start a local cluster on loopback.

    Returns the ``ray`` module. Idempotent: an initialised Ray is left as it is.
    """
    import ray

    apply_local_env()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # address="local": always a new cluster of our own, never one that another process
        # started with `ray start` on this machine (ray.init() would otherwise join it)
        ray.init(
            address="local",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            _node_ip_address=LOOPBACK,
            runtime_env={"env_vars": dict(LOCAL_RAY_ENV)},
            **kwargs,
        )
    return ray


def node_local_path(path: str) -> str:
    """``path`` as each node should open it: relative when it lies in this job's working dir.

    Under ``ray job submit --working-dir`` every node unpacks its own copy of the working
    dir and runs the job's tasks and actors in it, while the driver sees only the head's
    copy: a file shipped that way (e.g. the prior) is handed to actors relative to it, so
    each opens its own node's copy (no disk shared between nodes). Any other path or URL
    is returned unchanged. Call on the driver, connected to Ray.
    """
    import ray

    if "://" in str(path) or not os.path.isabs(str(path)):
        return str(path)
    try:
        working_dir = (ray.get_runtime_context().runtime_env or {}).get("working_dir")
    except Exception:  # not connected: nothing is shipped
        working_dir = None
    cwd = os.getcwd()
    if working_dir and os.path.commonpath([cwd, str(path)]) == cwd:
        return os.path.relpath(str(path), cwd)
    return str(path)


class _DropRecords(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_QUIET = _DropRecords("Progress bars disabled")


def quiet_ray_data() -> None:
    """Ray Data's console output as a d4a run wants it: warnings and errors only.

    The engine turns Ray Data's progress bars off (it prints its own progress, from the
    sampler's steps: ``pipeline/progress.py``); Ray Data then warns "Progress bars
    disabled" once per process, which is dropped here, as are its INFO lines (dataset
    registered, execution plan, execution finished). Everything still goes to Ray Data's
    own log file (``ray-data.log`` in the session's logs folder), and its real warnings
    (an operator that cannot be scheduled, memory pressure, ...) still reach the console.
    Idempotent; call after ``import ray.data`` (which configures the ``ray.data`` logger).
    """
    import ray.data  # noqa: F401  (configures the "ray.data" logger and its handlers)

    progress = logging.getLogger("ray.data._internal.progress")
    if _QUIET not in progress.filters:
        progress.addFilter(_QUIET)
    for handler in logging.getLogger("ray.data").handlers:
        # the console (a StreamHandler); the session's log file is a plain Handler
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.setLevel(max(handler.level, logging.WARNING))
