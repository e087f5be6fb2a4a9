"""jobs/choose_field.py: the field choice obeys its two rules; real sizes measured with sep
(``validation.field_choice``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from d4a_batch.physics.cosmology import upsampling_factor
from d4a_batch.testing import load_job
from d4a_batch.validation.field_choice import measure_hsc_cutouts, measure_hst_galaxy

JOB = Path(__file__).resolve().parents[2] / "jobs" / "choose_field.py"


def test_choice_meets_the_light_and_upsampling_rules(tmp_path):
    out = tmp_path / "field.json"
    args = ["--out-json", str(out), "--n-gal", "300", "--n-points", "300", "--z-step", "0.35"]
    args += ["--sizes", "32", "64", "--kpc", "0.5", "0.75", "--data", str(tmp_path / "none")]
    assert load_job("choose_field").main(args) == 0
    rep = json.loads(out.read_text())
    ch = rep["choice"]
    n, p = ch["N"], ch["kpc_per_pixel"]
    assert p <= rep["p_max_for_u_ge_1"] and n % 16 == 0
    assert upsampling_factor(0.3, p) >= 1.0
    assert min(ch["fraction_by_z"].values()) >= 0.9
    assert min(ch["fraction_by_z_bright"].values()) >= 0.9
    # at every z the 90th percentile of s90 (i < 24) lies inside the chosen field
    s90 = rep["population_s90_kpc"]
    assert all(v["p90"] <= n * p / 2 + 1e-9 for v in s90.values())
    # a bigger field holds more of the population
    grid = {(r["N"], r["kpc_per_pixel"]): r for r in rep["grid"]}
    assert grid[(64, 0.75)]["fraction_min"] >= grid[(32, 0.5)]["fraction_min"]
    assert rep["real"]["hsc_cutouts"] == []


def test_real_cutout_sizes_with_sep(shared_data):
    rows = measure_hsc_cutouts(shared_data)
    assert len(rows) >= 5
    r50 = np.array([r["r50_arcsec"] for r in rows])
    r90 = np.array([r["r90_arcsec"] for r in rows])
    assert np.all(r90 > r50) and np.all(r50 > 0.3)  # observed: no source smaller than the PSF
    hst = measure_hst_galaxy(shared_data)
    assert 0.5 < hst["circle_r50_arcsec"] < hst["circle_r90_arcsec"] < 3.5
    assert hst["square_r90_arcsec"] <= hst["circle_r90_arcsec"] + 1e-9


@pytest.mark.parametrize("z", [0.3, 0.6])
def test_the_shipped_config_follows_the_choice(z):
    cfg = json.loads((JOB.parent / "configs" / "hsc-64.json").read_text())
    assert cfg["mock_structure"] == "realistic"
    assert upsampling_factor(z, cfg["kpc_per_pixel"]) >= 1.0
