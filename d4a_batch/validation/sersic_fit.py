"""A PSF-convolved Sérsic fit of the observed stamp: the baseline astronomers would pick (issue 31).

What a survey's own model photometry (HSC's CModel, a forward-model fit) does: one elliptical
Sérsic profile, convolved with the stamp's PSF, fitted to the observed pixels under their
variance; sizes and shapes read off the fitted profile, with formal errors from the fit's
curvature. Here it is the baseline that the posterior's measurements are validated against
(``validation.measurements``), in the measurement band only.

Why our own fitter (~200 lines) and not one of the field's packages: AstroPhot (torch) is
GPL-3 and this project is MIT; pysersic needs JAX/numpyro and galight lenstronomy, each a
second numerical stack for one validation baseline; all of them fit one image per call.
This one fits a pack's B stamps at once in torch, with the physics package's FFT
convolution.

Model, per object, on the stamp's HSC pixels (pixel (i, j) covers [i, i+1) × [j, j+1)):
  I(r) = F · Sérsic(r_e, n) on the elliptical radius r (axis ratio q, angle φ), centred at
  the catalog position + (δy, δx), plus a constant sky s; integrated over each pixel by
  ``oversample``² sub-pixels, convolved with the PSF, masked by the stamp's valid pixels.
  The Sérsic's total flux is analytic, F = 2π q n e^{b_n} Γ(2n) b_n^{−2n} I_e r_e², with
  b_n from Ciotti & Bertin (1999). The PSF image is applied to the pixel-integrated
  profile, as the mock survey and the engine's forward operator apply theirs (an HSC PSF
  image that includes the pixel response then counts it twice, the same way in all three). Parameters (unconstrained for the optimiser): log F,
  δy, δx, log r_e, logit of (n − 0.3)/5.7, logit of (q − 0.05)/0.95, φ (free: the profile
  is the same at φ + π), s.
Fit: Adam then L-BFGS on Σ χ²/2 (the objects are independent, so one batched objective).
Formal errors: the Fisher matrix JᵀWJ of the fit (J from one forward-mode pass per
parameter, all objects at once), inverted per object.
Derived measurements (``derived_measurements``): the catalog's own code
(``measure.catalog``) on the fitted profile rendered without the PSF on the model grid, for
``n_draws`` parameter draws from the fit's Gaussian approximation N(θ̂, F⁻¹): median and
16/84 % percentiles, i.e. the formal ±1σ interval carried through the same definitions as
the posterior's (a circular-aperture r50 is not the profile's r_e when q < 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from d4a_batch.measure.catalog import measure_posterior
from d4a_batch.physics.psf import convolve_fft

N_PARAMS = 8  # log F, dy, dx, log r_e, n (logit), q (logit), phi, sky
N_MIN, N_MAX = 0.3, 6.0
Q_MIN = 0.05
NEWTON_DECREMENT_MAX = 0.1  # χ² units


@dataclass(frozen=True)
class SersicFit:
    """Per object [B]: the fitted parameters and their formal errors, and whether the fit
    converged (an invertible Fisher matrix, a Newton decrement gᵀF⁻¹g below
    ``NEWTON_DECREMENT_MAX`` at the end)."""

    params: np.ndarray  # [B, N_PARAMS] unconstrained
    covariance: np.ndarray  # [B, N_PARAMS, N_PARAMS] (NaN where not invertible)
    chi2_dof: np.ndarray  # [B]
    converged: np.ndarray  # [B] bool
    n: np.ndarray  # [B] Sérsic index
    n_err: np.ndarray  # [B] formal 1σ
    r_e: np.ndarray  # [B] half-light radius along the major axis, HSC pixels
    r_e_err: np.ndarray
    q: np.ndarray  # [B] axis ratio
    q_err: np.ndarray


def sersic_b(n: torch.Tensor) -> torch.Tensor:
    """b_n of the Sérsic profile (Ciotti & Bertin 1999 expansion; ≤ 1e-4 relative for n ≥ 0.36)."""
    return 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n**2) + 131 / (1148175 * n**3)


def physical(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """The physical parameters of unconstrained p[..., N_PARAMS]."""
    return {
        "flux": p[..., 0].exp(),
        "dy": p[..., 1],
        "dx": p[..., 2],
        "r_e": p[..., 3].exp(),
        "n": N_MIN + (N_MAX - N_MIN) * torch.sigmoid(p[..., 4]),
        "q": Q_MIN + (1 - Q_MIN) * torch.sigmoid(p[..., 5]),
        "phi": p[..., 6],
        "sky": p[..., 7],
    }


CORE_PIXELS = 5  # pixels about the centre integrated at CORE_OVERSAMPLE (a cusp's flux)
CORE_OVERSAMPLE = 20


def _surface(ph: dict, yy: torch.Tensor, xx: torch.Tensor, cy, cx, pixel, step) -> torch.Tensor:
    """Flux of sub-pixels of side ``step`` (this grid's pixels) centred at yy[B, Y], xx[B, X]:
    surface brightness × area, lengths scaled by ``pixel`` [B] into the parameters' unit."""
    dy = yy[:, :, None] - cy[:, None, None]
    dx = xx[:, None, :] - cx[:, None, None]
    c, s = ph["phi"].cos()[:, None, None], ph["phi"].sin()[:, None, None]
    u = dx * c + dy * s
    v = -dx * s + dy * c
    q = ph["q"][:, None, None]
    px = pixel[:, None, None]
    r = ((u * u) + (v / q) ** 2 + 1e-12).sqrt() * px
    n = ph["n"][:, None, None]
    b = sersic_b(n)
    r_e = ph["r_e"][:, None, None]
    prof = torch.exp(-b * ((r / r_e) ** (1 / n) - 1))
    norm = 2 * torch.pi * q * n * b.exp() * torch.exp(torch.lgamma(2 * n)) / b ** (2 * n) * r_e**2
    return ph["flux"][:, None, None] * prof / norm * (px * step) ** 2


def render(p: torch.Tensor, shape: tuple[int, int], centre: torch.Tensor, pixel: torch.Tensor,
           oversample: int = 4) -> torch.Tensor:  # fmt: skip
    """Pixel-integrated Sérsic images [B, H, W] (flux per pixel, no sky) of p[B, N_PARAMS]
    whose lengths (dy, dx, r_e) are in units of ``pixel`` [B] grid pixels of another grid:
    with pixel = 1 they are this grid's pixels. ``centre`` [B, 2] (edge coordinates).
    Each pixel is the sum of ``oversample``² sub-pixels, the ``CORE_PIXELS``² about the
    centre of ``CORE_OVERSAMPLE``² (a Sérsic n = 3 with r_e = 3 px loses 1 % of its flux
    to a 4× midpoint rule there)."""
    ph = physical(p)
    b, (h, w) = p.shape[0], shape
    cy = centre[:, 0] + ph["dy"] / pixel
    cx = centre[:, 1] + ph["dx"] / pixel
    sub = (torch.arange(oversample, dtype=p.dtype) + 0.5) / oversample
    yy = (torch.arange(h, dtype=p.dtype)[:, None] + sub[None]).reshape(1, -1).expand(b, -1)
    xx = (torch.arange(w, dtype=p.dtype)[:, None] + sub[None]).reshape(1, -1).expand(b, -1)
    img = _surface(ph, yy, xx, cy, cx, pixel, 1 / oversample)
    img = img.reshape(b, h, oversample, w, oversample).sum((2, 4))
    k, fos = min(CORE_PIXELS, h, w), CORE_OVERSAMPLE
    iy = (cy.detach().floor().long() - k // 2).clamp(0, h - k)
    ix = (cx.detach().floor().long() - k // 2).clamp(0, w - k)
    fine = (torch.arange(k * fos, dtype=p.dtype) + 0.5) / fos
    core = _surface(ph, iy[:, None] + fine[None], ix[:, None] + fine[None], cy, cx, pixel, 1 / fos)
    core = core.reshape(b, k, fos, k, fos).sum((2, 4))
    rows = iy[:, None, None] + torch.arange(k)[None, :, None]
    cols = ix[:, None, None] + torch.arange(k)[None, None, :]
    return img.index_put((torch.arange(b)[:, None, None], rows, cols), core)


def _objective(p, image, weight, psf, centre, oversample):
    model = convolve_fft(render(p, image.shape[-2:], centre, torch.ones_like(centre[:, 0]),
                                oversample)[:, None], psf[:, None])[:, 0]  # fmt: skip
    model = model + physical(p)["sky"][:, None, None]
    return model, 0.5 * (weight * (image - model) ** 2).sum((-2, -1))


def initial_params(image: np.ndarray, valid: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """p[B, N_PARAMS] to start from: the flux of the valid pixels within 10 px, r_e from their
    second moment, n = 1.5, q = 0.8, φ = 0, sky 0."""
    b, h, w = image.shape
    yy = np.arange(h)[None, :, None] + 0.5 - centre[:, 0, None, None]
    xx = np.arange(w)[None, None, :] + 0.5 - centre[:, 1, None, None]
    near = (yy**2 + xx**2 < 100) & valid
    img = np.where(near, np.clip(image, 0, None), 0.0)
    flux = np.maximum(img.sum((1, 2)), 1.0)
    r2 = (img * (yy**2 + xx**2)).sum((1, 2)) / flux
    r_e = np.clip(np.sqrt(np.maximum(r2, 1.0)) * 0.8, 0.5, 0.3 * min(h, w))
    p = np.zeros((b, N_PARAMS))
    p[:, 0], p[:, 3] = np.log(flux), np.log(r_e)
    p[:, 4] = np.log((1.5 - N_MIN) / (N_MAX - 1.5))
    p[:, 5] = np.log((0.8 - Q_MIN) / (1 - 0.8))
    return p


def fit_sersic(
    image: np.ndarray,
    variance: np.ndarray,
    valid: np.ndarray,
    psf: np.ndarray,
    offset: np.ndarray,
    oversample: int = 4,
    adam_steps: int = 300,
    lbfgs_steps: int = 100,
) -> SersicFit:
    """Fit B stamps image/variance/valid [B, H, W] (one band, counts) with PSFs psf[B, P, P]
    and the catalog positions ``offset`` [B, 2] (HSC pixels from the stamp centre)."""
    image = np.asarray(image, np.float64)
    b, h, w = image.shape
    if variance.shape != image.shape or valid.shape != image.shape or psf.shape[0] != b:
        raise ValueError(f"fit_sersic: image {image.shape}, variance {variance.shape}, "
                         f"valid {valid.shape}, psf {psf.shape}")  # fmt: skip
    ok = np.asarray(valid, bool) & np.isfinite(image) & (np.asarray(variance) > 0)
    t = torch.from_numpy
    img = t(np.where(ok, image, 0.0))
    weight = t(np.where(ok, 1.0 / np.where(ok, variance, 1.0), 0.0).astype(np.float64))
    psf_t = t(np.asarray(psf, np.float64) / np.asarray(psf, np.float64).sum((1, 2), keepdims=True))
    centre = t(np.array([h / 2, w / 2]) + np.asarray(offset, np.float64).reshape(b, 2))
    p = t(initial_params(image, ok, centre.numpy())).requires_grad_(True)
    opt = torch.optim.Adam([p], lr=0.05)
    for _ in range(adam_steps):
        opt.zero_grad()
        _, loss = _objective(p, img, weight, psf_t, centre, oversample)
        loss.sum().backward()
        opt.step()
    lbfgs = torch.optim.LBFGS([p], lr=1.0, max_iter=lbfgs_steps, line_search_fn="strong_wolfe",
                              tolerance_grad=1e-9, tolerance_change=1e-12)  # fmt: skip

    def closure():
        lbfgs.zero_grad()
        _, loss = _objective(p, img, weight, psf_t, centre, oversample)
        total = loss.sum()
        total.backward()
        return total

    lbfgs.step(closure)
    p = p.detach()
    _, loss = _objective(p.requires_grad_(True), img, weight, psf_t, centre, oversample)
    grad = torch.autograd.grad(loss.sum(), p)[0].detach()
    p = p.detach()
    # Fisher JᵀWJ: one forward-mode derivative of the model per parameter, all objects at once
    jac = []
    for k in range(N_PARAMS):
        tangent = torch.zeros_like(p)
        tangent[:, k] = 1.0
        _, dm = torch.func.jvp(lambda x: _objective(x, img, weight, psf_t, centre, oversample)[0],
                               (p,), (tangent,))  # fmt: skip
        jac.append(dm)
    jac_t = torch.stack(jac, 1).reshape(b, N_PARAMS, -1)  # [B, P, H*W]
    fisher = torch.einsum("bkp,bp,blp->bkl", jac_t, weight.reshape(b, -1), jac_t).numpy()
    cov = np.full_like(fisher, np.nan)
    for i in range(b):
        if np.all(np.isfinite(fisher[i])) and np.linalg.cond(fisher[i]) < 1e14:
            cov[i] = np.linalg.inv(fisher[i])
    dof = np.maximum(ok.sum((1, 2)) - N_PARAMS, 1)
    # converged: invertible curvature, and the Newton decrement gᵀF⁻¹g (the χ² still to be
    # gained, to second order) below NEWTON_DECREMENT_MAX
    g = grad.numpy()
    decrement = np.einsum("bk,bkl,bl->b", g, np.nan_to_num(cov, nan=np.inf), g)
    converged = np.isfinite(cov).all((1, 2)) & (decrement < NEWTON_DECREMENT_MAX)
    ph = {k: v.numpy() for k, v in physical(p).items()}
    # delta method through the constraining transforms
    sig = np.sqrt(np.clip(np.diagonal(cov, axis1=1, axis2=2), 0, None))
    s_n = (ph["n"] - N_MIN) * (N_MAX - ph["n"]) / (N_MAX - N_MIN)
    s_q = (ph["q"] - Q_MIN) * (1 - ph["q"]) / (1 - Q_MIN)
    return SersicFit(
        params=p.numpy(), covariance=cov, chi2_dof=2 * loss.detach().numpy() / dof,
        converged=converged, n=ph["n"], n_err=s_n * sig[:, 4], r_e=ph["r_e"],
        r_e_err=ph["r_e"] * sig[:, 3], q=ph["q"], q_err=s_q * sig[:, 5],
    )  # fmt: skip


def derived_measurements(
    fit: SersicFit,
    scale: np.ndarray,
    n_model: int,
    kpc_per_pixel: float,
    hsc_pixel_arcsec: float,
    n_draws: int = 16,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The catalog's measurements (``measure.catalog.measure_posterior``: median and 16/84 %
    percentiles over the draws) of the fitted profiles, rendered without the PSF on the model
    grid (n_model × n_model pixels of ``scale`` [B] HSC pixels, centred on the catalog
    position), for ``n_draws`` draws from N(θ̂, covariance). Objects whose fit did not
    converge get NaN."""
    b = fit.params.shape[0]
    rng = np.random.default_rng(seed)
    draws = np.repeat(fit.params[:, None], n_draws, 1)
    for i in range(b):
        if fit.converged[i]:
            draws[i] = rng.multivariate_normal(fit.params[i], fit.covariance[i], n_draws,
                                               check_valid="ignore")  # fmt: skip
    pd_ = torch.from_numpy(draws.reshape(b * n_draws, N_PARAMS))
    pixel = torch.from_numpy(np.repeat(np.asarray(scale, np.float64), n_draws))  # HSC px / model px
    # lengths are in HSC pixels: with pixel = scale, render's dy/dx/r_e are divided into model px
    centre = torch.full((b * n_draws, 2), n_model / 2, dtype=torch.float64)
    with torch.no_grad():
        img = render(pd_, (n_model, n_model), centre, pixel, oversample=4).numpy()
    flux = img.reshape(b, n_draws, 1, n_model, n_model)
    theta = np.asarray(scale, np.float64) * hsc_pixel_arcsec
    cols, _ = measure_posterior(flux, kpc_per_pixel, theta, ("i",))
    return {k: np.where(fit.converged, v, np.nan) for k, v in cols.items()}
