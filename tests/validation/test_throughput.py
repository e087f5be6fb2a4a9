"""Throughput helpers: memory peaks, FLOP counts and timing on a tiny real prior."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from d4a_batch.validation.throughput import (
    PeakMemory,
    dps_step_flops,
    measured_peak,
    naive_loop,
    return_freed_memory,
    sample_once,
    select,
    synthetic_batch,
    timed,
)
from tests.validation.test_experiments import tiny_prior

CPU = torch.device("cpu")


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory(CPU, interval_s=0.001) as mem:
        block = np.ones(100 * 2**20 // 8)  # 100 MiB, touched
        block[::512] += 1.0
        del block
    assert mem.peak >= 90 * 2**20
    with PeakMemory(CPU) as small:
        pass
    assert small.peak < 50 * 2**20


def test_a_freed_block_does_not_hide_the_next_calls_memory():
    assert return_freed_memory()
    first = torch.ones(16 * 2**20)  # 64 MiB, then freed
    del first
    with PeakMemory(CPU, interval_s=0.001) as mem:
        second = torch.ones(8 * 2**20)  # 32 MiB
        # RSS is sampled: hold the block long enough for the poller to run on a loaded machine
        time.sleep(0.2)
        del second
    assert mem.peak >= 28 * 2**20


def test_the_cpu_clock_ignores_waiting():
    wall, _ = timed(lambda: time.sleep(0.2), CPU, "wall")
    cpu, _ = timed(lambda: time.sleep(0.2), CPU, "cpu")
    assert wall >= 0.19 and cpu < 0.05
    busy, _ = timed(lambda: sum(i * i for i in range(300_000)), CPU, "cpu")
    assert busy > 0


def test_measured_peak_is_positive_and_finite():
    peak = measured_peak(CPU, size=128, conv_images=1, repeats=2)
    assert set(peak) == {"matmul", "conv3x3"}
    assert all(np.isfinite(v) and v > 0 for v in peak.values())


def test_dps_step_flops_scale_with_rows_and_include_the_backward_pass():
    prior = tiny_prior()
    obs, z, _ = synthetic_batch(prior, 2)
    two = dps_step_flops(prior, obs, z, samples=2)
    one = dps_step_flops(prior, select(obs, slice(0, 1)), z[:1], samples=2)
    assert two == 2 * one
    x = torch.zeros(2, 3, 16, 16)
    counter = FlopCounterMode(display=False)
    with counter:
        prior.model(x, torch.zeros(2, dtype=torch.long))
    forward = counter.get_total_flops()
    # guidance differentiates the network w.r.t. its input: about two forwards per row
    assert 2 * forward <= one <= 3 * forward


def test_batched_and_naive_sampling_run_the_same_work():
    prior = tiny_prior()
    obs, z, ids = synthetic_batch(prior, 2)
    assert sample_once(prior, obs, z, ids, steps=2, samples=2) > 0
    assert naive_loop(prior, obs, z, ids, steps=2, samples=2, batch=1) > 0
    with pytest.raises(ValueError, match="multiple"):
        naive_loop(prior, obs, z, ids, steps=2, samples=3, batch=2)


def test_fp32_variant_samples_like_the_prior_and_steps_are_timed():
    from d4a_batch.config import SamplerConfig
    from d4a_batch.sampling.dps import deconvolve
    from d4a_batch.validation.throughput import per_step_seconds, variant_prior

    prior = tiny_prior()
    obs, z, ids = synthetic_batch(prior, 1)
    cfg = SamplerConfig(steps=2, samples=2)
    a = deconvolve(obs, z, prior, cfg, ids).mean_x
    b = deconvolve(obs, z, variant_prior(prior, "fp32"), cfg, ids).mean_x
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="unknown variant"):
        variant_prior(prior, "fp8")
    assert np.isfinite(per_step_seconds(prior, obs, z, ids, samples=2, steps=(2, 3)))
