"""Batched linear PSF convolution by FFT, and its adjoint.

Convention: a PSF of P×Q pixels has its centre at pixel ``(P // 2, Q // 2)`` for odd
and even sizes alike, so ``out[i, j] = sum_{k,l} img[i - k + P//2, j - l + Q//2] psf[k, l]``
with ``img`` zero outside the stamp (linear, not circular). For odd P this is
``scipy.signal.convolve(img, psf, mode="same")``; for even P it is the 'full'
convolution cropped from ``P // 2`` (scipy's 'same' crops from ``(P - 1) // 2``).
Each object and band has its own PSF: ``img[B, C, H, W]`` with ``psf[B, C, P, Q]``
(B or C of the PSF may be 1 to broadcast). The FFT grid is ``H + max(P//2, P - 1 - P//2)``
(rounded up to a fast size) per axis: the circular convolution then wraps only into the
part of the full convolution that the 'same' output crops away, so the output is the
linear one exactly. (``H + P - 1``, no wrap at all, was the grid before 2026-12-08: for a
64-pixel stamp and a 43-pixel PSF, 108² against 90² points per transform; issue 30.)
"""

from __future__ import annotations

import scipy.fft
import torch
import torch.nn.functional as F


def fft_shape(image_shape: tuple[int, int], psf_shape: tuple[int, int]) -> tuple[int, int]:
    """FFT grid for the 'same'-size linear convolution of an image with a PSF.

    Per axis L ≥ n + max(c, p − 1 − c), c = p // 2: output pixel k (full index k + c) sums
    image pixels k + c − j, j ∈ [0, p); those below 0 wrap to k + c − j + L ≥ n, outside the
    image, and none reaches L. The adjoint (``convolve_otf_adjoint``) reads the same pixels
    backwards, so the same L serves it.
    """
    return tuple(
        scipy.fft.next_fast_len(n + max(p // 2, p - 1 - p // 2), real=True)
        for n, p in zip(image_shape, psf_shape, strict=True)
    )


def psf_otf(psf: torch.Tensor, image_shape: tuple[int, int]) -> torch.Tensor:
    """Optical transfer function of ``psf[..., P, Q]`` on the padded grid for ``image_shape`` stamps."""
    return torch.fft.rfft2(psf, s=fft_shape(image_shape, psf.shape[-2:]))


def convolve_otf(img: torch.Tensor, otf: torch.Tensor, psf_shape: tuple[int, int]) -> torch.Tensor:
    """Convolve ``img[..., H, W]`` with a PSF of ``psf_shape`` given its ``psf_otf``; 'same' output."""
    h, w = img.shape[-2:]
    shape = fft_shape((h, w), psf_shape)
    full = torch.fft.irfft2(torch.fft.rfft2(img, s=shape) * otf, s=shape)
    cy, cx = psf_shape[0] // 2, psf_shape[1] // 2
    return full[..., cy : cy + h, cx : cx + w]


def convolve_otf_adjoint(
    y: torch.Tensor, otf: torch.Tensor, psf_shape: tuple[int, int]
) -> torch.Tensor:
    """Adjoint of ``convolve_otf`` (correlation with the PSF): ``y[..., H, W]`` -> ``[..., H, W]``."""
    h, w = y.shape[-2:]
    shape = fft_shape((h, w), psf_shape)
    cy, cx = psf_shape[0] // 2, psf_shape[1] // 2
    padded = F.pad(y, (cx, shape[1] - cx - w, cy, shape[0] - cy - h))
    full = torch.fft.irfft2(torch.fft.rfft2(padded) * otf.conj(), s=shape)
    return full[..., :h, :w]


def _check(img: torch.Tensor, psf: torch.Tensor) -> None:
    if img.ndim != 4 or psf.ndim != 4:
        raise ValueError(
            f"convolve_fft: expected img[B, C, H, W] and psf[B, C, P, Q], "
            f"got {tuple(img.shape)} and {tuple(psf.shape)}"
        )
    if img.dtype != psf.dtype or not img.is_floating_point():
        raise ValueError(
            f"convolve_fft: img and psf must share a float dtype, got {img.dtype}, {psf.dtype}"
        )


def convolve_fft(img: torch.Tensor, psf: torch.Tensor) -> torch.Tensor:
    """Linear, zero-padded, 'same'-size convolution of ``img[B, C, H, W]`` with ``psf[B, C, P, Q]``."""
    _check(img, psf)
    return convolve_otf(img, psf_otf(psf, img.shape[-2:]), psf.shape[-2:])


def convolve_fft_adjoint(y: torch.Tensor, psf: torch.Tensor) -> torch.Tensor:
    """Adjoint of ``convolve_fft`` with the same PSF: ``<conv(x), y> = <x, adjoint(y)>``."""
    _check(y, psf)
    return convolve_otf_adjoint(y, psf_otf(psf, y.shape[-2:]), psf.shape[-2:])
