from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import torch

from d4a_batch.physics.psf import convolve_fft, convolve_fft_adjoint

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")],
)


def _direct(img: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """Direct linear convolution, 'full' cropped so that the PSF centre is pixel P // 2."""
    p, q = psf.shape
    h, w = img.shape
    full = scipy.signal.convolve(img, psf, mode="full", method="direct")
    return full[p // 2 : p // 2 + h, q // 2 : q // 2 + w]


def _sampled_gaussian(shape, centre, sigma) -> np.ndarray:
    y, x = np.indices(shape, dtype=np.float64)
    return np.exp(-0.5 * ((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / sigma**2)


def _moments(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flux-weighted centroid (y, x) and second moments (Qyy, Qxx, Qxy) of a discrete image."""
    y, x = np.indices(img.shape, dtype=np.float64)
    f = img.sum()
    cy, cx = (img * y).sum() / f, (img * x).sum() / f
    q = (
        (img * (y - cy) ** 2).sum() / f,
        (img * (x - cx) ** 2).sum() / f,
        (img * (y - cy) * (x - cx)).sum() / f,
    )
    return np.array([cy, cx]), np.array(q)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize(
    ("h", "w", "p", "q"), [(32, 32, 7, 7), (30, 27, 8, 6), (32, 32, 43, 43), (20, 24, 44, 41)]
)
def test_fft_equals_direct_float32(device, h, w, p, q, rng):
    img = rng.normal(size=(2, 3, h, w)).astype(np.float32)
    psf = rng.random((2, 3, p, q)).astype(np.float32)
    psf /= psf.sum((-2, -1), keepdims=True)
    out = convolve_fft(torch.from_numpy(img).to(device), torch.from_numpy(psf).to(device)).cpu()
    assert out.shape == (2, 3, h, w) and out.dtype == torch.float32
    for b in range(2):
        for c in range(3):
            ref = _direct(img[b, c].astype(np.float64), psf[b, c].astype(np.float64))
            err = np.abs(out[b, c].numpy() - ref).max() / np.abs(ref).max()
            assert err < 2e-6
            if p % 2 and q % 2:  # odd PSF: the same as scipy's 'same'
                same = scipy.signal.convolve(
                    img[b, c].astype(np.float64), psf[b, c].astype(np.float64), "same", "direct"
                )
                np.testing.assert_allclose(ref, same, atol=1e-12)


@pytest.mark.parametrize("p", [5, 6])
def test_delta_psf_is_identity(p):
    img = torch.rand(1, 2, 12, 10, dtype=torch.float64)
    psf = torch.zeros(1, 2, p, p, dtype=torch.float64)
    psf[..., p // 2, p // 2] = 1.0
    torch.testing.assert_close(convolve_fft(img, psf), img, rtol=0, atol=1e-14)
    # one pixel off the centre shifts the image by one pixel, zeros coming in (no wrap-around)
    psf = torch.zeros_like(psf)
    psf[..., p // 2 + 1, p // 2] = 1.0
    out = convolve_fft(img, psf)
    torch.testing.assert_close(out[..., 1:, :], img[..., :-1, :], rtol=0, atol=1e-14)
    assert out[..., 0, :].abs().max() < 1e-14


@pytest.mark.parametrize("p", [21, 20])
def test_gaussian_moments_add_and_flux_is_conserved(p):
    img = _sampled_gaussian((48, 48), (23.3, 24.6), 2.0)
    psf = _sampled_gaussian((p, p), (p // 2 + 0.2, p // 2 - 0.3), 1.5)
    psf /= psf.sum()
    out = convolve_fft(torch.from_numpy(img)[None, None], torch.from_numpy(psf)[None, None])
    out = out[0, 0].numpy()
    c_img, q_img = _moments(img)
    c_psf, q_psf = _moments(psf)
    c_out, q_out = _moments(out)
    assert out.sum() == pytest.approx(img.sum(), rel=1e-12)
    np.testing.assert_allclose(c_out, c_img + c_psf - p // 2, atol=1e-10)
    np.testing.assert_allclose(q_out, q_img + q_psf, atol=1e-10)  # exact for discrete convolution
    np.testing.assert_allclose(q_out[:2], 2.0**2 + 1.5**2, rtol=1e-3)  # and the analytic value


def test_batch_with_own_psfs_equals_one_by_one(rng):
    img = torch.as_tensor(rng.normal(size=(3, 2, 24, 24)))
    psf = torch.as_tensor(rng.random((3, 2, 9, 9)))
    out = convolve_fft(img, psf)
    for b in range(3):
        for c in range(2):
            one = convolve_fft(img[b : b + 1, c : c + 1], psf[b : b + 1, c : c + 1])
            torch.testing.assert_close(out[b : b + 1, c : c + 1], one, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(("h", "p"), [(16, 7), (15, 8), (12, 43)])
def test_adjoint_identity(h, p, rng):
    x = torch.as_tensor(rng.normal(size=(2, 3, h, h + 3)))
    y = torch.as_tensor(rng.normal(size=(2, 3, h, h + 3)))
    psf = torch.as_tensor(rng.random((2, 3, p, p)))
    lhs = (convolve_fft(x, psf) * y).sum()
    rhs = (x * convolve_fft_adjoint(y, psf)).sum()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-12)
    # the adjoint is what autograd computes as the vector-Jacobian product
    xg = x.clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad((convolve_fft(xg, psf) * y).sum(), xg)
    torch.testing.assert_close(vjp, convolve_fft_adjoint(y, psf))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"psf\[B, C, P, Q\]"):
        convolve_fft(torch.ones(1, 1, 8, 8), torch.ones(3, 3))
    with pytest.raises(ValueError, match="dtype"):
        convolve_fft(torch.ones(1, 1, 8, 8), torch.ones(1, 1, 3, 3, dtype=torch.float64))


def test_the_fft_grid_is_only_as_large_as_the_same_output_needs():
    """H + max(P//2, P-1-P//2) per axis (rounded to a fast size), not H + P - 1: a 64-pixel
    stamp with a 43-pixel PSF transforms 90² points, not 108² (issue 30). The wrap-around
    this allows lands only in what 'same' crops: test_fft_equals_direct_float32 (PSFs up to
    twice the stamp) and test_adjoint_identity hold on this grid."""
    from d4a_batch.physics.psf import fft_shape

    assert fft_shape((64, 64), (43, 43)) == (90, 90)
    assert fft_shape((30, 27), (8, 6)) == (36, 30)  # even sides: c = P//2 is the larger half
    for h, p in ((16, 7), (20, 44), (96, 43)):
        (n,) = {*fft_shape((h, h), (p, p))}
        assert h + p // 2 <= n <= h + p - 1
