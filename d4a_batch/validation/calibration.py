"""Calibration of posterior samples, measured: coverage, PIT, TARP (fitted λ: ``conformal.py``).

Inputs for G galaxies: samples[G,S,C,N,N] (flux space, counts per model pixel, or x-space:
every function is agnostic), truth[G,C,N,N], and an S/N per galaxy (the catalog's
``Col.SNR``, ``sampling.calibrate.observed_snr``, or the truth's S/N in a benchmark).

Two interval families are measured:
- ``"quantile"``: the equal-tailed interval between the samples' empirical (1 − p)/2 and
  (1 + p)/2 quantiles (``metrics.interval_coverage``), the raw sampler's own interval;
- ``"gauss"``: mean ± λ·z_p·std (std with ddof = 1, z_p = Φ⁻¹((1 + p)/2)). **The catalog
  uses this family** (it stores mean and std, and the calibrated half-width
  λ·z_p·std_flux), so λ is fitted for it; λ = 1 is the raw sampler's Gaussian interval.

Coverage is reported per galaxy (the fraction of selected pixels, all bands, inside the
interval), as the mean over galaxies, and pooled over all pixels of the bin; for the
``core`` (the hallucination score's aperture) and the whole ``stamp``.

PIT (rank) histogram: the rank of the truth among the S samples per pixel (0..S; S + 1
values, flat for a calibrated posterior; U-shaped when the samples are too narrow, hump-shaped
when too wide, tilted under bias). TARP (Lemos et al. 2023): ``tarp.get_tarp_coverage`` on
patches (patch × patch pixels × C bands as one vector per patch, every patch of every galaxy
one simulation; normalised per dimension as the package does with ``norm=True``); the
expected coverage probability (ECP) lies on the diagonal for a calibrated posterior.

The fitted side, λ per S/N bin (the conformal layer: ``fit_lambda``, ``fit_calibration``),
is in ``validation/conformal.py``; it reads its inputs with this module's ``_check``,
``_selection`` and ``snr_bins``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from d4a_batch.prior.calibration import level_key, z_score
from d4a_batch.validation.metrics import COVERAGE_LEVELS


# --------------------------------------------------------------------------- inputs
def _check(samples: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """samples[G,S,...] (S ≥ 2) and truth[G,...] as float64."""
    s = np.asarray(samples, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    if s.ndim < 3 or s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[1:] or s.shape[1] < 2:
        raise ValueError(f"expected samples [G, S>=2, *{t.shape[1:]}], got {s.shape}")
    return s, t


def _selection(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """bool selection of one galaxy's pixels [C,N,N] from a mask [N,N] / [C,N,N] / None."""
    sel = np.ones(shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), shape)
    if not sel.any():
        raise ValueError("the mask selects no pixel")
    return sel


# --------------------------------------------------------------------------- measurement
def outside(
    samples: np.ndarray,
    truth: np.ndarray,
    level: float,
    kind: str = "gauss",
    lam: float | np.ndarray = 1.0,
) -> np.ndarray:
    """bool [G,C,N,N]: truth outside the per-pixel interval of ``level``.

    ``kind="gauss"``: |t − mean| > λ·z_p·std (λ scalar or [G]); ``"quantile"``: outside the
    equal-tailed empirical interval (λ unused).
    """
    s, t = _check(samples, truth)
    if kind == "quantile":
        lo, hi = np.quantile(s, [(1 - level) / 2, (1 + level) / 2], axis=1)
        return (t < lo) | (t > hi)
    if kind != "gauss":
        raise ValueError(f"kind must be 'gauss' or 'quantile', got {kind!r}")
    lam = np.asarray(lam, dtype=np.float64).reshape((-1,) + (1,) * (t.ndim - 1))
    half = lam * z_score(level) * s.std(axis=1, ddof=1)
    return np.abs(t - s.mean(axis=1)) > half


def coverage_per_galaxy(
    samples: np.ndarray,
    truth: np.ndarray,
    level: float,
    mask: np.ndarray | None = None,
    kind: str = "gauss",
    lam: float | np.ndarray = 1.0,
) -> np.ndarray:
    """[G] fraction of each galaxy's selected pixels inside the interval (see ``outside``)."""
    out = outside(samples, truth, level, kind, lam)
    sel = _selection(mask, out.shape[1:])
    return 1.0 - out[:, sel].mean(axis=1)


def pit_ranks(samples: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Ranks 0..S of the truth among the samples at every selected pixel (flattened, int).

    Ties (e.g. clipped samples equal to the truth) get a rank drawn uniformly among the tied
    positions from a fixed-seed generator, so a degenerate pixel does not pile up in one bin.
    """
    s, t = _check(samples, truth)
    sel = _selection(mask, t.shape[1:])
    sv, tv = s[:, :, sel], t[:, sel]  # [G,S,P], [G,P]
    below = (sv < tv[:, None]).sum(1)
    ties = (sv == tv[:, None]).sum(1)
    rng = np.random.default_rng(0)
    return (below + np.floor(rng.random(below.shape) * (ties + 1))).astype(np.int64).ravel()


def pit_histogram(ranks: np.ndarray, n_samples: int, bins: int | None = None) -> np.ndarray:
    """Density of the ranks in ``bins`` equal groups of the S + 1 rank values (1 = flat).

    ``bins`` must divide S + 1 (default S + 1: one bin per rank).
    """
    n_ranks = int(n_samples) + 1
    bins = n_ranks if bins is None else int(bins)
    if n_ranks % bins:
        raise ValueError(f"bins={bins} must divide S + 1 = {n_ranks}")
    counts = np.bincount(np.asarray(ranks, np.int64), minlength=n_ranks)[:n_ranks]
    grouped = counts.reshape(bins, -1).sum(1).astype(np.float64)
    return grouped / max(grouped.mean(), 1e-300)


def patches(images: np.ndarray, patch: int, region: str = "core", core_radius: float = 0.0):
    """Vectors of patch × patch pixels × all bands: images[..., C, N, N] -> [..., P, C·patch²].

    ``region="stamp"``: every patch of the N×N tiling; ``"core"``: the patches of the
    central square of side ≥ 2·core_radius (model pixels), rounded up to whole patches.
    """
    a = np.asarray(images)
    c, n = a.shape[-3], a.shape[-1]
    if region == "core":
        side = min(n, patch * math.ceil(2 * core_radius / patch))
        side = max(side, patch)
        lo = (n - side) // 2
        a = a[..., lo : lo + side, lo : lo + side]
    elif region != "stamp":
        raise ValueError(f"region must be 'core' or 'stamp', got {region!r}")
    m = a.shape[-1] // patch
    a = a[..., : m * patch, : m * patch]
    lead = a.shape[:-3]
    a = a.reshape(*lead, c, m, patch, m, patch)
    k = len(lead)
    a = a.transpose(*range(k), k + 1, k + 3, k, k + 2, k + 4)  # [..., m, m, C, patch, patch]
    return a.reshape(*lead, m * m, c * patch * patch)


def tarp_curve(
    samples: np.ndarray,
    truth: np.ndarray,
    patch: int = 4,
    region: str = "core",
    core_radius: float = 8.0,
    bins: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """TARP expected coverage on patches: {"alpha", "ecp", "max_deviation", "n_sims", "dims"}.

    samples[G,S,C,N,N], truth[G,C,N,N]. ``bins`` credibility bins (default n_sims // 10,
    at most 50). ``max_deviation`` = max |ECP − α| (0 for perfect calibration; the
    Kolmogorov-like distance of the curve from the diagonal). numpy's global random state
    (which tarp seeds) is restored afterwards.
    """
    from tarp import get_tarp_coverage

    s, t = _check(samples, truth)
    ps = patches(s, patch, region, core_radius)  # [G,S,P,D]
    pt = patches(t, patch, region, core_radius)  # [G,P,D]
    g, n_s, p, d = ps.shape
    sims = np.moveaxis(ps, 1, 0).reshape(n_s, g * p, d)
    theta = pt.reshape(g * p, d)
    n_bins = bins or max(2, min(50, (g * p) // 10))
    refs = np.random.default_rng(seed).uniform(size=(g * p, d))  # in tarp's normalised cube
    state = np.random.get_state()  # noqa: NPY002  (tarp reseeds numpy's global generator)
    try:
        ecp, alpha = get_tarp_coverage(
            sims, theta, references=refs, metric="euclidean", num_alpha_bins=n_bins,
            norm=True, bootstrap=False, seed=seed,
        )  # fmt: skip
    finally:
        np.random.set_state(state)  # noqa: NPY002
    ecp, alpha = np.asarray(ecp, np.float64), np.asarray(alpha, np.float64)
    return {
        "alpha": alpha.tolist(),
        "ecp": ecp.tolist(),
        "max_deviation": float(np.max(np.abs(ecp - alpha))),
        "n_sims": int(g * p),
        "dims": int(d),
    }


def snr_bins(snr: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bin index per galaxy for ``edges`` (bins [e_k, e_k+1)); -1 outside."""
    e = np.asarray(edges, dtype=np.float64)
    s = np.asarray(snr, dtype=np.float64)
    idx = np.searchsorted(e, s, side="right") - 1
    return np.where(np.isfinite(s) & (idx >= 0) & (idx < e.size - 1), idx, -1)


def bin_label(edges: Sequence[float], k: int) -> str:
    return f"{edges[k]:g}–{edges[k + 1]:g}"


def calibration_report(
    samples: np.ndarray,
    truth: np.ndarray,
    snr: np.ndarray,
    edges: Sequence[float],
    core: np.ndarray,
    levels: Sequence[float] = COVERAGE_LEVELS,
    lambdas: dict[str, np.ndarray] | None = None,
    tarp_patch: int = 4,
    core_radius: float = 8.0,
    pit_bins: int | None = None,
) -> dict[str, Any]:
    """Coverage per S/N bin and pooled: {"bins": [...], "pooled": {...}, "per_galaxy": [...]}.

    For each group (every bin with galaxies, and all galaxies pooled): n; per level p the
    quantile-interval and Gaussian-interval (λ = 1) coverage of the core and the stamp (mean
    over galaxies and pooled over pixels); with ``lambdas`` ({level_key: λ per galaxy [G]},
    NaN where uncalibrated) the calibrated Gaussian coverage over the galaxies that have a λ;
    the PIT histogram of the core; the TARP curve of core patches. ``per_galaxy``: the same
    coverages per galaxy.
    """
    s, t = _check(samples, truth)
    g, n_s = s.shape[:2]
    snr = np.asarray(snr, dtype=np.float64).reshape(g)
    bins = snr_bins(snr, edges)
    stamp = np.ones(t.shape[-2:], bool)
    per: dict[str, np.ndarray] = {}
    for p in levels:
        k = level_key(p)
        for region, m in (("core", core), ("stamp", stamp)):
            per[f"cov{k}_{region}_quantile"] = coverage_per_galaxy(s, t, p, m, "quantile")
            per[f"cov{k}_{region}_gauss"] = coverage_per_galaxy(s, t, p, m, "gauss")
            if lambdas is not None and k in lambdas:
                lam = np.asarray(lambdas[k], np.float64).reshape(g)
                cal = np.full(g, np.nan)
                ok = np.isfinite(lam)
                if ok.any():
                    cal[ok] = coverage_per_galaxy(s[ok], t[ok], p, m, "gauss", lam[ok])
                per[f"cov{k}_{region}_calibrated"] = cal

    def group(idx: np.ndarray, label: str) -> dict[str, Any]:
        out: dict[str, Any] = {"snr_bin": label, "n": int(idx.size)}
        if idx.size == 0:
            return out
        out["snr_median"] = float(np.median(snr[idx]))
        for name, v in per.items():
            vals = v[idx]
            out[name] = float(np.nanmean(vals)) if np.isfinite(vals).any() else None
            out[f"{name}_min"] = float(np.nanmin(vals)) if np.isfinite(vals).any() else None
            out[f"{name}_max"] = float(np.nanmax(vals)) if np.isfinite(vals).any() else None
        ranks = pit_ranks(s[idx], t[idx], core)
        out["pit_core"] = pit_histogram(ranks, n_s, pit_bins).tolist()
        out["tarp_core"] = tarp_curve(s[idx], t[idx], tarp_patch, "core", core_radius)
        return out

    report = {
        "levels": list(levels),
        "snr_edges": [None if math.isinf(e) else float(e) for e in edges],
        "samples": int(n_s),
        # what the Gaussian interval of S samples covers when the posterior is exact
        # (Gaussian): the reference the measured cov*_gauss are read against
        "gauss_coverage_if_exact": {
            level_key(p): exact_gauss_coverage(p, n_s) if n_s > 1 else None for p in levels
        },
        "bins": [
            group(np.flatnonzero(bins == k), bin_label(edges, k)) for k in range(len(edges) - 1)
        ],
        "pooled": group(np.arange(g), "all"),
        "per_galaxy": [
            {"snr": float(snr[i]), "bin": int(bins[i]), **{k: float(v[i]) for k, v in per.items()}}
            for i in range(g)
        ],
    }
    return report


def exact_gauss_coverage(level: float, n_samples: int) -> float:
    """Coverage of mean ± z_p·std (std with ddof = 1) from S = ``n_samples`` draws of an
    exact Gaussian posterior: the truth and the S draws are i.i.d., so
    (t − mean)/(std·sqrt(1 + 1/S)) is Student-t with S − 1 degrees of freedom and the coverage
    is P(|T_{S−1}| ≤ z_p / sqrt(1 + 1/S)): 0.561 / 0.822 (68 / 95 %) at S = 4, 0.66 / 0.93 at
    S = 16. A raw coverage near this is a calibrated sampler seen through few samples; the
    calibrated λ then makes up the finite-S width (λ68 = 1.335 at S = 4)."""
    from scipy.stats import t as student_t

    if n_samples < 2:
        raise ValueError(f"needs at least 2 samples, got {n_samples}")
    c = z_score(level) / math.sqrt(1 + 1 / n_samples)
    return float(2 * student_t.cdf(c, df=n_samples - 1) - 1)


# --------------------------------------------------------------------------- engine output
def pack_inputs(
    arrays: dict[str, np.ndarray],
    rows: Any,
    maps: dict[str, np.ndarray],
    truth: dict[int, dict[str, Any]],
    stretch_a: float,
    ridge: float,
) -> dict[str, np.ndarray]:
    """Calibration inputs of one sampled pack (``validation.science.run_packs`` output).

    Returns flux samples [B,S,C,N,N] (``validation.samples.flux_samples`` of the kept
    samples), truth [B,C,N,N], the catalog's observed S/N ``Col.SNR`` [B] and the λ it
    applied (``Col.CALIB_LAMBDA68``/``95``; NaN without a matching calibration).
    """
    import torch

    from d4a_batch.pack_sampler import pack_observations
    from d4a_batch.schema import Col
    from d4a_batch.survey.packs import SCALE
    from d4a_batch.validation.samples import flux_samples

    ids = [int(v) for v in arrays[Col.OBJECT_ID]]
    flux, _ = flux_samples(
        maps[Col.SAMPLES_X],
        pack_observations(arrays, dtype=torch.float64),
        arrays[SCALE],
        stretch_a,
        ridge,
    )
    nan = np.full(len(ids), np.nan)
    return {
        "object_id": np.asarray(ids, np.int64),
        "flux": flux,
        "truth": np.stack([truth[i]["truth"] for i in ids]),
        "snr": np.asarray(rows[Col.SNR], np.float64) if Col.SNR in rows else nan,
        "68": np.asarray(rows[Col.CALIB_LAMBDA68], np.float64)
        if Col.CALIB_LAMBDA68 in rows
        else nan,
        "95": np.asarray(rows[Col.CALIB_LAMBDA95], np.float64)
        if Col.CALIB_LAMBDA95 in rows
        else nan,
    }


def engine_report(
    packs: Sequence[dict[str, np.ndarray]], edges: Sequence[float], core: np.ndarray, **kw: Any
) -> dict[str, Any]:
    """``calibration_report`` of the concatenated ``pack_inputs``, with the λ the catalog
    applied as the calibrated columns (raw and calibrated coverage side by side)."""
    cat = {k: np.concatenate([p[k] for p in packs]) for k in packs[0]}
    lam = {k: cat[k] for k in ("68", "95")}
    return calibration_report(cat["flux"], cat["truth"], cat["snr"], edges, core, lambdas=lam, **kw)
