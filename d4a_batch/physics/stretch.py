"""The asinh stretch between normalised flux v and model space x (DESIGN.md section 2).

    x = 2 asinh(v / a) / asinh(1 / a) - 1,        v(x) = a sinh((x + 1) / 2 * asinh(1 / a))

v = I / m is flux per model pixel over the image's per-band normaliser m; v = 0 maps
to x = -1 and v = 1 to x = +1. Both functions accept torch tensors (differentiable,
any device/dtype) or numpy arrays / scalars, and return the same kind.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)

DEFAULT_A = 0.01


def _check_a(a: float) -> float:
    if not a > 0:
        raise ValueError(f"stretch parameter a must be > 0, got {a!r}")
    return float(a)


def stretch(v: ArrayT, a: float = DEFAULT_A) -> ArrayT:
    """Normalised flux v -> model space x (same shape)."""
    a = _check_a(a)
    scale = math.asinh(1.0 / a)
    if isinstance(v, torch.Tensor):
        return 2.0 * torch.asinh(v / a) / scale - 1.0
    return 2.0 * np.arcsinh(np.asarray(v) / a) / scale - 1.0


def inverse_stretch(x: ArrayT, a: float = DEFAULT_A) -> ArrayT:
    """Model space x -> normalised flux v (same shape); exact inverse of ``stretch``."""
    a = _check_a(a)
    scale = math.asinh(1.0 / a)
    if isinstance(x, torch.Tensor):
        return a * torch.sinh((x + 1.0) * (0.5 * scale))
    return a * np.sinh((np.asarray(x) + 1.0) * (0.5 * scale))
