"""The whole engine against a plain loop in one process, on the same objects (issue 30).

``engine_vs_loop`` times, for each catalog size, on one mock survey of that many objects:

- **loop**: what a user would write without the engine, in this process: read the
  catalog's partitions, stage every object (``Stager.stage_rows``), pack them
  (``make_packs``), sample each pack with the engine's own per-pack code
  (``PackSampler.process``, which the engine's actor wraps: the prior loaded once, torch
  with all of this process's threads), write the rows to one Parquet file;
- **engine**: ``pipeline.engine.run_survey`` on a Ray cluster already started (its
  start-up is not counted: a cluster serves many runs): fingerprints, ledger, staging
  tasks, the actor pool in its default layout, commits, catalog metadata.

Both on the wall clock, loop first, with the load average before each. ``small_run_layouts``
runs the engine on one small catalog in several actor layouts (one pack on one
single-threaded actor, as before issue 30; packs split over one single-threaded actor per
CPU, the default since; one actor with every CPU as torch threads).

``engine_sections`` runs both (``jobs/benchmark_throughput.py``'s sections 6 and 7) on one
local Ray cluster; ``actor_sweep`` (its section 4) times the engine on a small mock survey
against the number of actors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from d4a_batch.config import PriorConfig, RunConfig, SamplerConfig, to_dict
from d4a_batch.mock.survey import MockSurveyConfig, ensure_mock_survey
from d4a_batch.prior.artifact import read_prior_config


def mock_survey(root: Path, n_objects: int, prior_path: str, seed: int = 30) -> Path:
    """A mock survey of ``n_objects`` at the prior's scale (built once per config)."""
    cfg, _ = read_prior_config(prior_path)
    return ensure_mock_survey(root, MockSurveyConfig(
        n_objects=n_objects, seed=seed, bands=tuple(cfg.bands), kpc_per_pixel=cfg.kpc_per_pixel,
        n_model=cfg.image_size, mock_structure=cfg.mock_structure,
    ))  # fmt: skip


def plain_loop(
    survey: Path, prior_path: str, config: RunConfig, batch_size: int, out: Path,
    threads: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Seconds (wall) of the loop over every object of ``survey`` in this process."""
    import torch

    from d4a_batch.pack_sampler import PackSampler
    from d4a_batch.survey.hats_io import open_input_catalog, read_partition
    from d4a_batch.survey.output import OutputSpec, Provenance
    from d4a_batch.survey.packs import make_packs
    from d4a_batch.survey.staging import Stager

    threads = threads or os.cpu_count() or 1
    before = torch.get_num_threads()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    prior_cfg, meta = read_prior_config(prior_path)
    bands = tuple(prior_cfg.bands)
    cat = open_input_catalog(str(survey))
    rows = [
        r for p in cat.partitions
        for r in read_partition(p, config.columns, bands, cat.healpix_column).to_pylist()
    ]  # fmt: skip
    stager = Stager(str(cat.root), prior_cfg, config.physics, config.staging)
    packs = make_packs(stager.stage_rows(rows), batch_size)
    t_staged = time.perf_counter()
    spec = OutputSpec(bands=bands, image_size=prior_cfg.image_size, maps=config.write_maps)
    prov = Provenance.new_run(prior_cfg, meta, config)
    try:
        sampler = PackSampler(prior_path, config, spec, prov, torch_threads=threads)
        tables = [sampler.process(p["kind"], p["pack"]) for p in packs]
    finally:
        torch.set_num_threads(before)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables(tables), out)
    seconds = time.perf_counter() - t0
    return {
        "objects": len(rows), "seconds": seconds, "objects_per_s": len(rows) / seconds,
        "staging_seconds": t_staged - t0, "packs": len(packs), "torch_threads": threads,
        "load_before": load,
    }  # fmt: skip


def engine_run(
    survey: Path, prior_path: str, config: RunConfig, out: Path, **options: Any
) -> dict[str, Any]:
    """Seconds (wall) of one ``run_survey`` (the Ray cluster must be up) with these
    ``ExecutionOptions``, and the layout it chose (from its log line)."""
    import logging

    from d4a_batch.pipeline.engine import ExecutionOptions, run_survey

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    engine_log = logging.getLogger("d4a_batch.pipeline.engine")
    handler, level = Keep(), engine_log.level
    engine_log.addHandler(handler)
    engine_log.setLevel(logging.INFO)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        opts = ExecutionOptions(overwrite=True, **options)
        summary = run_survey(str(survey), str(out), prior_path, config, opts)
    finally:
        engine_log.removeHandler(handler)
        engine_log.setLevel(level)
    seconds = time.perf_counter() - t0
    chosen = next((x for x in lines if " actors x (" in x), "")
    return {
        "objects": summary.objects, "ok": summary.ok, "seconds": seconds,
        "objects_per_s": summary.objects / seconds, "chosen": chosen, "load_before": load,
        "options": options,
    }  # fmt: skip


def engine_vs_loop(
    prior_path: str, sizes: Sequence[int], config: RunConfig, work: Path, batch_size: int = 8,
    log=print,
) -> list[dict[str, Any]]:  # fmt: skip
    """Loop and engine per catalog size (one row each); Ray must be initialised."""
    rows = []
    for n in sizes:
        survey = mock_survey(work / f"survey-{n}", n, prior_path)
        loop = plain_loop(survey, prior_path, config, batch_size, work / f"loop-{n}.parquet")
        log(f"{n} objects, loop: {loop['seconds']:.1f} s ({loop['objects_per_s']:.3f} objects/s)")
        eng = engine_run(survey, prior_path, config, work / f"engine-{n}", batch_size=batch_size)
        log(f"{n} objects, engine: {eng['seconds']:.1f} s ({eng['objects_per_s']:.3f} objects/s)"
            f"; {eng['chosen']}")  # fmt: skip
        rows.append({
            "objects": n, "loop_seconds": loop["seconds"], "engine_seconds": eng["seconds"],
            "loop_objects_per_s": loop["objects_per_s"],
            "engine_objects_per_s": eng["objects_per_s"],
            "engine_over_loop": loop["seconds"] / eng["seconds"],
            "loop": loop, "engine": eng,
        })  # fmt: skip
    return rows


@dataclass(frozen=True)
class Layout:
    """An actor layout of the engine for ``small_run_layouts``."""

    name: str
    options: dict[str, Any]


def layouts(n_cpu: int, batch_size: int, task_cpus: float = 0.25) -> list[Layout]:
    """One pack on one single-threaded actor (before issue 30), the default (packs split
    over the actors), one actor with every CPU as torch threads."""
    return [
        Layout("one pack, 1 actor x 1 thread (before)", {"actors": 1, "batch_size": batch_size}),
        Layout("split packs, default actors x 1 thread", {"batch_size": batch_size}),
        Layout(f"one pack, 1 actor x {n_cpu} threads",
               {"actors": 1, "cpus_per_actor": n_cpu - task_cpus, "batch_size": batch_size}),
    ]  # fmt: skip


def small_run_layouts(
    prior_path: str, n_objects: int, config: RunConfig, work: Path, batch_size: int = 8,
    repeats: int = 1, log=print,
) -> list[dict[str, Any]]:  # fmt: skip
    """The engine on one catalog of ``n_objects`` in each layout, ``repeats`` rounds
    interleaved (a shared machine's load drifts); Ray must be initialised."""
    import ray

    survey = mock_survey(work / f"survey-{n_objects}", n_objects, prior_path)
    n_cpu = int(ray.cluster_resources().get("CPU", 1))
    rows = []
    for r in range(repeats):
        for i, lay in enumerate(layouts(n_cpu, batch_size)):
            run = engine_run(survey, prior_path, config, work / f"layout-{i}", **lay.options)
            rows.append({"layout": lay.name, "round": r, **run})
            log(f"{lay.name}: {run['seconds']:.1f} s; {run['chosen']}")
    return rows


def actor_sweep(
    prior_path: str, prior_cfg: PriorConfig, actors: Sequence[int], n_objects: int, steps: int,
    samples: int, work: Path, log: Callable[[str], None] = print,
) -> list[dict]:  # fmt: skip
    """The whole engine (Ray Data: read, stage, sample, write) on a small mock survey of
    ``n_objects``, DPS at ``steps`` x ``samples``, once per number of actors (its own Ray)."""
    from d4a_batch.pipeline.engine import ExecutionOptions, run_survey
    from d4a_batch.ray_setup import init_ray
    from d4a_batch.validation.throughput import THROUGHPUT_SAMPLER

    # small HATS partitions: the read tasks then feed the actor pool several blocks at once
    survey = ensure_mock_survey(work / "survey", MockSurveyConfig(
        n_objects=n_objects, bands=tuple(prior_cfg.bands),
        kpc_per_pixel=prior_cfg.kpc_per_pixel, n_model=prior_cfg.image_size,
        partition_rows=max(2, n_objects // 4),
    ))  # fmt: skip
    ray = init_ray(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    config = RunConfig(sampler=SamplerConfig(sampler=THROUGHPUT_SAMPLER, steps=steps,
                                             samples=samples))  # fmt: skip
    rows = []
    try:
        for n in actors:
            opts = ExecutionOptions(actors=n, batch_size=max(1, n_objects // (2 * n)),
                                    overwrite=True)  # fmt: skip
            s = run_survey(str(survey), str(work / f"out-{n}"), prior_path, config, opts)
            rows.append({"actors": n, "objects": s.objects, "seconds": s.seconds,
                         "objects_per_s": s.objects_per_s, "batch_size": opts.batch_size})  # fmt: skip
            log(f"{n} actor(s): {s.line()}")
    finally:
        ray.shutdown()
    return rows


@dataclass(frozen=True)
class EngineSections:
    """Sections 6 and 7 of the throughput benchmark: engine vs loop at each of ``sizes``
    (none: skipped) with ``sampler``, packs of ``batch_size``; the actor layouts on
    ``layout_objects`` (0: skipped) with ``layout_sampler``, ``layout_repeats`` rounds."""

    sizes: tuple[int, ...]
    sampler: SamplerConfig
    batch_size: int
    layout_objects: int
    layout_sampler: SamplerConfig
    layout_repeats: int = 1


def engine_sections(
    prior_path: str, sections: EngineSections, work: Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Sections 6 and 7 on one local Ray cluster (its start-up not counted)."""
    from d4a_batch.ray_setup import init_ray

    doc: dict[str, Any] = {}
    e = sections
    ray = init_ray(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    try:
        if e.sizes:
            config = RunConfig(sampler=e.sampler, write_maps=False)
            doc["engine_vs_loop"] = {
                "sampler": to_dict(e.sampler), "batch_size": e.batch_size,
                "rows": engine_vs_loop(prior_path, e.sizes, config, work, e.batch_size, log),
            }  # fmt: skip
        if e.layout_objects:
            config = RunConfig(sampler=e.layout_sampler, write_maps=False)
            doc["layouts"] = {
                "sampler": to_dict(e.layout_sampler), "objects": e.layout_objects,
                "rows": small_run_layouts(prior_path, e.layout_objects, config, work,
                                          e.batch_size, e.layout_repeats, log),
            }  # fmt: skip
    finally:
        ray.shutdown()
    return doc
