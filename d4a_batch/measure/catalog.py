"""Morphology columns of the output catalog: posterior samples and the observed stamp.

Per object (``measure.morphology`` defines each measurement and the aperture):

- ``measure_posterior(flux[B,S,C,N,N], ...)``: every posterior flux sample on the model grid
  (N×N pixels of ``kpc_per_pixel`` proper kpc, centred on the catalog position), in every
  band for the curves of growth (r50 per band, the g − i gradient) and in the measurement
  band (``schema.MEASURE_BAND``) for the rest; summarised over the S samples as the median
  and the 16th/84th percentiles (the position angle on the circle: percentiles of the
  samples unwrapped about their circular mean). A summary needs at least half the samples
  finite, else NaN with a note. kpc -> arcsec with the model pixel's θ at the nominal
  photo-z (``theta_arcsec``; with a marginalised photo-z the samples share it).
- ``measure_observed(image[B,C,H,W], ...)``: the same code on the observed HSC stamp
  (PSF-convolved; HSC pixels of 0.168″, centre = stamp centre + the pack's offset), with
  the same aperture definition and the same field radius (N/2 model pixels = N/2 · scale
  HSC pixels). The sky is the median of the valid pixels beyond the field radius (one
  3σ-clipping pass; 0 with fewer than ``MIN_SKY_PIXELS``); invalid pixels (bad mask bits,
  masked neighbours) take their 180° partner's value about the catalog position, or 0;
  with more than ``MAX_UNRESTORED`` of the field's pixels unrestored the observed values
  are NaN with a note. arcsec -> kpc with the same θ.
- ``apply_flag_rules(columns, bits)``: a flag that makes a measurement meaningless sets it
  to NaN (posterior and observed) and says so (``FLAG_RULES``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from d4a_batch.measure import morphology as mm
from d4a_batch.schema import (
    COLOUR_BANDS,
    MEASURE_BAND,
    PERCENTILES,
    Col,
    Flag,
    band_col,
    obs_col,
    pct_col,
    with_intervals,
)

MIN_SKY_PIXELS = 32
MAX_UNRESTORED = 0.2  # of the field's pixels: above it the observed values are NaN
MIN_FINITE_SHARE = 0.5  # of the samples, for a posterior summary
OBJECT_CHUNK = 16  # objects measured at once (bounds the memory of [M, H, W] temporaries)

# radii from the curve of growth need the total flux: a cut-off galaxy has none
SIZE_COLUMNS = (
    Col.R20_KPC, Col.R50_KPC, Col.R80_KPC, Col.R20_ARCSEC, Col.R50_ARCSEC, Col.R80_ARCSEC,
    Col.R_TOTAL_KPC, Col.CONCENTRATION, Col.COLOUR_GRADIENT,
)  # fmt: skip
FLAG_RULES: tuple[tuple[Flag, tuple[str, ...], str], ...] = (
    (
        Flag.TRUNCATED,
        SIZE_COLUMNS,
        "r20/r50/r80 (all bands), r_total, concentration and the colour gradient are NaN: "
        "the model field cuts the galaxy off, so the curve of growth misses its outskirts",
    ),
)


def measurement_band(bands: Sequence[str]) -> int:
    """Index of ``MEASURE_BAND`` in ``bands``, else of the last (reddest) band."""
    return list(bands).index(MEASURE_BAND) if MEASURE_BAND in bands else len(bands) - 1


def measure_grid(
    flux: np.ndarray,
    centre: np.ndarray,
    r_max: np.ndarray,
    bands: Sequence[str],
    valid: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Pixel-unit measurements of flux[G, M, C, H, W] (M images sharing each group's
    centre[G, 2] and field radius r_max[G]; ``valid`` [G, M, C, H, W] for the asymmetry's
    pairs, None: all valid). Returns {name: [G, M]}: ``r_total``, ``r20``, ``r50``, ``r80``,
    ``concentration``, ``axis_ratio``, ``pa_deg``, ``offset`` (pixels), ``asymmetry``,
    ``gini``, ``m20``, ``colour_gradient``, ``petro_reached`` and ``r50_<band>``."""
    flux = np.asarray(flux, np.float64)
    g, m, c = flux.shape[:3]
    if len(bands) != c:
        raise ValueError(f"measure_grid: {c} bands in flux, bands {tuple(bands)}")
    mb = measurement_band(bands)
    per_band = [mm.light_profile(flux[:, :, b], centre, r_max) for b in range(c)]
    radii = [mm.light_radii(p, r_max) for p in per_band]
    img = flux[:, :, mb]
    lr = radii[mb]
    shape = mm.shape_moments(img, centre, lr.r50, lr.r_total)
    gini, m20 = mm.gini_m20(img, centre, per_band[mb], lr)
    asym, _, _ = mm.asymmetry(
        img, centre, lr.r_total, None if valid is None else valid[:, :, mb],
        start=np.stack([shape.dy, shape.dx], -1),
    )  # fmt: skip
    out = {
        "r_total": lr.r_total, "r20": lr.r20, "r50": lr.r50, "r80": lr.r80,
        "concentration": lr.concentration, "axis_ratio": shape.axis_ratio,
        "pa_deg": shape.pa_deg, "offset": shape.offset, "asymmetry": asym, "gini": gini,
        "m20": m20, "petro_reached": np.isfinite(lr.r_petro), "flux_total": lr.flux_total,
    }  # fmt: skip
    if all(b in bands for b in COLOUR_BANDS):
        blue, red = (list(bands).index(b) for b in COLOUR_BANDS)
        out["colour_gradient"] = mm.colour_gradient(
            per_band[blue], per_band[red], radii[red].r50, radii[red].r_total
        )
    else:
        out["colour_gradient"] = np.full((g, m), np.nan)
    for b, name in enumerate(bands):
        out[f"r50_{name}"] = radii[b].r50
    return out


def to_columns(
    px: dict[str, np.ndarray], kpc_per_px: np.ndarray, arcsec_per_px: np.ndarray, bands
) -> dict[str, np.ndarray]:
    """``measure_grid``'s values in catalog units, keyed by the morphology base names."""
    kpc = {k: px[k] * kpc_per_px for k in ("r20", "r50", "r80", "r_total", "offset")}
    cols = {
        Col.R20_KPC: kpc["r20"], Col.R50_KPC: kpc["r50"], Col.R80_KPC: kpc["r80"],
        Col.R20_ARCSEC: px["r20"] * arcsec_per_px, Col.R50_ARCSEC: px["r50"] * arcsec_per_px,
        Col.R80_ARCSEC: px["r80"] * arcsec_per_px, Col.R_TOTAL_KPC: kpc["r_total"],
        Col.CONCENTRATION: px["concentration"], Col.AXIS_RATIO: px["axis_ratio"],
        Col.POSITION_ANGLE: px["pa_deg"], Col.CENTROID_OFFSET_KPC: kpc["offset"],
        Col.CENTROID_OFFSET_ARCSEC: px["offset"] * arcsec_per_px,
        Col.CAS_ASYMMETRY: px["asymmetry"], Col.GINI: px["gini"], Col.M20: px["m20"],
        Col.COLOUR_GRADIENT: px["colour_gradient"],
    }  # fmt: skip
    for b in bands:
        cols[band_col(Col.R50_KPC, b)] = px[f"r50_{b}"] * kpc_per_px
    return cols


def summarise(values: np.ndarray, period: float | None = None) -> np.ndarray:
    """(median, p16, p84) [3, B] of values[B, S] over the finite samples; NaN where fewer
    than ``MIN_FINITE_SHARE`` of them are finite. ``period`` (e.g. 180 for a position
    angle): samples unwrapped about their circular mean, the median wrapped into
    [0, period), the percentiles kept on the median's side (they may leave that range)."""
    v = np.asarray(values, np.float64)
    finite = np.isfinite(v)
    enough = finite.sum(1) >= max(1, int(np.ceil(MIN_FINITE_SHARE * v.shape[1])))
    if period is not None:
        ang = 2 * np.pi * v / period
        mean = np.angle(np.nansum(np.exp(1j * ang), 1)) * period / (2 * np.pi)
        v = mean[:, None] + np.mod(v - mean[:, None] + period / 2, period) - period / 2
    q = np.full((3, v.shape[0]), np.nan)
    if enough.any():
        q[:, enough] = np.nanpercentile(v[enough], [50, *PERCENTILES], axis=1)
    if period is not None:
        med = np.mod(q[0], period)
        med = np.where(med >= period, med - period, med)  # np.mod(-1e-14, 180) == 180.0
        q = q + (med - q[0])
    return q


def measure_posterior(
    flux: np.ndarray,
    kpc_per_pixel: float,
    theta_arcsec: np.ndarray,
    bands: Sequence[str],
) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    """Morphology columns of B objects from their posterior flux samples flux[B,S,C,N,N]
    (counts per model pixel; the grid centred on the catalog position). ``theta_arcsec[B]``:
    the model pixel in arcsec at the nominal photo-z. Returns ({column: [B]}, notes per
    object)."""
    flux = np.asarray(flux)
    b, s, c, n = flux.shape[:4]
    if flux.shape != (b, s, c, n, n):
        raise ValueError(f"measure_posterior: flux {flux.shape}, expected [B, S, C, N, N]")
    theta = np.asarray(theta_arcsec, np.float64).reshape(b)
    centre, r_max = np.array([[n / 2, n / 2]]), np.array([n / 2])
    parts = []
    for lo in range(0, b, OBJECT_CHUNK):
        chunk = flux[lo : lo + OBJECT_CHUNK]
        px = measure_grid(chunk.reshape(1, -1, c, n, n), centre, r_max, bands)
        parts.append({k: v.reshape(-1, s) for k, v in px.items()})
    px = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    per_sample = to_columns(px, kpc_per_pixel, theta[:, None] * np.ones((1, s)), bands)
    cols: dict[str, np.ndarray] = {}
    notes: list[list[str]] = [[] for _ in range(b)]
    for name, vals in per_sample.items():
        med, lo16, hi84 = summarise(vals, 180.0 if name == Col.POSITION_ANGLE else None)
        cols[name], cols[pct_col(name, PERCENTILES[0])], cols[pct_col(name, PERCENTILES[1])] = (
            med, lo16, hi84
        )  # fmt: skip
    few = {name: ~np.isfinite(cols[name]) & (np.isfinite(v).sum(1) > 0)
           for name, v in per_sample.items()}  # fmt: skip
    for i in range(b):
        missed = int((~px["petro_reached"][i]).sum())
        if missed:
            notes[i].append(
                f"posterior: the Petrosian radius lies beyond the field in {missed} of {s} "
                "samples (their total aperture is the field)"
            )
        bad = int((~(px["flux_total"][i] > 0)).sum())
        if bad:
            notes[i].append(f"posterior: {bad} of {s} samples have no positive total flux")
        thin = [name for name, f in few.items() if f[i]]
        if thin:
            notes[i].append(
                f"posterior: fewer than {MIN_FINITE_SHARE:.0%} of the samples give a finite "
                f"{', '.join(thin)}: NaN"
            )
    return cols, notes


def observed_sky(
    image: np.ndarray, valid: np.ndarray, centre: np.ndarray, r_max: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(sky[B, C], pixels used[B]) of image[B, C, H, W]: the median of the valid pixels
    beyond r_max[B] of centre[B, 2] after one 3σ (MAD) clipping pass; 0 with fewer than
    ``MIN_SKY_PIXELS``."""
    b, c, h, w = image.shape
    dy = (np.arange(h) + 0.5)[None, :, None] - centre[:, 0, None, None]
    dx = (np.arange(w) + 0.5)[None, None, :] - centre[:, 1, None, None]
    outside = ((dy * dy + dx * dx) > (r_max**2)[:, None, None])[:, None] & valid
    v = np.where(outside, image, np.nan).reshape(b, c, -1)
    n = outside.reshape(b, c, -1).sum(-1)
    enough = n >= MIN_SKY_PIXELS
    sky = np.zeros((b, c))
    if enough.any():
        vv = v[enough]
        med = np.nanmedian(vv, -1)
        mad = 1.4826 * np.nanmedian(np.abs(vv - med[:, None]), -1)
        clipped = np.where(
            np.abs(vv - med[:, None]) <= 3 * np.maximum(mad, 1e-30)[:, None], vv, np.nan
        )
        sky[enough] = np.nanmedian(clipped, -1)
    return sky, n.min(1)


def measure_observed(
    image: np.ndarray,
    valid: np.ndarray,
    offset: np.ndarray,
    scale: np.ndarray,
    n_model: int,
    kpc_per_pixel: float,
    hsc_pixel_arcsec: float,
    bands: Sequence[str],
) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    """Morphology columns ``obs_col(name)`` of B observed stamps image[B,C,H,W] (counts,
    ``valid`` [B,C,H,W]; ``offset[B,2]`` the object from the stamp centre and ``scale[B]``
    the model pixel, in HSC pixels). Returns ({column: [B]}, notes per object)."""
    image = np.asarray(image, np.float64)
    b, _, h, w = image.shape
    valid = np.asarray(valid, bool) & np.isfinite(image)
    scale = np.asarray(scale, np.float64).reshape(b)
    centre = np.array([h / 2, w / 2]) + np.asarray(offset, np.float64).reshape(b, 2)
    r_max = 0.5 * n_model * scale
    sky, n_sky = observed_sky(image, valid, centre, r_max)
    img = np.where(valid, image - sky[..., None, None], 0.0)
    filled, unrestored = mm.fill_by_symmetry(img, valid, centre)
    dy = (np.arange(h) + 0.5)[None, :, None] - centre[:, 0, None, None]
    dx = (np.arange(w) + 0.5)[None, None, :] - centre[:, 1, None, None]
    field = (dy * dy + dx * dx) <= (r_max**2)[:, None, None]
    lost = (unrestored & field[:, None]).sum((-2, -1)) / np.maximum(field.sum((-2, -1)), 1)[:, None]
    lost = lost.max(1)
    px = measure_grid(filled[:, None], centre, r_max, bands, valid=valid[:, None])
    px = {k: v[:, 0] for k, v in px.items()}
    kpc_per_px = kpc_per_pixel / scale  # one HSC pixel = 1/scale model pixels
    values = to_columns(px, kpc_per_px, np.full(b, hsc_pixel_arcsec), bands)
    notes: list[list[str]] = [[] for _ in range(b)]
    for i in range(b):
        if lost[i] > MAX_UNRESTORED:
            notes[i].append(
                f"observed: {lost[i]:.0%} of the field's pixels masked with a masked 180° "
                f"partner (> {MAX_UNRESTORED:.0%}): all observed values NaN"
            )
        elif lost[i] > 0:
            notes[i].append(f"observed: {lost[i]:.1%} of the field's pixels masked, set to 0")
        if n_sky[i] < MIN_SKY_PIXELS:
            notes[i].append(f"observed: {n_sky[i]} sky pixels beyond the field: sky not subtracted")
        if not px["petro_reached"][i]:
            notes[i].append(
                "observed: the Petrosian radius lies beyond the field (total aperture = field)"
            )
    keep = lost <= MAX_UNRESTORED
    return {obs_col(k): np.where(keep, v, np.nan) for k, v in values.items()}, notes


def apply_flag_rules(
    columns: dict[str, np.ndarray], bits: np.ndarray, bands: Sequence[str]
) -> list[list[str]]:
    """Set to NaN (in place) the measurements that a set flag makes meaningless
    (``FLAG_RULES``: posterior and observed columns alike); the notes per object."""
    bits = np.asarray(bits, np.int64)
    notes: list[list[str]] = [[] for _ in range(bits.shape[0])]
    for flag, names, why in FLAG_RULES:
        hit = (bits & int(flag)) != 0
        if not hit.any():
            continue
        base = list(names)
        if Col.R50_KPC in names:
            base += [band_col(Col.R50_KPC, b) for b in bands]
        for name in base:
            for col in with_intervals(name):
                if col in columns:
                    columns[col] = np.where(hit, np.nan, np.asarray(columns[col], np.float64))
        for i in np.flatnonzero(hit):
            notes[i].append(f"{flag.name}: {why}")
    return notes
