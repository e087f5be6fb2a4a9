"""pack_sampler.PackSampler: the sampling stage without Ray, and the engine's actor around it."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest
import torch

from d4a_batch.config import RunConfig, SamplerConfig, to_dict
from d4a_batch.pack_sampler import PackSampler, pack_observations
from d4a_batch.pipeline.actors import DeconvolveActor
from d4a_batch.prior.artifact import read_prior_config
from d4a_batch.schema import Col, Status
from d4a_batch.survey.output import OutputSpec, Provenance
from d4a_batch.survey.packs import (
    IMAGE,
    KIND_ERRORS,
    OFFSET,
    PSF,
    VALID,
    VARIANCE,
    pack_arrays,
    pack_from_bytes,
    pack_to_bytes,
)
from tests.pipeline.test_actors import _pack_rows
from tests.survey.conftest import tiny_prior, tiny_survey

__all__ = ["tiny_prior", "tiny_survey"]

CONFIG = RunConfig(sampler=SamplerConfig(steps=2, samples=2))


def _run(prior_dir):
    cfg, meta = read_prior_config(prior_dir)
    when = datetime(2026, 1, 1, tzinfo=UTC)
    prov = Provenance("r", cfg.name, meta["weights_sha256"], "h", "v", 0, 2, 2, when)
    return OutputSpec(bands=cfg.bands, image_size=cfg.image_size, keep_samples=2), prov


def _bytes(table: pa.Table) -> bytes:
    """The table as Arrow IPC bytes: equal bytes, bit-identical values (NaN included)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return sink.getvalue().to_pybytes()


def test_the_actor_and_the_pack_sampler_write_identical_rows(tiny_prior, tiny_survey):
    """The engine's actor is a wrapper: on the same packs, with the same seeds, its rows are
    the stage's bit for bit (an error pack, a sampled pack, a pack that cannot be sampled)."""
    spec, prov = _run(tiny_prior)
    _, packs = _pack_rows(tiny_survey)
    assert {p["kind"] for p in packs} == {KIND_ERRORS, "objects"}
    ok = next(p for p in packs if p["kind"] != KIND_ERRORS)
    twice = pa.concat_tables([pack_from_bytes(ok["pack"])] * 2)  # repeated ids: refused
    packs.append({"kind": ok["kind"], "pack": pack_to_bytes(twice), "n_objects": twice.num_rows})
    actor = DeconvolveActor(str(tiny_prior), to_dict(CONFIG), spec, prov, torch_threads=1)
    sampler = PackSampler(tiny_prior, CONFIG, spec, prov, torch_threads=1)
    status = []
    for p in packs:
        ours, theirs = sampler.process(p["kind"], p["pack"]), actor.process(p["kind"], p["pack"])
        assert ours.num_rows == p["n_objects"]
        assert _bytes(ours) == _bytes(theirs), p["kind"]
        status.append(set(ours[Col.STATUS].to_pylist()))
    assert status == [{Status.ERROR}, {Status.OK}, {Status.ERROR}]
    out = sampler.process(ok["kind"], ok["pack"])
    # another seed samples something else: the comparison above can tell rows apart
    other = PackSampler(
        tiny_prior, RunConfig(sampler=SamplerConfig(steps=2, samples=2, seed=1)), spec, prov
    )
    assert _bytes(other.process(ok["kind"], ok["pack"])) != _bytes(out)


class _Record:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def pack_started(self, object_ids):
        self.events.append(("started", tuple(object_ids)))

    def step(self, i, x):
        self.events.append(("step", i, tuple(x.shape)))

    def pack_finished(self, n_objects):
        self.events.append(("finished", n_objects))


def test_the_progress_hears_of_every_step_and_pack(tiny_prior, tiny_survey):
    spec, prov = _run(tiny_prior)
    _, packs = _pack_rows(tiny_survey)
    progress = _Record()
    sampler = PackSampler(tiny_prior, CONFIG, spec, prov, torch_threads=1, progress=progress)
    cfg = sampler.prior.config
    for p in packs:
        progress.events.clear()
        out = sampler.process(p["kind"], p["pack"])
        n = p["n_objects"]
        if p["kind"] == KIND_ERRORS:  # nothing to sample
            assert progress.events == [("finished", n)]
            continue
        ids = tuple(out[Col.OBJECT_ID].to_pylist())
        rows = (n * CONFIG.sampler.samples, cfg.in_channels, cfg.image_size, cfg.image_size)
        assert progress.events == [
            ("started", ids), ("step", 1, rows), ("step", 0, rows), ("finished", n),
        ]  # fmt: skip


def test_a_pack_sampler_refuses_a_prior_that_differs_from_the_run(tiny_prior):
    spec, prov = _run(tiny_prior)
    wrong = Provenance("r", "x", "0" * 64, "h", "v", 0, 2, 2, prov.created_utc)
    with pytest.raises(RuntimeError, match="changed under the run"):
        PackSampler(tiny_prior, CONFIG, spec, wrong)


def test_the_sampling_stage_loads_without_ray():
    code = "import sys, d4a_batch.pack_sampler\nprint('ray' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["False"]


def test_pack_observations_is_the_one_decoder_of_a_packs_stamps(tiny_survey):
    """A pack's arrays -> the sampler's observations: the staged stamps as they are, valid
    pixels and-ed with finite values and variance > 0, in the dtype asked for."""
    _, packs = _pack_rows(tiny_survey)
    a = pack_arrays(pack_from_bytes(next(p["pack"] for p in packs if p["kind"] != KIND_ERRORS)))
    a[VARIANCE][0, 0, 0, 0] = 0.0
    a[IMAGE][0, 1, 2, 3] = np.nan
    obs = pack_observations(a)
    assert obs.image.dtype == torch.float32 and obs.valid.dtype == torch.bool
    np.testing.assert_array_equal(obs.psf.numpy(), a[PSF])
    np.testing.assert_array_equal(obs.offset.numpy(), a[OFFSET].astype(np.float32))
    valid = a[VALID].astype(bool) & np.isfinite(a[IMAGE]) & (a[VARIANCE] > 0)
    assert not valid[0, 0, 0, 0] and not valid[0, 1, 2, 3]
    np.testing.assert_array_equal(obs.valid.numpy(), valid)
    wide = pack_observations(a, dtype=torch.float64)
    assert wide.image.dtype == torch.float64
    np.testing.assert_array_equal(wide.valid.numpy(), valid)
    np.testing.assert_array_equal(wide.variance.numpy(), a[VARIANCE].astype(np.float64))
