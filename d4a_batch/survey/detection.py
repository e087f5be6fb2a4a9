"""Sources in a stamp: detection with deblending (``sep``), the target, neighbours to mask,
and the blend and truncation measurements of the BLENDED and TRUNCATED flags.

Per object (C bands, a detection stamp of H×W HSC pixels around the object, larger than
the sampler's stamp so that a large target's segment is not cut at the stamp edge):

1. detection image: per band, the sky level (``sep.Background`` over the whole stamp:
   one sigma-clipped mode, the global background) is subtracted; the bands are summed
   with inverse-variance weights w_c = 1 / median(VARIANCE_c): D = Σ w_c (I_c − b_c) / Σ w_c,
   its variance Σ w_c² V_c / (Σ w_c)² (only bands valid at a pixel count there);
2. ``sep.extract`` on D above ``detection_threshold`` × its sky σ with deblending
   (``deblend_nthresh``, ``deblend_cont``) -> a segmentation map (0: background);
3. the target: the segment at the catalog position, else the nearest segment pixel
   within ``target_radius`` pixels (else none: every segment is a neighbour);
   A much brighter source merged with the target (its peak far away, 10x brighter) is
   deblended again finer; if it still is one segment, a point source whose wings leave
   the target no peak at any threshold (a saturated star beside a large galaxy): its PSF
   model is fitted (``point_source_model``) and subtracted from D, detection runs again,
   and the star's pixels where its model outshines the rest become a neighbour segment;
   the target's own measurements (6, asymmetry) use D without the star;
4. neighbours: every other segment; dilated by ``neighbour_dilation`` × the PSF FWHM
   (pixels, the widest band) and made invalid, except on the target's own segment.
   Pixels so masked are invalid exactly like bad MASK bits: the likelihood, the χ² and
   every score skip them;
5. neighbour light outside the masks, from a symmetric template per neighbour (the SDSS
   deblender's idea): at pixel p, T(p) = max(0, min(I(p), I(p'))) with p' = p reflected
   through the neighbour's centre (near its peak, ``_centres``), where p' lies in that neighbour's segment (a galaxy is
   about point-symmetric; the minimum removes the target's own light at p).
   ``contamination`` (what BLENDED tests): per band, on the sky-subtracted band image,
   C = Σ_used (T_c(p)² / V_c(p) − b(p)) / n_used over the *used* pixels of the sampler's
   stamp (the pixels the likelihood and χ² use), b = 1/2 where a template is defined
   (E[max(0, n)²] / σ² of pure noise); so C is the χ²/dof the neighbours' leftover light
   adds to a perfect fit of the target (the true target model has χ²/dof ≈ 1 + C). How the
   threshold was chosen: ``FlagThresholds.contamination_max``. ``blend_fraction`` (D, the
   neighbour light on the used footprint pixels over the target segment's light there)
   stays as the flux share, for the reason;
6. ``truncated_fraction``: the target's flux outside the model footprint (the n_out × n_out
   square centred on the object) over its total, both from the target's own symmetric
   template max(0, min(D(p), D(2c − p))) on its segment (c: the object's position), so the
   light of a neighbour merged into the segment on one side does not count as the target's,
   and, off the segment, in its Kron ellipse (``outskirts_light``: the faint outskirts below
   the detection threshold, most of a large galaxy's light outside the field), on D less a
   residual sky (``residual_sky``).

All positions follow ``staging.cut_stamp``: the object lies at (H/2 + dy, W/2 + dx) in
pixel-edge coordinates of the stamp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import sep
from scipy import ndimage

from d4a_batch.schema import Col

# what staging measures here, as (pack/output column, StagedObject attribute); float64 in
# packs (NaN: not measured), n_neighbours_masked int32 in the output catalog
DETECTION_COLUMNS = (
    (Col.N_NEIGHBOURS_MASKED, "n_neighbours_masked"),
    (Col.NEIGHBOUR_MASKED_FRACTION, "neighbour_masked_fraction"),
    (Col.BLEND_FRACTION, "blend_fraction"),
    (Col.CONTAMINATION, "contamination"),
    (Col.ASYMMETRY, "asymmetry"),
    (Col.TRUNCATED_FRACTION, "truncated_fraction"),
)


@dataclass(frozen=True)
class DetectionParams:
    """Detection settings; defaults and their reasons: ``config.StagingConfig``."""

    threshold: float = 2.0  # detection threshold, sigma of the detection image per pixel
    minarea: int = 10  # pixels
    deblend_nthresh: int = 32
    deblend_cont: float = 0.0002
    dilation_fwhm: float = 1.0  # neighbour segments are dilated by this × the PSF FWHM
    target_radius: float = 3.0  # pixels: the nearest segment within this is the target

    @classmethod
    def from_staging(cls, st) -> DetectionParams:
        """The settings a ``config.StagingConfig`` carries."""
        return cls(st.detection_threshold, st.detection_minarea, st.deblend_nthresh,
                   st.deblend_cont, st.neighbour_dilation, st.target_radius)  # fmt: skip


@dataclass
class StampSources:
    """What detection found in one stamp (arrays on the stamp grid they were computed on).

    segmap [H,W] int32: 0 background, k >= 1 segment k; target: the target's segment
    (0: not detected); neighbour_mask [H,W] bool: pixels made invalid because of neighbours.
    """

    segmap: np.ndarray
    target: int
    neighbour_mask: np.ndarray
    n_neighbours: int  # neighbour segments with at least one masked pixel
    neighbour_masked_fraction: float  # masked pixels / stamp pixels
    blend_fraction: float  # NaN when the target was not detected
    truncated_fraction: float  # NaN when the target was not detected
    psf_fwhm: float  # pixels, the widest band
    asymmetry: float = math.nan  # asymmetric_excess of the target's segment (NaN: no target)
    # neighbours' leftover light on the sampler stamp's used pixels: chi2/dof it adds (NaN:
    # no target or no used pixel)
    contamination: float = math.nan

    def crop(self, pad: int) -> StampSources:
        """The same sources on the central (H − 2·pad)×(W − 2·pad) stamp (fractions kept)."""
        if pad == 0:
            return self
        s = (slice(pad, -pad), slice(pad, -pad))
        mask = self.neighbour_mask[s]
        seg = self.segmap[s]
        return StampSources(
            segmap=seg,
            target=self.target,
            neighbour_mask=mask,
            n_neighbours=int(np.unique(seg[mask & (seg > 0)]).size) if mask.any() else 0,
            neighbour_masked_fraction=float(mask.mean()),
            blend_fraction=self.blend_fraction,
            truncated_fraction=self.truncated_fraction,
            psf_fwhm=self.psf_fwhm,
            asymmetry=self.asymmetry,
            contamination=self.contamination,
        )


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


def _disc(radius: float) -> np.ndarray:
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


def _extract(d, level, usable, minarea, nthresh, cont) -> tuple[np.ndarray, np.ndarray]:
    """sep objects and segmentation map [H,W] int32 of detection image ``d``."""
    sep.set_sub_object_limit(4096)
    objects, segmap = sep.extract(
        np.ascontiguousarray(d, dtype=np.float64),
        level,
        mask=np.ascontiguousarray(~usable),
        minarea=minarea,
        deblend_nthresh=nthresh,
        deblend_cont=cont,
        segmentation_map=True,
    )
    return objects, segmap.astype(np.int32)


def _swallowed_by_brighter(
    d: np.ndarray, segmap: np.ndarray, target: int, offset: tuple[float, float], radius: float
) -> bool:
    """True when the target's segment peaks more than ``radius`` pixels from the object's
    position, 10× brighter than the detection image there: another source merged in."""
    h, w = segmap.shape
    cy, cx = h / 2 + offset[0], w / 2 + offset[1]
    seg = segmap == target
    k = int(np.argmax(np.where(seg, d, -np.inf)))
    py, px = divmod(k, w)
    far = (py + 0.5 - cy) ** 2 + (px + 0.5 - cx) ** 2 > radius**2
    iy, ix = min(max(math.floor(cy), 0), h - 1), min(max(math.floor(cx), 0), w - 1)
    return bool(far and d[py, px] > 10 * max(float(d[iy, ix]), 0.0))


def _centres(objects, d: np.ndarray, segmap: np.ndarray) -> list[dict[str, float]]:
    """Each sep object's symmetry centre for its template, {"x", "y"} (pixel indices): the
    D-weighted centroid of its segment's pixels within 2 px of its peak pixel. The centroid
    of a whole deblended segment is pulled away from the neighbour that took its near
    side, which reflects the target's pixels too deep into the source."""
    h, w = d.shape
    centres = []
    for k, o in enumerate(objects, start=1):
        py, px = int(o["ypeak"]), int(o["xpeak"])
        ys, xs = slice(max(py - 2, 0), min(py + 3, h)), slice(max(px - 2, 0), min(px + 3, w))
        yy, xx = np.mgrid[ys, xs]
        wgt = np.where(segmap[ys, xs] == k, np.clip(d[ys, xs], 0.0, None), 0.0)
        wgt *= (yy - py) ** 2 + (xx - px) ** 2 <= 4
        total = float(wgt.sum())
        if total > 0:
            centres.append({"x": float((xx * wgt).sum()) / total,
                            "y": float((yy * wgt).sum()) / total})  # fmt: skip
        else:
            centres.append({"x": float(px), "y": float(py)})
    return centres


def band_weights(variance: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The detection image's band weights [C]: 1 / median VARIANCE_c of the usable pixels
    (0 for a band with fewer than 16), normalised to sum 1 (``detection_image``)."""
    w = np.zeros(variance.shape[0])
    for c in range(variance.shape[0]):
        ok = np.asarray(valid[c], bool) & np.isfinite(variance[c]) & (variance[c] > 0)
        if ok.sum() >= 16:
            w[c] = 1.0 / float(np.median(variance[c][ok]))
    return w / w.sum() if w.sum() > 0 else w


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


def find_target(segmap: np.ndarray, offset: tuple[float, float], radius: float) -> int:
    """Segment id at the object's position, else of the nearest segment pixel within
    ``radius`` pixels (0: none)."""
    h, w = segmap.shape
    cy, cx = h / 2 + offset[0], w / 2 + offset[1]
    iy, ix = math.floor(cy), math.floor(cx)
    if 0 <= iy < h and 0 <= ix < w and segmap[iy, ix] > 0:
        return int(segmap[iy, ix])
    ys, xs = np.nonzero(segmap)
    if ys.size == 0:
        return 0
    d2 = (ys + 0.5 - cy) ** 2 + (xs + 0.5 - cx) ** 2
    k = int(np.argmin(d2))
    return int(segmap[ys[k], xs[k]]) if d2[k] <= radius**2 else 0


def neighbour_light(d: np.ndarray, segmap: np.ndarray, objects: np.ndarray, target: int):
    """Estimated light [H,W] of all neighbours at every pixel (symmetric templates).

    For neighbour n with centre c_n (``_centres``): T_n(p) = max(0, min(D(p), D(2c_n − p)))
    where the reflected point lies in segment n (D there bilinear between pixels); the
    neighbours' templates add up.
    """
    return _neighbour_templates(d, segmap, objects, target)[0]


def _neighbour_templates(d: np.ndarray, segmap: np.ndarray, objects: np.ndarray, target: int):
    """``(light, defined)`` [H,W]: ``neighbour_light`` and where any template is defined."""
    h, w = d.shape
    yy, xx = np.mgrid[0:h, 0:w]
    total = np.zeros_like(d)
    defined = np.zeros(d.shape, bool)
    for k, obj in enumerate(objects, start=1):
        if k == target:
            continue
        fy, fx = 2 * obj["y"] - yy, 2 * obj["x"] - xx  # the mirror point, sub-pixel
        ry, rx = np.rint(fy).astype(int), np.rint(fx).astype(int)
        inside = (ry >= 0) & (ry < h) & (rx >= 0) & (rx < w)
        ryc, rxc = np.clip(ry, 0, h - 1), np.clip(rx, 0, w - 1)
        own = inside & (segmap[ryc, rxc] == k)
        mirror = ndimage.map_coordinates(d, [fy, fx], order=1, mode="nearest")
        total += np.where(own, np.clip(np.minimum(d, mirror), 0.0, None), 0.0)
        defined |= own
    return total, defined


def contamination(
    image: np.ndarray,
    variance: np.ndarray,
    valid: np.ndarray,
    used: np.ndarray,
    segmap: np.ndarray,
    objects: np.ndarray,
    target: int,
) -> float:
    """χ²/dof that the neighbours' light left on the ``used`` [H,W] pixels adds to a perfect
    fit of the target (module docstring, step 5); image, variance, valid [C,H,W].

    Per band the sky-subtracted image gives symmetric templates T_c of the neighbours (the
    segments and centres of the detection image); C = Σ_c Σ_used (T_c² / V_c − b) /
    n_used, b = 1/2 where a template is defined (the mean of max(0, n)² / σ² for noise
    alone), clipped at 0. NaN without a used pixel.
    """
    num, n = 0.0, 0
    for c in range(image.shape[0]):
        ok = np.asarray(valid[c], bool) & np.isfinite(image[c]) & np.isfinite(variance[c])
        ok &= variance[c] > 0
        use = ok & used
        if not use.any():
            continue
        band = np.where(ok, image[c] - sky_level(image[c], ok), 0.0)
        light, defined = _neighbour_templates(band, segmap, objects, target)
        var = np.where(use, variance[c], 1.0)
        num += float((light**2 / var - 0.5 * defined)[use].sum())
        n += int(use.sum())
    return max(0.0, num) / n if n else math.nan


def symmetric_template(
    d: np.ndarray,
    segment: np.ndarray,
    offset: tuple[float, float],
    hidden: np.ndarray | None = None,
):
    """The target's point-symmetric template [H,W] on ``segment``: max(0, min(D(p), D(p')))
    with p' = p reflected through the object's position (0 off the segment, and where p'
    leaves the stamp). Light of a neighbour merged into the segment on one side has no
    mirror image, so the template drops it (SDSS / scarlet deblender templates). Where p'
    is ``hidden`` [H,W] (a masked neighbour covers it) the mirror is unknown: max(0, D(p))."""
    h, w = d.shape
    cy, cx = h / 2 + offset[0] - 0.5, w / 2 + offset[1] - 0.5  # pixel-centre coordinates
    ys, xs = np.nonzero(segment)
    ry, rx = np.rint(2 * cy - ys).astype(int), np.rint(2 * cx - xs).astype(int)
    inside = (ry >= 0) & (ry < h) & (rx >= 0) & (rx < w)
    ryc, rxc = np.clip(ry, 0, h - 1), np.clip(rx, 0, w - 1)
    mirror = d[ryc, rxc]
    if hidden is not None:
        mirror = np.where(hidden[ryc, rxc], np.inf, mirror)
    t = np.zeros_like(d, dtype=np.float64)
    t[ys, xs] = np.where(inside, np.clip(np.minimum(d[ys, xs], mirror), 0.0, None), 0.0)
    return t


def target_ellipse(
    template: np.ndarray, offset: tuple[float, float]
) -> tuple[float, float, float] | None:
    """(a, b, theta) of the target from the second moments of its symmetric ``template``
    [H,W] about the object's position (pixels, radians as sep's); None without light."""
    h, w = template.shape
    cy, cx = h / 2 + offset[0] - 0.5, w / 2 + offset[1] - 0.5  # pixel-centre coordinates
    ys, xs = np.nonzero(template > 0)
    f = template[ys, xs]
    total = float(f.sum())
    if ys.size < 3 or total <= 0:
        return None
    dy, dx = ys - cy, xs - cx
    myy, mxx, mxy = (
        (f * dy * dy).sum() / total,
        (f * dx * dx).sum() / total,
        (f * dx * dy).sum() / total,
    )
    half, diff = (mxx + myy) / 2, math.sqrt(((mxx - myy) / 2) ** 2 + mxy**2)
    a2, b2 = half + diff, max(half - diff, 1e-6)
    theta = 0.5 * math.atan2(2 * mxy, mxx - myy)
    return math.sqrt(a2), math.sqrt(b2), theta


def residual_sky(
    d: np.ndarray, segmap: np.ndarray, usable: np.ndarray, hidden: np.ndarray, grow: float
) -> float:
    """The detection image's sky left after ``detection_image`` (whose one sigma-clipped mode
    over the whole stamp a large galaxy's outskirts pull up): the median of D [H,W] on the
    usable pixels off every segment dilated by ``grow`` pixels and off ``hidden``; 0 when
    fewer than 100 such pixels are left."""
    grown = ndimage.binary_dilation(segmap > 0, structure=_disc(grow)) if grow > 0 else segmap > 0
    free = usable & ~grown & ~hidden
    return float(np.median(d[free])) if free.sum() >= 100 else 0.0


def outskirts_light(
    d: np.ndarray,
    sigma: np.ndarray,
    segment: np.ndarray,
    usable: np.ndarray,
    hidden: np.ndarray,
    offset: tuple[float, float],
    kron_factor: float = 4.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(light, region)`` [H,W]: the target's light on its segment united with its Kron
    ellipse (``kron_factor`` × the Kron radius), where the faint outskirts below the
    detection threshold lie. SExtractor's MAG_AUTO aperture is 2.5 Kron radii; 4 was chosen
    on 24 mock galaxies 2-4x larger than usual (i 20-23.3, true share outside the field
    0.002-0.34: ``jobs/truncation_check.py``): 22 of 24 within 0.05 of the truth at 2.5, 4, 6
    and 100 Kron radii alike, the worst (a faint i 23.2 galaxy with 0.25 outside) off by
    0.22 at 2.5 and 0.12 at 4 (0.17, 0.21 beyond); 24 usual-size mocks measure <= 0.03.

    On the segment: the symmetric template (``symmetric_template``: a merged neighbour on
    one side drops out). Off it, inside the ellipse, where p and its point mirror p' are both
    usable and not ``hidden`` (masked neighbours): min(D(p), D(p')) + sqrt(σ_p² + σ_p'²) /
    sqrt(2π), the minimum (one-sided light, a neighbour's or a star's wing, drops out)
    without its noise bias (E[min] of two equal means is the mean − that term), not clipped
    at 0 (a clipped minimum is biased up by ~0.12 σ per pixel, which adds up over a large
    ellipse); where only one of the two is usable, its D alone; 0 where neither is. The
    ellipse is the template's second-moment ellipse scaled by sep's Kron radius (within 6
    isophotal radii, as SExtractor), measured on the template on the segment and D off it,
    hidden and unusable pixels masked;
    the segment alone when the Kron radius is not measurable.
    """
    template = symmetric_template(d, segment, offset, hidden=hidden)
    region = segment.copy()
    shape = target_ellipse(template, offset)
    h, w = d.shape
    if shape is None:
        return template, region
    a, b, theta = shape
    cy, cx = h / 2 + offset[0] - 0.5, w / 2 + offset[1] - 0.5
    bad = np.ascontiguousarray(hidden | ~usable)
    # on the segment its template (a merged neighbour there would widen the radius), D off it
    data = np.ascontiguousarray(np.where(bad, 0.0, np.where(segment, template, d)), np.float64)
    kron, _ = sep.kron_radius(data, [cx], [cy], [a], [b], [theta], 6.0, mask=bad)
    kron = float(np.atleast_1d(kron)[0])
    if not math.isfinite(kron) or kron <= 0:
        return template, region
    ellipse = np.zeros((h, w), dtype=bool)
    sep.mask_ellipse(ellipse, [cx], [cy], [a], [b], [theta], r=max(kron_factor * kron, 3.5))
    region |= ellipse
    ys, xs = np.nonzero(ellipse & ~segment)
    ry, rx = np.rint(2 * cy - ys).astype(int), np.rint(2 * cx - xs).astype(int)
    inside = (ry >= 0) & (ry < h) & (rx >= 0) & (rx < w)
    ryc, rxc = np.clip(ry, 0, h - 1), np.clip(rx, 0, w - 1)
    ok_p = usable[ys, xs] & ~hidden[ys, xs] & np.isfinite(sigma[ys, xs])
    ok_m = inside & usable[ryc, rxc] & ~hidden[ryc, rxc] & np.isfinite(sigma[ryc, rxc])
    dp, dm = d[ys, xs], d[ryc, rxc]
    with np.errstate(invalid="ignore"):
        bias = np.sqrt((sigma[ys, xs] ** 2 + sigma[ryc, rxc] ** 2) / (2 * math.pi))
    both = np.minimum(dp, dm) + np.where(ok_p & ok_m, bias, 0.0)
    light = template.copy()
    light[ys, xs] = np.where(ok_p & ok_m, both, np.where(ok_p, dp, np.where(ok_m, dm, 0.0)))
    return light, region


def asymmetric_excess(
    d: np.ndarray, sigma: np.ndarray, segment: np.ndarray, offset: tuple[float, float]
) -> float:
    """Light of ``segment`` not matched by its point reflection through the object, over the
    segment's flux: Σ (max(0, D(p) − D(p')) − noise term).

    p' = p reflected through the object's position. A neighbour merged into the target's
    segment (too close to deblend) has no mirror image, so its light shows up here; the
    noise part, E[max(0, n − n')] = sqrt((σ_p² + σ_p'²) / (2π)), is subtracted per pixel.
    """
    h, w = d.shape
    cy, cx = h / 2 + offset[0] - 0.5, w / 2 + offset[1] - 0.5  # pixel-centre coordinates
    ys, xs = np.nonzero(segment)
    if ys.size == 0:
        return math.nan
    ry, rx = np.rint(2 * cy - ys).astype(int), np.rint(2 * cx - xs).astype(int)
    inside = (ry >= 0) & (ry < h) & (rx >= 0) & (rx < w)
    ys, xs, ry, rx = ys[inside], xs[inside], ry[inside], rx[inside]
    s1, s2 = sigma[ys, xs], sigma[ry, rx]
    ok = np.isfinite(s1) & np.isfinite(s2)
    diff = np.clip(d[ys, xs] - d[ry, rx], 0.0, None)
    noise = np.sqrt((s1**2 + s2**2) / (2 * math.pi))
    total = float(np.clip(d[segment], 0.0, None).sum())
    excess = float((diff - noise)[ok].sum())
    return max(0.0, excess) / total if total > 0 else math.nan


def find_sources(
    image: np.ndarray,
    variance: np.ndarray,
    valid: np.ndarray,
    psf: np.ndarray,
    offset: tuple[float, float],
    footprint: float,
    params: DetectionParams | None = None,
    pad: int = 0,
) -> StampSources:
    """Detect, deblend and measure the sources of one stamp (see the module docstring).

    image, variance [C,H,W] counts; valid [C,H,W] bool; psf [C,P,P]; offset (dy, dx) of
    the object from the stamp centre; footprint: n_out, the model footprint side in pixels;
    pad: the sampler's stamp is the central (H − 2·pad)×(W − 2·pad) one (``contamination``
    counts its used pixels only).
    """
    p = params or DetectionParams()
    image = np.asarray(image)
    c, h, w = image.shape
    if np.asarray(psf).ndim != 3 or np.asarray(psf).shape[0] != c:
        raise ValueError(f"find_sources: psf must be [C,P,P] with C={c}")
    fwhm = max(psf_fwhm_pixels(b) for b in psf)
    d, sigma, usable = detection_image(image, variance, valid)
    sky_sigma = detection_image(image, variance, valid, sky_only=True)[1]
    empty = np.zeros((h, w), bool)
    if not usable.any():
        return StampSources(np.zeros((h, w), np.int32), 0, empty, 0, 0.0, math.nan, math.nan, fwhm)
    # an absolute threshold (threshold × the sky sigma): with a per-pixel err array whose
    # unusable pixels are huge, sep stopped deblending (3 segments instead of 7 on
    # scarlet's hsc_cosmos_35); the sky sigma is one value per band combination anyway
    level = p.threshold * float(np.median(sky_sigma[usable]))
    objects, segmap = _extract(d, level, usable, p.minarea, p.deblend_nthresh, p.deblend_cont)
    target = find_target(segmap, offset, p.target_radius)
    # a much brighter source (a star) merged with the target: its range of levels (10^4
    # and more) leaves the target's branch inside one of the exponentially spaced threshold
    # steps, so deblend finer, 2x then 4x the thresholds at 1/100 of the contrast, and stop
    # at the first that splits it (finer than needed cuts the target's own wings): the demo
    # survey's 21 mag galaxies 16 px from 15 mag stars, and a compact galaxy beside a star
    # 6 mag brighter in tests/survey/test_detection.py, merged at the defaults and split so
    radius = max(p.target_radius, 2 * fwhm)
    for finer in (2, 4):
        if not (target and _swallowed_by_brighter(d, segmap, target, offset, radius)):
            break
        objects, segmap = _extract(
            d, level, usable, p.minarea, finer * p.deblend_nthresh, p.deblend_cont / 100
        )
        target = find_target(segmap, offset, p.target_radius)
    # still merged: a point source whose wings leave the target no peak of its own at any
    # threshold (the demo's 15.6 mag star 16 px from a galaxy 5x larger than usual): fit
    # its PSF, detect again without it, and make it a neighbour where it outshines the rest
    dt = d  # the detection image for the target's own measurements
    objects = _centres(objects, d, segmap)
    if target and _swallowed_by_brighter(d, segmap, target, offset, radius):
        star = point_source_model(d, segmap == target, usable, psf, band_weights(variance, valid))
        if star is not None:
            model, (sy, sx) = star
            dt = d - model
            found, segmap = _extract(
                dt, level, usable, p.minarea, p.deblend_nthresh, p.deblend_cont
            )
            objects = _centres(found, dt, segmap)
            target = find_target(segmap, offset, p.target_radius)
            star_pixels = (model > level) & (model > np.clip(dt, 0.0, None))
            if star_pixels.any():
                segmap[star_pixels] = len(objects) + 1
                objects.append({"x": float(sx), "y": float(sy)})
    others = (segmap > 0) & (segmap != target)
    radius = p.dilation_fwhm * fwhm if math.isfinite(fwhm) else 0.0
    mask = empty.copy()
    masked_ids: set[int] = set()
    if others.any():
        for k in np.unique(segmap[others]):
            grown = ndimage.binary_dilation(segmap == k, structure=_disc(radius))
            if target:
                grown &= segmap != target
            if grown.any():
                masked_ids.add(int(k))
                mask |= grown
    box = footprint_box((h, w), offset, footprint)
    blend = truncated = asym = contam = math.nan
    if target:
        tseg = segmap == target
        sky = residual_sky(dt, segmap, usable, mask, 2 * fwhm if math.isfinite(fwhm) else 4.0)
        flux, region = outskirts_light(dt - sky, sigma, tseg, usable, mask, offset)
        total = float(flux[region].sum())
        truncated = float(flux[region & ~box].sum()) / total if total > 0 else math.nan
        used = box & usable & ~mask
        target_light = float(dt[tseg & used].sum())
        share = float(neighbour_light(d, segmap, objects, target)[used].sum())
        blend = share / target_light if target_light > 0 else math.nan
        # pairs with a masked mirror pixel do not count (the neighbour's light is there)
        asym = asymmetric_excess(dt, np.where(usable & ~mask, sigma, np.nan), tseg & ~mask, offset)
        inner = np.zeros((h, w), bool)
        inner[pad : h - pad, pad : w - pad] = True
        contam = contamination(image, variance, valid, inner & ~mask, segmap, objects, target)
    return StampSources(
        segmap=segmap,
        target=target,
        neighbour_mask=mask,
        n_neighbours=len(masked_ids),
        neighbour_masked_fraction=float(mask.mean()),
        blend_fraction=blend,
        truncated_fraction=truncated,
        psf_fwhm=fwhm,
        asymmetry=asym,
        contamination=contam,
    )


def detection_flag_inputs(pack: pa.Table, prior_config=None) -> dict[str, np.ndarray]:
    """The BLENDED / TRUNCATED inputs of ``sampling.flags.flag_objects`` from a pack's columns.

    Arrays [B]; NaN when the pack has no such column (staged without detection).
    ``prior_config`` (a ``PriorConfig``) gives the model field's width in kpc for the reason.
    """
    n = pack.num_rows

    def col(name: str) -> np.ndarray:
        if name not in pack.column_names:
            return np.full(n, np.nan)
        return np.asarray(pack[name].to_numpy(zero_copy_only=False), np.float64)

    field = math.nan
    if prior_config is not None:
        field = float(prior_config.image_size * prior_config.kpc_per_pixel)
    return {
        "blend_fraction": col(Col.BLEND_FRACTION),
        "contamination": col(Col.CONTAMINATION),
        "asymmetry": col(Col.ASYMMETRY),
        "n_neighbours": col(Col.N_NEIGHBOURS_MASKED),
        "truncated_fraction": col(Col.TRUNCATED_FRACTION),
        "footprint": col(Col.N_OUT),
        "field_kpc": np.full(n, field),
    }
