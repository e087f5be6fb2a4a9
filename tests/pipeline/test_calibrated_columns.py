"""calibration.json in a real prior artifact -> the actor's calibrated interval columns.

The tiny prior is copied, a calibration is written into the copy, the artifact is loaded
back (round trip) and the sampling actor turns a real pack into output rows whose
calibrated columns follow λ·z_p·std_flux; a calibration fitted for another sampler config
gives a warning and NaN columns; no calibration gives NaN columns.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest

from d4a_batch.config import RunConfig, SamplerConfig, to_dict
from d4a_batch.pipeline.actors import DeconvolveActor
from d4a_batch.prior.artifact import PriorFormatError, load_prior, read_prior_config
from d4a_batch.prior.calibration import Calibration, sampler_fingerprint, write_calibration
from d4a_batch.sampling.calibrate import usable_calibration
from d4a_batch.schema import PRIOR_CALIBRATION, Col, Status
from d4a_batch.survey.output import OutputSpec, Provenance
from d4a_batch.survey.tensors import tensor_numpy
from tests.pipeline.test_actors import _pack_rows

CONFIG = RunConfig(sampler=SamplerConfig(steps=2, samples=3))
EDGES = (0.0, 1.0, 1e3, math.inf)


def _calibration(sampler: SamplerConfig) -> Calibration:
    return Calibration(
        snr_edges=EDGES, levels=(0.68, 0.95),
        lambdas={"68": (1.5, 2.0, None), "95": (2.5, 3.0, 4.0)},
        sampler_fingerprint=sampler_fingerprint(sampler), delta=0.1, bound="hb",
        n_per_bin=(3, 4, 5), sampler=to_dict(sampler), mocks={"seed": 7, "noise": "mock"},
    )  # fmt: skip


def _actor(prior_dir, config=CONFIG) -> DeconvolveActor:
    cfg, meta = read_prior_config(prior_dir)
    prov = Provenance("r", cfg.name, meta["weights_sha256"], "h", "v", 0, 2, 3, datetime.now(UTC))
    spec = OutputSpec(bands=cfg.bands, image_size=cfg.image_size)
    return DeconvolveActor(str(prior_dir), to_dict(config), spec, prov, torch_threads=1)


def _run(actor, tiny_survey) -> pa.Table:
    _, packs = _pack_rows(tiny_survey)
    out = actor(pa.Table.from_pylist([{"kind": p["kind"], "pack": p["pack"]} for p in packs]))
    return out.filter(pa.compute.equal(out[Col.STATUS], str(Status.OK)))


@pytest.fixture(scope="module")
def calibrated_prior(tiny_prior, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cal") / "prior"
    shutil.copytree(tiny_prior, folder)
    write_calibration(folder, _calibration(CONFIG.sampler))
    return folder


def test_calibration_round_trips_through_the_artifact(calibrated_prior, tiny_prior, tmp_path):
    (cal,) = load_prior(calibrated_prior).calibrations
    assert cal == _calibration(CONFIG.sampler)
    assert cal.matches(CONFIG.sampler)
    # the seed, kept samples and flag thresholds do not change the samples' distribution
    assert cal.matches(SamplerConfig(steps=2, samples=3, seed=9, keep_samples=3))
    assert not cal.matches(SamplerConfig(steps=3, samples=3))
    assert load_prior(tiny_prior).calibrations == ()
    bad = tmp_path / "bad"
    shutil.copytree(calibrated_prior, bad)
    (bad / PRIOR_CALIBRATION).write_text('{"format": "d4a-calibration/1", "snr_edges": [1, 0]}')
    with pytest.raises(PriorFormatError, match=r"calibration\.json"):
        load_prior(bad)
    # fitted for other weights: ignored with a warning
    stale = tmp_path / "stale"
    shutil.copytree(tiny_prior, stale)
    write_calibration(
        stale, dataclasses.replace(_calibration(CONFIG.sampler), prior_sha256="0" * 64)
    )
    with pytest.warns(UserWarning, match="fitted for weights"):
        assert load_prior(stale).calibrations == ()


def test_one_file_holds_a_calibration_per_sampler_config(calibrated_prior, tmp_path):
    """A second sampler config (e.g. the demo's) adds an entry; refitting one replaces only
    it; each run picks its own; a format-1 file (one calibration) still loads."""
    folder = tmp_path / "two"
    shutil.copytree(calibrated_prior, folder)
    other = SamplerConfig(steps=3, samples=2, sampler="dds", cg_iterations=4)
    write_calibration(folder, _calibration(other))
    refit = dataclasses.replace(_calibration(CONFIG.sampler), lambdas={
        "68": (1.1, 1.2, 1.3), "95": (2.1, 2.2, 2.3)})  # fmt: skip
    write_calibration(folder, refit)
    cals = load_prior(folder).calibrations
    assert len(cals) == 2 and _calibration(other) in cals and refit in cals
    assert usable_calibration(cals, CONFIG.sampler) == refit
    assert usable_calibration(cals, other) == _calibration(other)
    with pytest.warns(UserWarning, match="fitted for sampler config"):
        assert usable_calibration(cals, SamplerConfig(steps=7)) is None
    old = tmp_path / "format1"
    shutil.copytree(calibrated_prior, old)
    (old / PRIOR_CALIBRATION).write_text(json.dumps(_calibration(CONFIG.sampler).to_json()))
    assert load_prior(old).calibrations == (_calibration(CONFIG.sampler),)


def test_actor_writes_calibrated_columns_beside_the_raw_std(calibrated_prior, tiny_survey):
    out = _run(_actor(calibrated_prior), tiny_survey)
    assert out.num_rows >= 1
    snr = out[Col.SNR].to_numpy()
    assert np.isfinite(snr).all()
    bins = out[Col.CALIB_BIN].to_numpy()
    expect_bin = np.searchsorted(EDGES, snr, side="right") - 1
    np.testing.assert_array_equal(bins, expect_bin)
    lam68 = np.array([1.5, 2.0, np.nan])[expect_bin]
    lam95 = np.array([2.5, 3.0, 4.0])[expect_bin]
    np.testing.assert_array_equal(out[Col.CALIB_LAMBDA68].to_numpy(), lam68)
    np.testing.assert_array_equal(out[Col.CALIB_LAMBDA95].to_numpy(), lam95)
    std = tensor_numpy(out[Col.STD_FLUX])
    hw68, hw95 = tensor_numpy(out[Col.HALFWIDTH68_FLUX]), tensor_numpy(out[Col.HALFWIDTH95_FLUX])
    for i in range(out.num_rows):
        if np.isnan(lam68[i]):
            assert np.isnan(hw68[i]).all()
        else:
            np.testing.assert_allclose(hw68[i], lam68[i] * 0.994458 * std[i], rtol=1e-5)
        np.testing.assert_allclose(hw95[i], lam95[i] * 1.959964 * std[i], rtol=1e-5)


def test_a_calibration_for_another_sampler_config_is_not_applied(calibrated_prior, tiny_survey):
    other = RunConfig(sampler=SamplerConfig(steps=2, samples=3, cg_iterations=3))
    with pytest.warns(UserWarning, match="calibrated interval columns will be NaN"):
        actor = _actor(calibrated_prior, other)
    out = _run(actor, tiny_survey)
    assert np.isfinite(out[Col.SNR].to_numpy()).all()
    for name in (Col.CALIB_BIN, Col.CALIB_LAMBDA68, Col.CALIB_LAMBDA95):
        assert np.isnan(out[name].to_numpy()).all()
    assert np.isnan(tensor_numpy(out[Col.HALFWIDTH95_FLUX])).all()
    assert np.isfinite(tensor_numpy(out[Col.STD_FLUX])).all()
