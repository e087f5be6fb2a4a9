"""Richardson-Lucy baseline and the stamp -> model grid resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d4a_batch.physics.operator import ForwardOperator
from d4a_batch.physics.resample import resample
from d4a_batch.validation.baselines import (
    background,
    richardson_lucy_stamps,
    stamp_to_model,
    tune_iterations,
)
from d4a_batch.validation.metrics import psnr
from tests.validation.test_metrics import blob, gaussian_psf

N, H = 16, 32


def test_stamp_to_model_is_the_identity_on_the_same_grid(rng):
    img = rng.uniform(0, 1, (2, 3, N, N))
    out = stamp_to_model(img, np.ones(2), np.zeros((2, 2)), N)
    np.testing.assert_allclose(out, img, atol=1e-12)


@pytest.mark.parametrize("scale", [0.45, 0.8, 1.7])
def test_stamp_to_model_conserves_the_flux_of_a_compact_source(scale):
    truth = blob(N, 3, width=1.2)[None]
    offset = np.array([[0.3, -0.45]])
    stamp = resample(torch.as_tensor(truth), scale, offset, (H, H)).numpy()
    back = stamp_to_model(stamp, np.array([scale]), offset, N)
    np.testing.assert_allclose(back.sum((-2, -1)), truth.sum((-2, -1)), rtol=2e-3)
    # and it lands where the source was: the centroid is kept
    yy = np.arange(N) + 0.5
    cy = lambda im: (im.sum(-1) * yy).sum(-1) / im.sum((-2, -1))  # noqa: E731
    np.testing.assert_allclose(cy(back), cy(truth), atol=0.05)


def test_background_is_the_clipped_sky_level(rng):
    img = 0.4 + 0.01 * rng.standard_normal((1, 2, H, H))
    img[0, :, 14:18, 14:18] += 50.0  # a source does not move the clipped median
    valid = np.ones(img.shape, bool)
    valid[0, 1, :, :4] = False
    img[0, 1, :, :4] = 1e6  # invalid pixels are ignored
    np.testing.assert_allclose(background(img, valid), 0.4, atol=0.005)


def _blurred(scale: float = 0.5, sigma: float = 0.0, rng=None):
    truth = blob(N, 3, width=1.0)[None] * 20
    psf = np.broadcast_to(gaussian_psf(11, 1.5), (1, 3, 11, 11)).copy()
    offset = np.array([[0.2, 0.1]])
    op = ForwardOperator(torch.as_tensor(psf), torch.tensor([scale], dtype=torch.float64),
                         torch.as_tensor(offset), (H, H))  # fmt: skip
    y = op.linear(torch.as_tensor(truth)).numpy() + 0.3
    if sigma:
        y = y + sigma * rng.standard_normal(y.shape)
    return truth, y, np.ones(y.shape, bool), psf, np.array([scale]), offset


def test_richardson_lucy_sharpens_a_blurred_source(rng):
    truth, y, valid, psf, scale, offset = _blurred(sigma=0.005, rng=rng)
    raw = stamp_to_model(y - 0.3, scale, offset, N)
    rl = stamp_to_model(richardson_lucy_stamps(y, valid, psf, 30), scale, offset, N)
    assert psnr(rl[0], truth[0]) > psnr(raw[0], truth[0]) + 3
    # the flux is kept (background removed, no flux invented)
    np.testing.assert_allclose(rl.sum((-2, -1)), truth.sum((-2, -1)), rtol=0.05)


def test_tune_iterations_picks_the_best_mean_score(rng):
    truth, y, valid, psf, scale, offset = _blurred(sigma=0.005, rng=rng)
    best, means = tune_iterations(y, valid, psf, scale, offset, truth, [1, 30], psnr)
    assert set(means) == {1, 30}
    assert best == 30 and means[30] > means[1]
