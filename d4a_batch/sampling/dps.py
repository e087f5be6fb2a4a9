"""Diffusion posterior sampling (DPS, Chung et al. 2022) over objects × samples in one batch.

Rows: object o, sample k -> row ``r = o*S + k`` (R = B·S rows in one network batch); each
row carries its own forward operator (PSF, model pixel scale, offset, mask, variance).
One reverse step at spaced index i (DESIGN.md section 2):

    ε = ε_θ(x_t, timestep_map[i])                  (bfloat16 autocast on CUDA only)
    x̂0 = (x_t − √(1−ᾱ_i) ε)/√ᾱ_i, clipped to [−1, 1] when ``clip_x0``
    x' = coef1_i x̂0 + coef2_i x_t + σ_i z          (coefficients of the spaced process,
                                                      z = 0 at i = 0)
    g  = ∇_{x_t} ‖r(x̂0)‖                            (whitened residual of that row only)
    x_{t−1} = x' − ζ · g / rms(g)   ("rms" rule)    or    x' − ζ · g   ("raw" rule)
    x_{t−1} = x' − ζ (50/steps) · g / rms(g)          ("rms_total" rule)

Step rules: "rms" and "raw" take ζ per step (the paper's semantics; "rms" is what
docs/sampler_tuning.md tuned at 50 steps), so their total pull toward the data, Σ ζ, grows
with the step count. "rms_total" spreads the pull ζ·50 over the steps (ζ_step = ζ·50/steps):
at 50 steps it equals "rms", and 25 or 100 steps pull as far in total
(tests/sampling/test_dps.py checks χ² at 25 and 100 steps on a bright mock).

σ_i² is the reverse variance the prior's own sampler uses (improved-diffusion semantics of
the *spaced* process: learned with ``learn_sigma``, posterior variance with ``sigma_small``,
else β_i), so that with ζ = 0 the samples follow the same process as the prior statistics
(``stats_var``) they are compared against. Measured with the exact ε of a per-pixel
Gaussian prior (variance 0.04, 100 steps, 400 samples): the posterior variance alone gives
0.84 of the prior variance, β_i gives 1.04; 1000 steps: 0.98 and 1.01.

Per-sample independence: the guidance of a row is the gradient of that row's residual norm
(the network and the likelihood act row by row), and every random draw of row (o, k) --
x_T, each step's z, its photo-z -- comes from its own generator seeded by
``(seed, object_id, k)`` only. So a sample does not depend on the batch it runs in
(to float tolerance). Generators live on the sampling device: results are reproducible
per device type, not across CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
from d4a_batch.sampling.summaries import PosteriorSummaries

GUIDANCE_RULES = ("rms", "raw", "rms_total")
TOTAL_REFERENCE_STEPS = 50  # "rms_total": ζ is the per-step value at this many steps
_STREAM_NOISE = 0  # x_T and the per-step noise
_STREAM_PHOTOZ = 1  # the per-sample photo-z draw

ResidualFn = Callable[[torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor], None]
# consistency(i, x̂0[R,C,N,N]) -> x̂0' (spaced index i): a data-consistency step on Tweedie's estimate
ConsistencyFn = Callable[[int, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- randomness
def sample_seed(seed: int, object_id: int, k: int, stream: int = _STREAM_NOISE) -> int:
    """64-bit seed of sample ``k`` of ``object_id`` (stable: numpy SeedSequence of the ints).

    Negative integers are taken modulo 2**64 (object ids are 64-bit).
    """
    entropy = [int(v) % 2**64 for v in (seed, object_id, k, stream)]
    words = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int(words[0]) | (int(words[1]) << 32)


def row_generators(
    seed: int,
    object_ids: Sequence[int],
    samples: int,
    device: torch.device | str = "cpu",
) -> list[torch.Generator]:
    """One generator per row ``o*S + k`` on ``device``, seeded by ``sample_seed(seed, id_o, k)``."""
    gens = []
    for oid in object_ids:
        for k in range(samples):
            g = torch.Generator(device=device)
            g.manual_seed(sample_seed(seed, int(oid), k))
            gens.append(g)
    return gens


def randn_rows(
    generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str
) -> torch.Tensor:
    """Standard normal [R, *shape] (float32), row r drawn from ``generators[r]``."""
    out = torch.empty((len(generators), *shape), device=device, dtype=torch.float32)
    for r, g in enumerate(generators):
        out[r].normal_(generator=g)
    return out


def draw_photoz(
    z: ArrayLike,
    err68: ArrayLike,
    object_ids: Sequence[int],
    samples: int,
    seed: int,
    z_range: tuple[float, float],
) -> np.ndarray:
    """Per-sample redshifts [B·S] from a split normal around z with the 68% bounds ``err68``.

    ``z[B]``: the photo-z (mode); ``err68[B, 2]``: (photoz_err68_min, photoz_err68_max),
    the lower and upper bounds of the 68% interval (HSC convention: redshifts, not
    widths). Side widths s_lo = z - min, s_hi = max - z; a draw is z - |n| s_lo with
    probability s_lo / (s_lo + s_hi), else z + |n| s_hi. Draws are clipped to ``z_range``
    widened to include z; an object with non-finite or inverted bounds keeps z. Sample k of object o uses its
    own generator (``sample_seed(seed, id_o, k, stream=1)``).
    """
    z = np.asarray(z, dtype=np.float64)
    err = np.asarray(err68, dtype=np.float64).reshape(-1, 2)
    if err.shape[0] != z.shape[0] or len(object_ids) != z.shape[0]:
        raise ValueError(f"draw_photoz: z[{z.shape[0]}], err68{err.shape}, {len(object_ids)} ids")
    out = np.repeat(z, samples)
    for o, oid in enumerate(object_ids):
        s_lo, s_hi = z[o] - err[o, 0], err[o, 1] - z[o]
        if not (np.isfinite(s_lo) and np.isfinite(s_hi)) or s_lo < 0 or s_hi < 0:
            continue
        if s_lo + s_hi == 0:
            continue
        for k in range(samples):
            rng = np.random.default_rng(sample_seed(seed, int(oid), k, _STREAM_PHOTOZ))
            lower = rng.uniform() < s_lo / (s_lo + s_hi)
            n = abs(rng.standard_normal())
            out[o * samples + k] = z[o] - n * s_lo if lower else z[o] + n * s_hi
    lo = np.repeat(np.minimum(z, z_range[0]), samples)
    hi = np.repeat(np.maximum(z, z_range[1]), samples)
    return np.clip(out, lo, hi)


# --------------------------------------------------------------------------- the sampler
def scale_guidance(grad: torch.Tensor, rule: str) -> torch.Tensor:
    """The guidance direction of each row of grad[R, ...]: unit RMS per row ("rms",
    "rms_total") or as is ("raw")."""
    if rule == "raw":
        return grad
    if rule in ("rms", "rms_total"):
        rms = grad.pow(2).flatten(1).mean(1).sqrt().reshape(-1, *([1] * (grad.ndim - 1)))
        return torch.where(rms > 0, grad / torch.where(rms > 0, rms, 1.0), 0.0)
    raise ValueError(f"unknown guidance rule {rule!r}; expected one of {GUIDANCE_RULES}")


def network_autocast(precision: str, device: torch.device):
    """A context factory for the network's forward pass at ``precision`` on ``device``.

    "auto": bfloat16 autocast on CUDA, float32 elsewhere; "bfloat16": autocast on any device
    (CPU: oneDNN's bfloat16 kernels, native on AMX / AVX512-BF16); "float32": none. The
    sampler's own arithmetic (x_t, the data step) stays float32 whatever the choice.
    """
    if precision not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"unknown network precision {precision!r}")
    on = precision == "bfloat16" or (precision == "auto" and device.type == "cuda")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def dps_sample(
    prior: Prior,
    residual_fn: ResidualFn | None,
    generators: Sequence[torch.Generator],
    *,
    steps: int,
    guidance: float,
    rule: str = "rms",
    clip_x0: bool = True,
    callback: StepCallback | None = None,
    consistency: ConsistencyFn | None = None,
    posterior_variance: bool = False,
    clip_consistent: bool = True,
    network_precision: str = "auto",
) -> torch.Tensor:
    """DPS samples x0[R,C,N,N] (float32, on the prior's device, detached).

    ``residual_fn(x̂0[R,C,N,N]) -> r[R, ...]``: whitened residual of each row (row r
    may only depend on row r); None or ``guidance == 0`` samples the prior. ``steps``:
    respaced reverse steps of the prior's diffusion; the network gets the original
    timesteps. ``generators[r]`` draws row r's noise. ``callback(i, x)`` sees the state
    after each step (spaced index i, counting down). Only x_t carries a gradient, one step
    at a time: memory does not grow with ``steps``.

    ``consistency(i, x̂0) -> x̂0'`` (``sampling.dds``): replaces Tweedie's estimate by a
    data-consistent one before the step, x' = coef1_i x̂0' + coef2_i x_t + σ_i z (no gradient
    through the network). ``clip_x0`` clips the network's x̂0 to [−1, 1] (the prior's range);
    x̂0' and the final sample are clipped too only with ``clip_consistent`` (the data may
    want what the prior's range excludes: negative flux where noise dips below an empty sky,
    a core brighter than the normaliser; ``sampling.dds``). None: the DPS step above,
    unchanged. ``posterior_variance``: σ_i² is the variance of q(x_{t−1} | x_t, x0) whatever
    the prior's own choice -- the exact step when ``consistency`` draws x0 from
    p(x0 | x_t, y) (``dds_sample(randomize=True)``). ``network_precision``: the network's
    arithmetic (``SamplerConfig.network_precision``, ``network_autocast``).
    """
    if rule not in GUIDANCE_RULES:
        raise ValueError(f"unknown guidance rule {rule!r}; expected one of {GUIDANCE_RULES}")
    cfg = prior.config
    device = prior.device
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    spaced = prior.spaced(steps)
    rows = len(generators)
    guided = residual_fn is not None and guidance != 0
    zeta = guidance * TOTAL_REFERENCE_STEPS / steps if rule == "rms_total" else guidance
    autocast = network_autocast(network_precision, device)
    model = spaced.wrap_model(prior.model)
    x = randn_rows(generators, shape, device)
    for i in reversed(range(spaced.num_timesteps)):
        t = torch.full((rows,), i, dtype=torch.long, device=device)
        x = x.detach().requires_grad_(guided)
        with torch.set_grad_enabled(guided):
            with autocast():
                out = model(x, t)
            step = spaced.p_mean_variance_from_output(out.float(), x, t, clip_denoised=clip_x0)
            if guided:
                r = residual_fn(step["pred_xstart"])
                norms = r.flatten(1).pow(2).sum(1).clamp_min(1e-30).sqrt()
                (grad,) = torch.autograd.grad(norms.sum(), x)
        log_var = step["log_variance"]
        if consistency is None:
            x_next = step["mean"].detach()
        else:
            with torch.no_grad():
                x0c = consistency(i, step["pred_xstart"].detach())
                if clip_x0 and clip_consistent:
                    x0c = x0c.clamp(-1.0, 1.0)
                x_next, _, q_log_var = spaced.q_posterior_mean_variance(x0c, x.detach(), t)
            if posterior_variance:
                log_var = q_log_var
        if i > 0:
            sigma = torch.exp(0.5 * log_var.detach())
            x_next = x_next + sigma * randn_rows(generators, shape, device)
        if guided:
            x_next = x_next - zeta * scale_guidance(grad, rule)
        x = x_next.detach()
        if callback is not None:
            callback(i, x)
    if clip_x0 and (consistency is None or clip_consistent):
        return x.clamp(-1.0, 1.0)
    return x


# --------------------------------------------------------------------------- the entry point
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

    ``config.sampler`` picks the sampler: "dps" (``dps_sample``), "dds"
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
        from d4a_batch.sampling.daps import OperatorLikelihood, daps_sample

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
        from d4a_batch.sampling.daps import OperatorLikelihood
        from d4a_batch.sampling.dds import dds_sample

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
            warm_start=config.warm_start,
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
