"""Prior-drawn truths: does the sampler fit and cover when the prior is right?

The galsim mocks of the science benchmark test the prior and the sampler together: a
galaxy the demo prior cannot draw (a core at S/N ~1,000) is under-fitted whatever the
sampler does. This check takes the prior out of the question (simulation-based
calibration, Talts et al. 2018, arXiv 1804.06788; Cook, Gelman & Rubin 2006): the truth
x* is itself a draw of the prior, so for an exact posterior sampler

- x* and the S posterior samples are exchangeable: per pixel, the rank of x* among the
  samples is uniform on 0..S (a flat PIT histogram), and the coverage of mean ± z_p·std
  is that of S exchangeable draws (``validation.calibration.exact_gauss_coverage``:
  0.66 / 0.93 at S = 16 for a Gaussian posterior);
- the re-convolved posterior mean fits the data like the truth does: χ²/dof ≈ 1 at every
  S/N (slightly below 1 at high S/N, where the posterior mean is closer to the data than
  the truth is).

A sampler that fails here fails on its own; one that passes here but misfits the galsim
mocks is limited by its prior.

Setup: ``n_truths`` unconditional samples of the prior (``truth_steps`` ancestral steps,
default the sampler's, seeded), each mapped to flux (v(x*), the inverse asinh stretch, a flux per model pixel) and
observed at every magnitude of ``MagnitudeConfig`` exactly as the magnitude experiment
observes its galsim galaxy (``magnitude.make_observations``: area-overlap resampling to
0.168''/pixel at redshift z, Gaussian PSF of the band's median HSC seeing, HSC sky and
gain noise). Every observation is deconvolved with the given sampler. Scores per
(truth, magnitude): χ²/dof of the posterior mean (and of the truth), coverage of the raw
Gaussian intervals on the core pixels, of the calibrated ones (λ of the prior's
``calibration.json`` for this sampler, by observed S/N), PIT ranks, PSNR of the posterior
mean and of Richardson-Lucy with its iterations tuned on this truth (an oracle baseline).
All in flux space (counts per model pixel): the sampler profiles each sample's flux scale
α, so its x-space samples need not share the truth's scale, while α·v(x) is what the
catalog reports.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from d4a_batch.config import PhysicsConfig, SamplerConfig
from d4a_batch.physics.stretch import inverse_stretch
from d4a_batch.prior.artifact import Prior
from d4a_batch.sampling.calibrate import observed_snr, usable_calibration
from d4a_batch.sampling.deconvolve import deconvolve
from d4a_batch.sampling.dps import dps_sample
from d4a_batch.sampling.rows import row_generators
from d4a_batch.validation.baselines import tune_iterations
from d4a_batch.validation.calibration import (
    coverage_per_galaxy,
    exact_gauss_coverage,
    pit_histogram,
    pit_ranks,
)
from d4a_batch.validation.magnitude import MagnitudeConfig, _row, make_observations
from d4a_batch.validation.metrics import core_mask, psnr, reduced_chi2
from d4a_batch.validation.samples import flux_samples

TRUTH_OBJECT_ID = 9_100_000  # object id of (truth k, magnitude m): this + 100·k + m
RL_ITERATIONS = (5, 10, 20, 40, 80, 160, 320)
LEVELS = (0.68, 0.95)


def draw_prior_truths(prior: Prior, n: int, steps: int, seed: int) -> np.ndarray:
    """x*[n,C,N,N]: unconditional samples of the prior (``steps`` respaced ancestral steps),
    row k seeded by (seed, k), in model space x ∈ [−1, 1]."""
    if n < 1 or steps < 1:
        raise ValueError(f"draw_prior_truths: n and steps must be >= 1, got {n}, {steps}")
    gens = row_generators(seed, list(range(n)), 1, prior.device)
    with torch.no_grad():
        x = dps_sample(prior, None, gens, steps=steps, guidance=0.0)
    out = x.detach().to("cpu", torch.float64).numpy()
    cfg = prior.config
    assert out.shape == (n, cfg.in_channels, cfg.image_size, cfg.image_size), out.shape
    return out


def _rl_psnr(obs_row, truth: np.ndarray, scale: float) -> tuple[float, int]:
    """(PSNR, iterations) of the Richardson-Lucy iteration count of ``RL_ITERATIONS`` that
    scores best against ``truth[C,N,N]`` (``baselines.tune_iterations`` on this one object)."""
    best, scores = tune_iterations(
        obs_row.image.double().numpy(), obs_row.valid.numpy(), obs_row.psf.double().numpy(),
        np.array([scale]), obs_row.offset.double().numpy(), truth[None], RL_ITERATIONS, psnr,
    )  # fmt: skip
    return scores[best], best


def run_prior_truth_check(
    prior: Prior,
    sampler: SamplerConfig,
    n_truths: int,
    cfg: MagnitudeConfig | None = None,
    *,
    truth_steps: int | None = None,
    truth_seed: int = 0,
    physics: PhysicsConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Deconvolve ``n_truths`` prior-drawn truths at every magnitude of ``cfg`` (module doc).

    Returns ``records`` (one dict per truth × magnitude: truth, mag, snr, snr_observed,
    chi2, chi2_truth, cov68/cov95 (raw), cal68/cal95 (calibrated; NaN without a calibration
    for ``sampler``), psnr, psnr_rl, rl_iterations, seconds), ``pit`` {magnitude: PIT
    histogram of the core ranks, S + 1 bins (1 = flat)},
    ``reference`` (coverage of an exact Gaussian posterior seen through S samples),
    ``truth_x`` [K,C,N,N] and ``mean_x`` [K,M,C,N,N].
    """
    cfg = cfg or MagnitudeConfig(magnitudes=(18.0, 19.0, 20.0, 21.0, 22.0, 23.0, 24.0))
    physics = physics or PhysicsConfig()
    pcfg = prior.config
    n = pcfg.image_size
    a = pcfg.stretch.a
    keep = dataclasses.replace(sampler, keep_samples=sampler.samples)
    calibration = usable_calibration(prior.calibrations, sampler)
    core = core_mask(n, sampler.aperture_radius_frac)
    truths = draw_prior_truths(prior, n_truths, truth_steps or sampler.steps, truth_seed)
    mags = tuple(float(m) for m in cfg.magnitudes)
    records: list[dict[str, Any]] = []
    ranks: dict[float, list[np.ndarray]] = {m: [] for m in mags}
    means = np.zeros((n_truths, len(mags), *truths.shape[1:]))
    for k, x_true in enumerate(truths):
        data = make_observations(
            pcfg.bands, pcfg.kpc_per_pixel, n, cfg, sampler.aperture_radius_frac, physics,
            base=inverse_stretch(x_true, a),
        )  # fmt: skip
        ids = [TRUTH_OBJECT_ID + 100 * k + m for m in range(len(mags))]
        t0 = time.perf_counter()
        summ = deconvolve(data.obs, [cfg.z] * len(mags), prior, keep, ids, physics)
        seconds = (time.perf_counter() - t0) / len(mags)
        obs64 = data.obs.to(dtype=torch.float64)
        scale = np.full(len(mags), data.scale)
        flux, _ = flux_samples(summ.samples_x, obs64, scale, a, physics.profile_ridge)
        snr_obs = observed_snr(data.obs, summ.beta, scale, sampler.aperture_radius_frac, n)
        cov_f = {p: coverage_per_galaxy(flux, data.truth, p, core) for p in LEVELS}
        chi2_truth = reduced_chi2(data.truth, obs64, scale)
        cal_f = {}
        for p in LEVELS:
            lam = (
                calibration.lambda_for(p, snr_obs)
                if calibration is not None and p in calibration.levels
                else np.full(len(mags), np.nan)
            )
            ok = np.isfinite(lam)
            cov = coverage_per_galaxy(flux, data.truth, p, core, lam=np.where(ok, lam, 1.0))
            cal_f[p] = np.where(ok, cov, np.nan)
        for m, mag in enumerate(mags):
            ranks[mag].append(pit_ranks(flux[m : m + 1], data.truth[m : m + 1], core))
            rl, rl_iter = _rl_psnr(_row(data.obs, m), data.truth[m], data.scale)
            records.append({
                "truth": k,
                "mag": mag,
                "snr": float(data.snr[m]),
                "snr_observed": float(snr_obs[m]),
                "chi2": float(summ.chi2[m]),
                "chi2_truth": float(chi2_truth[m]),
                "cov68": float(cov_f[0.68][m]),
                "cov95": float(cov_f[0.95][m]),
                "cal68": float(cal_f[0.68][m]),
                "cal95": float(cal_f[0.95][m]),
                "psnr": psnr(summ.mean_flux[m], data.truth[m]),
                "psnr_rl": rl,
                "rl_iterations": rl_iter,
                "seconds": seconds,
            })  # fmt: skip
        means[k] = summ.mean_x
        if progress is not None:
            chi = ", ".join(f"{c:.2f}" for c in summ.chi2)
            progress(f"truth {k}: chi2/dof {chi} ({seconds:.1f} s per object)")
    s = int(sampler.samples)
    return {
        "records": records,
        "pit": {m: pit_histogram(np.concatenate(r), s).tolist() for m, r in ranks.items()},
        "reference": {str(p): exact_gauss_coverage(p, s) for p in LEVELS},
        "calibrated": calibration is not None,
        "truth_x": truths,
        "mean_x": means,
    }


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per magnitude: n, median S/N, median χ²/dof (mean and truth), mean coverages, median
    PSNR and PSNR − RL."""
    out = []
    for mag in sorted({r["mag"] for r in records}):
        rs = [r for r in records if r["mag"] == mag]

        def col(key: str, rs=rs) -> np.ndarray:
            return np.array([r[key] for r in rs], dtype=np.float64)

        def mean(key: str) -> float:
            v = col(key)
            return float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() else float("nan")

        out.append({
            "mag": mag,
            "n": len(rs),
            "snr": float(np.median(col("snr"))),
            "chi2_median": float(np.median(col("chi2"))),
            "chi2_max": float(np.max(col("chi2"))),
            "chi2_truth": float(np.median(col("chi2_truth"))),
            "cov68": mean("cov68"),
            "cov95": mean("cov95"),
            "cal68": mean("cal68"),
            "cal95": mean("cal95"),
            "psnr": float(np.median(col("psnr"))),
            "psnr_minus_rl": float(np.median(col("psnr") - col("psnr_rl"))),
        })  # fmt: skip
    return out
