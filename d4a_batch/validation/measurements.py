"""The catalog's measurements against the truth (issue 31): posterior and observed image.

Input: sampled packs of held-out mocks (``validation.science.save_sampled_pack``: the
output rows with their morphology columns, the pack's arrays and each object's truth image
on the model grid), e.g. the packs a calibration run leaves under ``<work>/packs``.

Per object the truth's own values come from the same code on the truth image
(``measure.catalog.measure_posterior`` with one "sample": same aperture, same grid, the
model pixel's θ at the *true* redshift). The posterior median, its 16/84 % percentiles and
the observed stamp's value (``*_obs``: the same code on the PSF-convolved HSC stamp) are
compared with it:

- sizes (r20, r50, r80, in arcsec: what the image constrains; the kpc columns share the
  photo-z's θ with the observed values, so they add the same photo-z error to both) by
  their relative error (est − true)/true; the other quantities by est − true, the position
  angle on the circle (period 180°) and only where the true axis ratio is below
  ``PA_MAX_AXIS_RATIO`` (a round galaxy has no position angle);
- per group (i magnitude bin, size bin): ``n``, the median error (bias), 1.4826 × its MAD
  (scatter) and the median absolute error, for the posterior and the observed image, and
  how often the posterior's 16–84 % interval holds the truth (nominal 0.68);
- size bins: the true r50 over the PSF's half width at half maximum (i band, from the
  pack's PSF image: ``psf_fwhm_pixels``).

Objects whose status is not ``ok`` are left out (they have no measurements); a NaN value
(e.g. TRUNCATED sets the sizes NaN; too few finite samples) leaves that object out of that
quantity only, and the table counts them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from d4a_batch.measure.catalog import measure_posterior, measurement_band
from d4a_batch.physics.cosmology import model_pixel_arcsec
from d4a_batch.quality.detection_image import psf_fwhm_pixels
from d4a_batch.schema import PERCENTILES, Col, obs_col, pct_col
from d4a_batch.survey.packs import IMAGE, OFFSET, PSF, SCALE, VALID, VARIANCE

# quantity -> how its error is measured
QUANTITIES: dict[str, str] = {
    Col.R50_ARCSEC: "relative",
    Col.R20_ARCSEC: "relative",
    Col.R80_ARCSEC: "relative",
    Col.CONCENTRATION: "absolute",
    Col.AXIS_RATIO: "absolute",
    Col.POSITION_ANGLE: "angle",
    Col.CENTROID_OFFSET_ARCSEC: "absolute",
    Col.CAS_ASYMMETRY: "absolute",
    Col.GINI: "absolute",
    Col.M20: "absolute",
    Col.COLOUR_GRADIENT: "absolute",
}
PA_PERIOD = 180.0
PA_MAX_AXIS_RATIO = 0.8  # position angles compared only for true b/a below this
MAG_EDGES = (18.0, 19.0, 20.0, 21.0, 22.0, 23.0, 24.0)
SIZE_EDGES = (0.0, 1.0, 2.0, 4.0, np.inf)  # true r50 / PSF HWHM
NOMINAL_COVERAGE = 0.68
MIN_PER_BIN = 10  # the done-when checks use bins with at least this many objects


@dataclass(frozen=True)
class Geometry:
    """What converts the truth's model pixels: the prior's grid and the cosmology."""

    kpc_per_pixel: float
    cosmology: str
    hsc_pixel_arcsec: float
    bands: tuple[str, ...]


def truth_values(truth: np.ndarray, z_true: np.ndarray, geo: Geometry) -> dict[str, np.ndarray]:
    """The measurements {column: [B]} of truth images truth[B,C,N,N] (counts per model
    pixel, centred on the catalog position), with the model pixel's θ at ``z_true`` [B]."""
    truth = np.asarray(truth, np.float64)
    if truth.ndim != 4 or truth.shape[1] != len(geo.bands) or truth.shape[2] != truth.shape[3]:
        raise ValueError(f"truth_values: truth {truth.shape}, expected [B, C, N, N]")
    theta = model_pixel_arcsec(np.asarray(z_true, np.float64), geo.kpc_per_pixel, geo.cosmology)
    cols, _ = measure_posterior(truth[:, None], geo.kpc_per_pixel, theta, geo.bands)
    return {k: cols[k] for k in QUANTITIES}


def psf_hwhm_arcsec(psf: np.ndarray, band: int, pixel_arcsec: float) -> np.ndarray:
    """Half width at half maximum (arcsec) of each object's PSF psf[B,C,P,P] in ``band``."""
    psf = np.asarray(psf)
    return np.array([0.5 * psf_fwhm_pixels(p[band]) * pixel_arcsec for p in psf])


def object_table(
    rows: pd.DataFrame,
    truth: dict[str, np.ndarray],
    psf_hwhm: np.ndarray,
    mag_true: np.ndarray,
) -> pd.DataFrame:
    """One row per object: ``mag_true``, ``size_ratio`` (true r50 / PSF HWHM), ``status``,
    ``flags`` and per quantity q: ``q_true``, ``q`` (posterior median), ``q_p16``, ``q_p84``,
    ``q_obs``. ``rows``: the output catalog's rows in the same object order as ``truth``."""
    out = pd.DataFrame(
        {
            Col.OBJECT_ID: rows[Col.OBJECT_ID].to_numpy(),
            "mag_true": np.asarray(mag_true, np.float64),
            "psf_hwhm_arcsec": np.asarray(psf_hwhm, np.float64),
            Col.STATUS: rows[Col.STATUS].to_numpy(),
            Col.FLAGS: rows[Col.FLAGS].to_numpy(),
        }
    )
    out["size_ratio"] = truth[Col.R50_ARCSEC] / out["psf_hwhm_arcsec"]
    for q in QUANTITIES:
        out[f"{q}_true"] = truth[q]
        for col in (q, pct_col(q, PERCENTILES[0]), pct_col(q, PERCENTILES[1]), obs_col(q)):
            out[col] = rows[col].to_numpy(np.float64) if col in rows else np.nan
    return out


def errors(est: np.ndarray, true: np.ndarray, kind: str) -> np.ndarray:
    """est − true (``absolute``), (est − true)/true (``relative``) or the signed difference
    on the circle of period 180° (``angle``), NaN where either is."""
    est, true = np.asarray(est, np.float64), np.asarray(true, np.float64)
    if kind == "relative":
        return (est - true) / np.where(true > 0, true, np.nan)
    if kind == "angle":
        return np.mod(est - true + PA_PERIOD / 2, PA_PERIOD) - PA_PERIOD / 2
    if kind == "absolute":
        return est - true
    raise ValueError(f"unknown error kind {kind!r}")


def covered(lo: np.ndarray, hi: np.ndarray, med: np.ndarray, true: np.ndarray, kind: str):
    """Whether lo ≤ true ≤ hi (NaN where any is NaN); angles: the truth moved to the
    median's side of the circle first, as the percentiles are (``measure.catalog.summarise``)."""
    lo, hi, med, true = (np.asarray(a, np.float64) for a in (lo, hi, med, true))
    if kind == "angle":
        true = med + errors(true, med, "angle")
    ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(true)
    return np.where(ok, (lo <= true) & (true <= hi), np.nan)


def fit_col(name: str) -> str:
    """The PSF-convolved Sérsic fit's value (``validation.sersic_fit``), e.g. ``r50_arcsec_fit``."""
    return f"{name}_fit"


def _usable(table: pd.DataFrame, q: str) -> pd.Series:
    keep = table[Col.STATUS] == "ok"
    if QUANTITIES[q] == "angle":
        keep &= table[f"{Col.AXIS_RATIO}_true"] < PA_MAX_AXIS_RATIO
    return keep & np.isfinite(table[f"{q}_true"])


def _stats(err: np.ndarray) -> dict[str, float]:
    e = err[np.isfinite(err)]
    if e.size == 0:
        return {"n": 0, "bias": np.nan, "scatter": np.nan, "median_abs": np.nan}
    med = float(np.median(e))
    return {
        "n": int(e.size),
        "bias": med,
        "scatter": float(1.4826 * np.median(np.abs(e - med))),
        "median_abs": float(np.median(np.abs(e))),
    }


def summary_rows(
    table: pd.DataFrame, by: str, edges: Sequence[float], quantities: Iterable[str] = QUANTITIES
) -> list[dict]:
    """Per quantity and bin of column ``by`` (``edges``; plus one bin "all"): the posterior's
    and the observed image's error statistics and the 16–84 % interval's coverage."""
    out = []
    bins = [(lo, hi) for lo, hi in itertools.pairwise(edges)] + [(-np.inf, np.inf)]
    for q in quantities:
        kind = QUANTITIES[q]
        t = table[_usable(table, q)]
        for lo, hi in bins:
            s = t[(t[by] >= lo) & (t[by] < hi)]
            true = s[f"{q}_true"].to_numpy()
            row = {"quantity": q, "error": kind, by: "all" if np.isinf(hi) and np.isinf(lo)
                   else f"{lo:g}-{hi:g}", "n_objects": len(s)}  # fmt: skip
            for who, col in (("post", q), ("obs", obs_col(q)), ("fit", fit_col(q))):
                if col not in s:
                    continue
                row |= {f"{who}_{k}": v for k, v in _stats(errors(s[col], true, kind)).items()}
                if who != "obs":
                    cov = covered(s[pct_col(col, 16)], s[pct_col(col, 84)], s[col], true, kind)
                    cov = cov[np.isfinite(cov)]
                    row[f"{who}_coverage_16_84"] = float(cov.mean()) if cov.size else np.nan
            out.append(row)
    return out


def done_when(table: pd.DataFrame) -> dict[str, dict]:
    """Issue 31's criteria that this data can decide, each with the numbers behind it.

    - ``r50_small``: galaxies with true r50 < 2 × PSF HWHM at i ≤ 22: the posterior r50's
      median absolute relative error ≤ half the observed image's, and its 16–84 % interval
      holds the truth for 60–76 % of them;
    - ``axis_ratio``: the posterior's median absolute error below the observed image's in
      every i-magnitude bin with ≥ ``MIN_PER_BIN`` objects.
    """
    small = table[(table["size_ratio"] < 2.0) & (table["mag_true"] <= 22.0)]
    (stats,) = summary_rows(small, "mag_true", (), [Col.R50_ARCSEC])  # its one bin: "all"
    post, obs = stats["post_median_abs"], stats["obs_median_abs"]
    cov_v = stats["post_coverage_16_84"]
    r50 = {
        "n": stats["n_objects"],
        "post_median_abs_rel": post,
        "obs_median_abs_rel": obs,
        "ratio": post / obs if obs > 0 else np.nan,
        "post_coverage_16_84": cov_v,
        "passed": bool(post <= 0.5 * obs and 0.60 <= cov_v <= 0.76),
    }
    rows = [
        r
        for r in summary_rows(table, "mag_true", MAG_EDGES, [Col.AXIS_RATIO])
        if r["mag_true"] != "all" and r["post_n"] >= MIN_PER_BIN
    ]
    q_ok = [r["post_median_abs"] < r["obs_median_abs"] for r in rows]
    axis = {
        "bins": {
            r["mag_true"]: [r["post_median_abs"], r["obs_median_abs"], r["post_n"]] for r in rows
        },
        "passed": bool(rows) and all(q_ok),
    }
    out = {"r50_small": r50, "axis_ratio": axis}
    if fit_col(Col.R50_ARCSEC) in table:
        rows = [
            r
            for r in summary_rows(table, "mag_true", MAG_EDGES, [Col.R50_ARCSEC])
            if r["post_n"] >= MIN_PER_BIN or r["mag_true"] == "all"
        ]
        per_mag = {r["mag_true"]: {k: r[k] for k in ("post_median_abs", "fit_median_abs",
                                                     "post_coverage_16_84",
                                                     "fit_coverage_16_84", "post_n", "fit_n")}
                   for r in rows}  # fmt: skip
        bins = [v for k, v in per_mag.items() if k != "all"]
        whole = per_mag["all"]
        out["r50_vs_sersic_fit"] = {
            "per_mag": per_mag,
            "passed": bool(bins)
            and all(v["post_median_abs"] <= v["fit_median_abs"] for v in bins)
            and whole["post_coverage_16_84"] > whole["fit_coverage_16_84"],
        }
    return out


def sersic_columns(arrays, band: int, n_model: int, geo: Geometry) -> dict[str, np.ndarray]:
    """The PSF-convolved Sérsic fit of a pack's observed stamps in ``band``
    (``validation.sersic_fit``): ``fit_col(q)`` with its 16/84 % columns per quantity, and
    ``sersic_n_fit``, ``sersic_n_fit_err``, ``sersic_chi2_dof``, ``sersic_converged``."""
    from d4a_batch.validation.sersic_fit import derived_measurements, fit_sersic

    img = np.asarray(arrays[IMAGE])[:, band]
    fit = fit_sersic(img, np.asarray(arrays[VARIANCE])[:, band],
                     np.asarray(arrays[VALID])[:, band].astype(bool), np.asarray(arrays[PSF])[:, band],
                     np.asarray(arrays[OFFSET]))  # fmt: skip
    cols = derived_measurements(fit, np.asarray(arrays[SCALE]), n_model, geo.kpc_per_pixel,
                                geo.hsc_pixel_arcsec)  # fmt: skip
    out = {"sersic_n_fit": fit.n, "sersic_n_fit_err": fit.n_err, "sersic_chi2_dof": fit.chi2_dof,
           "sersic_converged": fit.converged}  # fmt: skip
    for q in QUANTITIES:
        out[fit_col(q)] = cols[q]
        for pc in PERCENTILES:
            out[pct_col(fit_col(q), pc)] = cols[pct_col(q, pc)]
    return out


def pack_table(pack, geo: Geometry, sersic: bool = False) -> pd.DataFrame:
    """``object_table`` of one sampled pack ``(arrays, rows, maps, truths)``
    (``validation.science.read_sampled_pack``), with the Sérsic fit's columns
    (``sersic_columns``) if ``sersic``."""
    arrays, rows, _, truths = pack
    ids = [int(v) for v in arrays[Col.OBJECT_ID]]
    rows = rows.set_index(Col.OBJECT_ID).loc[ids].reset_index()
    truth = np.stack([truths[i]["truth"] for i in ids])
    z_true = np.array([truths[i]["z_true"] for i in ids])
    mag = np.array([truths[i]["i_mag_true"] for i in ids])
    band = measurement_band(geo.bands)
    hwhm = psf_hwhm_arcsec(arrays[PSF], band, geo.hsc_pixel_arcsec)
    table = object_table(rows, truth_values(truth, z_true, geo), hwhm, mag)
    if sersic:
        for k, v in sersic_columns(arrays, band, truth.shape[-1], geo).items():
            table[k] = v
    return table


def figure(table: pd.DataFrame, path) -> None:
    """Posterior median (with its 16–84 % interval) and observed value against the truth for
    r50 (arcsec) and the axis ratio, and r50's relative error against the size / PSF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, q, log in ((axes[0], Col.R50_ARCSEC, True), (axes[1], Col.AXIS_RATIO, False)):
        t = table[_usable(table, q)]
        true = t[f"{q}_true"]
        yerr = np.abs(np.stack([t[q] - t[pct_col(q, 16)], t[pct_col(q, 84)] - t[q]]))
        ax.errorbar(true, t[q], yerr=yerr, fmt="o", ms=3, lw=0.6, color="C0",
                    label="posterior median, 16–84 %")  # fmt: skip
        ax.plot(true, t[obs_col(q)], "x", ms=4, color="C3", label="observed HSC stamp")
        if fit_col(q) in t:
            ax.plot(true, t[fit_col(q)], "+", ms=5, color="C2", label="PSF-convolved Sérsic fit")
        lim = [np.nanmin(true) * (0.7 if log else 0.9), np.nanmax(true) * (1.4 if log else 1.05)]
        ax.plot(lim, lim, "k-", lw=0.8)
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(f"true {q}")
        ax.set_ylabel(q)
        ax.legend(fontsize=8)
    ax = axes[2]
    q = Col.R50_ARCSEC
    t = table[_usable(table, q)]
    ax.plot(t["size_ratio"], errors(t[q], t[f"{q}_true"], "relative"), "o", ms=3, color="C0",
            label="posterior")  # fmt: skip
    ax.plot(t["size_ratio"], errors(t[obs_col(q)], t[f"{q}_true"], "relative"), "x", ms=4,
            color="C3", label="observed")  # fmt: skip
    if fit_col(q) in t:
        ax.plot(t["size_ratio"], errors(t[fit_col(q)], t[f"{q}_true"], "relative"), "+", ms=5,
                color="C2", label="Sérsic fit")  # fmt: skip
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(2, color="0.5", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("true r50 / PSF HWHM (i)")
    ax.set_ylabel("r50: (estimate − truth) / truth")
    ax.legend(fontsize=8)
    fig.suptitle(f"catalog measurements against the truth, {int((table[Col.STATUS] == 'ok').sum())} "
                 "held-out mocks")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
