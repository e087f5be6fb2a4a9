from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from d4a_batch.physics.stretch import inverse_stretch, stretch


@pytest.mark.parametrize("a", [0.01, 0.1, 1.0])
def test_endpoints_and_formula(a):
    assert stretch(0.0, a) == pytest.approx(-1.0, abs=1e-15)
    assert stretch(1.0, a) == pytest.approx(1.0, abs=1e-15)
    assert inverse_stretch(-1.0, a) == pytest.approx(0.0, abs=1e-15)
    assert inverse_stretch(1.0, a) == pytest.approx(1.0, rel=1e-14)
    v = 0.37
    assert stretch(v, a) == pytest.approx(2 * math.asinh(v / a) / math.asinh(1 / a) - 1, rel=1e-14)


def test_round_trip_float32_torch():
    x = torch.linspace(-1.0, 1.0, 20001, dtype=torch.float32)
    x_back = stretch(inverse_stretch(x, 0.01), 0.01)
    # float32: a few ulps of |x| <= 1 through sinh/asinh
    assert (x_back - x).abs().max().item() < 4 * torch.finfo(torch.float32).eps
    v = torch.logspace(-6, 2, 2001, dtype=torch.float32)
    v_back = inverse_stretch(stretch(v, 0.01), 0.01)
    # the x-space rounding (a few ulps of |x| <= 1) propagates as dv/dx = asinh(1/a)/2 sqrt(v² + a²)
    bound = 4 * torch.finfo(torch.float32).eps * math.asinh(100.0) / 2 * torch.sqrt(v**2 + 1e-4)
    assert torch.all((v_back - v).abs() <= bound)


def test_numpy_matches_torch_and_keeps_type():
    x = np.linspace(-1.0, 1.0, 101)
    v_np = inverse_stretch(x, 0.05)
    v_t = inverse_stretch(torch.from_numpy(x), 0.05)
    assert isinstance(v_np, np.ndarray) and isinstance(v_t, torch.Tensor)
    np.testing.assert_allclose(v_np, v_t.numpy(), rtol=1e-14)
    np.testing.assert_allclose(stretch(v_np, 0.05), x, atol=1e-13)
    assert np.all(np.diff(v_np) > 0)


def test_differentiable():
    x = torch.linspace(-1.0, 1.0, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: inverse_stretch(t, 0.01), (x,))
    v = torch.linspace(-0.5, 2.0, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: stretch(t, 0.01), (v,))


def test_bad_a():
    with pytest.raises(ValueError, match="a must be > 0"):
        stretch(np.ones(3), 0.0)
