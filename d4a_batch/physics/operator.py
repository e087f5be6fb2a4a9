"""The HSC observation model and its Gaussian likelihood, batched over rows.

    y_c = alpha_c * P_c ⊛ R_z(v_c(x)) + beta_c + n_c,    n_c ~ N(0, VARIANCE_c)

A "row" is one (object, z) pair: the sampler repeats each object S times
(``ObservationBatch.repeat_interleave``) and may give every row its own redshift, so
every per-object quantity here has a leading dimension R (= B or B·S). Shapes:
C bands, N×N model pixels, H×W stamp pixels, P×Q PSF pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from d4a_batch.config import PhysicsConfig, PriorConfig
from d4a_batch.physics.psf import convolve_otf, convolve_otf_adjoint, psf_otf
from d4a_batch.physics.resample import (
    apply_separable,
    apply_separable_adjoint,
    separable_matrices,
)
from d4a_batch.physics.stretch import DEFAULT_A, inverse_stretch

DEFAULT_RIDGE = PhysicsConfig().profile_ridge


def _tensor(a: ArrayLike | torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.to(device=device, dtype=dtype)
    arr = np.asarray(a, dtype=np.bool_ if dtype == torch.bool else np.float64)  # native order
    return torch.as_tensor(arr).to(device=device, dtype=dtype)


@dataclass
class ObservationBatch:
    """Observed stamps of R rows (objects or object×sample), C bands, H×W HSC pixels.

    image[R,C,H,W] counts; variance[R,C,H,W] counts²; valid[R,C,H,W] bool (unmasked, finite,
    variance > 0); psf[R,C,P,Q] (each sums to 1, centre at P//2); offset[R,2] (dy, dx) of
    the object from the stamp centre, HSC pixels. Float tensors share one dtype and device.
    Values at invalid pixels are ignored (they may be NaN).
    """

    image: torch.Tensor
    variance: torch.Tensor
    valid: torch.Tensor
    psf: torch.Tensor
    offset: torch.Tensor

    def __post_init__(self) -> None:
        img = self.image
        if (
            not isinstance(img, torch.Tensor)
            or img.ndim != 4
            or img.dtype not in (torch.float32, torch.float64)
        ):
            got = (tuple(img.shape), img.dtype) if isinstance(img, torch.Tensor) else type(img)
            raise ValueError(f"ObservationBatch.image: expected float32/64 [R, C, H, W], got {got}")
        if not isinstance(self.psf, torch.Tensor) or self.psf.ndim != 4:
            raise ValueError("ObservationBatch.psf: expected a tensor [R, C, P, Q]")
        r, c = img.shape[:2]
        expect = {
            "variance": (self.variance, tuple(img.shape), img.dtype),
            "valid": (self.valid, tuple(img.shape), torch.bool),
            "psf": (self.psf, (r, c, *self.psf.shape[2:]), img.dtype),
            "offset": (self.offset, (r, 2), img.dtype),
        }
        for name, (t, shape, dtype) in expect.items():
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
                got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t)
                raise ValueError(f"ObservationBatch.{name}: expected {dtype} {shape}, got {got}")
            if t.device != img.device:
                raise ValueError(f"ObservationBatch.{name} is on {t.device}, image on {img.device}")
        bad = self.valid & ~(
            torch.isfinite(img) & torch.isfinite(self.variance) & (self.variance > 0)
        )
        if bool(bad.any()):
            raise ValueError(
                f"ObservationBatch: {int(bad.sum())} valid pixels have a non-finite image or "
                "variance or variance <= 0; mark them invalid"
            )

    @classmethod
    def from_arrays(
        cls,
        image: ArrayLike,
        variance: ArrayLike,
        valid: ArrayLike,
        psf: ArrayLike,
        offset: ArrayLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> ObservationBatch:
        """Build from numpy arrays (any byte order) or tensors; ``valid`` is and-ed with finite
        image and finite variance > 0."""
        img = _tensor(image, dtype, device)
        var = _tensor(variance, dtype, device)
        ok = _tensor(valid, torch.bool, device)
        ok = ok & torch.isfinite(img) & torch.isfinite(var) & (var > 0)
        return cls(img, var, ok, _tensor(psf, dtype, device), _tensor(offset, dtype, device))

    @property
    def stamp_shape(self) -> tuple[int, int]:
        return tuple(self.image.shape[-2:])

    def weight(self) -> torch.Tensor:
        """Inverse variance, 0 at invalid pixels: [R, C, H, W]."""
        safe = torch.where(self.valid, self.variance, torch.ones_like(self.variance))
        return torch.where(self.valid, 1.0 / safe, torch.zeros_like(safe))

    def masked_image(self) -> torch.Tensor:
        """Image with invalid pixels set to 0: [R, C, H, W]."""
        return torch.where(self.valid, self.image, torch.zeros_like(self.image))

    def repeat_interleave(self, repeats: int) -> ObservationBatch:
        """Each row repeated ``repeats`` times in a row (object o -> rows o*S .. o*S+S-1)."""
        return ObservationBatch(
            *(
                t.repeat_interleave(repeats, dim=0)
                for t in (self.image, self.variance, self.valid, self.psf, self.offset)
            )
        )

    def select(self, rows: torch.Tensor) -> ObservationBatch:
        """The rows ``rows`` (an index tensor [K]) of every tensor, in that order."""
        return ObservationBatch(
            *(t[rows] for t in (self.image, self.variance, self.valid, self.psf, self.offset))
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ObservationBatch:
        """Move to ``device`` and/or cast the float tensors to ``dtype``."""
        f = {"device": device, "dtype": dtype}
        return ObservationBatch(
            self.image.to(**f),
            self.variance.to(**f),
            self.valid.to(device=device),
            self.psf.to(**f),
            self.offset.to(**f),
        )


class ForwardOperator:
    """A = PSF ⊛ R_z ∘ v(x): model x[R,C,N,N] -> noiseless stamps [R,C,H,W] (before alpha, beta).

    ``psf[R,C,P,Q]``, ``scale[R]`` (model pixel width in HSC pixels, θ/0.168″; see
    ``model_pixel_scale``), ``offset[R,2]`` (HSC pixels), ``out_shape = (H, W)``. PSF, scale and
    offset are constants of the operator (not differentiated); the map is differentiable in
    its input. The PSF transfer function and the overlap matrices are computed once.
    """

    def __init__(
        self,
        psf: torch.Tensor,
        scale: ArrayLike | torch.Tensor,
        offset: ArrayLike | torch.Tensor,
        out_shape: tuple[int, int],
        stretch_a: float = DEFAULT_A,
    ) -> None:
        if psf.ndim != 4 or not psf.is_floating_point():
            raise ValueError(
                f"ForwardOperator: psf must be a float tensor [R, C, P, Q], got {tuple(psf.shape)}"
            )
        self.psf = psf.detach()
        self.rows = psf.shape[0]
        self.out_shape = (int(out_shape[0]), int(out_shape[1]))
        self.stretch_a = float(stretch_a)
        self.scale = torch.as_tensor(scale, dtype=psf.dtype, device=psf.device).detach()
        if self.scale.ndim == 0:
            self.scale = self.scale.expand(self.rows)
        self.offset = torch.as_tensor(offset, dtype=psf.dtype, device=psf.device).detach()
        if self.scale.shape != (self.rows,) or self.offset.shape != (self.rows, 2):
            raise ValueError(
                f"ForwardOperator: expected scale[{self.rows}] and offset[{self.rows}, 2], "
                f"got {tuple(self.scale.shape)} and {tuple(self.offset.shape)}"
            )
        if not bool(torch.all(torch.isfinite(self.scale) & (self.scale > 0))):
            raise ValueError("ForwardOperator: scale must be finite and > 0")
        if not bool(torch.all(torch.isfinite(self.offset))):
            raise ValueError("ForwardOperator: offset must be finite")
        self._otf = psf_otf(self.psf, self.out_shape)
        self._overlaps: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_observations(
        cls, obs: ObservationBatch, scale: ArrayLike | torch.Tensor, stretch_a: float = DEFAULT_A
    ) -> ForwardOperator:
        """The operator of ``obs`` (its PSFs, offsets and stamp shape) at model pixel ``scale[R]``."""
        return cls(obs.psf, scale, obs.offset, obs.stamp_shape, stretch_a)

    def select(self, rows: torch.Tensor) -> ForwardOperator:
        """The operator of rows ``rows`` (an index tensor [K]) only: its PSF transfer functions
        and overlap matrices are sliced, not recomputed."""
        sub = object.__new__(ForwardOperator)
        sub.psf, sub.scale, sub.offset = self.psf[rows], self.scale[rows], self.offset[rows]
        sub.rows, sub.out_shape, sub.stretch_a = int(rows.numel()), self.out_shape, self.stretch_a
        sub._otf = self._otf[rows]
        sub._overlaps = {k: (r_y[rows], r_x[rows]) for k, (r_y, r_x) in self._overlaps.items()}
        return sub

    def _matrices(self, in_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        key = (int(in_shape[0]), int(in_shape[1]))
        if key not in self._overlaps:
            self._overlaps[key] = separable_matrices(
                key, self.out_shape, self.scale, self.offset, self.rows, self.psf
            )
        return self._overlaps[key]

    def _check(self, t: torch.Tensor, what: str) -> None:
        if (
            t.ndim != 4
            or t.shape[0] != self.rows
            or t.shape[1] != self.psf.shape[1]
            or t.dtype != self.psf.dtype
        ):
            raise ValueError(
                f"ForwardOperator.{what}: expected {self.psf.dtype} [{self.rows}, {self.psf.shape[1]}, ., .], "
                f"got {t.dtype} {tuple(t.shape)}"
            )

    def linear(self, v: torch.Tensor) -> torch.Tensor:
        """PSF ⊛ R(v): flux per model pixel v[R,C,N,N] -> flux per HSC pixel [R,C,H,W]."""
        self._check(v, "linear")
        r_y, r_x = self._matrices(v.shape[-2:])
        return convolve_otf(apply_separable(v, r_y, r_x), self._otf, self.psf.shape[-2:])

    def adjoint(self, y: torch.Tensor, in_shape: tuple[int, int]) -> torch.Tensor:
        """Adjoint of ``linear``: y[R,C,H,W] -> [R,C,N,N] with ``in_shape = (N, N)``."""
        self._check(y, "adjoint")
        r_y, r_x = self._matrices(in_shape)
        return apply_separable_adjoint(
            convolve_otf_adjoint(y, self._otf, self.psf.shape[-2:]), r_y, r_x
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A(x) = linear(inverse_stretch(x)): model space x[R,C,N,N] -> [R,C,H,W]."""
        return self.linear(inverse_stretch(x, self.stretch_a))


def profile_amplitude(
    m: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, ridge: float = DEFAULT_RIDGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form weighted least squares for alpha, beta in y ≈ alpha·m + beta, per row and band.

    m, y, weight: [R,C,H,W] (weight = 1/variance, 0 at invalid pixels; y must be finite where
    weight is 0). Minimises sum w (y - alpha m - beta)² + eps alpha² with
    eps = ridge · trace of the normal matrix in the centred basis (sum w (m - m̄)² + sum w), so a
    constant or all-zero model gives alpha = 0, beta = weighted mean of y, with finite
    gradients. Solved in the centred basis (alpha = C_my / (C_mm + eps),
    beta = ȳ - alpha m̄), which is the 2×2 normal-equation solution without its cancellation.
    alpha is clamped at 0; beta = ȳ - alpha m̄ is then the background-only solution.
    Differentiable; returns (alpha[R,C], beta[R,C]).
    """
    dims = (-2, -1)
    w_sum = weight.sum(dims)
    safe_w = torch.where(w_sum > 0, w_sum, torch.ones_like(w_sum))
    m_bar = (weight * m).sum(dims) / safe_w
    y_bar = (weight * y).sum(dims) / safe_w
    dm = m - m_bar[..., None, None]
    c_mm = (weight * dm * dm).sum(dims)
    c_my = (weight * dm * (y - y_bar[..., None, None])).sum(dims)
    den = c_mm + ridge * (c_mm + w_sum)
    safe_den = torch.where(den > 0, den, torch.ones_like(den))
    alpha = (c_my / safe_den).clamp(min=0.0)
    beta = y_bar - alpha * m_bar
    return alpha, beta


def whitened_residual(
    x: torch.Tensor, obs: ObservationBatch, op: ForwardOperator, ridge: float = DEFAULT_RIDGE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """r = sqrt(w) (y - alpha A(x) - beta), 0 at invalid pixels, with alpha, beta profiled.

    x[R,C,N,N] model space -> (r[R,C,H,W], alpha[R,C], beta[R,C]); differentiable in x.
    """
    m = op(x)
    w = obs.weight()
    y = obs.masked_image()
    alpha, beta = profile_amplitude(m, y, w, ridge)
    r = w.sqrt() * (y - alpha[..., None, None] * m - beta[..., None, None])
    return r, alpha, beta


def degrees_of_freedom(valid: torch.Tensor) -> torch.Tensor:
    """Valid pixels minus 2 (alpha, beta) per band with any valid pixel, per row: [R]."""
    n = valid.sum((-2, -1))
    return (n - 2).clamp(min=0).sum(-1)


def chi2(
    x: torch.Tensor, obs: ObservationBatch, op: ForwardOperator, ridge: float = DEFAULT_RIDGE
) -> torch.Tensor:
    """chi² = sum of squared whitened residuals over bands and valid pixels, per row: [R]."""
    r, _, _ = whitened_residual(x, obs, op, ridge)
    return (r * r).sum((1, 2, 3))


def reduced_chi2(
    x: torch.Tensor, obs: ObservationBatch, op: ForwardOperator, ridge: float = DEFAULT_RIDGE
) -> torch.Tensor:
    """chi² / dof per row ([R]); NaN where dof is 0."""
    dof = degrees_of_freedom(obs.valid).to(obs.image.dtype)
    safe = torch.where(dof > 0, dof, torch.full_like(dof, float("nan")))
    return chi2(x, obs, op, ridge) / safe


def model_pixel_scale(
    z: ArrayLike, prior_cfg: PriorConfig, physics_cfg: PhysicsConfig | None = None
) -> NDArray[np.float64]:
    """Model pixel width in HSC pixels, θ(z)/0.168″ = 1/u, per redshift (numpy, shape of z)."""
    from d4a_batch.physics.cosmology import model_pixel_arcsec  # astropy.cosmology: ~2 s import

    physics_cfg = physics_cfg or PhysicsConfig()
    theta = model_pixel_arcsec(z, prior_cfg.kpc_per_pixel, physics_cfg.cosmology)
    return theta / physics_cfg.hsc_pixel_arcsec
