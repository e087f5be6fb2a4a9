from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from d4a_batch.mock.galaxies import MockGalaxyParams, draw_galaxy
from d4a_batch.training.data import to_model_space
from d4a_batch.training.evaluate import (
    FEATURE_NAMES,
    frechet_distance,
    morphology_features,
    pca_fit,
    pca_project,
    sample_grid_rgb,
    standardise,
)


def test_frechet_identical_sets_is_zero(rng):
    f = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4))
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)


def test_frechet_shifted_gaussians_match_analytic(rng):
    # same covariance: d² = |μ1 - μ2|²; diagonal covariances: + Σ (σ1 - σ2)²
    n, d = 200_000, 3
    shift = np.array([0.5, -1.0, 2.0])
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(n, d)) + shift
    assert frechet_distance(a, b) == pytest.approx(float(shift @ shift), rel=0.01)
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    c = rng.normal(size=(n, d)) * s1
    e = rng.normal(size=(n, d)) * s2 + shift
    expected = float(shift @ shift + np.sum((s1 - s2) ** 2))
    assert frechet_distance(c, e) == pytest.approx(expected, rel=0.01)


def _x(params, n=64, kpc=0.5, offset=(0.0, 0.0)):
    return to_model_space(draw_galaxy(params, kpc, n, offset=offset), a=0.01)


def test_features_measure_size_shape_and_symmetry():
    base = MockGalaxyParams(bulge_fraction=0.0, knot_fraction=0.0, inclination_deg=0.0)
    small = dataclasses.replace(base, disk_hlr_kpc=1.5)
    big = dataclasses.replace(base, disk_hlr_kpc=3.0)
    flat = dataclasses.replace(big, inclination_deg=75.0)
    knotty = dataclasses.replace(big, knot_fraction=0.5, n_knots=8)
    f = morphology_features(np.stack([_x(p) for p in (small, big, flat, knotty)]), a=0.01)
    assert f.shape == (4, len(FEATURE_NAMES))
    col = {name: f[:, i] for i, name in enumerate(FEATURE_NAMES)}
    # half-light radius in pixels at 0.5 kpc/px
    assert col["r50"][0] == pytest.approx(3.0, rel=0.05)
    assert col["r50"][1] == pytest.approx(6.0, rel=0.05)
    # exponential disk: r80/r20 = 2.99/0.82 -> C = 2.8
    assert col["concentration"][1] == pytest.approx(5 * np.log10(2.994 / 0.824), abs=0.15)
    assert col["ellipticity"][1] < 0.02 and col["ellipticity"][2] > 0.5
    assert col["asymmetry"][1] < 0.02 and col["asymmetry"][3] > 0.1
    # a bulge-dominated galaxy is more concentrated than a pure disk
    bulgy = dataclasses.replace(base, bulge_fraction=0.8, bulge_hlr_kpc=0.8)
    fb = morphology_features(_x(bulgy)[None], a=0.01)
    assert fb[0, FEATURE_NAMES.index("concentration")] > col["concentration"][1] + 0.5


def test_frechet_on_features_separates_populations():
    rng = np.random.default_rng(0)

    def pop(hlr_median, k):
        return np.stack(
            [
                _x(
                    MockGalaxyParams(
                        seed=i,
                        disk_hlr_kpc=float(hlr_median * np.exp(0.2 * rng.standard_normal())),
                        inclination_deg=float(rng.uniform(0, 80)),
                        position_angle_deg=float(rng.uniform(0, 180)),
                    )
                )
                for i in range(k)
            ]
        )

    ref, same, other = pop(2.5, 40), pop(2.5, 40), pop(1.2, 40)
    fr, fs, fo = standardise(*(morphology_features(p, a=0.01) for p in (ref, same, other)))
    assert frechet_distance(fr, fo) > 3 * frechet_distance(fr, fs)


def test_pca_recovers_dominant_direction(rng):
    direction = np.array([3.0, 4.0]) / 5.0
    f = rng.normal(size=(2000, 1)) * 5.0 * direction + rng.normal(size=(2000, 2)) * 0.1
    mean, comps = pca_fit(f, 1)
    assert abs(float(comps[0] @ direction)) == pytest.approx(1.0, abs=1e-3)
    proj = pca_project(f, mean, comps)
    assert proj.shape == (2000, 1) and proj.std() == pytest.approx(5.0, rel=0.05)


def test_sample_grid_places_bands_and_tiles():
    x = -np.ones((3, 3, 4, 4))
    x[1, 2] = 1.0  # image 1, band i -> red channel of tile (0, 1)
    grid = sample_grid_rgb(x, ncol=2)
    assert grid.shape == (8, 8, 3)
    np.testing.assert_array_equal(grid[0:4, 4:8, 0], 1.0)
    assert grid[0:4, 4:8, 1:].max() == 0.0 and grid[:, 0:4].max() == 0.0
