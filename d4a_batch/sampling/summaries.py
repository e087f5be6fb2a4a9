"""Posterior summaries of B objects from S posterior samples each (numpy, one entry per object).

Definitions (per object; C bands, N×N model pixels, samples x_k in x-space):
- ``mean_x``, ``std_x`` [C,N,N]: sample mean and standard deviation (ddof = 1) of x_k.
- flux samples F_k = alpha_k · v(x_k) [C,N,N] (counts per model pixel, zero point
  ``PhysicsConfig.zeropoint_ab``; alpha_k is sample k's profiled amplitude); ``mean_flux``,
  ``std_flux`` are their mean and std, on the model grid (pixel θ = ``theta_arcsec``).
- ``variance_ratio`` [N,N]: var(x_k) / prior ``stats_var``, averaged over bands;
  ``hallucination``: its mean inside the centred disc of radius
  ``aperture_radius_frac · N`` (pixel centres within the radius of the image centre);
  ``variance_ratio_mean``: its mean over the whole image. Both use the *raw* sampler
  variance, not the conformally calibrated one (``prior/calibration.py``): the ratio compares
  two spreads produced by the same diffusion process (the posterior's and the prior's own,
  ``stats_var``), so a sampler's overall narrowness enters both; λ is fitted in flux space
  for interval coverage on mocks, per S/N bin, and absorbs the bias of the mean as well as
  the width (DESIGN.md §2b), so λ² is not a variance correction, and the
  ``hallucination_max`` threshold was set on the raw ratio. λ² · ratio bounds it from above
  when needed. Reading the map: the prior's own variance is close to zero where its training
  images are nearly always empty (the sky of the stamp, its corners), so there a ratio far
  above 1 is expected and says "these pixels are set by the data's noise, not by the prior",
  not "the prior invents structure". With the unclipped data step (``clip_data_step``) the
  samples keep the noise-driven sky the data imply. On the demo (32 objects, 2026-12-03) the
  per-object median ratio outside 0.4 N of the centre is 1.4-1.9 (quartiles), the per-object
  maximum 10-27 (quartiles), and one object reaches ~800 at a stamp edge where the samples
  disagree about a masked neighbour's leaked light; in the core disc the median is 0.07-0.12.
  The hallucination score averages only the core disc, where the prior's variance is large
  and the ratio reads as intended.
- ``chi2``: reduced chi² of the re-convolved posterior mean *flux* image:
  y ≈ PSF ⊛ R(mean_flux) + beta_c with the background beta_c profiled here (weighted mean
  of the residual per band) and the amplitude alpha_c fitted per sample (inside the flux
  image), at the nominal redshift; dof = valid pixels − 2 per band (alpha and beta), the
  one rule of ``physics.operator.degrees_of_freedom`` (also ``reduced_chi2``'s).
  ``reconvolved`` [C,H,W] keeps that model (computed once per pack): the POOR_FIT
  regions are taken from it (``quality.regions.chi2_regions``).
- ``flux``, ``flux_err`` [C]: mean and std over samples of sum(F_k) (counts); ``mag`` =
  zp − 2.5 log10(flux) (NaN when flux ≤ 0), ``mag_err`` = std of the per-sample
  magnitudes. These are the sampler's raw posterior widths; their coverage on mocks is
  measured and the calibrated interval columns correct it per S/N bin (``calibration.json``,
  DESIGN.md §2b).
- ``alpha``, ``beta`` [C]: mean over samples of the profiled amplitude and background.
- ``morphology`` ({column: [B]}, ``measure.catalog``): sizes, shape and structure measured
  on every flux sample F_k (median and 16th/84th percentiles over the samples) and on the
  observed stamp (``*_obs``), when ``from_samples`` is given the prior's ``kpc_per_pixel``;
  ``measure_notes`` [B] says why a measurement is NaN. A failing measurement leaves the
  columns NaN with its error in the notes; it never fails the pack.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from d4a_batch.config import PhysicsConfig, SamplerConfig
from d4a_batch.physics.operator import (
    ForwardOperator,
    ObservationBatch,
    degrees_of_freedom,
    whitened_residual,
)
from d4a_batch.physics.stretch import DEFAULT_A, inverse_stretch
from d4a_batch.schema import Col, band_col

log = logging.getLogger(__name__)


def aperture_mask(n: int, radius_frac: float) -> np.ndarray:
    """Boolean [n, n] disc: pixel centres within ``radius_frac · n`` of the image centre."""
    c = np.arange(n) + 0.5 - n / 2
    return (c[:, None] ** 2 + c[None, :] ** 2) <= (radius_frac * n) ** 2


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _std(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sample std (ddof = 1) over ``dim``; NaN with a single sample."""
    if t.shape[dim] < 2:
        return torch.full_like(t.select(dim, 0), float("nan"))
    return t.std(dim=dim, correction=1)


def reconvolve(mean_flux: torch.Tensor, obs: ObservationBatch, op: ForwardOperator) -> torch.Tensor:
    """op.linear(mean_flux) + beta_c [B,C,H,W], the background beta_c profiled per band
    (weighted mean of the residual; 0 in a band without valid pixels)."""
    m = op.linear(mean_flux)
    w = obs.weight()
    w_sum = w.sum((-2, -1))
    beta = (w * (obs.masked_image() - m)).sum((-2, -1)) / torch.where(w_sum > 0, w_sum, 1.0)
    return m + beta[..., None, None]


def model_chi2(model: torch.Tensor, obs: ObservationBatch) -> torch.Tensor:
    """Reduced chi² [B] of y ≈ model[B,C,H,W] (a ``reconvolve``d mean; see the module
    docstring's dof); NaN where no dof is left."""
    res = obs.masked_image() - model
    chi2 = (obs.weight() * res * res).sum((1, 2, 3))
    dof = degrees_of_freedom(obs.valid).to(chi2.dtype)
    return chi2 / torch.where(dof > 0, dof, float("nan"))


def reconvolved_chi2(
    mean_flux: torch.Tensor, obs: ObservationBatch, op: ForwardOperator
) -> torch.Tensor:
    """Reduced chi² [B] of y ≈ ``reconvolve(mean_flux)`` (``model_chi2``).

    mean_flux[B,C,N,N] in counts per model pixel; NaN where no dof is left.
    """
    return model_chi2(reconvolve(mean_flux, obs, op), obs)


def flux_operator(
    obs: ObservationBatch, scale: np.ndarray | torch.Tensor, stretch_a: float = DEFAULT_A
) -> ForwardOperator:
    """The forward operator of ``obs`` (its PSFs, offsets, stamp) at model pixel ``scale[B]``."""
    return ForwardOperator.for_observations(
        obs, torch.as_tensor(np.array(scale, dtype=np.float64), dtype=obs.image.dtype), stretch_a
    )


def reconvolved_flux(flux: np.ndarray, obs: ObservationBatch, scale: np.ndarray) -> np.ndarray:
    """numpy ``reconvolve``: flux[B,C,N,N] (counts per model pixel, model pixel ``scale[B]``
    HSC pixels) seen through each object's operator, plus the profiled beta_c: [B,C,H,W]."""
    f = torch.as_tensor(np.asarray(flux), dtype=obs.image.dtype)
    with torch.no_grad():
        return reconvolve(f, obs, flux_operator(obs, scale)).double().numpy()


def flux_samples(
    samples_x: np.ndarray,
    obs: ObservationBatch,
    scale: np.ndarray,
    stretch_a: float = DEFAULT_A,
    ridge: float = PhysicsConfig().profile_ridge,
) -> tuple[np.ndarray, np.ndarray]:
    """(flux[B,S,C,N,N], alpha[B,S,C]) of kept x-space samples samples_x[B,S,C,N,N].

    Sample k's flux image F_k = alpha_k · v(x_k), alpha_k profiled against the observation
    as ``deconvolve`` does after sampling, so this reproduces the sampler's flux samples
    (at the nominal redshift). ``scale[B]``: model pixel width in HSC pixels.
    """
    x = torch.as_tensor(np.array(samples_x), dtype=obs.image.dtype)
    if x.ndim != 5 or x.shape[0] != obs.image.shape[0] or x.shape[2] != obs.image.shape[1]:
        raise ValueError(f"flux_samples: samples {tuple(x.shape)} vs obs {tuple(obs.image.shape)}")
    b, s = x.shape[:2]
    rows = obs.repeat_interleave(s)
    op = flux_operator(rows, np.repeat(np.asarray(scale, dtype=np.float64), s), stretch_a)
    flat = x.reshape(b * s, *x.shape[2:])
    with torch.no_grad():
        _, alpha, _ = whitened_residual(flat, rows, op, ridge)
        flux = alpha[..., None, None] * inverse_stretch(flat, stretch_a)
    return (
        flux.reshape(x.shape).double().numpy(),
        alpha.reshape(b, s, -1).double().numpy(),
    )


@dataclass
class PosteriorSummaries:
    """Summaries of B objects; arrays have a leading object axis (see the module docstring)."""

    object_id: np.ndarray  # [B] int64
    bands: tuple[str, ...]
    redshift: np.ndarray  # [B] nominal z
    theta_arcsec: np.ndarray  # [B] model pixel size at z
    upsampling: np.ndarray  # [B] u = 0.168''/theta
    footprint: np.ndarray  # [B] model footprint in HSC pixels, N·theta/0.168''
    masked_fraction: np.ndarray  # [B] invalid fraction of the stamp (all bands)
    mean_x: np.ndarray  # [B,C,N,N]
    std_x: np.ndarray  # [B,C,N,N]
    mean_flux: np.ndarray  # [B,C,N,N] counts per model pixel
    std_flux: np.ndarray  # [B,C,N,N]
    variance_ratio: np.ndarray  # [B,N,N]
    hallucination: np.ndarray  # [B]
    variance_ratio_mean: np.ndarray  # [B]
    chi2: np.ndarray  # [B]
    flux: np.ndarray  # [B,C] counts
    flux_err: np.ndarray  # [B,C]
    mag: np.ndarray  # [B,C] AB
    mag_err: np.ndarray  # [B,C]
    alpha: np.ndarray  # [B,C]
    beta: np.ndarray  # [B,C]
    steps: int
    samples: int
    seed: int
    samples_x: np.ndarray | None = None  # [B,K,C,N,N], K = config.keep_samples
    morphology: dict[str, np.ndarray] | None = None  # {column: [B]} (measure.catalog)
    measure_notes: list[str] | None = None  # [B] "; "-joined, "" when none
    # [B,C,H,W] the re-convolved mean flux (``reconvolve``) the chi2 was computed from, on
    # the observation's stamp: the POOR_FIT regions use it (``quality.regions.chi2_regions``)
    reconvolved: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.object_id.shape[0])

    @classmethod
    def from_samples(
        cls,
        x: torch.Tensor,
        alpha: torch.Tensor,
        beta: torch.Tensor,
        obs: ObservationBatch,
        op: ForwardOperator,
        stats_var: torch.Tensor,
        *,
        object_ids: Sequence[int],
        redshift: np.ndarray,
        scale: np.ndarray,
        bands: tuple[str, ...],
        config: SamplerConfig,
        physics: PhysicsConfig,
        kpc_per_pixel: float | None = None,
    ) -> PosteriorSummaries:
        """Reduce samples x[B,S,C,N,N] with their profiled alpha, beta [B,S,C].

        ``obs``/``op``: the B objects' observations and operators at the nominal
        redshift (for the chi²); ``stats_var[C,N,N]``: the prior's variance map;
        ``scale[B]``: nominal model pixel width in HSC pixels. ``kpc_per_pixel``: the
        prior's model pixel; given, the morphology of every flux sample and of the
        observed stamp is measured (``measure.catalog``), else ``morphology`` is None.
        """
        n_obj, n_samp, n_band, n = x.shape[:4]
        if x.shape != (n_obj, n_samp, n_band, n, n) or alpha.shape != (n_obj, n_samp, n_band):
            raise ValueError(f"from_samples: x {tuple(x.shape)}, alpha {tuple(alpha.shape)}")
        if tuple(stats_var.shape) != (n_band, n, n):
            raise ValueError(
                f"from_samples: stats_var {tuple(stats_var.shape)} != {(n_band, n, n)}"
            )
        with torch.no_grad():
            x = x.float()
            a = op.stretch_a
            flux_s = alpha[..., None, None] * inverse_stretch(x, a)  # [B,S,C,N,N]
            mean_flux = flux_s.mean(1)
            var_x = _std(x, 1) ** 2
            ratio = (var_x / stats_var.float().clamp_min(1e-12)).mean(1)  # [B,N,N]
            disc = torch.as_tensor(aperture_mask(n, config.aperture_radius_frac), device=x.device)
            total = flux_s.sum((-2, -1))  # [B,S,C]
            mag_s = physics.zeropoint_ab - 2.5 * torch.log10(
                torch.where(total > 0, total, float("nan"))
            )
            flux = total.mean(1)
            mag = physics.zeropoint_ab - 2.5 * torch.log10(
                torch.where(flux > 0, flux, float("nan"))
            )
            mag_ok = torch.isfinite(mag_s)
            mag_mean = torch.where(mag_ok, mag_s, 0.0).sum(1) / mag_ok.sum(1).clamp_min(1)
            mag_dev = torch.where(mag_ok, mag_s - mag_mean[:, None], 0.0)
            mag_err = (mag_dev.pow(2).sum(1) / (mag_ok.sum(1) - 1).clamp_min(0)).sqrt()
            reconvolved = reconvolve(mean_flux, obs, op)  # once: the chi2 and its regions
            chi2 = model_chi2(reconvolved, obs)
            masked = 1.0 - obs.valid.double().mean((1, 2, 3))
        scale = np.asarray(scale, dtype=np.float64)
        keep = min(int(config.keep_samples), n_samp)
        morphology, notes = None, None
        if kpc_per_pixel is not None:
            morphology, notes = measure_morphology(
                flux_s, obs, scale, kpc_per_pixel, tuple(bands), physics
            )
        return cls(
            object_id=np.asarray(object_ids, dtype=np.int64),
            bands=tuple(bands),
            redshift=np.asarray(redshift, dtype=np.float64),
            theta_arcsec=scale * physics.hsc_pixel_arcsec,
            upsampling=1.0 / scale,
            footprint=n * scale,
            masked_fraction=_np(masked),
            mean_x=_np(x.mean(1)).astype(np.float32),
            std_x=_np(_std(x, 1)).astype(np.float32),
            mean_flux=_np(mean_flux).astype(np.float32),
            std_flux=_np(_std(flux_s, 1)).astype(np.float32),
            variance_ratio=_np(ratio).astype(np.float32),
            hallucination=_np(ratio[:, disc].mean(-1)),
            variance_ratio_mean=_np(ratio.mean((-2, -1))),
            chi2=_np(chi2),
            flux=_np(flux),
            flux_err=_np(_std(total, 1)),
            mag=_np(mag),
            mag_err=_np(mag_err),
            alpha=_np(alpha.mean(1)),
            beta=_np(beta.mean(1)),
            steps=int(config.steps),
            samples=n_samp,
            seed=int(config.seed),
            samples_x=_np(x[:, :keep]).astype(np.float32) if keep > 0 else None,
            morphology=morphology,
            measure_notes=notes,
            reconvolved=_np(reconvolved),
        )

    def columns(self, maps: bool = True) -> dict[str, np.ndarray]:
        """Column arrays keyed by ``Col`` names (band columns via ``band_col``), one entry per object.

        Scalars [B] float64 (the output catalog's summary, per-band and morphology columns); with
        ``maps`` the image maps: ``MEAN_X``/``STD_X``/``MEAN_FLUX``/``STD_FLUX`` [B,C,N,N],
        ``VARIANCE_RATIO`` [B,N,N], ``SAMPLES_X`` [B,K,C,N,N] when samples were kept.
        """
        cols: dict[str, np.ndarray] = {
            Col.OBJECT_ID: self.object_id,
            Col.HALLUCINATION: self.hallucination,
            Col.VARIANCE_RATIO_MEAN: self.variance_ratio_mean,
            Col.CHI2: self.chi2,
        }
        per_band = ((Col.FLUX, self.flux), (Col.FLUX_ERR, self.flux_err), (Col.MAG, self.mag),
                    (Col.MAG_ERR, self.mag_err), (Col.ALPHA, self.alpha), (Col.BETA, self.beta))  # fmt: skip
        for c, band in enumerate(self.bands):
            for name, arr in per_band:
                cols[band_col(name, band)] = arr[:, c]
        if self.morphology is not None:
            cols |= self.morphology
        if maps:
            cols[Col.MEAN_X], cols[Col.STD_X] = self.mean_x, self.std_x
            cols[Col.MEAN_FLUX], cols[Col.STD_FLUX] = self.mean_flux, self.std_flux
            cols[Col.VARIANCE_RATIO] = self.variance_ratio
            if self.samples_x is not None:
                cols[Col.SAMPLES_X] = self.samples_x
        return cols


def measure_morphology(
    flux_s: torch.Tensor,
    obs: ObservationBatch,
    scale: np.ndarray,
    kpc_per_pixel: float,
    bands: tuple[str, ...],
    physics: PhysicsConfig,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Morphology columns ({column: [B]}) and notes [B] of flux samples flux_s[B,S,C,N,N]
    and of the observed stamps ``obs`` (``measure.catalog``). A failure is logged and
    becomes every object's note, with no columns (NaN in the catalog)."""
    from d4a_batch.measure.catalog import measure_observed, measure_posterior

    n_obj = int(flux_s.shape[0])
    try:
        theta = scale * physics.hsc_pixel_arcsec
        cols, notes = measure_posterior(_np(flux_s), kpc_per_pixel, theta, bands)
        obs_cols, obs_notes = measure_observed(
            _np(obs.image), obs.valid.cpu().numpy(), _np(obs.offset), scale,
            int(flux_s.shape[-1]), kpc_per_pixel, physics.hsc_pixel_arcsec, bands,
        )  # fmt: skip
    except Exception as e:  # measurements refine the catalog; they never fail the pack
        log.exception("measuring the morphology of %d objects failed", n_obj)
        return {}, [f"measurement failed: {type(e).__name__}: {e}"] * n_obj
    return cols | obs_cols, ["; ".join(a + b) for a, b in zip(notes, obs_notes)]
