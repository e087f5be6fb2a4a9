"""Real HSC cutouts (scarlet's COSMOS fields) through jobs/real_hsc_check.py's path, quickly.

Image-only cutout-service files and PSF-picker files are written from
``../shared/data/scarlet``, a HATS catalog is built from their table, and two sources are
staged (noise estimated, neighbours detected and masked) and deconvolved in-process with
a few sampler steps. Skips when the shared data is absent.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from d4a_batch.config import ColumnMap, PhysicsConfig, SamplerConfig, StagingConfig
from d4a_batch.physics.operator import ObservationBatch
from d4a_batch.prior.artifact import load_prior, read_prior_config
from d4a_batch.sampling.deconvolve import deconvolve
from d4a_batch.schema import DEMO_PRIOR_DIR, REPO_ROOT, SHARED_DATA_DIR, Col
from d4a_batch.survey.hats_io import open_input_catalog, read_partition
from d4a_batch.survey.staging import IMAGE, PSF, VALID, VARIANCE, Stager

SCARLET = SHARED_DATA_DIR / "scarlet"
pytestmark = [
    pytest.mark.skipif(
        not (SCARLET / "hsc_cosmos_35.npz").exists(), reason=f"no real HSC data at {SCARLET}"
    ),
    pytest.mark.slow,  # 13 sources written, a catalog built, two deconvolved: about a minute
]


def _job():
    spec = importlib.util.spec_from_file_location(
        "real_hsc_check", REPO_ROOT / "jobs" / "real_hsc_check.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    job = _job()
    work = tmp_path_factory.mktemp("real_hsc")
    table = job.write_inputs(work, SCARLET)
    catalog = work / "catalog"
    job.build_catalog(table, catalog)
    prior_cfg, _ = read_prior_config(str(DEMO_PRIOR_DIR))
    cat = open_input_catalog(str(catalog))
    columns = ColumnMap()  # make_catalog writes the engine's default (HSC PDR3) names
    rows = []
    for part in cat.partitions:
        rows += read_partition(
            part, columns, tuple(prior_cfg.bands), cat.healpix_column
        ).to_pylist()
    stager = Stager(cat.root, prior_cfg, PhysicsConfig(), StagingConfig())
    by_id = {int(r[Col.OBJECT_ID]): r for r in rows}
    return {oid: stager.stage(by_id[oid]) for oid in (1003, 2003)}, len(rows)


def test_every_real_source_is_in_the_catalog(staged):
    _, n = staged
    assert n == 13  # 7 sources in hsc_cosmos_35, 6 in hsc_cosmos


def test_image_only_real_cutouts_stage_with_estimated_noise_and_masked_neighbours(staged):
    objs, _ = staged
    for oid, obj in objs.items():
        assert obj.error is None, (oid, obj.error)
        assert obj.noise_note  # image only: the noise came from the stamp
        valid = obj.arrays[VALID].astype(bool)
        assert np.all(obj.arrays[VARIANCE][valid] > 0)
        assert obj.n_neighbours_masked >= 1  # scarlet's fields are blends
        assert 0 < obj.neighbour_masked_fraction < 1
        assert math.isfinite(obj.blend_fraction) and math.isfinite(obj.truncated_fraction)
        assert math.isfinite(obj.contamination) and obj.contamination >= 0
        # the neighbour mask is part of the valid plane the likelihood uses
        assert not valid[:, obj.sources.neighbour_mask].any()


def test_real_sources_deconvolve_with_a_finite_chi2_on_the_used_pixels(staged):
    if not (DEMO_PRIOR_DIR / "weights.safetensors").exists():
        pytest.skip("no demo prior")
    torch.set_num_threads(1)
    objs, _ = staged
    prior = load_prior(str(DEMO_PRIOR_DIR), device="cpu")
    for oid, obj in objs.items():  # stamp sizes may differ: one object per call
        a = obj.arrays
        obs = ObservationBatch.from_arrays(
            a[IMAGE][None], a[VARIANCE][None], a[VALID][None].astype(bool), a[PSF][None],
            np.asarray([obj.offset]),
        )  # fmt: skip
        s = deconvolve(obs, np.array([0.3]), prior, SamplerConfig(steps=4, samples=2), [oid])
        assert np.isfinite(s.chi2[0]) and s.chi2[0] > 0, (oid, s.chi2)
