"""The sampler's public entry point: ``deconvolve`` (observations in, posterior summaries out).

It builds each row's forward operator and likelihood (rows r = o*S + k, ``sampling.rows``),
draws the per-sample photo-z, runs the algorithm ``SamplerConfig.sampler`` names (``dps``,
``dds`` or ``daps``) and reduces the samples to ``PosteriorSummaries``. It imports the
algorithms; they import only ``rows`` and ``likelihood`` (and ``dds`` the ancestral loop of
``dps``), never this module: ``sampling/`` has no import circle (issue 32,
tests/test_layers.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike

from d4a_batch.config import PhysicsConfig, SamplerConfig
from d4a_batch.physics.operator import (
    ForwardOperator,
    ObservationBatch,
    model_pixel_scale,
    whitened_residual,
)
from d4a_batch.prior.artifact import Prior
from d4a_batch.sampling.daps import daps_sample
from d4a_batch.sampling.dds import dds_sample
from d4a_batch.sampling.dps import dps_sample
from d4a_batch.sampling.likelihood import OperatorLikelihood
from d4a_batch.sampling.rows import StepCallback, draw_photoz, row_generators
from d4a_batch.sampling.summaries import PosteriorSummaries


def deconvolve(
    observations: ObservationBatch,
    redshifts: ArrayLike,
    prior: Prior,
    config: SamplerConfig,
    object_ids: Sequence[int],
    physics: PhysicsConfig | None = None,
    photoz_err: ArrayLike | None = None,
    callback: StepCallback | None = None,
) -> PosteriorSummaries:
    """Posterior samples and summaries of B objects (all bands at once), usable without Ray.

    ``config.sampler`` picks the sampler: "dps" (``sampling.dps.dps_sample``), "dds"
    (``sampling.dds.dds_sample``: ``config.steps`` network calls, ``cg_iterations`` CG
    iterations of the data-consistency step each, ``dds_randomize``) or "daps"
    (``sampling.daps.daps_sample``: ``config.steps`` levels, ``inner_steps`` MALA steps and
    ``cg_iterations`` CG iterations per level); all return the same summaries.

    ``observations``: the physics ``ObservationBatch`` of the B objects -- image, variance,
    valid [B,C,H,W] (counts, zero point ``physics.zeropoint_ab``), the per-band PSFs
    psf[B,C,P,Q] (each summing to 1) and offset[B,2]; bands in ``prior.config.bands`` order.
    ``redshifts[B]``: photo-z, finite and > 0 (the caller flags and skips the others).
    ``object_ids[B]``: integer ids; they seed the samples. ``photoz_err[B,2]``: the 68%
    bounds (photoz_err68_min, photoz_err68_max), used when ``config.marginalise_photoz``
    (each sample then has its own z and operator scale; summaries report the nominal z).
    The prior needs its statistics (``stats_var``) for the variance ratio.
    ``callback(i, x)``: called after each reverse step (level, for "daps") of all B·S rows
    (the engine's progress counts them: ``pipeline.progress``).
    """
    physics = physics or PhysicsConfig()
    pcfg = prior.config
    n_obj, n_band = observations.image.shape[:2]
    z = np.asarray(redshifts, dtype=np.float64).reshape(-1)
    ids = [int(v) for v in object_ids]
    if z.shape != (n_obj,) or len(ids) != n_obj:
        raise ValueError(f"deconvolve: {n_obj} observations, {z.size} redshifts, {len(ids)} ids")
    if n_band != pcfg.in_channels:
        raise ValueError(f"deconvolve: observations have {n_band} bands, prior {pcfg.bands}")
    if not np.all(np.isfinite(z) & (z > 0)):
        raise ValueError(f"deconvolve: redshifts must be finite and > 0, got {z.tolist()}")
    if len(set(ids)) != n_obj:
        raise ValueError("deconvolve: object ids must be unique within a batch")
    samples = int(config.samples)
    device = prior.device
    obs = observations.to(device=device, dtype=torch.float32)
    rows = obs.repeat_interleave(samples)
    if config.marginalise_photoz and photoz_err is not None:
        z_rows = draw_photoz(z, photoz_err, ids, samples, config.seed, (pcfg.z_min, pcfg.z_max))
    else:
        z_rows = np.repeat(z, samples)
    scale_rows = torch.as_tensor(
        model_pixel_scale(z_rows, pcfg, physics), dtype=torch.float32, device=device
    )
    op = ForwardOperator.for_observations(rows, scale_rows, pcfg.stretch.a)
    ridge = physics.profile_ridge

    def residual(x0: torch.Tensor) -> torch.Tensor:
        return whitened_residual(x0, rows, op, ridge)[0]

    generators = row_generators(config.seed, ids, samples, device)
    if config.sampler == "daps":
        x = daps_sample(
            prior,
            OperatorLikelihood(rows, op, ridge),
            generators,
            levels=config.steps,
            inner=config.inner_steps,
            cg=config.cg_iterations,
            clip_x0=config.clip_x0,
            clip_data_step=config.clip_data_step,
            callback=callback,
            network_precision=config.network_precision,
        )
    elif config.sampler == "dds":
        x = dds_sample(
            prior,
            OperatorLikelihood(rows, op, ridge),
            generators,
            steps=config.steps,
            cg=config.cg_iterations,
            randomize=config.dds_randomize,
            clip_x0=config.clip_x0,
            gauss_newton=config.gauss_newton,
            clip_data_step=config.clip_data_step,
            callback=callback,
            refine_cg=config.refine_cg_iterations,
            gauss_newton_tol=config.gauss_newton_tol,
            network_precision=config.network_precision,
        )
    elif config.sampler == "dps":
        x = dps_sample(
            prior,
            residual,
            generators,
            steps=config.steps,
            guidance=config.guidance,
            rule=config.guidance_rule,
            clip_x0=config.clip_x0,
            callback=callback,
            network_precision=config.network_precision,
        )
    else:
        raise ValueError(
            f"deconvolve: unknown sampler {config.sampler!r} (expected dps, dds or daps)"
        )
    with torch.no_grad():
        _, alpha, beta = whitened_residual(x, rows, op, ridge)
    scale = model_pixel_scale(z, pcfg, physics)
    nominal = ForwardOperator.for_observations(
        obs, torch.as_tensor(scale, dtype=torch.float32, device=device), pcfg.stretch.a
    )
    shape = (n_obj, samples, *x.shape[1:])
    return PosteriorSummaries.from_samples(
        x.reshape(shape),
        alpha.reshape(n_obj, samples, n_band),
        beta.reshape(n_obj, samples, n_band),
        obs,
        nominal,
        prior.stats_var.to(device),
        object_ids=ids,
        redshift=z,
        scale=scale,
        bands=tuple(pcfg.bands),
        config=config,
        physics=physics,
        kpc_per_pixel=pcfg.kpc_per_pixel,
    )
