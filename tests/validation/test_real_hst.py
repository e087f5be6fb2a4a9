"""The real-galaxy check's parts: resampling without PSF, the degraded observation, the scores,
and the job end to end on the real HST and HSC files (skips without ../shared/data)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from d4a_batch.schema import DEMO_PRIOR_DIR, Col
from d4a_batch.validation.real_hst import (
    HST_PIXEL_ARCSEC,
    degrade_to_hsc,
    hst_galaxy,
    pearson,
    resample_only,
    score_real,
)


def test_resample_only_conserves_flux_and_moves_the_centroid_by_the_offset():
    y, x = np.indices((40, 40)) - 19.5
    img = np.exp(-(y**2 + x**2) / (2 * 4.0**2))
    out = resample_only(img, 0.5, (1.5, -2.0), 48)
    assert out.sum() == pytest.approx(img.sum(), rel=1e-10)
    yy, xx = np.indices(out.shape) - 23.5
    assert (out * yy).sum() / out.sum() == pytest.approx(1.5, abs=1e-6)
    assert (out * xx).sum() / out.sum() == pytest.approx(-2.0, abs=1e-6)
    # Gaussian second moments: (0.5 * 4)^2 in stamp pixels, plus the box terms of both grids
    q = (out * yy**2).sum() / out.sum() - 1.5**2
    assert q == pytest.approx(4.0 + 0.5**2 / 12 + 1 / 12, rel=0.02)


def test_score_real_pearson_is_one_for_the_truth_itself():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 20))
    where = np.ones_like(a, bool)
    assert pearson(a, 3 * a + 1, where) == pytest.approx(1.0)
    assert pearson(a, -a, where) == pytest.approx(-1.0)


def test_degraded_hst_galaxy_keeps_its_flux_and_the_truth_scores_perfectly(shared_data):
    truth = hst_galaxy()
    assert truth.shape == (543, 543) and truth.sum() > 0
    r = np.hypot(*(np.indices(truth.shape) - 271))
    assert np.all(truth[r > 3.6 / HST_PIXEL_ARCSEC] == 0)  # cut at 3.5'' of the centroid
    obs = degrade_to_hsc(truth, ("g", "r", "i"), mag_i=20.0)
    assert obs.image.shape == (3, 112, 112) and obs.psf.shape[0] == 3
    assert obs.truth_hsc.sum() == pytest.approx(obs.flux, rel=1e-6)
    noise = np.sqrt(obs.variance[2, 0, 0]) * 112
    assert abs(obs.image[2].sum() - obs.flux) < 5 * noise
    # the truth on the model grid (model pixel = 4 HST pixels, 64 px) scores as the truth
    n, f = 64, 4
    c = 271 - n * f // 2
    model = truth[c : c + n * f, c : c + n * f].reshape(n, f, n, f).sum(axis=(1, 3))
    model = np.repeat(model[None] * obs.flux / truth.sum(), 3, axis=0)
    off = tuple(float(v) for v in obs.offset)
    scale = f * HST_PIXEL_ARCSEC / 0.168
    # a centroid-centred crop vs the array-centred truth: shift the offset by the crop's
    # centre difference so both grids coincide
    cy = 271 - (c + n * f / 2 - 0.5)
    row = {Col.CHI2: 1.0, Col.FLAG_NAMES: "", Col.HALLUCINATION: 0.0}
    s = score_real(
        obs, model, scale, (off[0] - cy * 0.03 / 0.168, off[1] - cy * 0.03 / 0.168), 2, row
    )
    assert s["pearson_mean_footprint"] > 0.99
    assert s["pearson_obs_footprint"] < s["pearson_mean_footprint"]
    assert s["truth_light_in_footprint"] > 0.99


@pytest.mark.slow
def test_real_hst_check_job_writes_its_table(shared_data, tmp_path):
    from d4a_batch.testing import load_job

    if not (DEMO_PRIOR_DIR / "weights.safetensors").exists():
        pytest.skip(f"no demo prior at {DEMO_PRIOR_DIR}")
    job = load_job("real_hst_check")
    args = ["--prior", str(DEMO_PRIOR_DIR), "--z", "0.5", "--steps", "3", "--samples", "2",
            "--threads", "1", "--out", str(tmp_path)]  # fmt: skip
    assert job.main(args) == 0
    doc = json.loads((tmp_path / "real_hst.json").read_text())
    [r] = doc["results"]
    assert r["z"] == 0.5 and np.isfinite(r["chi2"]) and r["chi2"] > 0
    assert -1 <= r["pearson_obs_footprint"] <= 1 and -1 <= r["pearson_mean_footprint"] <= 1
    assert r["pearson_obs_footprint"] > 0.5  # the observation does resemble the galaxy
    assert (tmp_path / "z0.5" / "147246.png").exists()
    assert "| 0.5 |" in (tmp_path / "real_hst.md").read_text()
