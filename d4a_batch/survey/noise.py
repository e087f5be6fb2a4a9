"""Noise of an image-only cutout, estimated from its own pixels.

An HSC cutout downloaded "image only" has empty MASK and VARIANCE HDUs. Its per-pixel
variance is then estimated from the image [H, W] as

    Var = s² + max(I − b, 0) / g_eff

- **sky** ``b`` and ``s²``: sigma-clipped (3σ) mean and variance of the *source-free*
  pixels. Sources are found with ``sep``: a ``sep.Background`` mesh gives a first sky
  level and rms, ``sep.extract(..., segmentation_map=True)`` (1.5σ, 5 pixels, with
  deblending) gives their footprints, which are dilated by ``SOURCE_DILATION`` pixels
  (about an HSC PSF FWHM) so that their wings do not count as sky.
- **effective gain** ``g_eff`` (counts per Poisson event, so that I/g_eff is the source
  variance in counts²): from the IMAGE header when it holds a positive ``GAIN_KEYS``
  card, else *estimated from the stamp*. The estimate uses the frequencies the PSF
  cannot transmit: where the PSF's transfer function is below ``MTF_NOISE_LEVEL`` of its
  peak, the image holds (almost) no signal, only noise. Filtered to those frequencies,
  the image F has E[F²(x)] = c·(s² + (h²⊛(I − b))(x)/g_eff) with h the filter's impulse
  response; c (the filter's share of the noise power, which also absorbs the coadd's
  pixel correlations) is measured on the sky pixels, 1/g_eff by weighted least squares
  on the source pixels. A slope below 1 standard error is "no source term detected"
  (g_eff = ∞); the brightest pixels (S/N ≳ 300 on HSC coadds) carry the information,
  so faint objects, whose noise is sky-dominated anyway, get the sky term only.
- pixels whose image is not finite get NaN variance (invalid); ``valid`` (e.g. from a
  MASK) excludes pixels from every statistic.

Checked against real VARIANCE planes (``../shared/data/scarlet/hsc_cosmos_35.npz``, HSC
COSMOS coadds): the sky variance is within -5 .. +16 % of the plane's median in g, r, i, z, y
(+9, +16, +4, -5, +1 %), but the stamp's 1/g_eff is 4.2, 3.9 and 2.2 times the plane's
slope of VARIANCE against IMAGE in g, r, i (none detected in z, y), so the brightest
pixels get 1.5-2.4× the plane's variance (too large: their χ² comes out low, never
high). On mocks with white noise it is within ±50 % (tests/survey/test_noise.py). A
header gain, when known, is better.

``NoiseEstimate.reason`` says what was done, e.g. ``"sky var 0.000411 from 8170
source-free pixels (sep background), gain 3.9e+04 estimated from the stamp"``; it ends
up in the catalog's flag reasons (``Flag.NOISE_ESTIMATED``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import sep
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from d4a_batch.survey.fits_io import HSCCutout, mask_to_valid

# IMAGE-header cards read as the effective gain (counts -> Poisson events), first one found
GAIN_KEYS = ("EFFGAIN", "GAIN")
SOURCE_THRESHOLD = 1.5  # sep detection threshold, in units of the background rms
SOURCE_MIN_AREA = 5  # pixels
SOURCE_DILATION = 4  # pixels added around every detected source before measuring the sky
MIN_SKY_PIXELS = 50  # fewer source-free pixels than this: the noise cannot be estimated
MTF_NOISE_LEVEL = 1e-3  # frequencies where |PSF transfer| < this carry noise only
EDGE_GUARD = 3  # pixels near the border or an invalid pixel are not used for the gain fit
GAIN_SIGNIFICANCE = 1.0  # 1/g_eff below this many standard errors: no source term
# variance of a normal distribution clipped at ±3σ, relative to the unclipped one
CLIP3_VARIANCE = 0.97334


class NoiseEstimateError(ValueError):
    """The stamp cannot give a noise estimate (too few source-free pixels, ...)."""


@dataclass(frozen=True)
class NoiseEstimate:
    """An estimated noise model of one image.

    variance: float32 [H, W] (NaN where the image is not finite or not valid);
    sky: background level b (counts); sky_variance: s² (counts²); gain: g_eff
    (``math.inf``: no source term); gain_source: "header <KEY>" | "estimated" |
    "not detected" | "not estimable"; n_sky: source-free pixels used; reason: one line.
    """

    variance: NDArray[np.float32]
    sky: float
    sky_variance: float
    gain: float
    gain_source: str
    n_sky: int
    reason: str


def header_gain(header: fits.Header | None) -> tuple[float, str] | None:
    """``(g_eff, key)`` from the first positive, finite ``GAIN_KEYS`` card, else None."""
    if header is None:
        return None
    for key in GAIN_KEYS:
        value = header.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value) and value > 0:
                return float(value), key
    return None


def source_mask(
    image: ArrayLike, valid: ArrayLike | None = None, dilation: int = SOURCE_DILATION
) -> tuple[NDArray[np.bool_], NDArray[np.int32]]:
    """``(sources, segmap)``: dilated source footprints (bool [H, W]) and sep's segmentation.

    Invalid or non-finite pixels are masked for sep; ``segmap`` labels sources 1..n.
    """
    data = np.asarray(image, np.float64)
    good = np.isfinite(data) & (True if valid is None else np.asarray(valid, bool))
    if not good.any():
        raise NoiseEstimateError("no finite, valid pixel")
    fill = float(np.median(data[good]))
    data = np.ascontiguousarray(np.where(good, data, fill), np.float64)
    bad = np.ascontiguousarray(~good)
    h, w = data.shape
    mesh = max(h, w)  # one cell: the global sky of a coadd cutout (already sky-subtracted)
    bkg = sep.Background(data, mask=bad, bw=mesh, bh=mesh, fw=3, fh=3)
    sub = data - bkg.back()
    rms = float(bkg.globalrms)
    if not rms > 0 or not math.isfinite(rms):
        rms = float(np.std(sub[good])) or 1.0
    _, segmap = sep.extract(
        sub,
        SOURCE_THRESHOLD,
        err=rms,
        mask=bad,
        minarea=SOURCE_MIN_AREA,
        segmentation_map=True,
    )
    sources = segmap > 0
    if dilation > 0 and sources.any():
        sources = ndimage.binary_dilation(sources, iterations=int(dilation))
    return sources, segmap.astype(np.int32)


def _noise_filter(shape: tuple[int, int], psf: ArrayLike | None) -> NDArray[np.bool_]:
    """Frequencies [H, W] (``fft2`` layout) that the PSF does not transmit: noise only.

    Without a PSF: both |k_y| and |k_x| above 0.35 cycles/pixel.
    """
    h, w = shape
    if psf is None:
        ky, kx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
        return (np.abs(ky) > 0.35) & (np.abs(kx) > 0.35)
    p = np.asarray(psf, np.float64)
    big = np.zeros(shape)
    ph, pw = min(p.shape[0], h), min(p.shape[1], w)
    y0, x0 = (p.shape[0] - ph) // 2, (p.shape[1] - pw) // 2
    big[:ph, :pw] = p[y0 : y0 + ph, x0 : x0 + pw]
    mtf = np.abs(np.fft.fft2(big))
    return mtf < MTF_NOISE_LEVEL * mtf.max()


def _fit_inverse_gain(
    resid: NDArray[np.float64],
    usable: NDArray[np.bool_],
    sky_pix: NDArray[np.bool_],
    sky_var: float,
    psf: ArrayLike | None,
) -> tuple[float, float] | None:
    """``(1/g_eff, its standard error)`` from the noise-only frequencies, or None."""
    keep = _noise_filter(resid.shape, psf)
    frac = keep.mean()
    if frac < 0.02:
        return None
    fil = np.real(np.fft.ifft2(np.fft.fft2(np.where(usable, resid, 0.0)) * keep))
    h2 = np.real(np.fft.ifft2(keep.astype(np.float64))) ** 2  # h², centred at pixel (0, 0)
    h2 /= h2.sum()  # E[F²] = c · (h2 ⊛ Var) with c the filter's share of the noise power
    flux = np.real(np.fft.ifft2(np.fft.fft2(np.clip(resid, 0, None) * usable) * np.fft.fft2(h2)))
    f2 = fil**2
    interior = ndimage.binary_erosion(usable, iterations=EDGE_GUARD, border_value=0)
    cal = interior & sky_pix
    if cal.sum() < MIN_SKY_PIXELS:
        return None
    c = float(f2[cal].mean()) / sky_var  # the filter's share of the noise power
    src = interior & ~sky_pix
    if src.sum() < 5 or not c > 0:
        return None
    y = f2[src] / c - sky_var  # per-pixel estimate of the source variance (noisy)
    x = flux[src]
    inv_g = 0.0
    for _ in range(3):  # weights 1 / Var(F²) ∝ 1 / E[F²]²
        wgt = 1.0 / (sky_var + inv_g * x) ** 2
        sxx = float((wgt * x * x).sum())
        if not sxx > 0:
            return None
        inv_g = max(float((wgt * x * y).sum()) / sxx, 0.0)
    # F² of a Gaussian has variance 2 E[F²]², but neighbouring F are correlated: a pixel
    # carries ~frac independent modes, so the error grows by 1/sqrt(frac)
    se = math.sqrt(2.0 / sxx / frac)
    return inv_g, se


def estimate_noise(
    image: ArrayLike,
    valid: ArrayLike | None = None,
    header: fits.Header | None = None,
    psf: ArrayLike | None = None,
) -> NoiseEstimate:
    """Estimate the per-pixel variance of ``image`` [H, W] (counts) from its own pixels.

    ``valid`` [H, W] bool excludes pixels (e.g. a MASK); ``header``: the IMAGE header, for
    the gain; ``psf`` [P, Q] (centre pixel P//2, Q//2): selects the noise-only frequencies of
    the gain estimate. Raises ``NoiseEstimateError`` with fewer than ``MIN_SKY_PIXELS``
    source-free pixels.
    """
    data = np.asarray(image, np.float64)
    if data.ndim != 2:
        raise ValueError(f"estimate_noise: image must be 2-D, got shape {data.shape}")
    good = np.isfinite(data)
    if valid is not None:
        v = np.asarray(valid, bool)
        if v.shape != data.shape:
            raise ValueError(f"estimate_noise: valid has shape {v.shape}, image {data.shape}")
        good &= v
    sources, _ = source_mask(data, good)
    sky_pix = good & ~sources
    n_sky = int(sky_pix.sum())
    if n_sky < MIN_SKY_PIXELS:
        raise NoiseEstimateError(
            f"only {n_sky} source-free pixels of {int(good.sum())} usable "
            f"(need {MIN_SKY_PIXELS}): the sources fill the cutout"
        )
    sky, _, std = sigma_clipped_stats(data[sky_pix], sigma=3.0, maxiters=10)
    sky_var = float(std) ** 2 / CLIP3_VARIANCE  # undo the 3σ clip's bias
    if not sky_var > 0:
        raise NoiseEstimateError(f"the {n_sky} source-free pixels have zero scatter")
    resid = np.where(good, data - sky, 0.0)
    from_header = header_gain(header)
    if from_header is not None:
        gain, key = from_header
        gain_source, gain_text = f"header {key}", f"gain {gain:.3g} from header {key}"
    else:
        fit = _fit_inverse_gain(resid, good, sky_pix, sky_var, psf)
        if fit is None:
            gain, gain_source = math.inf, "not estimable"
            gain_text = "no source term (gain not estimable from the stamp)"
        elif fit[0] > GAIN_SIGNIFICANCE * fit[1]:
            gain, gain_source = 1.0 / fit[0], "estimated"
            gain_text = f"gain {gain:.3g} (±{fit[1] / fit[0]:.0%}) estimated from the stamp"
        else:
            gain, gain_source = math.inf, "not detected"
            gain_text = (
                "no source term (the sources' Poisson noise is not significant in the stamp: "
                f"1/gain {fit[0]:.2g} ± {fit[1]:.2g})"
            )
    source_var = np.clip(resid, 0, None) / gain if math.isfinite(gain) else 0.0
    variance = np.where(good, sky_var + source_var, np.nan).astype(np.float32)
    reason = f"sky var {sky_var:.3g} from {n_sky} source-free pixels (sep background), {gain_text}"
    return NoiseEstimate(
        variance=variance,
        sky=float(sky),
        sky_variance=sky_var,
        gain=float(gain),
        gain_source=gain_source,
        n_sky=n_sky,
        reason=reason,
    )


def fill_missing_planes(
    cutout: HSCCutout, bad_plane_names: Iterable[str] = (), psf: ArrayLike | None = None
) -> tuple[HSCCutout, str | None]:
    """``(cutout, note)``: an image-only cutout made usable, and how (None: nothing missing).

    A missing MASK leaves every finite pixel valid; a missing VARIANCE is estimated with
    ``estimate_noise`` on the whole cutout (pixels with a bad MASK plane excluded when the
    MASK exists). Raises ``NoiseEstimateError`` when the noise cannot be estimated.
    """
    if not cutout.missing:
        return cutout, None
    what = " and ".join(cutout.missing) + (" empty" if cutout.missing else "")
    if "VARIANCE" not in cutout.missing:
        return cutout, f"{what}: no pixel masked (only non-finite IMAGE pixels are invalid)"
    valid = mask_to_valid(cutout.mask, cutout.mask_planes, bad_plane_names)
    est = estimate_noise(cutout.image, valid, cutout.header, psf)
    filled = dataclasses.replace(cutout, variance=est.variance)
    return filled, f"{what}: {est.reason}"
