from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import ndtr

from d4a_batch.physics.resample import overlap_matrix, resample, resample_adjoint


def _edges(n: int, scale: float, centre: float) -> np.ndarray:
    """Pixel edges of an n-pixel grid of pitch ``scale`` centred at ``centre`` (output coords)."""
    return centre + (np.arange(n + 1) - n / 2) * scale


def _pixel_gaussian(edges_y, edges_x, mu, sigma) -> np.ndarray:
    """A unit-flux 2-D Gaussian integrated exactly over each pixel of the given edges."""
    gy = np.diff(ndtr((edges_y - mu[0]) / sigma))
    gx = np.diff(ndtr((edges_x - mu[1]) / sigma))
    return np.outer(gy, gx)


def _resample_gaussian(n_in, scale, offset, n_out, mu, sigma):
    """Gaussian pixel-integrated on the input grid, resampled; and integrated on the output grid."""
    cy, cx = n_out / 2 + offset[0], n_out / 2 + offset[1]
    src = _pixel_gaussian(_edges(n_in, scale, cy), _edges(n_in, scale, cx), mu, sigma)
    out = resample(
        torch.from_numpy(src)[None, None],
        torch.tensor([scale], dtype=torch.float64),
        torch.tensor([offset], dtype=torch.float64),
        (n_out, n_out),
    )[0, 0].numpy()
    direct = _pixel_gaussian(np.arange(n_out + 1.0), np.arange(n_out + 1.0), mu, sigma)
    return out, direct


def test_identity_and_exact_binning():
    eye = overlap_matrix(7, 7, 1.0, 0.0)
    torch.testing.assert_close(eye, torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-15)
    # scale 1/2 with aligned edges: each output pixel is the sum of 2 input pixels
    r = overlap_matrix(4, 8, 0.5, 0.0)
    expect = torch.zeros(4, 8, dtype=torch.float64)
    for i in range(4):
        expect[i, 2 * i : 2 * i + 2] = 1.0
    torch.testing.assert_close(r, expect, rtol=0, atol=1e-15)
    # half-pixel shift at scale 1: flux split evenly between two neighbours
    r = overlap_matrix(5, 3, 1.0, 0.5)
    # input centre 2.5 + 0.5 = 3: input pixel 0 covers [1.5, 2.5)
    assert r[1, 0] == pytest.approx(0.5) and r[2, 0] == pytest.approx(0.5)
    assert r[:, 0].sum() == pytest.approx(1.0)


def test_batched_matrices_and_cut():
    s = torch.tensor([0.3, 1.0, 2.7])
    d = torch.tensor([0.1, -0.4, 0.45])
    r = overlap_matrix(9, 12, s, d)
    assert r.shape == (3, 9, 12) and r.dtype == torch.float32
    for b in range(3):
        torch.testing.assert_close(r[b], overlap_matrix(9, 12, float(s[b]), float(d[b])).float())
    # input larger than output, scale 1: an exact central crop, the rest is cut
    img = torch.arange(100.0, dtype=torch.float64).reshape(1, 1, 10, 10)
    out = resample(img, 1.0, torch.zeros(1, 2), (6, 6))
    torch.testing.assert_close(out, img[..., 2:8, 2:8])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("n_in", "scale", "n_out"),
    [(64, 0.1786, 24), (543, 0.03 / 0.168, 112), (32, 1.0, 40), (16, 1.37, 40), (9, 3.9, 48)],
)
def test_flux_conservation_up_and_down(dtype, n_in, scale, n_out, rng):
    img = torch.as_tensor(rng.random((3, 2, n_in, n_in)), dtype=dtype)
    offset = torch.as_tensor(rng.uniform(-0.5, 0.5, (3, 2)), dtype=dtype)
    scales = torch.tensor([scale, scale * 0.93, scale * 1.05], dtype=dtype)
    assert float(scales.max()) * n_in < n_out - 1.0  # the footprint fits: nothing is cut
    out = resample(img, scales, offset, (n_out, n_out))
    assert out.shape == (3, 2, n_out, n_out) and out.dtype == dtype
    rel = (out.double().sum((-2, -1)) / img.double().sum((-2, -1)) - 1).abs().max().item()
    assert rel < 1e-6


def test_gaussian_downsampling_aligned_is_exact():
    # scale 1/5 with a sub-pixel offset of 2 input pixels: input edges fall on the output edges,
    # so summing input pixels IS integrating on the output grid (input covers the whole output)
    out, direct = _resample_gaussian(110, 0.2, (0.4, -0.6), 20, mu=(11.3, 7.6), sigma=1.4)
    np.testing.assert_allclose(out, direct, rtol=0, atol=1e-14)


def test_gaussian_downsampling_any_ratio_second_order():
    # HST 0.03" -> HSC 0.168" with a sub-pixel offset. Input pixels straddling an output edge
    # are split by area, i.e. as if flat: the error per output edge is ~ s² |f'| / 8, second
    # order in the input pitch s. Check the size and that halving s divides it by ~4.
    errors = []
    for scale in (0.03 / 0.168, 0.015 / 0.168):
        n_in = round(28 / scale)
        out, direct = _resample_gaussian(n_in, scale, (0.31, -0.17), 32, mu=(16.2, 15.7), sigma=1.3)
        assert out.sum() == pytest.approx(direct.sum(), rel=1e-10)
        errors.append(np.abs(out - direct).max() / direct.max())
    assert errors[0] < 5e-3  # measured 3.4e-3 (and 8.1e-4 at half the pitch)
    assert errors[0] / errors[1] > 3.0


def test_gaussian_upsampling_first_order():
    # coarse -> fine: inside a coarse pixel the flux is spread flat, an O(s |f'|) error
    # at worst (measured: 0.12 at s = 2, 0.021 at s = 1).
    errors = []
    for scale in (2.0, 1.0):
        n_in = round(40 / scale)
        out, direct = _resample_gaussian(n_in, scale, (0.2, -0.35), 48, mu=(24.1, 23.5), sigma=3.0)
        assert out.sum() == pytest.approx(direct.sum(), rel=1e-10)
        errors.append(np.abs(out - direct).max() / direct.max())
    assert errors[0] < 0.15
    assert errors[0] / errors[1] > 1.8
    # and summing the fine result back over each coarse pixel restores it exactly
    src = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    up = resample(src, 4.0, torch.zeros(1, 2, dtype=torch.float64), (32, 32))
    torch.testing.assert_close(resample(up, 0.25, torch.zeros(1, 2), (8, 8)), src)


def test_batch_equals_one_by_one(rng):
    img = torch.as_tensor(rng.random((4, 3, 20, 20)))
    scale = torch.tensor([0.4, 0.9, 1.6, 2.2], dtype=torch.float64)
    offset = torch.as_tensor(rng.uniform(-0.5, 0.5, (4, 2)))
    out = resample(img, scale, offset, (30, 30))
    for b in range(4):
        one = resample(img[b : b + 1], scale[b : b + 1], offset[b : b + 1], (30, 30))
        torch.testing.assert_close(out[b : b + 1], one, rtol=1e-12, atol=1e-14)
        ry = overlap_matrix(30, 20, float(scale[b]), float(offset[b, 0])).numpy()
        rx = overlap_matrix(30, 20, float(scale[b]), float(offset[b, 1])).numpy()
        np.testing.assert_allclose(out[b, 1].numpy(), ry @ img[b, 1].numpy() @ rx.T, atol=1e-12)


@pytest.mark.parametrize(("n_in", "n_out", "scale"), [(20, 12, 0.45), (10, 30, 2.3)])
def test_adjoint_identity(n_in, n_out, scale, rng):
    x = torch.as_tensor(rng.normal(size=(2, 3, n_in, n_in)))
    y = torch.as_tensor(rng.normal(size=(2, 3, n_out, n_out)))
    s = torch.tensor([scale, scale * 1.1], dtype=torch.float64)
    off = torch.as_tensor(rng.uniform(-0.5, 0.5, (2, 2)))
    lhs = (resample(x, s, off, (n_out, n_out)) * y).sum()
    rhs = (x * resample_adjoint(y, s, off, (n_in, n_in))).sum()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-12)


def test_gradients():
    img = torch.rand(2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.7, 1.3], dtype=torch.float64)
    # offsets chosen so that no input edge falls on an output edge (the map has kinks there)
    off = torch.tensor([[0.23, -0.11], [0.31, 0.27]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: resample(t, s, off, (7, 7)), (img,))
    off_var = off.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda o: resample(img.detach(), s, o, (7, 7)), (off_var,))


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        overlap_matrix(4, 4, 0.0)
    with pytest.raises(ValueError, match=r"offset\[2, 2\]"):
        resample(torch.ones(2, 1, 4, 4), torch.ones(2), torch.zeros(3, 2), (4, 4))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        resample(torch.ones(4, 4), 1.0, torch.zeros(1, 2), (4, 4))
