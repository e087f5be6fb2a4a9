"""Calibration of posterior samples, fitted: the interval scale λ per S/N bin that the
catalog's calibrated columns apply (``fit_calibration``, written by
``jobs/calibrate_prior.py`` into the prior artifact's ``calibration.json``). What is measured
(coverage, PIT, TARP) and the shapes of the inputs: ``validation/calibration.py``.

Conformal layer (``fit_lambda``, risk-controlling prediction sets of Bates et al. 2021 as
used for image-to-image regression by Angelopoulos et al. 2022, arXiv 2202.05265): the loss
of galaxy g is L_g(λ) = fraction of its selected pixels outside mean ± λ·z_p·std, bounded in
[0, 1] and non-increasing in λ; galaxies are the exchangeable units (pixels of one galaxy are
not independent). λ̂ = the smallest λ on a grid such that the upper confidence bound
R⁺(λ') of the mean loss is ≤ α for every λ' ≥ λ, with the Hoeffding bound
R̂ + sqrt(log(1/δ)/(2n)), the Hoeffding-Bentkus bound (tighter for small risks), or the
Waudby-Smith–Ramdas betting bound (``"wsr"``, Bates et al. 2021 §3.1.3, Waudby-Smith & Ramdas
2024), which adapts to the losses' variance: the per-galaxy miscovered fractions spread far
less than the worst case [0, 1] that Hoeffding and Bentkus assume (std ≈ 0.1 here), so at
n ≈ 100 its slack is a few hundredths where Hoeffding's is 0.11 (a certified 68 % interval
would cover ≈ 0.79, outside any useful window); then
P(E[L(λ̂)] ≤ α) ≥ 1 − δ for new galaxies exchangeable with the calibration set. With few
galaxies the bound may never reach α: then λ̂ is None (e.g. n = 16, δ = 0.1 cannot certify
α = 0.05 even at zero empirical risk, since 1 − 0.1^(1/16) = 0.134). ``bound="none"`` gives
the plug-in λ (empirical risk ≤ α; no guarantee).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binom

from d4a_batch.prior.calibration import level_key, z_score
from d4a_batch.sampling.calibrate import degenerate_intervals
from d4a_batch.validation.calibration import _check, _selection, snr_bins
from d4a_batch.validation.metrics import COVERAGE_LEVELS

BOUNDS = ("wsr", "hb", "hoeffding", "none")
LAMBDA_GRID = np.exp(np.linspace(np.log(0.2), np.log(50.0), 801))


# --------------------------------------------------------------------------- fitting
def normalised_residuals(
    samples: np.ndarray, truth: np.ndarray, level: float, mask: np.ndarray | None = None
) -> np.ndarray:
    """[G,P] |t − mean| / (z_p · std) at the selected pixels: a pixel is outside the interval
    of scale λ iff this exceeds λ (inf where std = 0 and t ≠ mean)."""
    s, t = _check(samples, truth)
    sel = _selection(mask, t.shape[1:])
    dev = np.abs(t - s.mean(1))[:, sel]
    half = z_score(level) * s.std(1, ddof=1)[:, sel]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(half > 0, dev / np.where(half > 0, half, 1.0), np.where(dev > 0, np.inf, 0.0))
    return q


def losses(q: np.ndarray, grid: np.ndarray = LAMBDA_GRID) -> np.ndarray:
    """[G,L]: each galaxy's miscovered fraction L_g(λ) = mean(q_g > λ) on the λ grid."""
    q = np.sort(np.asarray(q, np.float64), axis=1)
    n = q.shape[1]
    below = np.stack([np.searchsorted(row, grid, side="right") for row in q])
    return 1.0 - below / n


def hoeffding_ucb(rhat: np.ndarray, n: int, delta: float) -> np.ndarray:
    """Hoeffding upper confidence bound of a mean of n losses in [0, 1]."""
    return np.minimum(1.0, np.asarray(rhat, np.float64) + math.sqrt(math.log(1 / delta) / (2 * n)))


def _h1(a: float, b: float) -> float:
    """Bernoulli KL divergence a·log(a/b) + (1−a)·log((1−a)/(1−b))."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = a * math.log(a / b) if a > 0 else 0.0
        t2 = (1 - a) * math.log((1 - a) / (1 - b)) if a < 1 else 0.0
    return t1 + t2


def hb_pvalue(rhat: float, n: int, risk: float) -> float:
    """Hoeffding-Bentkus p-value of H0: E[L] > risk given the empirical mean ``rhat`` of n losses
    in [0, 1] (Bates et al. 2021, eq. for p^HB)."""
    if risk >= 1:
        return 1.0
    if risk <= 0:
        return 0.0 if rhat > 0 else 1.0
    hoeff = math.exp(-n * _h1(min(rhat, risk), risk))
    bentkus = math.e * float(binom.cdf(math.ceil(n * rhat), n, risk))
    return min(hoeff, bentkus, 1.0)


def hb_ucb(rhat: float, n: int, delta: float, tol: float = 1e-6) -> float:
    """Hoeffding-Bentkus upper confidence bound: sup{R : p^HB(R) ≥ δ} (bisection)."""
    lo, hi = float(rhat), 1.0
    if hb_pvalue(rhat, n, hi - 1e-12) >= delta:
        return 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if hb_pvalue(rhat, n, mid) >= delta:
            lo = mid
        else:
            hi = mid
    return hi


def wsr_ucb(losses: np.ndarray, delta: float, tol: float = 1e-7) -> float:
    """Waudby-Smith–Ramdas (betting) upper confidence bound of the mean of losses [n] in
    [0, 1] (Bates et al. 2021, Prop. 5; Waudby-Smith & Ramdas 2024, predictable plug-in bets).

    With μ̂_i = (½ + Σ_{j≤i} L_j)/(i + 1), σ̂²_i = (¼ + Σ_{j≤i} (L_j − μ̂_j)²)/(i + 1), the bet
    ν_i = min(1, sqrt(2 log(1/δ) / (n σ̂²_{i−1}))) (σ̂²_0 = ¼) and the capital
    K_i(R) = Π_{j≤i} (1 − ν_j (L_j − R)), the bound is inf{R : max_i K_i(R) > 1/δ}: the
    capital of betting against "the mean is ≥ R" grows past 1/δ only with probability ≤ δ
    when it is. The bound depends on the order of the losses (a fixed, data-independent
    order keeps it valid; the calibration set's is the mock catalog's).
    """
    x = np.asarray(losses, np.float64).ravel()
    n = x.size
    if n == 0:
        raise ValueError("wsr_ucb needs at least one loss")
    if np.any((x < 0) | (x > 1)) or not np.all(np.isfinite(x)):
        raise ValueError("wsr_ucb: losses must be finite and in [0, 1]")
    i = np.arange(1, n + 1)
    mu = (0.5 + np.cumsum(x)) / (i + 1)
    var = (0.25 + np.cumsum((x - mu) ** 2)) / (i + 1)
    var_prev = np.concatenate([[0.25], var[:-1]])
    nu = np.minimum(1.0, np.sqrt(2 * math.log(1 / delta) / (n * var_prev)))
    target = math.log(1 / delta)

    def log_capital(r: float) -> float:
        with np.errstate(divide="ignore"):
            return float(np.max(np.cumsum(np.log(np.clip(1 - nu * (x - r), 0.0, None)))))

    if log_capital(1.0) <= target:  # not even R = 1 is rejected: the trivial bound
        return 1.0
    lo, hi = 0.0, 1.0  # the capital is non-decreasing in R: bisect for the crossing
    if log_capital(0.0) > target:
        return 0.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if log_capital(mid) > target:
            hi = mid
        else:
            lo = mid
    return hi


def upper_bound(rhat: np.ndarray, n: int, delta: float, bound: str) -> np.ndarray:
    """UCB of each empirical risk in ``rhat`` [L] (``bound="none"``: the risk itself).

    The bounds that need more than the mean (``"wsr"``) go through ``loss_upper_bound``."""
    rhat = np.asarray(rhat, np.float64)
    if bound == "none":
        return rhat
    if bound == "hoeffding":
        return hoeffding_ucb(rhat, n, delta)
    if bound == "hb":
        return np.array([hb_ucb(float(r), n, delta) for r in rhat])
    raise ValueError(f"bound must be one of {BOUNDS} (wsr through loss_upper_bound), got {bound!r}")


def loss_upper_bound(losses: np.ndarray, delta: float, bound: str) -> float:
    """UCB of the mean of the per-galaxy losses [n] under ``bound`` (any of ``BOUNDS``)."""
    losses = np.asarray(losses, np.float64)
    if bound == "wsr":
        return wsr_ucb(losses, delta)
    return float(upper_bound(np.array([losses.mean()]), losses.size, delta, bound)[0])


@dataclass(frozen=True)
class LambdaFit:
    """One λ fit: the chosen λ (None: the bound never reaches α on the grid), the plug-in λ
    (empirical risk ≤ α), n galaxies, and the empirical risk / UCB at the chosen λ."""

    lam: float | None
    lam_hat: float | None
    n: int
    alpha: float
    delta: float
    bound: str
    risk: float | None
    ucb: float | None


def fit_lambda(
    q: np.ndarray,
    alpha: float,
    delta: float = 0.1,
    bound: str = "wsr",
    grid: np.ndarray = LAMBDA_GRID,
) -> LambdaFit:
    """Risk-controlling λ from the normalised residuals q[G,P] of n = G calibration galaxies.

    λ̂ = the smallest grid λ such that UCB(R̂(λ')) ≤ α for all grid λ' ≥ λ (scanning down
    from the largest λ, as in Bates et al. 2021).
    """
    if not 0 < alpha < 1 or not 0 < delta < 1:
        raise ValueError(f"alpha, delta must be in (0, 1), got {alpha}, {delta}")
    q = np.asarray(q, np.float64)
    n = q.shape[0]
    if n < 1:
        raise ValueError("fit_lambda needs at least one calibration galaxy")
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    per_galaxy = losses(q, grid)  # [G,L]
    rhat = per_galaxy.mean(0)  # [L], non-increasing in λ
    ok_hat = np.flatnonzero(rhat <= alpha)
    lam_hat = float(grid[ok_hat[0]]) if ok_hat.size else None

    def ucb(i: int) -> float:
        return loss_upper_bound(per_galaxy[:, i], delta, bound)

    # the UCB is non-decreasing in R̂, R̂ non-increasing in λ: "UCB ≤ α for all λ' ≥ λ" is
    # "UCB(λ) ≤ α", found by bisection over the grid
    top = grid.size - 1
    if ucb(top) > alpha:
        return LambdaFit(None, lam_hat, n, alpha, delta, bound, None, None)
    lo, hi = -1, top  # ucb(hi) <= alpha; lo: unknown or > alpha
    if ucb(0) <= alpha:
        hi = 0
    else:
        lo = 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ucb(mid) <= alpha:
                hi = mid
            else:
                lo = mid
    i = hi
    u = ucb(i)
    return LambdaFit(float(grid[i]), lam_hat, n, alpha, delta, bound, float(rhat[i]), u)


def fit_calibration(
    samples: np.ndarray,
    truth: np.ndarray,
    snr: np.ndarray,
    edges: Sequence[float],
    mask: np.ndarray | None,
    levels: Sequence[float] = COVERAGE_LEVELS,
    delta: float = 0.1,
    bound: str = "wsr",
    min_per_bin: int = 1,
) -> tuple[dict[str, list[float | None]], list[int], dict[str, Any]]:
    """λ per S/N bin and level: ({level_key: [λ per bin]}, n per bin, details).

    Galaxies whose samples have no spread at a selected pixel (the catalog's rule,
    ``sampling.calibrate.degenerate_intervals``: it gives them no interval) are left out first (``details["n_degenerate_left_out"]``).
    A bin with fewer than ``min_per_bin`` galaxies, or whose bound does not reach α, takes
    the λ fitted on all galaxies pooled (recorded in details as ``source``: "bin" / "pooled"
    / "none"). ``mask`` selects the pixels of the loss (the catalog's calibration uses the
    core).
    """
    s, t = _check(samples, truth)
    # the objects the catalog gives no interval (sampling.calibrate.degenerate_intervals)
    usable = ~degenerate_intervals(s.std(1), mask)
    s, t, snr = s[usable], t[usable], np.asarray(snr)[usable]
    bins = snr_bins(snr, edges)
    n_bins = len(edges) - 1
    counts = [int((bins == k).sum()) for k in range(n_bins)]
    lambdas: dict[str, list[float | None]] = {}
    details: dict[str, Any] = {}
    for p in levels:
        key = level_key(p)
        q = normalised_residuals(s, t, p, mask)
        pooled = fit_lambda(q, 1 - p, delta, bound)
        lams, info = [], []
        for k in range(n_bins):
            sel = bins == k
            fit = (
                fit_lambda(q[sel], 1 - p, delta, bound)
                if sel.sum() >= max(1, min_per_bin)
                else None
            )
            if fit is not None and fit.lam is not None:
                lams.append(fit.lam)
                info.append({"source": "bin", **_fit_doc(fit)})
            else:
                lams.append(pooled.lam)
                info.append({"source": "pooled" if pooled.lam is not None else "none",
                             "bin_fit": None if fit is None else _fit_doc(fit)})  # fmt: skip
        lambdas[key] = lams
        details[key] = {"pooled": _fit_doc(pooled), "bins": info}
    details["n_degenerate_left_out"] = int((~usable).sum())
    return lambdas, counts, details


def _fit_doc(fit: LambdaFit) -> dict[str, Any]:
    return {"lambda": fit.lam, "lambda_hat": fit.lam_hat, "n": fit.n, "alpha": fit.alpha,
            "risk": fit.risk, "ucb": fit.ucb}  # fmt: skip
