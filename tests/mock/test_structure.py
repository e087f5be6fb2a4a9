"""Realistic mock structure: each feature measured on drawn images (arms, bars, knots, dust)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from d4a_batch.config import PriorConfig
from d4a_batch.mock.galaxies import (
    ALL_COMPONENTS,
    MockGalaxyParams,
    arm_pattern_faceon,
    draw_components,
    draw_galaxy,
    dust_transmission,
    extinction_ccm89,
    knot_positions_kpc,
    sample_params,
)
from d4a_batch.training.data import mock_images
from d4a_batch.training.evaluate import FEATURE_NAMES, morphology_features

FACE_ON = dict(inclination_deg=0.0, knot_fraction=0.0, bulge_fraction=0.0, position_angle_deg=0.0)


def _polar(n: int, kpc: float):
    c = (np.arange(n) + 0.5 - n / 2) * kpc
    x, y = np.meshgrid(c, c)
    return np.hypot(x, y), np.arctan2(y, x)


def _azimuthal_profile(img: np.ndarray, r: np.ndarray, phi: np.ndarray, r0: float, r1: float):
    """Mean brightness in 24 azimuthal bins of the annulus r0 <= r < r1: ``[24]``."""
    ring = (r >= r0) & (r < r1)
    bins = np.floor((phi[ring] + np.pi) / (2 * np.pi) * 24).astype(int) % 24
    return np.bincount(bins, img[ring], 24) / np.bincount(bins, minlength=24)


def test_smooth_default_is_unchanged():
    a = sample_params(np.random.default_rng(3), 4)
    b = sample_params(np.random.default_rng(3), 4, "smooth")
    assert a == b
    for p in a:
        assert p.arm_fraction == p.bar_fraction == p.dust_tau_v == 0.0
        assert set(draw_components(p, 0.5, 32)) == {"bulge", "disk", "knots"}
    assert PriorConfig().mock_structure == "smooth"
    with pytest.raises(ValueError, match="unknown mock structure"):
        sample_params(np.random.default_rng(0), 1, "spiky")


def test_spiral_arms_contrast_and_winding():
    p = MockGalaxyParams(**FACE_ON, arm_fraction=0.6, n_arms=2, arm_pitch_deg=20.0)
    kpc, n = 0.1, 160
    img = draw_galaxy(p, kpc, n, ("r",))[0]
    smooth = draw_galaxy(dataclasses.replace(p, arm_fraction=0.0), kpc, n, ("r",))[0]
    r, phi = _polar(n, kpc)
    rd = p.disk_hlr_kpc / 1.6783
    peaks = []
    for r0 in (1.2 * rd, 2.4 * rd):
        prof = _azimuthal_profile(img, r, phi, r0, r0 + 0.3)
        flat = _azimuthal_profile(smooth, r, phi, r0, r0 + 0.3)
        assert prof.max() / prof.min() > 2.0  # arms vs inter-arm
        assert flat.max() / flat.min() < 1.1  # the smooth disk is axisymmetric
        peaks.append(np.angle(np.sum(prof * np.exp(2j * (np.arange(24) + 0.5) * np.pi / 12))) / 2)
    # log spiral: the m = 2 phase advances by ln(R2 / R1) / tan(pitch) between the radii
    expected = np.log((2.4 * rd + 0.15) / (1.2 * rd + 0.15)) / np.tan(np.deg2rad(20.0))
    diff = (peaks[1] - peaks[0] - expected + np.pi / 2) % np.pi - np.pi / 2
    assert abs(diff) < 0.15
    # flux bookkeeping still holds with arms
    comps = draw_components(p, 0.2, 140, ("r",))  # 28 kpc: the whole arm grid (5 hlr)
    assert comps["arms"].sum() == pytest.approx(0.6, rel=1e-2)


def test_bar_elongation_and_orientation():
    p = MockGalaxyParams(
        **{**FACE_ON, "bulge_fraction": 0.0},
        bar_fraction=1.0,
        bar_hlr_kpc=1.5,
        bar_q=0.3,
        bar_angle_deg=30.0,
    )
    img = draw_components(p, 0.1, 160, ("r",))["bar"][0].astype(np.float64)
    yy, xx = np.indices(img.shape) + 0.5 - 80
    f = img.sum()
    m = np.array(
        [
            [(img * xx * xx).sum(), (img * xx * yy).sum()],
            [(img * xx * yy).sum(), (img * yy * yy).sum()],
        ]
    )
    ev, vec = np.linalg.eigh(m / f)
    assert np.sqrt(ev[0] / ev[1]) == pytest.approx(0.3, rel=0.03)
    angle = np.rad2deg(np.arctan2(vec[1, 1], vec[0, 1])) % 180
    assert angle == pytest.approx(30.0, abs=1.0)


def test_knots_on_arms_follow_the_arms():
    p = MockGalaxyParams(
        **{**FACE_ON, "knot_fraction": 0.2}, arm_fraction=0.4, n_knots=60, knots_on_arms=1.0
    )
    scale = p.disk_hlr_kpc / 8.0
    pattern = arm_pattern_faceon(p, scale)
    g = pattern.shape[0]
    pos = knot_positions_kpc(p)
    ix = np.clip((pos[:, 0] / scale + g / 2).astype(int), 0, g - 1)
    iy = np.clip((pos[:, 1] / scale + g / 2).astype(int), 0, g - 1)
    rand = knot_positions_kpc(dataclasses.replace(p, knots_on_arms=0.0))
    jx = np.clip((rand[:, 0] / scale + g / 2).astype(int), 0, g - 1)
    jy = np.clip((rand[:, 1] / scale + g / 2).astype(int), 0, g - 1)
    # the arm brightness at the knots is several times that at exponential-disk positions
    assert np.median(pattern[iy, ix]) > 3 * np.median(pattern[jy, jx])
    # knots are clumps: they raise the 180-degree asymmetry of the image
    a = 0.01
    from d4a_batch.training.data import to_model_space

    clumpy = to_model_space(draw_galaxy(dataclasses.replace(p, knot_fraction=0.4), 0.25, 64), a)
    smooth = to_model_space(draw_galaxy(dataclasses.replace(p, knot_fraction=0.0), 0.25, 64), a)
    k = FEATURE_NAMES.index("asymmetry")
    f = morphology_features(np.stack([clumpy, smooth]), a)
    assert f[0, k] > 1.5 * f[1, k]


def test_dust_reddens_and_dims_inclined_disks():
    assert extinction_ccm89(0.55) == pytest.approx(1.0, abs=0.01)  # A_V / A_V
    ag, ar, ai = (extinction_ccm89(w) for w in (0.475, 0.617, 0.769))
    assert ag > ar > ai
    base = MockGalaxyParams(knot_fraction=0.0, bulge_fraction=0.3, dust_tau_v=1.0)
    n, kpc = 64, 0.25
    # colour g-i of the centre: redder with dust; more so edge-on (longer path through the slab)
    centre = slice(n // 2 - 3, n // 2 + 3)

    def gi(p):
        g, _, i = draw_galaxy(p, kpc, n).astype(np.float64)
        return -2.5 * np.log10(g[centre, centre].sum() / i[centre, centre].sum())

    clear = gi(dataclasses.replace(base, dust_tau_v=0.0, inclination_deg=0.0))
    face = gi(dataclasses.replace(base, inclination_deg=0.0))
    edge = gi(dataclasses.replace(base, inclination_deg=85.0))
    assert face > clear + 0.05
    assert edge > face + 0.1
    t_face = dust_transmission(dataclasses.replace(base, inclination_deg=0.0), kpc, n, ("r",))
    t_edge = dust_transmission(dataclasses.replace(base, inclination_deg=85.0), kpc, n, ("r",))
    assert t_edge.min() < 0.5 * t_face.min() and t_face.max() <= 1.0
    # components still sum to the galaxy, all attenuated alike
    p = dataclasses.replace(base, inclination_deg=60.0, arm_fraction=0.3, bar_fraction=0.1)
    comps = draw_components(p, kpc, n)
    total = draw_galaxy(p, kpc, n)
    np.testing.assert_allclose(
        total, sum(comps[c] for c in ALL_COMPONENTS if c in comps), rtol=1e-6
    )


@pytest.fixture(scope="module")
def realistic():
    params = sample_params(np.random.default_rng(11), 60, "realistic")
    x = np.stack([mock_images_one(p) for p in params])
    return params, x


def mock_images_one(p: MockGalaxyParams) -> np.ndarray:
    from d4a_batch.training.data import to_model_space

    return to_model_space(draw_galaxy(p, 0.75, 48), 0.01)


def test_realistic_population_has_its_features(realistic):
    params, x = realistic
    late = [p for p in params if p.bulge_fraction < 0.5]
    assert 0.6 < len(late) / len(params) < 0.98  # i < 24 is dominated by star-forming disks
    assert np.mean([p.arm_fraction > 0 for p in late]) > 0.5
    assert any(p.bar_fraction > 0 for p in params)
    for p in params:
        assert p.bulge_gr > p.disk_gr > p.knot_gr and p.arm_gr < p.disk_gr
        assert sum(p.component_fluxes_r().values()) == pytest.approx(1.0)
        assert min(p.component_fluxes_r().values()) >= 0.0
    # sizes: van der Wel et al. 2014 late types are a few kpc (semi-major R_eff)
    r_eff = np.array([p.disk_hlr_kpc / np.sqrt(p.disk_q) for p in late])
    assert 1.5 < np.median(r_eff) < 6.0
    assert np.all(np.isfinite(x)) and x.min() >= -1.0 and x.max() <= 1.0


def test_realistic_ellipticity_and_colour_gradient(realistic):
    params, x = realistic
    f = morphology_features(x, 0.01)
    ell = f[:, FEATURE_NAMES.index("ellipticity")]
    # isotropic thick disks + rounder spheroids: median 1 - b/a near 0.4, a wide spread
    assert 0.25 < np.median(ell) < 0.55
    assert np.percentile(ell, 90) - np.percentile(ell, 10) > 0.4
    # colour gradient measured on the images (flux space): bulge (centre) redder in g-i
    diffs = []
    for p in params:
        if p.bulge_fraction < 0.05 or p.dust_tau_v > 0.6:
            continue
        g, _, i = draw_galaxy(dataclasses.replace(p, flux_r=1.0), 0.25, 96).astype(np.float64)
        r, _ = _polar(96, 0.25)
        core = r < max(0.5, p.bulge_hlr_kpc)
        outer = (r > 2 * p.disk_hlr_kpc) & (r < 4 * p.disk_hlr_kpc)
        if outer.sum() < 20:
            continue
        gi_core = -2.5 * np.log10(g[core].sum() / i[core].sum())
        gi_outer = -2.5 * np.log10(g[outer].sum() / i[outer].sum())
        diffs.append(gi_core - gi_outer)
    assert len(diffs) >= 10
    assert np.median(diffs) > 0.1


def test_prior_config_selects_the_mock_structure():
    cfg = PriorConfig(image_size=32, kpc_per_pixel=0.75, mock_structure="realistic")
    a = mock_images(np.arange(3), 5, cfg)
    b = mock_images(np.arange(3), 5, dataclasses.replace(cfg, mock_structure="smooth"))
    assert a.shape == b.shape == (3, 3, 32, 32)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, mock_images(np.arange(3), 5, cfg))
