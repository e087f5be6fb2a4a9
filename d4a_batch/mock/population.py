"""A published-relation model of the i < 24 galaxy population: redshift, stellar mass, type, size.

Used to choose the prior's field (``jobs/choose_field.py``) and to draw realistic mock sizes
(``mock.galaxies.sample_params(..., structure="realistic")``). Every number below is
transcribed from the paper named next to it (from the published tables, not refitted here):

- Stellar mass function: Ilbert et al. 2013 (A&A 556, A55), Table 2, all galaxies, double
  Schechter (log M*, Phi1*, alpha1, Phi2*, alpha2) per redshift bin; evaluated at the bin
  whose range holds z (bins 0.2-0.5, 0.5-0.8, 0.8-1.1, 1.1-1.5; z < 0.2 uses the first).
- Size-mass-redshift: van der Wel et al. 2014 (ApJ 788, 28), Table 1: semi-major-axis
  effective radius ``R_eff / kpc = A (M* / 5e10 Msun)^alpha`` with log-normal scatter
  sigma(log R_eff), late and early types, at z = 0.25, 0.75, 1.25, 1.75 (linear in z
  between them, clamped outside). Their redshift trend at fixed mass, R_eff ∝ (1+z)^-0.75
  (late) and (1+z)^-1.48 (early), is what the table encodes.
- Type mix: the quiescent (early-type) fraction rises with mass; a logistic in log M* with
  its midpoint at log M* = 10.5 + 0.3 z and width 0.3 dex (a model choice that follows the
  crossing masses of the quiescent and star-forming mass functions in Ilbert et al. 2013,
  Fig. 8; not a fit).
- Magnitude limit i < 24 -> mass limit: log M_lim(z) from the i-band luminosity at i = 24
  (Planck15 luminosity distance, flat-f_nu k-correction -2.5 log(1+z), M_sun,i = 4.53 AB,
  Willmer 2018) and a mass-to-light ratio log(M/L_i) = -0.2 (late) / +0.35 (early). At
  z > 0.8 the observed i band is rest-frame blue/UV where M/L is lower, so this overestimates
  M_lim there: it removes small galaxies, which only makes the field choice conservative.
- Shapes: late types are thick disks (intrinsic thickness 0.15, isotropic inclination:
  q = sqrt(cos^2 i + 0.15^2 sin^2 i)); early types q ~ N(0.72, 0.15) clipped to [0.3, 1];
  profiles Sersic n = 1 (late) and n = 4 (early).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import gammaincinv

from d4a_batch.physics.cosmology import get_cosmology

# Ilbert et al. 2013, Table 2 (all galaxies): z_lo, z_hi, log M*, Phi1* (1e-3/Mpc^3/dex),
# alpha1, Phi2* (1e-3), alpha2
ILBERT13_ALL = (
    (0.2, 0.5, 10.88, 1.68, -0.69, 0.77, -1.42),
    (0.5, 0.8, 11.03, 1.22, -1.00, 0.16, -1.64),
    (0.8, 1.1, 10.87, 2.03, -0.52, 0.29, -1.62),
    (1.1, 1.5, 10.71, 1.35, -0.08, 0.67, -1.46),
)
# van der Wel et al. 2014, Table 1: z, log A, alpha, sigma(log R) for late and early types
VDW14_Z = (0.25, 0.75, 1.25, 1.75)
VDW14_LATE = ((0.86, 0.25, 0.16), (0.78, 0.22, 0.16), (0.70, 0.22, 0.17), (0.65, 0.23, 0.18))
VDW14_EARLY = ((0.60, 0.75, 0.10), (0.42, 0.71, 0.11), (0.22, 0.76, 0.12), (0.09, 0.76, 0.14))
VDW14_PIVOT_LOGM = np.log10(5e10)

M_SUN_I_AB = 4.53  # Willmer 2018, SDSS i
LOG_ML_I = {"late": -0.2, "early": 0.35}
MAG_LIMIT_I = 24.0
LOGM_MIN, LOGM_MAX = 8.0, 12.0
DISK_THICKNESS = 0.15
SERSIC_N = {"late": 1.0, "early": 4.0}


def ilbert13_mass_function(logm: np.ndarray, z: float) -> np.ndarray:
    """Phi(log M*) in 1/Mpc^3/dex (double Schechter of Ilbert et al. 2013 at the bin of z)."""
    row = next((r for r in ILBERT13_ALL if z < r[1]), ILBERT13_ALL[-1])
    _, _, lms, p1, a1, p2, a2 = row
    x = 10.0 ** (np.asarray(logm, dtype=np.float64) - lms)
    return np.log(10.0) * np.exp(-x) * x * (1e-3 * p1 * x**a1 + 1e-3 * p2 * x**a2)


def quiescent_fraction(logm: np.ndarray, z: float) -> np.ndarray:
    """Early-type fraction at stellar mass ``logm`` and redshift z (logistic model, see module)."""
    return 1.0 / (1.0 + np.exp(-(np.asarray(logm) - (10.5 + 0.3 * z)) / 0.3))


def mass_limit(z: float, kind: str, mag_limit: float = MAG_LIMIT_I) -> float:
    """log M* of a galaxy of type ``kind`` at redshift z with observed i = ``mag_limit``."""
    dl_pc = get_cosmology().luminosity_distance(z).to_value("pc")
    m_abs = mag_limit - 5.0 * np.log10(dl_pc / 10.0) + 2.5 * np.log10(1.0 + z)
    return float(LOG_ML_I[kind] - 0.4 * (m_abs - M_SUN_I_AB))


def vdw14_size(logm: np.ndarray, z: float, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(median R_eff in kpc, sigma of log10 R_eff) at stellar mass ``logm`` and redshift z."""
    table = np.array(VDW14_LATE if kind == "late" else VDW14_EARLY)
    zc = float(np.clip(z, VDW14_Z[0], VDW14_Z[-1]))
    log_a, alpha, sig = (np.interp(zc, VDW14_Z, table[:, j]) for j in range(3))
    logm = np.asarray(logm, dtype=np.float64)
    return 10.0 ** (log_a + alpha * (logm - VDW14_PIVOT_LOGM)), np.full(logm.shape, sig)


@dataclass(frozen=True)
class Population:
    """Galaxies at one redshift: arrays of equal length K."""

    z: float
    logm: np.ndarray  # [K] log10 M*/Msun
    early: np.ndarray  # [K] bool
    r_eff_kpc: np.ndarray  # [K] semi-major-axis half-light radius
    q: np.ndarray  # [K] projected axis ratio
    sersic_n: np.ndarray  # [K]


def number_density(z: float, mag_limit: float = MAG_LIMIT_I) -> float:
    """Comoving density (1/Mpc^3) of galaxies with i < ``mag_limit`` at z (both types)."""
    logm = np.linspace(LOGM_MIN, LOGM_MAX, 801)
    phi = ilbert13_mass_function(logm, z)
    fq = quiescent_fraction(logm, z)
    keep_late = logm >= mass_limit(z, "late", mag_limit)
    keep_early = logm >= mass_limit(z, "early", mag_limit)
    dens = phi * ((1 - fq) * keep_late + fq * keep_early)
    return float(np.trapezoid(dens, logm))


def sample_population(
    rng: np.random.Generator, z: float, n: int, mag_limit: float = MAG_LIMIT_I
) -> Population:
    """``n`` galaxies at redshift z with i < ``mag_limit``: mass, type, size, axis ratio."""
    logm_grid = np.linspace(LOGM_MIN, LOGM_MAX, 801)
    phi = ilbert13_mass_function(logm_grid, z)
    fq = quiescent_fraction(logm_grid, z)
    w_late = phi * (1 - fq) * (logm_grid >= mass_limit(z, "late", mag_limit))
    w_early = phi * fq * (logm_grid >= mass_limit(z, "early", mag_limit))
    w = np.concatenate([w_late, w_early])
    if not w.sum() > 0:
        raise ValueError(f"no galaxies brighter than i = {mag_limit} at z = {z}")
    idx = rng.choice(len(w), size=n, p=w / w.sum())
    early = idx >= len(logm_grid)
    step = logm_grid[1] - logm_grid[0]
    logm = logm_grid[idx % len(logm_grid)] + rng.uniform(-0.5, 0.5, n) * step
    r_eff = np.empty(n)
    for kind, sel in (("late", ~early), ("early", early)):
        med, sig = vdw14_size(logm[sel], z, kind)
        r_eff[sel] = med * 10.0 ** (sig * rng.standard_normal(sel.sum()))
    cos_i = rng.uniform(0.0, 1.0, n)
    q_disk = np.sqrt(cos_i**2 + DISK_THICKNESS**2 * (1 - cos_i**2))
    q_sph = np.clip(0.72 + 0.15 * rng.standard_normal(n), 0.3, 1.0)
    q = np.where(early, q_sph, q_disk)
    sersic = np.where(early, SERSIC_N["early"], SERSIC_N["late"])
    return Population(z=z, logm=logm, early=early, r_eff_kpc=r_eff, q=q, sersic_n=sersic)


def sersic_b(n: np.ndarray) -> np.ndarray:
    """b_n with Gamma(2n) gamma(2n, b_n) = 1/2 (exact, by the inverse incomplete gamma)."""
    return gammaincinv(2.0 * np.asarray(n, dtype=np.float64), 0.5)


def light_radius_in_square(
    rng: np.random.Generator, pop: Population, frac: float = 0.9, n_points: int = 2000
) -> np.ndarray:
    """Half-side (kpc) of the smallest centred square holding ``frac`` of each galaxy's light.

    Monte Carlo per galaxy: radii from the Sersic profile's exact enclosed-light law
    (L(<r)/L = P(2n, b_n (r/R_eff)^(1/n)), so b_n (r/R_eff)^(1/n) ~ Gamma(2n)), uniform
    polar angle, squashed by q along the minor axis, rotated by a random position angle;
    the square's half-side needed for a point is max(|x|, |y|). Returns ``[K]`` in kpc.
    """
    k = len(pop.r_eff_kpc)
    n = pop.sersic_n[:, None]
    g = rng.gamma(shape=np.broadcast_to(2.0 * n, (k, n_points)))
    r = pop.r_eff_kpc[:, None] * (g / sersic_b(n)) ** n
    phi = rng.uniform(0, 2 * np.pi, (k, n_points))
    x, y = r * np.cos(phi), pop.q[:, None] * r * np.sin(phi)
    pa = rng.uniform(0, np.pi, (k, 1))
    xr = x * np.cos(pa) - y * np.sin(pa)
    yr = x * np.sin(pa) + y * np.cos(pa)
    return np.quantile(np.maximum(np.abs(xr), np.abs(yr)), frac, axis=1)
