"""jobs/evaluate_prior.py end to end on the shipped demo prior, at a tiny size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d4a_batch.testing import load_job
from d4a_batch.training.evaluate import FEATURE_NAMES

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_heldout_populations_quantiles_and_the_real_galaxy(tmp_path, shared_data):
    out = tmp_path / "eval.json"
    real = shared_data / "galsim" / "cosmos_147246_f814w.fits"
    args = ["--prior", f"demo={ROOT / 'priors' / 'demo-64'}", "--n-samples", "3"]
    args += ["--steps", "2", "--n-heldout", "8", "--heldout-structure", "smooth"]
    args += ["--heldout-structure", "realistic", "--real", str(real), "--real-z", "0.3", "1.0"]
    assert load_job("evaluate_prior").main([*args, "--out-json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["heldout_sets"]) == {"smooth", "realistic"}
    assert rep["heldout"] == rep["heldout_sets"]["smooth"]
    res = rep["priors"][0]
    assert set(res["frechet_distance_by_heldout"]) == {"smooth", "realistic"}
    assert res["frechet_distance"] == res["frechet_distance_by_heldout"]["smooth"]
    for q in (res["feature_quantiles"], rep["heldout_sets"]["realistic"]["feature_quantiles"]):
        assert set(q) == set(FEATURE_NAMES)
        assert q["r50"]["q10"] <= q["r50"]["q50"] <= q["r50"]["q90"]
    rob = res["robust_feature_quantiles"]["ellipticity_seg"]
    assert 0.0 <= rob["q10"] <= rob["q90"] < 1.0
    assert "robust_feature_quantiles" in rep["heldout_sets"]["realistic"]
    # the real galaxy: one band copied to all, so no colour; it grows in pixels with z
    by_z = rep["real_galaxy"]["by_z"]
    assert by_z["0.3"]["features"]["log_ratio_g_r"] == pytest.approx(0.0, abs=1e-9)
    assert by_z["1.0"]["features"]["r50"] > by_z["0.3"]["features"]["r50"]
    assert 0 <= by_z["0.3"]["percentile_in_heldout"]["realistic"]["r50"] <= 100
    assert by_z["1.0"]["robust_features"]["r50_seg"] > by_z["0.3"]["robust_features"]["r50_seg"]
