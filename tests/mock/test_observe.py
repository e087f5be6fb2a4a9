"""mock.observe: a truth observed with HSC noise (the one copy)."""

from __future__ import annotations

import numpy as np

from d4a_batch.mock.observe import (
    INV_GAIN,
    SKY_VARIANCE,
    add_hsc_noise,
    hsc_variance,
    observe_truth,
)


def test_variance_is_sky_plus_source_over_gain():
    model = np.zeros((2, 3, 4, 4))
    model[0, :, 1, 1] = 10.0
    model[1, :, 0, 0] = -5.0  # negative model light adds no source variance
    var = hsc_variance(model, "gri")
    for c, b in enumerate("gri"):
        assert var[1, c, 0, 0] == SKY_VARIANCE[b]
        assert var[0, c, 1, 1] == SKY_VARIANCE[b] + 10.0 * INV_GAIN[b]


def test_noise_is_one_seeded_draw_of_the_model_shape():
    model = np.ones((1, 3, 8, 8))
    image, var = add_hsc_noise(model, "gri", np.random.default_rng(4))
    expected = model + np.sqrt(var) * np.random.default_rng(4).standard_normal(model.shape)
    assert np.array_equal(image, expected)


def test_a_point_truth_keeps_its_flux_on_the_stamp():
    truth = np.zeros((2, 3, 16, 16))
    truth[:, :, 8, 8] = 100.0
    psf = np.zeros((3, 5, 5))
    psf[:, 2, 2] = 1.0
    seen = observe_truth(truth, psf, 0.5, np.zeros((2, 2)), 20, "gri", np.random.default_rng(0))
    assert seen.model.shape == seen.image.shape == seen.variance.shape == (2, 3, 20, 20)
    assert np.allclose(seen.model.sum((2, 3)), 100.0, rtol=1e-6)
    assert not np.array_equal(seen.image, seen.model)
