"""Shared fixtures: the real data in ../shared/data (skipped cleanly when absent) and a local Ray."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from d4a_batch.ray_setup import apply_local_env, init_ray
from d4a_batch.schema import SHARED_DATA_DIR

# Token auth explicit, Ray on loopback only; inherited by every subprocess a test starts.
apply_local_env()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data (real HSC and HST data); skips when absent."""
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA_DIR} is absent")
    return SHARED_DATA_DIR


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster for the whole test session (logical CPUs oversubscribed for headroom)."""
    ray = init_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
