"""Figures: one object's posterior, a run's catalog report, the validation experiments.

Images are shown as the paper shows them: the asinh stretch of the model,
asinh(F / (a·m)) / asinh(1 / a) with a = 0.01 (``PriorConfig.stretch.a``), clipped to [0, 1]
(``asinh_rgb``), as RGB = (i, r, g) for bands g, r, i. Panels of one grid (model or stamp)
share one per-band normaliser m, so they are comparable. Figures use matplotlib's object
API (no pyplot state) and are written at exactly ``figsize · dpi`` pixels.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Rectangle

from d4a_batch.config import FlagThresholds
from d4a_batch.physics.stretch import DEFAULT_A
from d4a_batch.quality.regions import normalised_residual
from d4a_batch.schema import Col, Flag, Status, band_col, obs_col, pct_col

DPI = 100
RESIDUAL_RANGE = 5.0  # residual/sigma colour scale: ±this
_RESID_CMAP = colormaps["RdBu_r"].with_extremes(bad="0.6")  # unused pixels grey


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi)
    return path


def band_norm(img: np.ndarray, percentile: float = 99.9) -> np.ndarray:
    """Per-band normaliser m[C] of img[C,H,W]: a high percentile of each band (> 0)."""
    m = np.nanpercentile(np.asarray(img, dtype=np.float64), percentile, axis=(-2, -1))
    return np.where(m > 0, m, 1.0)


def asinh_rgb(img: np.ndarray, norm: np.ndarray | None = None, a: float = DEFAULT_A) -> np.ndarray:
    """img[C,H,W] (C = 1 or 3, bands blue to red) -> RGB [H,W,3] in [0, 1] (asinh stretch)."""
    img = np.asarray(img, dtype=np.float64)
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"asinh_rgb: expected [1 or 3, H, W], got {img.shape}")
    m = band_norm(img) if norm is None else np.asarray(norm, dtype=np.float64)
    x = np.arcsinh(np.nan_to_num(img) / (a * m.reshape(-1, 1, 1))) / np.arcsinh(1.0 / a)
    x = np.clip(x, 0.0, 1.0)
    rgb = x[::-1] if img.shape[0] == 3 else np.repeat(x, 3, axis=0)
    return np.moveaxis(rgb, 0, -1)


def _show(ax, rgb_or_map, title: str, **kw):
    im = ax.imshow(rgb_or_map, origin="lower", interpolation="nearest", **kw)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def object_figure(
    path: str | os.PathLike,
    *,
    observation: np.ndarray,
    variance: np.ndarray,
    valid: np.ndarray,
    reconvolved: np.ndarray,
    mean_flux: np.ndarray,
    std_flux: np.ndarray,
    variance_ratio: np.ndarray,
    samples_flux: np.ndarray,
    truth: np.ndarray | None = None,
    title: str = "",
    notes: Sequence[str] = (),
    aperture_radius_frac: float = 30 / 256,
    a: float = DEFAULT_A,
    figsize: tuple[float, float] = (12.0, 9.0),
    dpi: int = DPI,
    segmap: np.ndarray | None = None,
    target: int = 0,
    neighbour_mask: np.ndarray | None = None,
    footprint: float | None = None,
    offset: tuple[float, float] = (0.0, 0.0),
    flag_reasons: str = "",
) -> Path:
    """One object's posterior on a grid of 4 columns; returns the PNG path.

    Stamp grid (counts per HSC pixel, [C,H,W]): ``observation``, ``variance``, ``valid``
    (the pixels the likelihood used), ``reconvolved`` (PSF ⊛ R(mean) + background,
    ``validation.metrics.reconvolve``). Model grid ([C,N,N], counts per model pixel):
    ``mean_flux``, ``std_flux``, ``truth`` (optional), ``samples_flux[K,C,N,N]`` (up to 4
    shown); ``variance_ratio[N,N]``. Detection (optional, ``quality.detection``): ``segmap``
    [H,W] with the ``target`` segment, ``neighbour_mask`` [H,W] (pixels masked for
    neighbours), ``footprint`` (model footprint side, HSC pixels) around the object at
    ``offset`` (dy, dx) from the stamp centre.
    Panels, only those with data: observation (masked pixels grey, neighbour-masked ones
    hatched in red, the model footprint outlined), segmentation, re-convolved mean,
    residual/σ (band mean over used pixels; unused pixels grey), posterior std, posterior
    mean, truth, variance ratio with the score aperture, samples; below them ``notes`` and
    the flags with their reasons (``flag_reasons``, "; "-separated), wrapped.
    """
    obs = np.where(valid, observation, np.nan)
    sky = np.nanmedian(obs, axis=(-2, -1), keepdims=True)
    stamp_norm = band_norm(obs - sky)
    model_norm = band_norm(mean_flux if truth is None else truth)
    chi = normalised_residual(observation, reconvolved, variance, valid)  # as POOR_FIT's
    n_valid = np.isfinite(chi).sum(0)
    chi = np.nan_to_num(chi, nan=0.0)
    resid = np.where(n_valid > 0, chi.sum(0) / np.maximum(n_valid, 1), np.nan)
    h, w = observation.shape[-2:]
    k_show = min(4, samples_flux.shape[0])
    panels: list[str] = ["observation"] + (["segmentation"] if segmap is not None else [])
    panels += ["reconvolved", "residual", "std", "mean"]
    panels += (["truth"] if truth is not None else []) + ["ratio"]
    panels += [f"sample{k}" for k in range(k_show)]
    cols = 4
    rows = -(-len(panels) // cols)
    width = max(40, int(figsize[0] * 12))  # characters per line: 8 pt monospace, 80 % wide
    lines = [*notes]
    for reason in [r.strip() for r in flag_reasons.split(";") if r.strip()]:
        lines += textwrap.wrap(reason, width, subsequent_indent="    ")
    # the text panel grows with its lines (about 0.05 of a panel row each), the figure with it
    text_rows = max(0.55, 0.052 * len(lines))
    height = figsize[1] * (rows + text_rows) / (rows + 0.55)
    fig = Figure(figsize=(figsize[0], height), dpi=dpi)
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[1.0] * rows + [text_rows])
    n = variance_ratio.shape[-1]

    def outline(ax):
        if footprint is not None and np.isfinite(footprint):
            cy, cx = h / 2 + offset[0] - 0.5, w / 2 + offset[1] - 0.5  # pixel-centre coords
            ax.add_patch(Rectangle((cx - footprint / 2, cy - footprint / 2), footprint,
                                   footprint, fill=False, ec="yellow", lw=1, ls="--"))  # fmt: skip
            ax.set_xlim(-0.5, w - 0.5)
            ax.set_ylim(-0.5, h - 0.5)

    def draw(ax, name):
        if name == "observation":
            rgb = asinh_rgb(np.nan_to_num(obs - sky), stamp_norm, a)
            rgb[~valid.any(0)] = 0.5
            _show(ax, rgb, "observation (grey: unused)")
            if neighbour_mask is not None and neighbour_mask.any():
                ax.contourf(neighbour_mask.astype(float), levels=[0.5, 1.5], colors="none",
                            hatches=["////"], origin="lower")  # fmt: skip
                ax.contour(neighbour_mask.astype(float), levels=[0.5], colors="red",
                           linewidths=0.8, origin="lower")  # fmt: skip
            outline(ax)
        elif name == "segmentation":
            seg = np.where(segmap == target, -1, segmap).astype(float)
            seg[segmap == 0] = np.nan
            n_seg = int(segmap.max())
            ax.set_facecolor("black")  # background: black; target: white; others: colours
            _show(ax, seg, f"segmentation ({n_seg} sources; target white)", cmap="tab20",
                  vmin=0, vmax=max(n_seg, 1))  # fmt: skip
            ax.imshow(np.where(segmap == target, 1.0, np.nan), origin="lower", cmap="gray",
                      vmin=0, vmax=1, interpolation="nearest")  # fmt: skip
            if neighbour_mask is not None and neighbour_mask.any():
                ax.contour(neighbour_mask.astype(float), levels=[0.5], colors="red",
                           linewidths=0.8, origin="lower")  # fmt: skip
            outline(ax)
        elif name == "reconvolved":
            _show(ax, asinh_rgb(reconvolved - sky, stamp_norm, a), "re-convolved mean")
            outline(ax)
        elif name == "residual":
            im = _show(ax, np.ma.masked_invalid(np.where(n_valid > 0, resid, np.nan)),
                       "residual / σ (used pixels)", cmap=_RESID_CMAP,
                       vmin=-RESIDUAL_RANGE, vmax=RESIDUAL_RANGE)  # fmt: skip
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            outline(ax)
        elif name == "std":
            _show(ax, asinh_rgb(std_flux, band_norm(std_flux), a), "posterior std (own scale)")
        elif name == "mean":
            _show(ax, asinh_rgb(mean_flux, model_norm, a), "posterior mean")
        elif name == "truth":
            _show(ax, asinh_rgb(truth, model_norm, a), "truth")
        elif name == "ratio":
            im = _show(ax, variance_ratio, "variance ratio", cmap="magma", vmin=0)
            ax.add_patch(Circle((n / 2 - 0.5, n / 2 - 0.5), aperture_radius_frac * n,
                                fill=False, ec="cyan", lw=1))  # fmt: skip
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        else:
            k = int(name[len("sample") :])
            _show(ax, asinh_rgb(samples_flux[k], model_norm, a), f"sample {k}")

    for i, name in enumerate(panels):
        draw(fig.add_subplot(grid[i // cols, i % cols]), name)
    text_ax = fig.add_subplot(grid[rows, :])
    text_ax.axis("off")
    text_ax.text(0.0, 1.0, "\n".join(lines) if lines else "no flags", va="top", ha="left",
                 fontsize=8, family="monospace", transform=text_ax.transAxes)  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def run_report(
    path: str | os.PathLike,
    catalog: pd.DataFrame,
    bands: Sequence[str] = ("g", "r", "i"),
    thresholds: FlagThresholds | None = None,
    figsize: tuple[float, float] = (15.0, 9.0),
    dpi: int = DPI,
) -> Path:
    """Distribution of scores and flags over an output catalog (``schema.Col`` columns).

    Panels: hallucination score, reduced χ², upsampling factor (with their flag
    thresholds), flag and status counts, score against the reddest band's magnitude,
    masked fraction, and the posterior half-light radius and axis ratio (median, 16-84 %)
    against the observed stamp's (issue 31: what deconvolution changed; empty without those
    columns).
    """
    t = thresholds or FlagThresholds()
    ok = catalog[catalog[Col.STATUS] == Status.OK.value]
    fig = Figure(figsize=(figsize[0] * 4 / 3, figsize[1]), dpi=dpi)
    grid = fig.subplots(2, 4)
    axes = grid[:, :3]
    _posterior_vs_observed(grid[0, 3], ok, Col.R50_KPC, "r50 (kpc)")
    _posterior_vs_observed(grid[1, 3], ok, Col.AXIS_RATIO, "axis ratio b/a")

    def hist(ax, values, label, limit=None, log=False):
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        if log:
            v = v[v > 0]
        if v.size:
            bins = np.geomspace(v.min(), v.max() * 1.0001, 20) if log and v.min() < v.max() else 20
            ax.hist(v, bins=bins, color="0.4")
        if log:
            ax.set_xscale("log")
        if limit is not None:
            ax.axvline(limit, color="red", ls="--", lw=1, label="flag threshold")
            ax.legend(fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("objects")

    hist(axes[0, 0], ok[Col.HALLUCINATION], "hallucination score", t.hallucination_max)
    hist(axes[0, 1], ok[Col.CHI2], "reduced χ² of the re-convolved mean", t.chi2_max, log=True)
    hist(axes[0, 2], ok[Col.UPSAMPLING], "upsampling factor u", t.upsampling_max)
    flags = catalog[Col.FLAGS].fillna(0).astype(np.int64).to_numpy()
    names = [f.name for f in Flag]
    counts = [int(((flags & f.value) != 0).sum()) for f in Flag]
    names.append("status=error")
    counts.append(int((catalog[Col.STATUS] == Status.ERROR.value).sum()))
    axes[1, 0].barh(names, counts, color="0.4")
    axes[1, 0].set_xlabel("objects")
    axes[1, 0].tick_params(axis="y", labelsize=7)
    mag_col = band_col(Col.MAG, bands[-1])
    if mag_col in ok:
        flagged = ok[Col.FLAGS].fillna(0).astype(np.int64) != 0
        for sel, colour, label in (
            (~flagged, "tab:blue", "no flag"),
            (flagged, "tab:red", "flagged"),
        ):
            axes[1, 1].scatter(ok.loc[sel, mag_col], ok.loc[sel, Col.HALLUCINATION], s=12,
                               color=colour, label=f"{label} ({int(sel.sum())})")  # fmt: skip
        axes[1, 1].axhline(t.hallucination_max, color="red", ls="--", lw=1)
        axes[1, 1].set_xlabel(f"{mag_col} (posterior)")
        axes[1, 1].set_ylabel("hallucination score")
        axes[1, 1].legend(fontsize=8)
    hist(axes[1, 2], ok[Col.MASKED_FRACTION], "masked fraction", t.masked_fraction_max)
    fig.suptitle(
        f"{len(catalog)} objects: {len(ok)} ok, {int((flags != 0).sum())} flagged, "
        f"{len(catalog) - len(ok)} errors",
        fontsize=11,
    )
    fig.tight_layout()
    return _save(fig, path)


def _posterior_vs_observed(ax, ok: pd.DataFrame, col: str, label: str) -> None:
    """A measurement's posterior median (16-84 % bars) against the observed stamp's value,
    with the one-to-one line (for r50: points below it are galaxies the seeing enlarged)."""
    post, lo, hi, obs = col, pct_col(col, 16), pct_col(col, 84), obs_col(col)
    ax.set_xlabel(f"{label}, observed stamp")
    ax.set_ylabel(f"{label}, posterior (16-84 %)")
    if not {post, lo, hi, obs} <= set(ok.columns):
        ax.text(0.5, 0.5, f"no {col} columns", ha="center", va="center", transform=ax.transAxes)
        return
    d = ok[[post, lo, hi, obs, Col.FLAGS]].apply(pd.to_numeric, errors="coerce")
    d = d[np.isfinite(d[[post, obs]]).all(axis=1)]
    if d.empty:
        ax.text(0.5, 0.5, f"no measured {col}", ha="center", va="center", transform=ax.transAxes)
        return
    clean = d[Col.FLAGS].fillna(0).astype(np.int64) == 0
    for sel, colour, name in ((clean, "tab:blue", "no flag"), (~clean, "tab:red", "flagged")):
        g = d[sel]
        err = np.clip([g[post] - g[lo], g[hi] - g[post]], 0, None)
        ax.errorbar(g[obs], g[post], yerr=err, fmt="o", ms=3, color=colour, lw=0.8,
                    label=f"{name} ({len(g)})")  # fmt: skip
    top = float(np.nanmax(d[[post, obs, hi]].to_numpy()))
    ax.plot([0, top], [0, top], color="0.5", lw=0.8, ls="--", label="one to one")
    ax.legend(fontsize=8)


def magnitude_figure(
    path: str | os.PathLike,
    magnitudes: Sequence[float],
    snr: Sequence[float],
    observation: np.ndarray,
    mean_flux: np.ndarray,
    variance_ratio: np.ndarray,
    scores: Sequence[float],
    truth: np.ndarray | None = None,
    a: float = DEFAULT_A,
    dpi: int = DPI,
) -> Path:
    """The magnitude experiment: per magnitude (columns) the observation, the posterior mean
    and the variance-ratio map (one colour scale), plus the truth when given.

    observation [M,C,H,W], mean_flux [M,C,N,N], variance_ratio [M,N,N], truth [M,C,N,N].
    Each column's images share the normaliser of its brightest model image.
    """
    m_count = len(magnitudes)
    rows = 3 + (truth is not None)
    fig = Figure(figsize=(2.4 * m_count + 1.0, 2.4 * rows), dpi=dpi)
    axes = fig.subplots(rows, m_count, squeeze=False)
    vmax = float(np.nanmax(variance_ratio))
    im = None
    for k in range(m_count):
        ref = mean_flux[k] if truth is None else truth[k]
        norm = band_norm(ref)
        obs_norm = band_norm(observation[k])
        _show(
            axes[0, k],
            asinh_rgb(observation[k], obs_norm, a),
            f"m={magnitudes[k]:g}  S/N={snr[k]:.1f}",
        )
        _show(axes[1, k], asinh_rgb(mean_flux[k], norm, a), "posterior mean")
        im = _show(
            axes[2, k],
            variance_ratio[k],
            f"var. ratio, score {scores[k]:.3f}",
            cmap="magma",
            vmin=0,
            vmax=vmax,
        )
        if truth is not None:
            _show(axes[3, k], asinh_rgb(truth[k], norm, a), "truth")
    fig.colorbar(im, ax=axes[2, :].tolist(), fraction=0.02, pad=0.01)
    return _save(fig, path)


def science_figure(path: str | os.PathLike, table: pd.DataFrame, dpi: int = DPI) -> Path:
    """Benchmark summary over objects with known truth: PSNR of the posterior mean against
    Richardson-Lucy and the resampled observation; hallucination score, coverage and χ²
    against S/N. ``table`` columns: snr, psnr_mean, psnr_rl, psnr_obs, hallucination,
    coverage68, coverage95, chi2."""
    fig = Figure(figsize=(14.0, 8.0), dpi=dpi)
    axes = fig.subplots(2, 2)
    snr = table["snr"].to_numpy()
    for name, style in (("psnr_mean", "o"), ("psnr_rl", "s"), ("psnr_obs", "^")):
        axes[0, 0].scatter(snr, table[name], marker=style, s=16, label=name.split("_")[1])
    axes[0, 0].set_xscale("log")
    axes[0, 0].set_xlabel("S/N (aperture)")
    axes[0, 0].set_ylabel("PSNR vs truth (dB)")
    axes[0, 0].legend(fontsize=8)
    axes[0, 1].scatter(snr, table["hallucination"], s=16, color="k")
    axes[0, 1].set_xscale("log")
    axes[0, 1].set_xlabel("S/N (aperture)")
    axes[0, 1].set_ylabel("hallucination score")
    axes[1, 0].scatter(snr, table["coverage68"], s=16, label="68% interval")
    axes[1, 0].scatter(snr, table["coverage95"], s=16, label="95% interval")
    for p in (0.68, 0.95):
        axes[1, 0].axhline(p, color="0.5", ls="--", lw=1)
    axes[1, 0].set_xscale("log")
    axes[1, 0].set_ylim(0, 1)
    axes[1, 0].set_xlabel("S/N (aperture)")
    axes[1, 0].set_ylabel("coverage of core pixels")
    axes[1, 0].legend(fontsize=8)
    axes[1, 1].scatter(snr, table["chi2"], s=16, color="k")
    axes[1, 1].axhline(1.0, color="0.5", ls="--", lw=1)
    axes[1, 1].set_xscale("log")
    axes[1, 1].set_yscale("log")
    axes[1, 1].set_xlabel("S/N (aperture)")
    axes[1, 1].set_ylabel("reduced χ² (re-convolved mean)")
    fig.tight_layout()
    return _save(fig, path)
