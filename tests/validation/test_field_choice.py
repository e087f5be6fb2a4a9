"""validation.field_choice on made-up sizes: the grid's fractions and the choice's two rules."""

from __future__ import annotations

import numpy as np
import pytest

from d4a_batch.physics.cosmology import upsampling_factor
from d4a_batch.validation.field_choice import choose_field, field_row, measure_real, p_max


def _sizes(zs, scale):
    """s90 = scale x (1, 2, ..., 10) kpc at every z."""
    return {float(z): scale * np.arange(1.0, 11.0) for z in zs}


def test_the_grid_row_and_the_choice_follow_the_sizes(tmp_path):
    zs = np.array([0.3, 0.9])
    s90, bright = _sizes(zs, 1.0), _sizes(zs, 2.0)
    row = field_row(16, 0.5, s90, bright, zs, np.array([0.5, 0.5]), 0.3)
    # half-side 4 kpc: 4 of 10 (s90 <= 4) and 2 of 10 bright (s90 <= 4)
    assert row["fraction_min"] == row["fraction_pooled"] == pytest.approx(0.4)
    assert row["fraction_min_bright"] == pytest.approx(0.2) and row["field_kpc"] == 8.0
    p = p_max(0.3)
    ch = choose_field(s90, bright, zs, p, target=0.9)
    assert ch["kpc_per_pixel"] <= p and upsampling_factor(0.3, ch["kpc_per_pixel"]) >= 1.0
    # 90 % of the bright sample (s90 <= 18 kpc) must fit: the smallest multiple of 16 that does
    n = ch["N"]
    assert n % 16 == 0 and n * ch["kpc_per_pixel"] / 2 >= 18 > (n - 16) * ch["kpc_per_pixel"] / 2
    alone = choose_field(s90, bright, zs, p, target=0.9, require_bright=False)
    assert alone["N"] < n and min(alone["fraction_by_z"].values()) >= 0.9
    assert measure_real(tmp_path / "absent") == {"hsc_cutouts": [], "hst_galaxy": None}
