"""Physics tests use tiny tensors: one intra-op thread is faster, and far faster when the shared
machine's cores are oversubscribed (measured: gradcheck 0.35 s with 1 thread, 6-12 s with 2)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
