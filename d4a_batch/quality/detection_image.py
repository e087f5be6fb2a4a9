"""The detection image of a stamp, and the pixel helpers that detection
(``quality/detection.py``) and its symmetric-template measurements (``quality/symmetry.py``)
share.

Step 1 of ``quality/detection.py``'s module docstring: per band the sky level
(``sky_level``: ``sep.Background`` over the whole stamp, one sigma-clipped mode) is
subtracted and the bands are summed with inverse-variance weights w_c = 1 / median(VARIANCE_c)
(``detection_image``, ``band_weights``). Also here: the PSF's FWHM in pixels
(``psf_fwhm_pixels``), the model footprint's square (``footprint_box``) and the disc
structuring element of the dilations (``disc``).

All positions follow ``survey.staging.cut_stamp``: the object lies at (H/2 + dy, W/2 + dx) in
pixel-edge coordinates of the stamp.
"""

from __future__ import annotations

import math

import numpy as np
import sep


def psf_fwhm_pixels(psf: np.ndarray) -> float:
    """FWHM (pixels) of a PSF [P,P] from the area above half its peak: 2·sqrt(A/π)."""
    psf = np.asarray(psf, dtype=np.float64)
    peak = float(psf.max())
    if not math.isfinite(peak) or peak <= 0:
        return math.nan
    return 2.0 * math.sqrt(float((psf >= 0.5 * peak).sum()) / math.pi)


def detection_image(
    image: np.ndarray, variance: np.ndarray, valid: np.ndarray, sky_only: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(D, sigma, usable)`` [H,W] from image, variance, valid [C,H,W] (see module docstring).

    usable: valid in at least one band; D and sigma are 0 and inf elsewhere. ``sky_only``:
    sigma from each band's median variance (the sky), without the source term: what the
    detection threshold and deblending use (as SExtractor's background RMS map). With the
    source term, bright blends look flat in S/N and sep's deblending merged all 7 sources
    of scarlet's hsc_cosmos_35 field into one segment.
    """
    image = np.asarray(image, dtype=np.float64)
    variance = np.asarray(variance, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool) & np.isfinite(image) & np.isfinite(variance)
    valid &= variance > 0
    if image.ndim != 3 or image.shape != variance.shape or image.shape != valid.shape:
        raise ValueError(f"detection_image: expected [C,H,W] planes, got {image.shape}")
    num = np.zeros(image.shape[1:])
    den = np.zeros(image.shape[1:])
    var = np.zeros(image.shape[1:])
    for c in range(image.shape[0]):
        ok = valid[c]
        if ok.sum() < 16:
            continue
        sky = float(np.median(variance[c][ok]))
        w = 1.0 / sky
        level = sky_level(image[c], ok)
        num += np.where(ok, w * (image[c] - level), 0.0)
        den += np.where(ok, w, 0.0)
        var += np.where(ok, w * w * (sky if sky_only else variance[c]), 0.0)
    usable = den > 0
    d = np.where(usable, num / np.where(usable, den, 1.0), 0.0)
    sigma = np.where(usable, np.sqrt(var) / np.where(usable, den, 1.0), np.inf)
    return d, sigma, usable


def sky_level(band: np.ndarray, ok: np.ndarray) -> float:
    """One band's global sky level [H,W] -> float: ``sep.Background`` over the whole stamp
    (one sigma-clipped mode) on the pixels ``ok``."""
    b = np.ascontiguousarray(np.where(ok, band, 0.0), dtype=np.float64)
    h, w = b.shape
    return float(
        sep.Background(b, mask=np.ascontiguousarray(~ok), bw=w, bh=h, fw=1, fh=1).globalback
    )


def disc(radius: float) -> np.ndarray:
    r = max(0, math.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy**2 + xx**2) <= radius**2 + 1e-9


def footprint_box(shape: tuple[int, int], offset: tuple[float, float], footprint: float):
    """Boolean [H,W]: pixel centres inside the n_out × n_out model footprint around the object."""
    h, w = shape
    cy, cx = h / 2 + offset[0], w / 2 + offset[1]
    yc, xc = np.arange(h) + 0.5, np.arange(w) + 0.5
    iny = np.abs(yc - cy) <= footprint / 2
    inx = np.abs(xc - cx) <= footprint / 2
    return iny[:, None] & inx[None, :]


def band_weights(variance: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The detection image's band weights [C]: 1 / median VARIANCE_c of the usable pixels
    (0 for a band with fewer than 16), normalised to sum 1 (``detection_image``)."""
    w = np.zeros(variance.shape[0])
    for c in range(variance.shape[0]):
        ok = np.asarray(valid[c], bool) & np.isfinite(variance[c]) & (variance[c] > 0)
        if ok.sum() >= 16:
            w[c] = 1.0 / float(np.median(variance[c][ok]))
    return w / w.sum() if w.sum() > 0 else w
