from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from d4a_batch.mock.galaxies import (
    COMPONENTS,
    MockGalaxyParams,
    draw_components,
    draw_galaxy,
    knot_positions_kpc,
    sample_params,
)


def _half_light_radius(img: np.ndarray, kpc_per_pixel: float) -> float:
    """Radius (kpc) of the circle about the image centre that holds half the flux."""
    n = img.shape[-1]
    yy, xx = np.indices(img.shape) + 0.5 - n / 2
    r = np.hypot(yy, xx).ravel()
    order = np.argsort(r)
    cum = np.cumsum(img.ravel()[order])
    return float(np.interp(0.5 * cum[-1], cum, r[order]) * kpc_per_pixel)


def test_component_fluxes_sum_as_configured():
    p = MockGalaxyParams(
        seed=3, bulge_fraction=0.35, knot_fraction=0.25, disk_hlr_kpc=1.5, bulge_hlr_kpc=0.5
    )
    comps = draw_components(p, kpc_per_pixel=0.1, n=320)
    total = draw_galaxy(p, kpc_per_pixel=0.1, n=320)
    np.testing.assert_allclose(total, sum(comps[c] for c in COMPONENTS), rtol=1e-6, atol=1e-12)
    r = 1  # band index of r in (g, r, i)
    flux_r = {c: float(comps[c][r].sum(dtype=np.float64)) for c in COMPONENTS}
    assert sum(flux_r.values()) == pytest.approx(1.0, rel=5e-3)
    assert flux_r["bulge"] == pytest.approx(0.35, rel=5e-3)
    assert flux_r["disk"] == pytest.approx(0.65 * 0.75, rel=5e-3)
    assert flux_r["knots"] == pytest.approx(0.65 * 0.25, rel=5e-3)
    # other bands follow the AB colours: F_g = F_r 10^(-0.4 (g-r)), F_i = F_r 10^(0.4 (r-i))
    for c in COMPONENTS:
        gr, ri = p.colour(c)
        g, _, i = comps[c].sum(axis=(1, 2), dtype=np.float64)
        assert g / flux_r[c] == pytest.approx(10 ** (-0.4 * gr), rel=1e-4)
        assert i / flux_r[c] == pytest.approx(10 ** (0.4 * ri), rel=1e-4)


@pytest.mark.parametrize("hlr", [1.0, 2.5])
def test_face_on_disk_half_light_radius(hlr):
    p = MockGalaxyParams(bulge_fraction=0.0, knot_fraction=0.0, disk_hlr_kpc=hlr, inclination_deg=0)
    img = draw_galaxy(p, kpc_per_pixel=0.1, n=256, bands=("r",))[0]
    assert _half_light_radius(img, 0.1) == pytest.approx(hlr, rel=0.01)


def test_inclination_flattens_the_disk():
    base = MockGalaxyParams(
        bulge_fraction=0.0, knot_fraction=0.0, disk_hlr_kpc=1.0, position_angle_deg=0.0
    )
    for inc, q in [(0.0, 1.0), (60.0, np.sqrt(0.25 + 0.15**2 * 0.75))]:
        img = draw_galaxy(dataclasses.replace(base, inclination_deg=inc), 0.1, 200, ("r",))[0]
        yy, xx = np.indices(img.shape) + 0.5 - 100
        # second moments of an exponential scale with the axis lengths (PA 0: major axis = x)
        ratio = np.sqrt((img * yy**2).sum() / (img * xx**2).sum())
        assert ratio == pytest.approx(q, rel=0.02)


def test_deterministic_per_seed():
    a = sample_params(np.random.default_rng(7), 5)
    b = sample_params(np.random.default_rng(7), 5)
    c = sample_params(np.random.default_rng(8), 5)
    assert a == b
    assert a != c
    for pa, pb in zip(a, b):
        np.testing.assert_array_equal(draw_galaxy(pa, 0.5, 48), draw_galaxy(pb, 0.5, 48))
    p = MockGalaxyParams(seed=1, n_knots=20)
    knots1 = knot_positions_kpc(p)
    knots2 = knot_positions_kpc(dataclasses.replace(p, seed=2))
    np.testing.assert_array_equal(knots1, knot_positions_kpc(p))
    assert not np.allclose(knots1, knots2)


def test_colours_red_bulge_blue_disk_bluer_knots():
    params = sample_params(np.random.default_rng(0), 300)
    for p in params:
        assert p.bulge_gr > p.disk_gr > p.knot_gr
        assert p.bulge_ri > p.disk_ri > p.knot_ri
    # measured on images: a bulge + disk galaxy is redder (g-r) in its core than outside
    p = MockGalaxyParams(bulge_fraction=0.4, knot_fraction=0.0, inclination_deg=0.0)
    g, r, _ = draw_galaxy(p, kpc_per_pixel=0.25, n=96)
    yy, xx = np.indices(g.shape) + 0.5 - 48
    rad = np.hypot(yy, xx) * 0.25
    core, outer = rad < 0.5, (rad > 4) & (rad < 8)
    gr_core = -2.5 * np.log10(g[core].sum() / r[core].sum())
    gr_outer = -2.5 * np.log10(g[outer].sum() / r[outer].sum())
    assert gr_core > gr_outer + 0.1
    # and the population's integrated colour reddens with B/T
    bt = np.array([q.bulge_fraction for q in params])
    gr_int = []
    for q in params:
        fg = sum(q.band_flux(c, "g") for c in COMPONENTS)
        fr = sum(q.band_flux(c, "r") for c in COMPONENTS)
        gr_int.append(-2.5 * np.log10(fg / fr))
    assert np.corrcoef(bt, gr_int)[0, 1] > 0.5


def test_subpixel_offset_moves_the_centroid():
    p = MockGalaxyParams(knot_fraction=0.0, disk_hlr_kpc=1.5)
    n = 64
    yy, xx = np.indices((n, n)) + 0.5
    for off in [(0.0, 0.0), (0.3, -0.45)]:
        img = draw_galaxy(p, 0.5, n, ("r",), offset=off)[0]
        cy, cx = (img * yy).sum() / img.sum(), (img * xx).sum() / img.sum()
        assert cy == pytest.approx(n / 2 + off[0], abs=0.01)
        assert cx == pytest.approx(n / 2 + off[1], abs=0.01)


def test_sampled_population_is_realistic_and_drawable():
    params = sample_params(np.random.default_rng(1), 200)
    disk = np.array([p.disk_hlr_kpc for p in params])
    bulge = np.array([p.bulge_hlr_kpc for p in params])
    assert 2.0 < np.median(disk) < 3.0
    assert np.all(bulge < disk)
    imgs = np.stack([draw_galaxy(p, 0.5, 64) for p in params[:20]])
    assert imgs.shape == (20, 3, 64, 64)
    assert np.all(np.isfinite(imgs)) and imgs.min() >= 0.0
    # most of the r-band light lands in a 32 kpc field
    assert np.median(imgs[:, 1].sum(axis=(1, 2))) > 0.95


def test_unknown_band_rejected():
    with pytest.raises(ValueError, match="unknown bands"):
        draw_galaxy(MockGalaxyParams(), 0.5, 16, bands=("z",))
