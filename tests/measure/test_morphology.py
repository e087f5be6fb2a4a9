"""Morphology against analytic profiles rendered on a 64×64 model grid (GalSim, pixel-integrated).

Truths: a round Sérsic's curve of growth is the regularised incomplete gamma function
L(<r) = P(2n, b_n (r/r_e)^{1/n}), so the Petrosian radius (η = 0.2), the total aperture
2 r_P and r20/r50/r80 within it follow without pixels; a Gaussian's is 1 − exp(−r²/2σ²);
GalSim's ``shear(q, beta)`` sets the axis ratio and the major axis at ``beta`` from +x,
i.e. a position angle east of north of beta − 90° (north up, east left).
Tolerances allow for the pixel integration (a 1/12 px² blur) and the K = 128 radii.
"""

from __future__ import annotations

import galsim
import numpy as np
import pytest
from scipy.special import gammainc, gammaincinv

from d4a_batch.measure import morphology as mm

N = 64
CENTRE = np.array([[N / 2, N / 2]])
R_MAX = np.array([N / 2])


def draw(profile: galsim.GSObject, n: int = N, offset=(0.0, 0.0)) -> np.ndarray:
    """``profile`` pixel-integrated on an n×n grid of unit pixels, centred at n/2 + offset
    (offset (dy, dx) in pixels)."""
    return profile.drawImage(nx=n, ny=n, scale=1.0, offset=(offset[1], offset[0])).array


def sersic(n_s: float, hlr: float, q: float = 1.0, beta: float = 0.0) -> galsim.GSObject:
    g = galsim.Sersic(n=n_s, half_light_radius=hlr).withFlux(1e4)
    return g.shear(q=q, beta=beta * galsim.degrees) if q != 1.0 else g


def analytic_radii(cog, r_max: float) -> dict[str, float]:
    """Petrosian radius, r20/r50/r80 and C of the curve of growth ``cog(r)`` (normalised)."""
    r = np.linspace(0.05, 0.8 * r_max, 200_000)
    eta = (cog(1.25 * r) - cog(0.8 * r)) / ((1.25**2 - 0.8**2) * r**2) / (cog(r) / r**2)
    r_p = r[np.argmax(eta < mm.ETA_PETROSIAN)]
    total = cog(min(2 * r_p, r_max))
    fine = np.linspace(1e-4, r_max, 400_000)
    level = cog(fine)
    out = {"r_petro": r_p}
    for name, frac in (("r20", 0.2), ("r50", 0.5), ("r80", 0.8)):
        out[name] = fine[np.argmax(level >= frac * total)]
    out["concentration"] = 5 * np.log10(out["r80"] / out["r20"])
    return out


def sersic_cog(n_s: float, hlr: float):
    b = gammaincinv(2 * n_s, 0.5)
    return lambda r: gammainc(2 * n_s, b * (np.asarray(r) / hlr) ** (1 / n_s))


def measure(images: np.ndarray, centre=CENTRE, r_max=R_MAX):
    images = np.asarray(images, np.float64)[None]
    prof = mm.light_profile(images, centre, r_max)
    return prof, mm.light_radii(prof, r_max)


@pytest.mark.parametrize(
    ("label", "profile", "cog", "rtol", "c_tol"),
    [
        ("exponential", sersic(1.0, 5.0), sersic_cog(1.0, 5.0), 0.015, 0.05),
        ("sersic n=2.5", sersic(2.5, 6.0), sersic_cog(2.5, 6.0), 0.03, 0.12),
        ("de Vaucouleurs", sersic(4.0, 8.0), sersic_cog(4.0, 8.0), 0.05, 0.2),
        (
            "gaussian",
            galsim.Gaussian(sigma=4.0, flux=1e4),
            lambda r: 1 - np.exp(-(np.asarray(r) ** 2) / 32.0),
            0.01,
            0.03,
        ),
    ],
)
def test_radii_and_concentration_match_the_analytic_profile(label, profile, cog, rtol, c_tol):
    _, lr = measure([draw(profile)])
    truth = analytic_radii(cog, N / 2)
    # r20 of the cuspy profiles sits at 1-2 px, where the pixel integration blurs it most
    for name in ("r_petro", "r50", "r80", "r20"):
        tol = rtol if name != "r20" else 2 * rtol
        got = float(getattr(lr, name)[0, 0])
        assert got == pytest.approx(truth[name], rel=tol), (label, name, got, truth[name])
    assert float(lr.concentration[0, 0]) == pytest.approx(truth["concentration"], abs=c_tol)
    assert float(lr.r_total[0, 0]) == pytest.approx(2 * float(lr.r_petro[0, 0]))
    # a Gaussian's r50 is σ·sqrt(2 ln 2) (the Petrosian aperture holds all its light)
    if label == "gaussian":
        assert float(lr.r50[0, 0]) == pytest.approx(4.0 * np.sqrt(2 * np.log(2)), rel=0.01)


def test_petrosian_radius_beyond_the_field_makes_the_field_the_aperture():
    _, lr = measure([draw(sersic(1.0, 14.0))])  # r_P ≈ 30 px > 0.8 · 32
    assert np.isnan(lr.r_petro[0, 0]) and lr.r_total[0, 0] == N / 2
    assert np.isfinite(lr.r50[0, 0])


def test_radii_scale_with_the_profile_and_are_nan_without_flux():
    _, lr = measure([draw(sersic(1.0, 3.0)), draw(sersic(1.0, 6.0)), np.zeros((N, N))])
    assert lr.r50[0, 1] / lr.r50[0, 0] == pytest.approx(2.0, rel=0.02)
    assert np.isnan(lr.r50[0, 2]) and np.isnan(lr.concentration[0, 2])


@pytest.mark.parametrize(
    ("n_s", "q", "beta"), [(1.0, 0.5, 30.0), (2.0, 0.3, 120.0), (1.0, 0.8, -60.0), (4.0, 0.6, 75.0)]
)
def test_axis_ratio_and_position_angle_of_an_elliptical_sersic(n_s, q, beta):
    img = draw(sersic(n_s, 5.0, q, beta))
    _prof, lr = measure([img])
    shape = mm.shape_moments(img[None, None], CENTRE, lr.r50, lr.r_total)
    assert float(shape.axis_ratio[0, 0]) == pytest.approx(q, abs=0.02)
    pa = float(shape.pa_deg[0, 0])
    expect = (beta - 90.0) % 180.0
    # the angle is less defined the rounder the profile: 0.5° / (1 - q)
    assert abs((pa - expect + 90) % 180 - 90) < 0.5 / (1 - q), (pa, expect)
    assert float(shape.offset[0, 0]) < 0.01


def test_round_profile_has_axis_ratio_one_and_centroid_offset_is_measured():
    img = draw(galsim.Gaussian(sigma=3.0, flux=1e4), offset=(1.3, -0.7))
    _, lr = measure([img])
    shape = mm.shape_moments(img[None, None], CENTRE, lr.r50, lr.r_total)
    assert float(shape.axis_ratio[0, 0]) == pytest.approx(1.0, abs=0.02)
    assert float(shape.dy[0, 0]) == pytest.approx(1.3, abs=0.03)
    assert float(shape.dx[0, 0]) == pytest.approx(-0.7, abs=0.03)


def _gini_m20(images):
    images = np.asarray(images, np.float64)[None]
    prof = mm.light_profile(images, CENTRE, R_MAX)
    return mm.gini_m20(images, CENTRE, prof, mm.light_radii(prof, R_MAX))


def test_gini_coefficient_of_equal_pixels_and_of_one_pixel_holding_all_light():
    rng = np.random.default_rng(2)
    member = np.ones((3, 200), bool)
    values = np.ones((3, 200))
    values[1] = 0.0
    values[1, 17] = 5.0  # one pixel holds all the light
    values[2] = rng.exponential(size=200)
    gini = mm.gini_coefficient(values, member)
    assert gini[0] == pytest.approx(0.0, abs=1e-12)
    assert gini[1] == pytest.approx(1.0, abs=1e-12)
    x = np.sort(values[2])  # the textbook form: mean absolute difference / (2 mean)
    mad = np.abs(x[:, None] - x[None, :]).sum() / (200 * 199)
    assert gini[2] == pytest.approx(mad / (2 * x.mean()), rel=1e-9)
    # only members count; fewer than two: undefined
    member[0, :100] = False
    values[0, :100] = 1e3
    assert mm.gini_coefficient(values[:1], member[:1])[0] == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(mm.gini_coefficient(values[:1], np.eye(1, 200, dtype=bool))[0])


def test_gini_of_a_uniform_disc_a_point_and_sersics():
    yy, xx = np.mgrid[:N, :N] + 0.5 - N / 2
    disc = (yy**2 + xx**2 <= 10.0**2).astype(float)
    point = np.zeros((N, N))
    point[32, 32] = 100.0
    tophat = draw(galsim.TopHat(radius=10.0, flux=1e4))  # pixel-integrated: soft edge
    gini, m20 = _gini_m20([disc, point, tophat, draw(sersic(1.0, 5.0)), draw(sersic(4.0, 5.0))])
    assert gini[0, 0] == pytest.approx(0.0, abs=1e-12)  # the segment is exactly the disc
    assert gini[0, 2] < 0.06
    # a lone bright pixel is a one-pixel segment (Lotz et al.): Gini and M20 undefined
    assert np.isnan(gini[0, 1]) and np.isnan(m20[0, 1])
    # more concentrated light is less equal: an exponential < de Vaucouleurs
    assert 0.35 < gini[0, 3] < gini[0, 4] < 0.85
    # the brightest 20 % of a more concentrated profile hold less of its moment
    assert m20[0, 4] < m20[0, 3] < -1.0


def test_gini_and_m20_agree_with_statmorph():
    statmorph = pytest.importorskip("statmorph")
    img = draw(sersic(1.5, 5.0, 0.6, 30.0))
    gini, m20 = _gini_m20([img])
    segmap = (img > 1e-3 * img.max()).astype(int)
    ref = statmorph.source_morphology(img, segmap, gain=1e6)[0]
    assert gini[0, 0] == pytest.approx(ref.gini, abs=0.04)
    assert m20[0, 0] == pytest.approx(ref.m20, abs=0.1)
    _, lr = measure([img])
    assert float(lr.concentration[0, 0]) == pytest.approx(ref.concentration, abs=0.15)


def _asymmetry(images, centre=CENTRE, r_max=R_MAX):
    """mm.asymmetry as measure.catalog runs it: the search starts at the light centroid."""
    images = np.asarray(images, np.float64)
    prof = mm.light_profile(images, centre, r_max)
    lr = mm.light_radii(prof, r_max)
    shape = mm.shape_moments(images, centre, lr.r50, lr.r_total)
    return mm.asymmetry(images, centre, lr.r_total, start=np.stack([shape.dy, shape.dx], -1))


def test_asymmetry_is_zero_for_symmetric_profiles_on_and_off_the_pixel_lattice():
    imgs = [
        draw(sersic(1.0, 5.0, 0.5, 30.0)),
        draw(galsim.Gaussian(sigma=3.0, flux=1e4), offset=(0.8, -0.6)),
        # off the lattice the rotation interpolates (FFT): exact for a band-limited image,
        # as PSF-convolved ones are
        draw(
            galsim.Convolve(sersic(1.5, 4.0, 0.7, 100.0), galsim.Gaussian(sigma=1.5)),
            offset=(-0.37, 0.21),
        ),
    ]
    a, _, n_bkg = _asymmetry(np.asarray(imgs)[None])
    # on the lattice the rotation is exact; off it the centre search stops at 0.015 px
    assert abs(a[0, 0]) < 1e-6 and np.all(np.abs(a) < 0.01), a
    assert np.all(n_bkg >= mm.MIN_BACKGROUND_PIXELS)
    # an observed-stamp geometry: the catalog position off the half-pixel lattice
    centre = np.array([[24.3, 23.8]])
    img = draw(galsim.Gaussian(sigma=2.5, flux=1e4), n=48, offset=(0.3, -0.2))
    a, _, _ = _asymmetry(img[None, None], centre, np.array([20.0]))
    assert abs(float(a[0, 0])) < 0.01, a


def test_asymmetry_of_a_lopsided_profile_and_its_noise_correction():
    rng = np.random.default_rng(5)
    base = draw(sersic(1.0, 5.0))
    lopsided = base + draw(galsim.Gaussian(sigma=1.5, flux=2e3), offset=(0.0, 6.0))
    a, _, _ = _asymmetry(lopsided[None, None])
    assert a[0, 0] > 0.15
    # noise: the raw asymmetry of a symmetric galaxy grows, the corrected one stays near 0
    noisy = base[None] + rng.normal(0.0, 0.5 * base.max() / 60, (8, N, N))
    a, a_bkg, _ = _asymmetry(noisy[None])
    assert np.all(a_bkg > 0.03), a_bkg
    assert abs(float(np.median(a))) < 0.02 and np.all(np.abs(a) < 0.05), a


def test_rotation_about_half_pixel_and_arbitrary_centres():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(1, 1, 10, 12))
    rot, pair = mm.rotate180(img, np.array([[5.0, 6.0]]))
    np.testing.assert_allclose(rot[0, 0], img[0, 0, ::-1, ::-1])
    assert pair.all()
    # about row edge 5.5: row i's partner is row 10 - i, off the grid for row 0
    rot, pair = mm.rotate180(img, np.array([[5.5, 6.0]]))
    np.testing.assert_allclose(rot[0, 0, 1:], img[0, 0, ::-1, ::-1][:-1])
    assert not pair[0, 0, 0].any() and pair[0, 0, 1:].all()
    # a smooth image rotated about a non-lattice point matches the analytic rotation
    yy, xx = np.mgrid[:32, :32] + 0.5
    g = lambda y0, x0: np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / 18.0)  # noqa: E731
    rot, _ = mm.rotate180(g(14.2, 17.9)[None, None], np.array([[16.1, 15.7]]))
    np.testing.assert_allclose(rot[0, 0], g(2 * 16.1 - 14.2, 2 * 15.7 - 17.9), atol=1e-4)


def test_fill_by_symmetry_restores_masked_pixels_from_their_partner():
    img = draw(sersic(1.0, 4.0, 0.7, 10.0))[None, None]
    valid = np.ones(img.shape, bool)
    valid[..., 20:24, 40:45] = False  # partner rows 40-43, columns 19-23: valid
    valid[..., 0, 0] = valid[..., -1, -1] = False  # each other's partner: not restorable
    filled, unfilled = mm.fill_by_symmetry(np.where(valid, img, np.nan), valid, CENTRE)
    np.testing.assert_allclose(filled[..., 20:24, 40:45], img[..., 20:24, 40:45], rtol=1e-6)
    assert unfilled.sum() == 2 and filled[0, 0, 0, 0] == 0.0


def test_colour_gradient_against_analytic_gaussians():
    s_red, s_blue = 3.0, 6.0
    red = draw(galsim.Gaussian(sigma=s_red, flux=1e4))
    blue = 0.5 * red + draw(galsim.Gaussian(sigma=s_blue, flux=5e3))  # bluer outskirts
    prof_r, lr = measure([red])
    prof_b, _ = measure([blue])
    grad = float(mm.colour_gradient(prof_b, prof_r, lr.r50, lr.r_total)[0, 0])

    def enclosed(sigma, r):  # pixel integration adds 1/12 px² to the variance
        return 1 - np.exp(-(r**2) / (2 * (sigma**2 + 1 / 12)))

    r50, rt = float(lr.r50[0, 0]), float(lr.r_total[0, 0])
    f_r = 1e4 * np.array([enclosed(s_red, r50), enclosed(s_red, rt)])
    f_b = 0.5 * f_r + 5e3 * np.array([enclosed(s_blue, r50), enclosed(s_blue, rt)])
    inner = -2.5 * np.log10(f_b[0] / f_r[0])
    outer = -2.5 * np.log10((f_b[1] - f_b[0]) / (f_r[1] - f_r[0]))
    assert grad == pytest.approx(inner - outer, abs=0.01)
    assert grad > 0.3  # the centre is redder
    same, _ = measure([0.4 * red])
    assert float(mm.colour_gradient(same, prof_r, lr.r50, lr.r_total)[0, 0]) == pytest.approx(
        0.0, abs=1e-6
    )
