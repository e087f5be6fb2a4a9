"""Light measured with point-symmetric templates on a stamp's segmentation: steps 5 and 6
of ``quality/detection.py``'s module docstring, which ``detection.find_sources`` calls once
the sources are detected.

- the neighbours' light (BLENDED): ``neighbour_light`` (on the detection image, the flux
  share ``blend_fraction``) and ``contamination`` (per band, the χ²/dof their leftover
  light adds to a perfect fit of the target), from each neighbour's symmetric template;
- the target's light (TRUNCATED): its own template on its segment (``symmetric_template``),
  its second-moment ellipse (``target_ellipse``), the sky left in the detection image
  (``residual_sky``) and the faint outskirts in its Kron ellipse (``outskirts_light``);
- the light of the target's segment without a mirror image (``asymmetric_excess``: a
  neighbour merged into it).

A galaxy is about point-symmetric (the SDSS deblender's idea): light at p that its mirror
point p' does not match belongs to something else. All positions follow
``survey.staging.cut_stamp``: the object lies at (H/2 + dy, W/2 + dx) in pixel-edge coordinates
of the stamp.
"""

from __future__ import annotations

import math

import numpy as np
import sep
from scipy import ndimage

from d4a_batch.quality.detection_image import disc, sky_level


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
    grown = ndimage.binary_dilation(segmap > 0, structure=disc(grow)) if grow > 0 else segmap > 0
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
