"""Fixtures for the sampling tests: an analytic Gaussian prior wrapped as a real ``Prior``.

For x0 ~ N(mu, diag(s²)) per pixel, q(x_t) is Gaussian and the exact ε-prediction is
eps(x_t, t) = √(1−ᾱ_t) (x_t − √ᾱ_t mu) / (ᾱ_t s² + 1 − ᾱ_t), so DPS can be checked
against closed-form prior and posterior moments.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch
from torch import nn

from d4a_batch.config import PriorConfig
from d4a_batch.prior.artifact import Prior, PriorStats
from d4a_batch.prior.diffusion import build_diffusion


class GaussianEps(nn.Module):
    """Exact ε of a Gaussian prior: x[R,C,N,N], t[R] (original timesteps) -> ε[R,C,N,N].

    Without ``basis``: independent pixels N(mu, lam). With an orthonormal ``basis[N,N]`` D,
    the modes D (x − mu) Dᵀ of each band are independent with variances lam[C,N,N]
    (e.g. a DCT basis with large variance in smooth modes only).
    """

    def __init__(
        self,
        mu: torch.Tensor,
        lam: torch.Tensor,
        alphas_cumprod: np.ndarray,
        basis: torch.Tensor | None = None,
    ):
        super().__init__()
        self.mu = nn.Parameter(mu.float().clone())
        self.register_buffer("lam", lam.float().clone())
        self.register_buffer("abar", torch.as_tensor(alphas_cumprod, dtype=torch.float64))
        self.register_buffer("basis", None if basis is None else basis.float().clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.abar[t.long()].to(x.dtype).reshape(-1, 1, 1, 1)
        d = x - ab.sqrt() * self.mu
        if self.basis is None:
            return (1 - ab).sqrt() * d / (ab * self.lam + 1 - ab)
        b = self.basis
        modes = b @ d @ b.T
        return b.T @ ((1 - ab).sqrt() * modes / (ab * self.lam + 1 - ab)) @ b


def dct_basis(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix [n, n] (rows: modes of increasing frequency)."""
    return torch.as_tensor(scipy.fft.dct(np.eye(n), norm="ortho", axis=0), dtype=torch.float32)


def gaussian_prior(
    mu: torch.Tensor, lam: torch.Tensor, basis: torch.Tensor | None = None, **cfg_kwargs
) -> Prior:
    """A ``Prior`` whose network is the exact ε of a Gaussian (see ``GaussianEps``).

    Its statistics are exact: mean mu and the pixel variances of the covariance.
    """
    c, n = mu.shape[0], mu.shape[-1]
    bands = ("g", "r", "i", "z", "y")[:c] if c > 1 else ("i",)
    cfg = PriorConfig(name="gaussian", image_size=n, bands=bands, **cfg_kwargs)
    model = GaussianEps(mu, lam, build_diffusion(cfg).alphas_cumprod, basis)
    var = lam if basis is None else torch.einsum("ki,lj,ckl->cij", basis**2, basis**2, lam)
    stats = PriorStats(mean=mu.float(), var=var.float(), n_samples=0, steps=0)
    return Prior(model, cfg, "gaussian", "0" * 64, stats)


@pytest.fixture
def make_gaussian_prior():
    return gaussian_prior


def assert_matches_gaussian_posterior(
    x: np.ndarray, mean: np.ndarray, cov: np.ndarray, label: str = ""
) -> None:
    """Samples x [S,D] of an exact Gaussian posterior N(mean [D], cov [D,D]): per pixel, the
    sample mean within 5 Monte-Carlo sd of ``mean`` (rms of those z-scores < 1.5), and the
    sample variance within 35 % of the exact one (mean ratio within 10 %; with S = 400 the sd
    of one pixel's ratio is 0.07)."""
    s, d = x.shape
    assert mean.shape == (d,) and cov.shape == (d, d), (x.shape, mean.shape, cov.shape)
    z = (x.mean(0) - mean) / (np.sqrt(np.diag(cov)) / np.sqrt(s))
    ratio = x.var(0, ddof=1) / np.diag(cov)
    print(
        f"\n[{label}] |z| max {np.abs(z).max():.2f}, rms {np.sqrt(np.mean(z**2)):.2f}; "
        f"var/exact var mean {ratio.mean():.3f} [{ratio.min():.2f}, {ratio.max():.2f}]"
    )
    assert np.abs(z).max() < 5 and np.sqrt(np.mean(z**2)) < 1.5
    assert np.all((ratio > 0.65) & (ratio < 1.35)) and abs(ratio.mean() - 1) < 0.1


def gaussian_psf(size: int = 11, sigma: float = 1.2) -> np.ndarray:
    """Normalised circular Gaussian PSF [size, size] centred on pixel size // 2."""
    p = np.arange(size) - size // 2
    psf = np.exp(-(p[:, None] ** 2 + p[None] ** 2) / (2 * sigma**2))
    return psf / psf.sum()


def observe(
    x_true: torch.Tensor,
    prior: Prior,
    z: float,
    alpha: float,
    sigma: float,
    rng: np.random.Generator,
    stamp: int = 24,
    beta: float = 3.0,
    psf_sigma: float = 1.2,
):
    """Simulate an observation of x_true[C,N,N] through the real forward operator.

    y = alpha · PSF ⊛ R(v(x_true)) + beta + N(0, sigma²) on a ``stamp``² stamp at redshift
    z (offset (0.2, -0.1)). Returns (ObservationBatch with one row, noiseless model).
    """
    from d4a_batch.physics.operator import ForwardOperator, ObservationBatch, model_pixel_scale

    c = x_true.shape[0]
    psf = np.broadcast_to(gaussian_psf(11, psf_sigma), (1, c, 11, 11)).copy()
    offset = np.array([[0.2, -0.1]])
    scale = model_pixel_scale(np.array([z]), prior.config)
    op = ForwardOperator(
        torch.as_tensor(psf, dtype=torch.float32),
        torch.as_tensor(scale, dtype=torch.float32),
        torch.as_tensor(offset, dtype=torch.float32),
        (stamp, stamp),
        prior.config.stretch.a,
    )
    clean = alpha * op(x_true[None].float()) + beta
    noisy = clean.numpy() + sigma * rng.standard_normal(clean.shape)
    obs = ObservationBatch.from_arrays(
        noisy, np.full(clean.shape, sigma**2), np.ones(clean.shape, bool), psf, offset
    )
    return obs, clean


def galaxy_prior(n: int = 16, bands: int = 2, smooth: float = 2.0) -> Prior:
    """Gaussian prior shaped like a galaxy: mean core x ≈ 0.3, sky −0.6; smooth variations.

    DCT modes (ky, kx) have standard deviation 0.6 · exp(−(ky² + kx²)/(4 smooth²)) in
    x-space units, so the prior varies on scales of a few pixels (as galaxies do), which a
    PSF-blurred observation can constrain.
    """
    c = np.arange(n) + 0.5 - n / 2
    r2 = c[:, None] ** 2 + c[None] ** 2
    profile = np.exp(-r2 / (2 * (n / 6) ** 2))
    mu = np.stack([-0.6 + 0.9 * profile * (1 - 0.15 * b) for b in range(bands)])
    k = np.arange(n)
    sd = 0.6 * np.exp(-(k[:, None] ** 2 + k[None] ** 2) / (4 * smooth**2))
    lam = np.broadcast_to(sd**2, mu.shape).copy()
    return gaussian_prior(
        torch.tensor(mu, dtype=torch.float32), torch.tensor(lam, dtype=torch.float32), dct_basis(n)
    )


@pytest.fixture
def tiny_unet_prior() -> Prior:
    """A real (tiny, random-weight) improved-diffusion UNet prior: 3 bands, 16×16, unit stats."""
    from d4a_batch.prior.unet import build_unet

    cfg = PriorConfig(
        name="tiny-random",
        image_size=16,
        num_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2),
        attention_resolutions=(8,),
        num_heads=2,
    )
    model = build_unet(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ones = torch.ones(3, 16, 16)
    return Prior(model, cfg, "tiny-random", "0" * 64, PriorStats(0 * ones, ones, 0, 0))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run these small-tensor tests on one torch thread (restored afterwards).

    On the shared 2-core machine, two OpenMP threads under load made a tiny UNet step
    20-40x slower (measured 5-8 s vs 0.15-0.3 s per forward+backward of 9 rows).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
