"""Is the bright peak that swallowed the target a point source? (``point_source_model``)

Step 3 of ``quality/detection.py``'s module docstring: when a much brighter source stays
merged with the target after finer deblending, ``detection.find_sources`` fits the PSF of
the detection image to its peak here; a point-like peak (a saturated star beside a large
galaxy) is subtracted and detection runs again, a slightly extended one (a compact galaxy)
is left alone.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# PSF ⊛ Gaussian(σ) kernels (σ in pixels) a point source must not fit markedly better than
# the PSF itself (``point_source_model``), and how much better counts as "markedly"
EXTENDED_SIGMAS = (0.5, 0.75, 1.0, 1.5, 2.0)
EXTENDED_MARGIN = 1.25


def point_source_model(
    d: np.ndarray, segment: np.ndarray, usable: np.ndarray, psf: np.ndarray, weights
) -> tuple[np.ndarray, tuple[int, int]] | None:
    """PSF model [H,W] of the brightest peak of ``segment`` in the detection image ``d``, and
    the peak pixel (y, x); None when it is not point-like.

    The PSF of D is Σ w_c psf_c [C,P,P] with the detection weights; it is centred on the
    peak pixel and scaled by least squares on its wing (5-50 % of the PSF's peak; pixels
    within 2 % of the peak value, a saturated core, are left out). Point-like: the wing
    fits to 20 % rms (a galaxy's broader profile does not), and no slightly extended
    model, the PSF convolved with a Gaussian of σ = 0.5-2 px (``EXTENDED_SIGMAS``) fitted
    on the same pixels, fits it with an rms ``EXTENDED_MARGIN`` (1.25) times smaller. The
    20 % rule alone took compact galaxies for stars: GalSim exponentials of half-light
    radius 0.15-0.2'' in 0.7'' seeing fit the PSF's wing to 7-15 % rms, but PSF ⊛ a σ 0.75-1
    px Gaussian to 1.6-7.6 % (``tests/survey/test_detection.py``); a star, and source 0 of
    scarlet's hsc_cosmos_35 (modelled as a point source in scarlet's own tutorial), fit the
    PSF best (6.1 % against 8 % at σ 0.5 px).
    """
    psf_d = np.tensordot(np.asarray(weights, np.float64), np.asarray(psf, np.float64), 1)
    if not np.isfinite(psf_d).all() or psf_d.max() <= 0:
        return None
    h, w = d.shape
    n = psf_d.shape[0]
    k = int(np.argmax(np.where(segment, d, -np.inf)))
    py, px = divmod(k, w)
    # centre: the centroid of the pixels above half the peak within 3 px (a saturated core
    # is a plateau whose first pixel is not its centre)
    yy, xx = np.mgrid[0:h, 0:w]
    top = ((yy - py) ** 2 + (xx - px) ** 2 <= 9) & (d >= 0.5 * d[py, px])
    weight = float(d[top].sum())
    cy, cx = float((yy * d)[top].sum()) / weight, float((xx * d)[top].sum()) / weight
    py, px = round(cy), round(cx)
    y0, x0 = py - n // 2, px - n // 2
    ys, xs = slice(max(y0, 0), min(y0 + n, h)), slice(max(x0, 0), min(x0 + n, w))

    def placed(kernel: np.ndarray) -> np.ndarray:
        shifted = ndimage.shift(kernel, (cy - py, cx - px), order=1, mode="constant")
        out = np.zeros((h, w))
        out[ys, xs] = shifted[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
        return out

    model = placed(psf_d)
    # the wing between 5 % and 50 % of the peak, off a flat (saturated, interpolated) core
    rel = model / psf_d.max()
    core = (rel >= 0.05) & (rel <= 0.5) & usable & (d < 0.98 * d[py, px])
    if core.sum() < 8:
        return None

    def fit(m: np.ndarray) -> tuple[float, float]:
        amp = float((d[core] * m[core]).sum() / (m[core] ** 2).sum())
        return amp, float(np.sqrt(np.mean((d[core] - amp * m[core]) ** 2)))

    amp, rms = fit(model)
    if amp <= 0 or rms > 0.2 * amp * float(model[core].mean()):
        return None
    for sigma in EXTENDED_SIGMAS:
        wide = ndimage.gaussian_filter(psf_d, sigma, mode="constant")
        if EXTENDED_MARGIN * fit(placed(wide / wide.sum()))[1] < rms:
            return None  # a slightly extended source fits better: a compact galaxy
    return amp * model, (py, px)
