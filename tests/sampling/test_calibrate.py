"""The observed S/N that picks an object's calibration bin, and the calibrated columns."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch

from d4a_batch.config import SamplerConfig, to_dict
from d4a_batch.physics.operator import ObservationBatch
from d4a_batch.prior.calibration import Calibration, sampler_fingerprint
from d4a_batch.sampling.calibrate import calibrated_columns, observed_snr, usable_calibration
from d4a_batch.schema import Col


def _obs(image, variance, valid, offset):
    b, c = image.shape[:2]
    psf = np.zeros((b, c, 5, 5))
    psf[..., 2, 2] = 1.0
    return ObservationBatch.from_arrays(image, variance, valid, psf, offset, dtype=torch.float64)


def test_observed_snr_is_the_mean_signal_over_the_rms_noise_in_the_aperture():
    h = 32
    yy, xx = np.mgrid[:h, :h] + 0.5 - h / 2
    offset = np.array([[1.0, -2.0], [0.0, 0.0]])
    beta = np.array([[10.0, 20.0], [0.0, 0.0]])
    image = np.zeros((2, 2, h, h))
    variance = np.full((2, 2, h, h), 4.0)
    # object 0: signal 6 above the background inside a disc of radius 5 around the offset
    # (radius = 0.25 * 8 model pixels * scale 2.5 = 5 HSC pixels), 100 outside
    disc0 = (yy - 1.0) ** 2 + (xx + 2.0) ** 2 <= 25
    for c in range(2):
        image[0, c] = np.where(disc0, beta[0, c] + 6.0, 100.0)
    variance[0, 1] = 9.0
    valid = np.ones((2, 2, h, h), bool)
    valid[1] = False  # object 1: nothing valid
    snr = observed_snr(_obs(image, variance, valid, offset), beta, [2.5, 1.0], 0.25, 8)
    assert snr[0] == pytest.approx(np.mean([6 / 2, 6 / 3]))
    assert np.isnan(snr[1])


def _cal(sampler):
    return Calibration(
        snr_edges=(0.0, 10.0, math.inf), levels=(0.68,), lambdas={"68": (1.2, None)},
        sampler_fingerprint=sampler_fingerprint(sampler), delta=0.1, bound="hb",
        n_per_bin=(5, 1), sampler=to_dict(sampler),
    )  # fmt: skip


def test_calibrated_columns_scale_the_std_by_lambda_and_z():
    std = np.ones((3, 1, 2, 2), np.float32)
    cols = calibrated_columns(np.array([5.0, 50.0, np.nan]), std, _cal(SamplerConfig()))
    np.testing.assert_array_equal(cols[Col.CALIB_BIN], [0.0, 1.0, np.nan])
    np.testing.assert_array_equal(cols[Col.CALIB_LAMBDA68], [1.2, np.nan, np.nan])
    assert np.isnan(cols[Col.CALIB_LAMBDA95]).all()  # level not fitted
    np.testing.assert_allclose(cols[Col.HALFWIDTH68_FLUX][0], 1.2 * 0.9944579, rtol=1e-6)
    assert np.isnan(cols[Col.HALFWIDTH68_FLUX][1:]).all()
    assert cols[Col.HALFWIDTH95_FLUX].dtype == np.float32
    bare = calibrated_columns(np.array([5.0]), std[:1], None)
    assert bare[Col.SNR][0] == 5.0 and np.isnan(bare[Col.CALIB_LAMBDA68]).all()
    with pytest.raises(ValueError):
        calibrated_columns(np.array([5.0, 1.0]), std[:1], None)


def test_no_interval_where_the_posterior_flux_has_no_spread_in_the_core():
    """A band whose profiled amplitude hit 0 has zero flux std: no λ makes a zero-width
    interval cover, so the object gets NaN (and the fit leaves it out by the same rule)."""
    from d4a_batch.sampling.calibrate import degenerate_intervals
    from d4a_batch.sampling.summaries import aperture_mask
    from d4a_batch.validation.conformal import fit_calibration

    std = np.ones((3, 2, 8, 8), np.float32)
    std[1, 1] = 0.0  # one band pinned
    std[2, 0, 0, 0] = 0.0  # a corner pixel, outside the core disc (radius 0.25 · 8)
    np.testing.assert_array_equal(
        degenerate_intervals(std, aperture_mask(8, 0.25)), [False, True, False]
    )
    cols = calibrated_columns(np.array([5.0] * 3), std, _cal(SamplerConfig()), 0.25)
    assert np.isfinite(cols[Col.CALIB_LAMBDA68][[0, 2]]).all()
    assert np.isnan(cols[Col.CALIB_LAMBDA68][1]) and np.isnan(cols[Col.HALFWIDTH68_FLUX][1]).all()
    # the fit applies the same rule to the std of samples [G,S,C,N,N]
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(40, 8, 2, 8, 8))
    samples[3, :, 1] = 0.0
    truth = rng.normal(size=(40, 2, 8, 8))
    core = np.zeros((8, 8), bool)
    core[2:6, 2:6] = True
    assert np.flatnonzero(degenerate_intervals(samples.std(1), core)).tolist() == [3]
    _, counts, details = fit_calibration(samples, truth, np.full(40, 5.0), (0.0, 10.0), core,
                                         bound="none")  # fmt: skip
    assert counts == [39] and details["n_degenerate_left_out"] == 1


def test_only_a_calibration_fitted_for_the_sampler_config_is_used():
    cal = _cal(SamplerConfig(steps=50))
    assert usable_calibration(cal, SamplerConfig(steps=50, seed=4)) is cal
    assert usable_calibration(None, SamplerConfig()) is None
    with pytest.warns(UserWarning, match="fitted for sampler config"):
        assert usable_calibration(cal, SamplerConfig(steps=25)) is None


def test_a_field_added_to_the_sampler_config_later_must_be_at_its_default():
    old_record = {k: v for k, v in to_dict(SamplerConfig()).items() if k != "clip_x0"}
    cal = Calibration(
        snr_edges=(0.0, math.inf), levels=(0.68,), lambdas={"68": (1.2,)},
        sampler_fingerprint=sampler_fingerprint(old_record), delta=0.1, bound="hb",
        n_per_bin=(5,), sampler=old_record,
    )  # fmt: skip
    assert cal.matches(SamplerConfig())
    assert not cal.matches(SamplerConfig(clip_x0=not SamplerConfig().clip_x0))
    assert not cal.matches(SamplerConfig(samples=8))


def test_dps_rms_total_at_the_reference_steps_is_the_rms_rule():
    from d4a_batch.prior import calibration
    from d4a_batch.sampling import dps

    assert calibration._DPS_REFERENCE_STEPS == dps.TOTAL_REFERENCE_STEPS
    cal = _cal(SamplerConfig(steps=50, guidance=0.01, guidance_rule="rms", sampler="dps"))
    dps_cfg = functools.partial(SamplerConfig, sampler="dps")
    assert cal.matches(dps_cfg(steps=50, guidance=0.01, guidance_rule="rms_total"))
    assert not cal.matches(dps_cfg(steps=25, guidance=0.01, guidance_rule="rms_total"))
    assert _cal(dps_cfg(steps=25, guidance=0.02, guidance_rule="rms")).matches(
        dps_cfg(steps=25, guidance=0.01, guidance_rule="rms_total")
    )


def test_fields_a_sampler_does_not_read_do_not_change_its_calibration():
    """DPS never reads cg_iterations or dds_randomize, DDS never reads the guidance: a
    calibration of one applies whatever those fields say; the fields it reads still count."""
    dps = _cal(SamplerConfig(steps=50, sampler="dps", cg_iterations=20))
    assert dps.matches(SamplerConfig(steps=50, sampler="dps", cg_iterations=10))
    assert sampler_fingerprint(SamplerConfig(sampler="dps", cg_iterations=3)) == (
        sampler_fingerprint(SamplerConfig(sampler="dps", cg_iterations=30))
    )
    dds = _cal(SamplerConfig(steps=25, samples=4, sampler="dds", cg_iterations=10))
    assert dds.matches(SamplerConfig(steps=25, samples=4, sampler="dds", cg_iterations=10,
                                     guidance=0.5, guidance_rule="rms"))  # fmt: skip
    assert not dds.matches(SamplerConfig(steps=25, samples=4, sampler="dds", cg_iterations=5))
    assert not dds.matches(SamplerConfig(steps=25, samples=4, sampler="dps"))
    # a record without a field added later (dds_randomize) matches only its default
    old_record = {k: v for k, v in dict(dds.sampler).items() if k != "dds_randomize"}
    old = dataclasses.replace(dds, sampler=old_record)
    assert old.matches(SamplerConfig(steps=25, samples=4, sampler="dds", cg_iterations=10))
    assert not old.matches(SamplerConfig(steps=25, samples=4, sampler="dds", cg_iterations=10,
                                         dds_randomize=False))  # fmt: skip


@pytest.mark.parametrize(
    ("field", "before", "other"), [("gauss_newton", 1, 3), ("clip_data_step", True, False)]
)
def test_a_field_added_later_at_its_old_value_is_the_sampler_old_calibrations_fitted(
    field, before, other
):
    """``gauss_newton`` and ``clip_data_step`` came after calibrations were written: at the
    old sampler's value (one linearisation; the data step clipped) they leave the
    fingerprint alone; another value is another sampler, and an old record never matches
    it, whatever SamplerConfig's default is."""
    dds = functools.partial(SamplerConfig, steps=25, samples=4, sampler="dds")
    old_record = {k: v for k, v in to_dict(dds()).items() if k != field}
    assert sampler_fingerprint(dds(**{field: before})) == sampler_fingerprint(old_record)
    assert sampler_fingerprint(dds(**{field: other})) != sampler_fingerprint(old_record)
    old = dataclasses.replace(_cal(dds()), sampler=old_record)
    assert old.matches(dds(**{field: before}))
    assert not old.matches(dds(**{field: other}))
    new = _cal(dds(**{field: other}))
    assert new.matches(dds(**{field: other})) and not new.matches(dds(**{field: before}))


def test_samplers_that_never_read_a_field_ignore_it():
    assert sampler_fingerprint(SamplerConfig(sampler="dps", clip_data_step=False)) == (
        sampler_fingerprint(SamplerConfig(sampler="dps", clip_data_step=True))
    )
    assert sampler_fingerprint(SamplerConfig(sampler="daps", clip_data_step=False)) != (
        sampler_fingerprint(SamplerConfig(sampler="daps", clip_data_step=True))
    )
    # DPS and DAPS never read gauss_newton
    assert sampler_fingerprint(SamplerConfig(sampler="dps", gauss_newton=3)) == (
        sampler_fingerprint(SamplerConfig(sampler="dps"))
    )
