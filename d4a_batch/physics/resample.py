"""Flux-conserving area-overlap resampling between square-pixel grids of any ratio.

Geometry (docs/architecture.md): output pixel ``i`` covers ``[i, i + 1)``; the
output centre is ``n_out / 2``; the input image (``n_in`` pixels, each ``scale``
output pixels wide) is centred on ``n_out / 2 + offset``, so input pixel ``j``
covers ``[c + (j - n_in/2) s, c + (j + 1 - n_in/2) s)``. Input values are flux per
input pixel; output values are flux per output pixel: each input pixel's flux is
shared among the output pixels it overlaps in proportion to the overlap area.
Total flux is conserved exactly for the part of the input inside the output grid;
the rest is cut. The map is separable, ``out = R_y @ img @ R_x^T``, linear in the
image and piecewise-linear (differentiable almost everywhere) in scale and offset.
"""

from __future__ import annotations

import torch
from numpy.typing import ArrayLike


def _as_tensor(value: ArrayLike | torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float64, device=device)


def overlap_matrix(
    n_out: int,
    n_in: int,
    scale: float | ArrayLike | torch.Tensor,
    offset: float | ArrayLike | torch.Tensor = 0.0,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Overlap fractions ``R[..., i, j]``: share of input pixel j's flux landing in output pixel i.

    ``scale`` (input pixel width in output pixels, > 0) and ``offset`` (input centre minus
    output centre, output pixels) broadcast to a batch shape ``[...]``; returns
    ``[..., n_out, n_in]``. Each column sums to 1 where the input pixel lies inside the
    output grid. Edges are computed in float64 and the result cast to ``dtype`` (default:
    ``scale``'s dtype when it is a floating tensor, else float64).
    """
    if dtype is None:
        dtype = (
            scale.dtype
            if isinstance(scale, torch.Tensor) and scale.is_floating_point()
            else torch.float64
        )
    if device is None and isinstance(scale, torch.Tensor):
        device = scale.device
    s = _as_tensor(scale, device)
    d = _as_tensor(offset, device)
    s, d = torch.broadcast_tensors(s, d)
    if not bool(torch.all(s > 0) & torch.all(torch.isfinite(s)) & torch.all(torch.isfinite(d))):
        raise ValueError("overlap_matrix: scale must be finite and > 0 and offset finite")
    centre = 0.5 * n_out + d
    j = torch.arange(n_in + 1, dtype=torch.float64, device=s.device)
    edges_in = centre[..., None] + (j - 0.5 * n_in) * s[..., None]  # [..., n_in + 1]
    lo_in, hi_in = edges_in[..., None, :-1], edges_in[..., None, 1:]  # [..., 1, n_in]
    i = torch.arange(n_out, dtype=torch.float64, device=s.device)[:, None]  # [n_out, 1]
    overlap = (torch.minimum(i + 1.0, hi_in) - torch.maximum(i, lo_in)).clamp(min=0.0)
    return (overlap / (hi_in - lo_in)).to(dtype)


def separable_matrices(
    in_shape: tuple[int, int],
    out_shape: tuple[int, int],
    scale: ArrayLike | torch.Tensor,
    offset: ArrayLike | torch.Tensor,
    batch: int,
    like: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-object ``R_y[B, H, Ny]`` and ``R_x[B, W, Nx]`` in ``like``'s dtype and device."""
    s = torch.as_tensor(scale, device=like.device)
    off = torch.as_tensor(offset, device=like.device)
    if s.ndim == 0:
        s = s.expand(batch)
    if s.shape != (batch,) or off.shape != (batch, 2):
        raise ValueError(
            f"resample: expected scale[{batch}] and offset[{batch}, 2], "
            f"got {tuple(s.shape)} and {tuple(off.shape)}"
        )
    kw = {"dtype": like.dtype, "device": like.device}
    r_y = overlap_matrix(out_shape[0], in_shape[0], s, off[:, 0], **kw)
    r_x = overlap_matrix(out_shape[1], in_shape[1], s, off[:, 1], **kw)
    return r_y, r_x


def apply_separable(img: torch.Tensor, r_y: torch.Tensor, r_x: torch.Tensor) -> torch.Tensor:
    """``out[b, c] = r_y[b] @ img[b, c] @ r_x[b]^T``: img[B,C,Ny,Nx], r_y[B,H,Ny], r_x[B,W,Nx] -> [B,C,H,W]."""
    tmp = torch.einsum("bhn,bcnm->bchm", r_y, img)
    return torch.einsum("bchm,bwm->bchw", tmp, r_x)


def apply_separable_adjoint(y: torch.Tensor, r_y: torch.Tensor, r_x: torch.Tensor) -> torch.Tensor:
    """Adjoint of ``apply_separable``: y[B,C,H,W] -> ``r_y^T @ y @ r_x`` [B,C,Ny,Nx]."""
    tmp = torch.einsum("bhn,bchw->bcnw", r_y, y)
    return torch.einsum("bcnw,bwm->bcnm", tmp, r_x)


def _check_image(name: str, img: torch.Tensor) -> int:
    if img.ndim != 4 or not img.is_floating_point():
        raise ValueError(
            f"{name}: expected a float tensor [B, C, H, W], got {tuple(img.shape)} {img.dtype}"
        )
    return img.shape[0]


def resample(
    img: torch.Tensor,
    scale: ArrayLike | torch.Tensor,
    offset: ArrayLike | torch.Tensor,
    out_shape: tuple[int, int],
) -> torch.Tensor:
    """Resample ``img[B, C, Ny, Nx]`` (flux per input pixel) onto ``[B, C, H, W]`` output pixels.

    ``scale[B]`` (or a scalar): input pixel width in output pixels (θ/0.168″ for the model ->
    HSC map); ``offset[B, 2]``: (dy, dx) of the input centre from the output centre, in
    output pixels. Each object has its own scale and offset; all share ``out_shape``.
    """
    b = _check_image("resample", img)
    r_y, r_x = separable_matrices(img.shape[-2:], out_shape, scale, offset, b, img)
    return apply_separable(img, r_y, r_x)


def resample_adjoint(
    y: torch.Tensor,
    scale: ArrayLike | torch.Tensor,
    offset: ArrayLike | torch.Tensor,
    in_shape: tuple[int, int],
) -> torch.Tensor:
    """Adjoint of ``resample``: ``y[B, C, H, W]`` -> ``[B, C, Ny, Nx]`` with ``in_shape = (Ny, Nx)``."""
    b = _check_image("resample_adjoint", y)
    r_y, r_x = separable_matrices(in_shape, y.shape[-2:], scale, offset, b, y)
    return apply_separable_adjoint(y, r_y, r_x)
