"""The sampling actor: the Ray wrapper of ``pack_sampler.PackSampler``, and its resources."""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

from d4a_batch.config import RunConfig, from_dict
from d4a_batch.survey.output import OutputSpec, Provenance


class DeconvolveActor:
    """Ray Data callable class: ``{pack_id, kind, stamp_size, n_objects, pack}`` rows -> output rows.

    ``__init__`` builds one ``PackSampler`` (the sampling stage, which loads the prior
    artifact from ``prior_path`` once: on CUDA when the actor has a GPU, else on CPU with
    ``torch_threads`` threads). ``__call__`` turns each pack of the batch (staged objects of
    one stamp size, or error records) into its output rows (``PackSampler.process``); a pack
    whose sampling fails becomes error rows. ``progress``: the run's
    ``pipeline.progress.ProgressBoard`` actor (None: no reports), told of every sampler step
    and finished pack.
    """

    def __init__(
        self,
        prior_path: str,
        run_config: dict[str, Any],
        spec: OutputSpec,
        provenance: Provenance,
        torch_threads: int | None = None,
        progress: Any = None,
    ) -> None:
        # imported here: the driver imports this module for actor_resources, the prior and
        # the sampler only the actor processes need
        from d4a_batch.pack_sampler import PackSampler
        from d4a_batch.pipeline.progress import StepReporter

        config: RunConfig = from_dict(RunConfig, run_config)
        self.sampler = PackSampler(
            prior_path, config, spec, provenance, torch_threads=torch_threads
        )
        # the sampler's steps, reported to the run's progress board (pipeline/progress.py);
        # the actor registers with the board once its prior is loaded, as before issue 32
        sampler = config.sampler
        self.sampler.progress = StepReporter(progress, sampler.samples, sampler.steps)

    @property
    def prior(self):
        """The sampler's prior (``prior.artifact.Prior``)."""
        return self.sampler.prior

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = [
            self.process(kind, pack)
            for kind, pack in zip(batch["kind"].to_pylist(), batch["pack"].to_pylist())
        ]
        return pa.concat_tables(tables)

    def process(self, kind: str, data: bytes) -> pa.Table:
        """Output rows of one pack (Parquet bytes)."""
        return self.sampler.process(kind, data)


def actor_resources(
    cluster: dict[str, float],
    actors: int | None,
    gpus_per_actor: float | None,
    cpus_per_actor: float | None,
    task_cpus: float,
    max_packs: int | None = None,
) -> tuple[int, float, float]:
    """(actors, cpus per actor, gpus per actor) for a cluster's resources.

    ``max_packs``: an upper bound on the run's useful actors (its objects / batch size):
    with ``actors`` None, no more actors are started than that, each keeping the CPU share
    (and torch threads) it would have had, so a small run (a rerun of a few objects, a test
    survey) does not start a process per CPU (each imports torch and loads the prior) that
    would get no pack.

    With GPUs: one actor per GPU, one GPU and one CPU each. Without: about one
    single-threaded actor per CPU, sharing the CPUs minus a headroom of
    max(2 task slots, 10 %), because actors that hold every CPU leave the
    read/stage/write tasks unscheduled and the dataset waits forever (DESIGN.md
    section 5). Single-threaded actors, because torch's thread pools slow down many
    times over when the cores are shared (measured: 218 ms vs 36 ms per image for the
    demo UNet, 2 threads vs 1, on a loaded 2-core machine).
    """
    n_cpu = float(cluster.get("CPU", 1.0))
    n_gpu = float(cluster.get("GPU", 0.0))
    gpus = (1.0 if n_gpu >= 1 else 0.0) if gpus_per_actor is None else float(gpus_per_actor)
    headroom = max(2 * task_cpus, 0.1 * n_cpu)
    auto = actors is None
    if actors is None:
        actors = max(1, int(n_gpu // gpus)) if gpus > 0 else max(1, round(n_cpu - headroom))
    if cpus_per_actor is None:
        cpus_per_actor = 1.0 if gpus > 0 else max(0.25, (n_cpu - headroom) / actors)
    if actors * cpus_per_actor > n_cpu - task_cpus + 1e-9:
        raise ValueError(
            f"{actors} actors x {cpus_per_actor} CPUs leave no CPU for the read/stage/write "
            f"tasks on a cluster of {n_cpu:g} CPUs"
        )
    if gpus > 0 and actors * gpus > n_gpu + 1e-9:
        raise ValueError(f"{actors} actors x {gpus} GPUs exceed the cluster's {n_gpu:g} GPUs")
    if auto and max_packs is not None:
        actors = max(1, min(actors, int(max_packs)))
    return int(actors), float(cpus_per_actor), gpus


def split_packs(objects: int | None, batch_size: int, actors: int) -> int:
    """Objects per pack for a run of ``objects`` on ``actors`` sampling actors.

    ``batch_size`` unless the run has fewer objects than ``actors`` full packs: then packs
    of ceil(objects / actors), so that every actor gets a pack (5 objects on 2 CPU actors:
    packs of 3 and 2 instead of one pack of 5 on one actor while the other CPU idles;
    measured in docs/HISTORY.md, issue 30). None (not known: staged packs): ``batch_size``.
    """
    batch_size = max(1, int(batch_size))
    if objects is None or objects <= 0 or objects >= actors * batch_size:
        return batch_size
    return max(1, -(-int(objects) // max(1, int(actors))))


def torch_threads_for(cpus_per_actor: float) -> int:
    """Torch threads of a CPU actor: its whole CPUs (a share of 1.5 gets 1), at least 1."""
    return max(1, math.floor(cpus_per_actor + 0.25))
