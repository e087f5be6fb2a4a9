from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest
import torch

from d4a_batch.config import (
    ColumnMap,
    PhysicsConfig,
    RunConfig,
    SamplerConfig,
    StagingConfig,
    to_dict,
)
from d4a_batch.pack_sampler import pack_observations
from d4a_batch.pipeline.actors import (
    DeconvolveActor,
    actor_resources,
    split_packs,
    torch_threads_for,
)
from d4a_batch.prior.artifact import read_prior_config
from d4a_batch.quality.regions import chi2_regions
from d4a_batch.sampling.summaries import reconvolved_flux
from d4a_batch.schema import Col, Status
from d4a_batch.survey.hats_io import ORDER, PIXEL, open_input_catalog, read_partition
from d4a_batch.survey.output import OutputSpec, Provenance
from d4a_batch.survey.packs import (
    IMAGE,
    KIND_ERRORS,
    NEIGHBOUR_MASK,
    OFFSET,
    PSF,
    SCALE,
    VALID,
    VARIANCE,
    make_packs,
    pack_arrays,
    pack_from_bytes,
    pack_to_bytes,
)
from d4a_batch.survey.staging import Stager
from d4a_batch.survey.tensors import tensor_numpy
from d4a_batch.testing import TINY_PRIOR

CONFIG = RunConfig(sampler=SamplerConfig(steps=2, samples=2))


def test_actor_resources_keep_cpu_headroom_for_tasks():
    # 2 CPUs: two single-CPU-ish actors, 0.5 CPU left for the tasks
    assert actor_resources({"CPU": 2.0}, None, None, None, 0.25) == (2, 0.75, 0.0)
    assert actor_resources({"CPU": 2.0}, 1, None, None, 0.25) == (1, 1.5, 0.0)
    assert actor_resources({"CPU": 16.0}, None, None, None, 0.25) == (
        14,
        pytest.approx(14.4 / 14),
        0.0,
    )
    assert actor_resources({"CPU": 16.0}, 3, None, None, 0.25) == (3, pytest.approx(14.4 / 3), 0.0)
    assert actor_resources({"CPU": 16.0, "GPU": 4.0}, None, None, None, 0.25) == (4, 1.0, 1.0)
    assert actor_resources({"CPU": 8.0, "GPU": 2.0}, 4, 0.5, None, 0.25) == (4, 1.0, 0.5)
    with pytest.raises(ValueError, match="leave no CPU"):
        actor_resources({"CPU": 2.0}, 2, None, 1.0, 0.25)
    with pytest.raises(ValueError, match="exceed"):
        actor_resources({"CPU": 8.0, "GPU": 1.0}, 2, 1.0, None, 0.25)
    assert [torch_threads_for(c) for c in (0.3, 0.75, 1.03, 1.5, 4.8)] == [1, 1, 1, 1, 5]


def test_actor_resources_start_no_more_actors_than_packs():
    # 8 objects in packs of 4 on 4 CPUs: 2 actors, each with the share it had among 4
    assert actor_resources({"CPU": 4.0}, None, None, None, 0.25) == (4, 0.875, 0.0)
    assert actor_resources({"CPU": 4.0}, None, None, None, 0.25, max_packs=2) == (2, 0.875, 0.0)
    assert actor_resources({"CPU": 4.0}, None, None, None, 0.25, max_packs=9) == (4, 0.875, 0.0)
    assert actor_resources({"CPU": 16.0, "GPU": 4.0}, None, None, None, 0.25, max_packs=1) == (
        1, 1.0, 1.0,
    )  # fmt: skip
    assert actor_resources({"CPU": 4.0}, None, None, None, 0.25, max_packs=0)[0] == 1
    # an explicit actor count is the user's: kept
    assert actor_resources({"CPU": 4.0}, 3, None, None, 0.25, max_packs=1)[0] == 3


def test_small_runs_are_split_so_that_every_actor_samples():
    # 5 objects on 2 CPU actors: packs of 3 and 2, not one pack of 5 (issue 30)
    assert split_packs(5, 8, 2) == 3
    assert split_packs(9, 8, 2) == 5  # 5 + 4 instead of 8 + 1
    assert split_packs(1, 8, 2) == 1
    assert split_packs(16, 8, 2) == split_packs(100, 8, 2) == 8  # full packs for everyone
    assert split_packs(5, 8, 1) == 5  # one actor: one pack
    assert split_packs(None, 8, 4) == split_packs(0, 8, 4) == 8  # not known: the batch size
    # with the split, the engine's actor count follows the packs (engine._written)
    assert actor_resources({"CPU": 2.0}, None, None, None, 0.25, max_packs=-(-5 // 3)) == (
        2, 0.75, 0.0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def actor(tiny_prior):
    cfg, meta = read_prior_config(tiny_prior)
    prov = Provenance("r", cfg.name, meta["weights_sha256"], "h", "v", 0, 2, 2, datetime.now(UTC))
    spec = OutputSpec(bands=cfg.bands, image_size=cfg.image_size)
    return DeconvolveActor(str(tiny_prior), to_dict(CONFIG), spec, prov, torch_threads=1)


def _pack_rows(tiny_survey, n=3):
    cat = open_input_catalog(str(tiny_survey))
    rows = read_partition(
        cat.partitions[0], ColumnMap(), TINY_PRIOR.bands, cat.healpix_column
    ).to_pylist()[:n]
    rows[-1] = dict(rows[-1], **{Col.PHOTOZ: float("nan")})
    stager = Stager(str(tiny_survey), TINY_PRIOR, PhysicsConfig(), StagingConfig())
    return rows, make_packs(stager.stage_rows(rows), pack_size=8)


def test_actor_maps_pack_rows_to_one_output_row_per_object(actor, tiny_survey):
    rows, packs = _pack_rows(tiny_survey)
    batch = pa.Table.from_pylist([{"kind": p["kind"], "pack": p["pack"]} for p in packs])
    out = actor(batch)
    assert sorted(out[Col.OBJECT_ID].to_pylist()) == sorted(r[Col.OBJECT_ID] for r in rows)
    status = dict(zip(out[Col.OBJECT_ID].to_pylist(), out[Col.STATUS].to_pylist()))
    assert status[rows[-1][Col.OBJECT_ID]] == Status.ERROR
    assert [status[r[Col.OBJECT_ID]] for r in rows[:-1]] == [Status.OK] * (len(rows) - 1)
    ok = np.array(out[Col.STATUS].to_pylist()) == Status.OK
    assert np.isfinite(tensor_numpy(out[Col.MEAN_FLUX])[ok]).all()
    assert np.isfinite(out[Col.CHI2].to_numpy()[ok]).all()
    assert ORDER in out.column_names and PIXEL in out.column_names
    assert set(out[Col.PRIOR_HASH].to_pylist()) == {actor.prior.sha256}


def test_the_chi2_regions_add_up_to_the_catalog_chi2(actor, tiny_survey):
    """The excess chi2 per region (the POOR_FIT reason) sums to chi2·dof/n_used − 1 with the
    catalog's chi2: the flags and the chi2 see the same residual on the same pixels."""
    _, packs = _pack_rows(tiny_survey)
    data = next(p["pack"] for p in packs if p["kind"] != KIND_ERRORS)
    pack, out = pack_from_bytes(data), actor.process("objects", data)
    assert NEIGHBOUR_MASK in pack.column_names
    assert out[Col.OBJECT_ID].to_pylist() == pack[Col.OBJECT_ID].to_pylist()
    a = pack_arrays(pack)
    obs = pack_observations(a, dtype=torch.float64)
    model = reconvolved_flux(tensor_numpy(out[Col.MEAN_FLUX]).astype(np.float64), obs, a[SCALE])
    regions = chi2_regions(
        a[IMAGE], a[VARIANCE], a[VALID], model, a[PSF], a[OFFSET], a[Col.N_OUT],
        a[NEIGHBOUR_MASK], CONFIG.sampler.flags.core_radius_fwhm,
    )  # fmt: skip
    used = a[VALID].astype(bool) & np.isfinite(a[IMAGE]) & (a[VARIANCE] > 0)
    n_used = used.sum((1, 2, 3))
    dof = n_used - 2 * (used.sum((2, 3)) > 0).sum(1)
    total = sum(regions[k] for k in ("chi2_core", "chi2_neighbours", "chi2_footprint",
                                     "chi2_outside"))  # fmt: skip
    chi2 = out[Col.CHI2].to_numpy()
    np.testing.assert_allclose(total, chi2 * dof / n_used - 1, rtol=1e-3, atol=1e-3)


def test_a_pack_that_cannot_be_sampled_becomes_error_rows(actor, tiny_survey):
    _, packs = _pack_rows(tiny_survey)
    pack = next(pack_from_bytes(p["pack"]) for p in packs if p["kind"] != KIND_ERRORS)
    twice = pa.concat_tables([pack, pack])  # duplicated object ids: deconvolve refuses the batch
    out = actor.process("objects", pack_to_bytes(twice))
    assert out.num_rows == twice.num_rows
    assert set(out[Col.STATUS].to_pylist()) == {Status.ERROR}
    assert all(m.startswith("sampling failed: ValueError") for m in out[Col.MESSAGE].to_pylist())


def test_actor_refuses_a_prior_that_differs_from_the_run(tiny_prior):
    prov = Provenance("r", "x", "0" * 64, "h", "v", 0, 2, 2, datetime.now(UTC))
    spec = OutputSpec(bands=TINY_PRIOR.bands, image_size=TINY_PRIOR.image_size)
    with pytest.raises(RuntimeError, match="changed under the run"):
        DeconvolveActor(str(tiny_prior), to_dict(CONFIG), spec, prov)


# Modules a sampling actor must not import: each run starts new actor processes, and on a
# 2-core machine these cost seconds each (measured with `python -X importtime`: hats 3.5 s,
# scipy.stats 1 s, against torch's 2.7 s; astropy.cosmology, 2 s, the sampler needs for
# θ(z)). The read/stage/write tasks skip hats too; only the driver and the commit need it.
HEAVY_FOR_ACTORS = ("hats", "scipy.stats", "matplotlib", "galsim", "lsdb")
HEAVY_FOR_TASKS = ("hats", "torch", "matplotlib", "galsim", "lsdb")

_ACTOR_PROCESS = """
import pickle, sys
import pyarrow.parquet as pq
from d4a_batch.pipeline.actors import DeconvolveActor
args = pickle.load(open(sys.argv[1], "rb"))
actor = DeconvolveActor(*args)
out = actor(pq.read_table(sys.argv[2]))
assert out.num_rows == int(sys.argv[3]), out.num_rows
print(" ".join(sorted(sys.modules)))
"""


def _loaded(stdout: str, heavy: tuple[str, ...]) -> list[str]:
    mods = stdout.split()
    return [h for h in heavy if any(m == h or m.startswith(h + ".") for m in mods)]


def test_an_actor_process_samples_without_the_drivers_heavy_imports(
    tiny_prior, tiny_survey, tmp_path
):
    import pickle
    import subprocess
    import sys

    import pyarrow.parquet as pq

    rows, packs = _pack_rows(tiny_survey)
    pq.write_table(
        pa.Table.from_pylist([{"kind": p["kind"], "pack": p["pack"]} for p in packs]),
        tmp_path / "packs.parquet",
    )
    cfg, meta = read_prior_config(tiny_prior)
    prov = Provenance("r", cfg.name, meta["weights_sha256"], "h", "v", 0, 2, 2, datetime.now(UTC))
    spec = OutputSpec(bands=cfg.bands, image_size=cfg.image_size)
    (tmp_path / "args.pkl").write_bytes(
        pickle.dumps((str(tiny_prior), to_dict(CONFIG), spec, prov, 1))
    )
    run = subprocess.run(
        [sys.executable, "-c", _ACTOR_PROCESS, str(tmp_path / "args.pkl"),
         str(tmp_path / "packs.parquet"), str(len(rows))],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert _loaded(run.stdout, HEAVY_FOR_ACTORS) == []


def test_the_task_stages_import_without_hats_or_torch():
    import subprocess
    import sys

    code = "import sys, d4a_batch.pipeline.stages\nprint(' '.join(m for m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _loaded(run.stdout, HEAVY_FOR_TASKS) == []
