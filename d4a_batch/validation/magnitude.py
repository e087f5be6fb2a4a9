"""The paper's magnitude experiment: one galaxy observed at magnitudes 18..23.

Setup (after the diffusion4astro paper, arXiv:2411.19158, with this project's physics):

- one mock galaxy (``mock.galaxies``, fixed seed) at the prior's kpc/pixel and image
  size, its colours kept and its total ``mag_band`` magnitude set to each of 18..23
  (zero point 27);
- seen at redshift ``z`` through the physics operator (area-overlap resampling to
  0.168''/pixel, then a circular Gaussian PSF of the band's median HSC seeing), on a stamp
  sized by the staging rule;
- HSC-level noise, as the mock survey draws it: VARIANCE = sky + model/gain with the sky
  variance and gain measured on real HSC COSMOS coadds (``mock.survey``), Gaussian noise of
  that variance, a zero background;
- S/N per magnitude: per band, the mean noiseless flux in the hallucination aperture
  (radius ``aperture_radius_frac`` of the model side, i.e. 30 px of a 256-px image, taken
  at the HSC scale: radius_frac·N·θ/0.168'' HSC pixels) over sqrt(mean VARIANCE there),
  averaged over the bands (``metrics.aperture_snr``). The variance includes the source's
  own noise, so the S/N grows more slowly than the flux at the bright end, unlike the
  paper's sky-only values;
- per magnitude, DPS with S samples (``sampling.deconvolve``), the variance-ratio map
  and its aperture mean (the hallucination score), plus what the truth allows: PSNR of
  the posterior mean and the 68/95% coverage of the core pixels.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import galsim
import numpy as np
import torch

from d4a_batch.config import PhysicsConfig, PriorConfig, SamplerConfig, StagingConfig
from d4a_batch.mock.galaxies import draw_galaxy, sample_params
from d4a_batch.mock.observe import observe_truth
from d4a_batch.mock.survey import MEDIAN_SEEING
from d4a_batch.physics.operator import ObservationBatch, model_pixel_scale
from d4a_batch.prior.artifact import Prior
from d4a_batch.sampling.deconvolve import deconvolve
from d4a_batch.survey.fits_io import PSF_SIZE
from d4a_batch.survey.staging import stamp_size
from d4a_batch.validation.metrics import aperture_snr, core_mask, coverage, image_scores
from d4a_batch.validation.samples import flux_samples

PAPER_MAGNITUDES = (18.0, 19.0, 20.0, 21.0, 22.0, 23.0)
PAPER_SNR = (699.3, 278.4, 110.8, 44.1, 17.6, 7.0)  # arXiv:2411.19158, same magnitudes
EXPERIMENT_OBJECT_ID = 9_000_000  # object id of magnitude k: this + k (seeds the samples)


@dataclass(frozen=True)
class MagnitudeConfig:
    """What the experiment observes (the sampler settings come separately)."""

    magnitudes: tuple[float, ...] = PAPER_MAGNITUDES
    mag_band: str = "i"
    z: float = 0.3
    galaxy_seed: int = 3
    noise_seed: int = 0
    offset: tuple[float, float] = (0.0, 0.0)
    psf_fwhm_arcsec: dict[str, float] = field(default_factory=lambda: dict(MEDIAN_SEEING))


def gaussian_psf(fwhm_arcsec: float, pixel_arcsec: float, size: int = PSF_SIZE) -> np.ndarray:
    """Pixel-integrated circular Gaussian PSF [size, size], centre pixel size//2, sum 1."""
    img = galsim.Gaussian(fwhm=fwhm_arcsec).drawImage(nx=size, ny=size, scale=pixel_arcsec).array
    return (img / img.sum()).astype(np.float64)


def experiment_galaxy(
    bands: tuple[str, ...], kpc_per_pixel: float, n: int, seed: int
) -> np.ndarray:
    """The experiment's galaxy [C,N,N] (flux per model pixel, r-band total 1, the other
    bands by its colours); ``at_magnitude`` sets its brightness."""
    params = sample_params(np.random.default_rng(seed), 1)[0]
    return draw_galaxy(params, kpc_per_pixel, n, bands).astype(np.float64)


def at_magnitude(img: np.ndarray, band_index: int, mag: float, zeropoint: float) -> np.ndarray:
    """img[C,N,N] scaled so that band ``band_index`` has total AB magnitude ``mag``."""
    return img * (10 ** (-0.4 * (mag - zeropoint)) / float(img[band_index].sum()))


@dataclass
class MagnitudeObservations:
    """The experiment's inputs: M magnitudes of one galaxy."""

    magnitudes: np.ndarray  # [M]
    truth: np.ndarray  # [M,C,N,N] counts per model pixel
    model: np.ndarray  # [M,C,H,W] noiseless counts per HSC pixel
    obs: ObservationBatch  # M rows
    scale: float  # model pixel width in HSC pixels
    snr: np.ndarray  # [M] aperture S/N (mean over bands)
    snr_bands: np.ndarray  # [M,C]
    aperture_radius_hsc: float


def make_observations(
    bands: tuple[str, ...],
    kpc_per_pixel: float,
    n_model: int,
    cfg: MagnitudeConfig,
    aperture_radius_frac: float,
    physics: PhysicsConfig | None = None,
    staging: StagingConfig | None = None,
    base: np.ndarray | None = None,
) -> MagnitudeObservations:
    """Simulate the galaxy at every magnitude of ``cfg`` (see the module docstring).

    ``base[C,N,N]``: the galaxy (flux per model pixel, any scale; band ``cfg.mag_band`` must
    have a positive total) instead of ``experiment_galaxy``'s (``validation.prior_truth``
    observes prior draws this way).
    """
    physics = physics or PhysicsConfig()
    staging = staging or StagingConfig()
    pcfg = PriorConfig(bands=bands, kpc_per_pixel=kpc_per_pixel, image_size=n_model)
    scale = float(model_pixel_scale(cfg.z, pcfg, physics))
    size = stamp_size(n_model * scale, staging)
    band_index = bands.index(cfg.mag_band)
    if base is None:
        base = experiment_galaxy(bands, kpc_per_pixel, n_model, cfg.galaxy_seed)
    else:
        base = np.asarray(base, dtype=np.float64)
        if base.shape != (len(bands), n_model, n_model):
            raise ValueError(f"make_observations: base must be {(len(bands), n_model, n_model)}")
        if not float(base[band_index].sum()) > 0:
            raise ValueError(f"make_observations: base has no {cfg.mag_band}-band flux")
    truth = np.stack(
        [at_magnitude(base, band_index, m, physics.zeropoint_ab) for m in cfg.magnitudes]
    )
    m_count = truth.shape[0]
    psf = np.stack([gaussian_psf(cfg.psf_fwhm_arcsec[b], physics.hsc_pixel_arcsec) for b in bands])
    psf = np.broadcast_to(psf, (m_count, *psf.shape)).copy()
    offset = np.broadcast_to(np.asarray(cfg.offset, dtype=np.float64), (m_count, 2)).copy()
    rng = np.random.default_rng(cfg.noise_seed)
    seen = observe_truth(truth, psf, scale, offset, size, bands, rng)
    model, image, variance = seen.model, seen.image, seen.variance
    valid = np.ones(model.shape, bool)
    obs = ObservationBatch.from_arrays(image, variance, valid, psf, offset, dtype=torch.float32)
    radius = aperture_radius_frac * n_model * scale
    snr = [
        aperture_snr(model[k], variance[k], valid[k], cfg.offset, radius) for k in range(m_count)
    ]
    return MagnitudeObservations(
        magnitudes=np.asarray(cfg.magnitudes, dtype=np.float64),
        truth=truth,
        model=model,
        obs=obs,
        scale=scale,
        snr=np.array([s[0] for s in snr]),
        snr_bands=np.stack([s[1] for s in snr]),
        aperture_radius_hsc=radius,
    )


def _row(obs: ObservationBatch, k: int) -> ObservationBatch:
    fields = (obs.image, obs.variance, obs.valid, obs.psf, obs.offset)
    return ObservationBatch(*(t[k : k + 1] for t in fields))


def run_magnitude_experiment(
    prior: Prior,
    sampler: SamplerConfig,
    cfg: MagnitudeConfig,
    physics: PhysicsConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[MagnitudeObservations, dict[str, Any]]:
    """Deconvolve every magnitude (one ``deconvolve`` call each, S = sampler.samples rows).

    Returns the observations and a dict: per magnitude (lists) ``magnitudes``, ``snr``,
    ``snr_paper`` (None where the paper has no value), ``hallucination``,
    ``variance_ratio_mean``, ``chi2``, ``coverage68``/``coverage95`` (core pixels, flux
    space), ``psnr``/``ssim``/``psnr_asinh`` of the posterior mean, ``seconds``; maps
    ``mean_flux`` [M,C,N,N], ``variance_ratio`` [M,N,N], ``samples_flux`` [M,K,C,N,N]
    (K ≤ 4); and the geometry (``scale``, ``upsampling``, ``stamp_size``,
    ``aperture_radius_hsc``).
    """
    physics = physics or PhysicsConfig()
    pcfg = prior.config
    n = pcfg.image_size
    data = make_observations(
        pcfg.bands, pcfg.kpc_per_pixel, n, cfg, sampler.aperture_radius_frac, physics
    )
    keep = dataclasses.replace(sampler, keep_samples=sampler.samples)
    core = core_mask(n, sampler.aperture_radius_frac)
    paper = dict(zip(PAPER_MAGNITUDES, PAPER_SNR))
    records: list[dict[str, float]] = []
    maps: dict[str, list[np.ndarray]] = {"mean_flux": [], "variance_ratio": [], "samples_flux": []}
    for k, mag in enumerate(data.magnitudes):
        one = _row(data.obs, k)
        t0 = time.perf_counter()
        summ = deconvolve(one, [cfg.z], prior, keep, [EXPERIMENT_OBJECT_ID + k], physics)
        seconds = time.perf_counter() - t0
        flux, _ = flux_samples(
            summ.samples_x, one.to(dtype=torch.float64), [data.scale], pcfg.stretch.a,
            physics.profile_ridge,
        )  # fmt: skip
        cov = coverage(flux[0], data.truth[k], mask=core)
        scores = image_scores(summ.mean_flux[0], data.truth[k], pcfg.stretch.a)
        records.append({
            "hallucination": float(summ.hallucination[0]),
            "variance_ratio_mean": float(summ.variance_ratio_mean[0]),
            "chi2": float(summ.chi2[0]),
            "coverage68": cov[0.68],
            "coverage95": cov[0.95],
            "psnr": scores["psnr"],
            "ssim": scores["ssim"],
            "psnr_asinh": scores["psnr_asinh"],
            "seconds": seconds,
        })  # fmt: skip
        maps["mean_flux"].append(summ.mean_flux[0])
        maps["variance_ratio"].append(summ.variance_ratio[0])
        maps["samples_flux"].append(flux[0, :4])
        if progress is not None:
            progress(
                f"mag {mag:g}: S/N {data.snr[k]:.1f}, score {summ.hallucination[0]:.3f}, "
                f"{seconds:.0f} s"
            )
    out: dict[str, Any] = {key: [r[key] for r in records] for key in records[0]}
    out |= {key: np.stack(v) for key, v in maps.items()}
    out["magnitudes"] = data.magnitudes.tolist()
    out["snr"] = data.snr.tolist()
    out["snr_paper"] = [paper.get(float(m)) for m in data.magnitudes]
    out["scale"] = data.scale
    out["upsampling"] = 1.0 / data.scale
    out["stamp_size"] = int(data.obs.image.shape[-1])
    out["aperture_radius_hsc"] = data.aperture_radius_hsc
    return data, out
