"""Throughput helpers: memory peaks, FLOP counts and timing on a tiny real prior."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from d4a_batch.schema import REPO_ROOT
from d4a_batch.validation.throughput import (
    dps_step_flops,
    measured_peak,
    naive_loop,
    sample_once,
    select,
    synthetic_batch,
)
from tests.validation.test_experiments import tiny_prior

CPU = torch.device("cpu")


# Memory and CPU-time readings are process-wide: in the test session other threads (a Ray
# driver's, moto's, pytest's) allocate, free and run during the block. These checks run in a
# fresh interpreter of their own, where only the poller runs beside the block, and hold each
# block until the poller has read it (``wait_for_samples``) instead of sleeping a while.
QUIET_PROCESS = """
import json, time
import numpy as np, torch
from d4a_batch.validation.throughput import PeakMemory, return_freed_memory, timed
torch.set_num_threads(1)
CPU, MiB, out = torch.device("cpu"), 2**20, {}
with PeakMemory(CPU, interval_s=0.001) as mem:
    block = np.ones(100 * MiB // 8)  # 100 MiB, touched
    mem.wait_for_samples(2)
    del block
out["large"] = mem.peak
with PeakMemory(CPU) as mem:
    mem.wait_for_samples(2)
out["empty"] = mem.peak
out["pinned"] = return_freed_memory()
out["repeated"] = []
for _ in range(3):  # 24 MiB: below glibc's 32 MiB dynamic mmap threshold cap
    with PeakMemory(CPU, interval_s=0.001) as mem:
        block = torch.ones(24 * MiB // 4)
        mem.wait_for_samples(2)
        del block
    out["repeated"].append(mem.peak)
out["wall"] = timed(lambda: time.sleep(0.2), CPU, "wall")[0]
out["cpu"] = timed(lambda: time.sleep(0.2), CPU, "cpu")[0]
out["busy"] = timed(lambda: sum(i * i for i in range(300_000)), CPU, "cpu")[0]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def quiet():
    """The readings of ``QUIET_PROCESS`` (a fresh interpreter, one torch thread)."""
    done = subprocess.run(
        [sys.executable, "-c", QUIET_PROCESS], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=300, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_peak_memory_sees_a_large_allocation(quiet):
    # margins: 10 MiB below the block (the interpreter's own allocations are far smaller);
    # an empty block reads the poller thread's few pages
    assert 90 * 2**20 <= quiet["large"] <= 140 * 2**20
    assert quiet["empty"] < 8 * 2**20


def test_a_freed_block_does_not_hide_the_next_calls_memory(quiet):
    # with glibc's dynamic thresholds, the second and third 24 MiB blocks would reuse the
    # first one's freed, still resident pages and read near 0
    assert quiet["pinned"]
    for peak in quiet["repeated"]:
        assert 22 * 2**20 <= peak <= 40 * 2**20, quiet["repeated"]


def test_the_cpu_clock_ignores_waiting(quiet):
    # a sleep's wall time is at least the sleep; its CPU time in a quiet process is the
    # poller-free main thread's wake-ups: well under 50 ms whatever else loads the machine
    assert quiet["wall"] >= 0.2 and quiet["cpu"] < 0.05
    assert quiet["busy"] > 0


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
    from d4a_batch.sampling.deconvolve import deconvolve
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
