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


def test_robust_shape_ignores_a_faint_sky_and_recovers_the_axis_ratio():
    from d4a_batch.mock.galaxies import MockGalaxyParams, draw_galaxy
    from d4a_batch.physics.stretch import stretch
    from d4a_batch.training.data import normaliser
    from d4a_batch.training.evaluate import morphology_features, robust_shape_features

    a = 0.01
    p = MockGalaxyParams(
        bulge_fraction=0.0, knot_fraction=0.0, inclination_deg=60.0, position_angle_deg=30.0
    )
    img = draw_galaxy(p, 0.5, 64).astype(np.float64)
    v = img / normaliser(img)[:, None, None]
    x_clean = stretch(v, a)[None]
    x_sky = stretch(v + 6.6e-4, a)[None]  # a prior sample's sky: x = -0.975
    rob_clean = robust_shape_features(x_clean, a)[0]
    rob_sky = robust_shape_features(x_sky, a)[0]
    assert rob_clean[1] == pytest.approx(1 - p.disk_q, abs=0.02)  # ellipticity = 1 - b/a
    assert rob_sky[1] == pytest.approx(rob_clean[1], abs=0.02)
    assert rob_sky[0] == pytest.approx(rob_clean[0], rel=0.05)
    j = FEATURE_NAMES.index("ellipticity")
    classic = morphology_features(np.concatenate([x_clean, x_sky]), a)[:, j]
    assert classic[1] < classic[0] - 0.1  # the all-pixel moments are fooled by the sky
