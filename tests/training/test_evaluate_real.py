"""Feature quantiles and real images moved onto the prior's grid (flux conservation, size scaling)."""

from __future__ import annotations

import galsim
import numpy as np
import pytest

from d4a_batch.training.evaluate import (
    FEATURE_NAMES,
    QUANTILES,
    feature_quantiles,
    image_on_prior_grid,
)


def test_feature_quantiles_match_numpy(rng):
    f = rng.normal(size=(400, len(FEATURE_NAMES)))
    q = feature_quantiles(f)
    assert set(q) == set(FEATURE_NAMES)
    assert list(q["r50"]) == [f"q{round(100 * p):02d}" for p in QUANTILES]
    j = FEATURE_NAMES.index("ellipticity")
    assert q["ellipticity"]["q50"] == pytest.approx(np.median(f[:, j]))
    assert q["ellipticity"]["q10"] < q["ellipticity"]["q50"] < q["ellipticity"]["q90"]
    with pytest.raises(ValueError, match="expected features"):
        feature_quantiles(f[:, :3])


def test_image_on_prior_grid_conserves_flux_and_scales_size():
    # a Gaussian of sigma 0.3" drawn at 0.03"/pixel, off-centre; moved to 0.12"/pixel
    sigma, fine, coarse = 0.3, 0.03, 0.12
    img = (
        galsim.Gaussian(sigma=sigma, flux=1.0)
        .drawImage(nx=201, ny=201, scale=fine, offset=(12.0, -7.0))
        .array.astype(np.float64)
    )
    out = image_on_prior_grid(img, fine, coarse, 32)
    assert out.shape == (32, 32)
    assert out.sum() == pytest.approx(img.sum(), rel=1e-3)  # area overlap keeps the flux
    yy, xx = np.indices(out.shape) + 0.5 - 16
    f = out.sum()
    cy, cx = (out * yy).sum() / f, (out * xx).sum() / f
    assert abs(cy) < 0.25 and abs(cx) < 0.25  # centred on the light
    # second moment: sigma^2 in coarse pixels + the fine and coarse pixel boxes (1/12 each)
    var = (out * (xx - cx) ** 2).sum() / f
    expected = (sigma / coarse) ** 2 + (fine / coarse) ** 2 / 12 + 1 / 12
    assert var == pytest.approx(expected, rel=0.05)
