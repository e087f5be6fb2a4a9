"""Measurements against the truth (``validation.measurements``): truths on analytic profiles,
error and coverage arithmetic, the done-when checks on tables with known answers."""

from __future__ import annotations

import galsim
import numpy as np
import pandas as pd
import pytest

from d4a_batch.physics.cosmology import model_pixel_arcsec
from d4a_batch.schema import Col, obs_col, pct_col
from d4a_batch.validation import measurements as vm

GEO = vm.Geometry(kpc_per_pixel=0.5, cosmology="Planck15", hsc_pixel_arcsec=0.168,
                  bands=("g", "r", "i"))  # fmt: skip


def test_truth_values_of_an_elliptical_gaussian_at_its_redshift():
    """r50 of an elliptical Gaussian is σ·√(2 ln 2)·√q... measured along circles: the circular
    curve of growth of a q = 0.5 Gaussian with circularised σ_c has r50 ≈ that of the circle;
    here a round Gaussian (r50 = σ√(2 ln 2)) and, separately, the axis ratio of a sheared one."""
    sigma, z = 4.0, np.array([0.4, 0.9])
    round_img = galsim.Gaussian(sigma=sigma, flux=1e4).drawImage(nx=64, ny=64, scale=1.0).array
    ell_img = (
        galsim.Gaussian(sigma=sigma, flux=1e4).shear(q=0.5, beta=30 * galsim.degrees)
        .drawImage(nx=64, ny=64, scale=1.0).array
    )  # fmt: skip
    truth = np.stack([np.stack([round_img] * 3), np.stack([ell_img] * 3)])
    vals = vm.truth_values(truth, z, GEO)
    theta = model_pixel_arcsec(z, GEO.kpc_per_pixel, GEO.cosmology)
    r50_px = sigma * np.sqrt(2 * np.log(2))
    assert vals[Col.R50_ARCSEC][0] == pytest.approx(r50_px * theta[0], rel=0.01)
    assert vals[Col.AXIS_RATIO][0] == pytest.approx(1.0, abs=0.01)
    assert vals[Col.AXIS_RATIO][1] == pytest.approx(0.5, abs=0.02)
    # galsim's beta from +x; position angle east of north = beta - 90 (mod 180)
    assert vals[Col.POSITION_ANGLE][1] == pytest.approx(120.0, abs=1.0)
    with pytest.raises(ValueError, match="expected"):
        vm.truth_values(truth[:, :2], z, GEO)


def test_errors_and_coverage():
    assert vm.errors(np.array([3.0]), np.array([2.0]), "relative")[0] == 0.5
    assert vm.errors(np.array([1.0]), np.array([179.0]), "angle")[0] == pytest.approx(2.0)
    assert np.isnan(vm.errors(np.array([1.0]), np.array([0.0]), "relative")[0])
    # percentiles on the median's side of the circle (measure.catalog.summarise): an interval
    # -5..5 about a median of 0 holds a truth of 178 (= -2)
    cov = vm.covered(np.array([-5.0]), np.array([5.0]), np.array([0.0]), np.array([178.0]),
                     "angle")  # fmt: skip
    assert cov[0] == 1.0
    cov = vm.covered(np.array([1.0, 1.0, np.nan]), np.array([2.0, 2.0, 2.0]),
                     np.array([1.5] * 3), np.array([1.5, 3.0, 1.5]), "absolute")  # fmt: skip
    assert cov[0] == 1.0 and cov[1] == 0.0 and np.isnan(cov[2])


def _table(n: int, post_err: float, obs_err: float, seed: int = 0) -> pd.DataFrame:
    """Objects with known errors: the posterior off by ``post_err`` (relative) and an
    interval ±1σ of a Gaussian draw, the observed image off by ``obs_err``."""
    rng = np.random.default_rng(seed)
    d = {
        Col.OBJECT_ID: np.arange(n),
        "mag_true": rng.uniform(18, 22, n),
        "psf_hwhm_arcsec": np.full(n, 0.35),
        Col.STATUS: ["ok"] * n,
        Col.FLAGS: np.zeros(n, int),
    }
    table = pd.DataFrame(d)
    for q in vm.QUANTITIES:
        true = rng.uniform(0.2, 0.6, n)
        table[f"{q}_true"] = true
        table[q] = true * (1 + post_err)
        # the truth lies inside a ±1σ interval about a N(truth, σ) centre 68 % of the time
        centre = true + rng.normal(0.0, 0.01, n)
        table[pct_col(q, 16)] = centre - 0.01
        table[pct_col(q, 84)] = centre + 0.01
        table[obs_col(q)] = true * (1 + obs_err)
    table["size_ratio"] = table[f"{Col.R50_ARCSEC}_true"] / table["psf_hwhm_arcsec"]
    return table


def test_summary_rows_and_done_when_on_known_errors():
    table = _table(4000, post_err=0.1, obs_err=0.3)
    rows = vm.summary_rows(table, "mag_true", vm.MAG_EDGES)
    r50 = next(r for r in rows if r["quantity"] == Col.R50_ARCSEC and r["mag_true"] == "all")
    assert r50["post_median_abs"] == pytest.approx(0.1) and r50["obs_median_abs"] == pytest.approx(
        0.3
    )
    assert r50["post_bias"] == pytest.approx(0.1) and r50["post_scatter"] == pytest.approx(
        0, abs=1e-9
    )
    assert r50["post_coverage_16_84"] == pytest.approx(0.683, abs=0.03)
    checks = vm.done_when(table)
    assert checks["r50_small"]["passed"] and checks["axis_ratio"]["passed"]
    # the posterior no better than half the observed error: fails
    worse = vm.done_when(_table(4000, post_err=0.2, obs_err=0.3))
    assert not worse["r50_small"]["passed"]
    # a flagged-out (status != ok) or round object is left out of the position angle
    table.loc[:9, Col.STATUS] = "error"
    n_pa = next(r for r in vm.summary_rows(table, "mag_true", vm.MAG_EDGES, [Col.POSITION_ANGLE])
                if r["mag_true"] == "all")["post_n"]  # fmt: skip
    assert n_pa == int(
        ((table[Col.STATUS] == "ok") & (table[f"{Col.AXIS_RATIO}_true"] < 0.8)).sum()
    )
