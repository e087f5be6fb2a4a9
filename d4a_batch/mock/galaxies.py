"""GalSim mock galaxies: Sersic bulge + exponential disk + star-forming knots, in g, r, i.

Lengths are physical (kpc): GalSim's angular unit is read as kpc and images are
drawn at ``kpc_per_pixel``. Fluxes are arbitrary units (the r-band total is
``flux_r``); per-band fluxes follow the component colours (AB magnitudes), so
a component's flux in band b is ``F_r * 10**(-0.4 (m_b - m_r))``.

The morphology of each component is band-independent: colour gradients come
from mixing a red bulge, a bluer disk and still bluer knots. Each component is
drawn once at unit flux and combined linearly per band, so the images are exact
sums of the components (``draw_components``). Everything is deterministic given
the parameters (the knot positions come from ``params.seed``), and
``sample_params`` is deterministic given its generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import galsim
import numpy as np
from scipy.special import erf

COMPONENTS = ("bulge", "disk", "knots")
# AB colours are given as g-r and r-i; these are the bands the module knows
KNOWN_BANDS = ("g", "r", "i")
# intrinsic disk thickness (edge-on axis ratio) used to turn inclination into q
DISK_THICKNESS = 0.15
# Sersic bulges are truncated at this many half-light radii
BULGE_TRUNCATION = 8.0


@dataclass(frozen=True)
class MockGalaxyParams:
    """One mock galaxy (lengths in kpc, angles in degrees, colours in AB mag).

    ``bulge_fraction`` is B/T in r; ``knot_fraction`` is the share of the disk's
    r-band light in knots. r-band fluxes: bulge ``B/T F``, smooth disk
    ``(1-B/T)(1-f_k) F``, knots ``(1-B/T) f_k F``.
    """

    seed: int = 0
    flux_r: float = 1.0
    bulge_fraction: float = 0.3
    bulge_hlr_kpc: float = 0.8
    bulge_sersic_n: float = 4.0
    bulge_q: float = 0.8
    disk_hlr_kpc: float = 2.5
    inclination_deg: float = 45.0
    position_angle_deg: float = 0.0
    knot_fraction: float = 0.2
    n_knots: int = 30
    knot_sigma_kpc: float = 0.2
    bulge_gr: float = 0.75
    bulge_ri: float = 0.40
    disk_gr: float = 0.45
    disk_ri: float = 0.25
    knot_gr: float = 0.15
    knot_ri: float = 0.10

    @property
    def disk_q(self) -> float:
        """Projected axis ratio of a thick disk: sqrt(cos^2 i + q0^2 sin^2 i)."""
        inc = np.deg2rad(self.inclination_deg)
        return float(np.sqrt(np.cos(inc) ** 2 + (DISK_THICKNESS * np.sin(inc)) ** 2))

    def component_fluxes_r(self) -> dict[str, float]:
        """r-band flux of each component (they sum to ``flux_r``)."""
        disk = (1.0 - self.bulge_fraction) * self.flux_r
        return {
            "bulge": self.bulge_fraction * self.flux_r,
            "disk": disk * (1.0 - self.knot_fraction),
            "knots": disk * self.knot_fraction,
        }

    def colour(self, component: str) -> tuple[float, float]:
        """(g-r, r-i) of a component."""
        prefix = {"bulge": "bulge", "disk": "disk", "knots": "knot"}[component]
        return getattr(self, f"{prefix}_gr"), getattr(self, f"{prefix}_ri")

    def band_flux(self, component: str, band: str) -> float:
        """Flux of a component in one band (AB colours relative to r)."""
        f_r = self.component_fluxes_r()[component]
        gr, ri = self.colour(component)
        dmag = {"g": gr, "r": 0.0, "i": -ri}[band]  # m_b - m_r
        return f_r * 10.0 ** (-0.4 * dmag)


def _smooth_profiles(p: MockGalaxyParams) -> dict[str, galsim.GSObject]:
    """Unit-flux GalSim profiles of bulge and disk, inclined and oriented."""
    pa = p.position_angle_deg * galsim.degrees
    # truncated at 8 hlr: the untruncated n = 4 wings would need a huge FFT
    bulge = galsim.Sersic(
        n=p.bulge_sersic_n,
        half_light_radius=p.bulge_hlr_kpc,
        trunc=BULGE_TRUNCATION * p.bulge_hlr_kpc,
        flux=1.0,
    )
    disk = galsim.Exponential(half_light_radius=p.disk_hlr_kpc, flux=1.0)
    return {
        "bulge": bulge.shear(q=p.bulge_q, beta=pa),
        "disk": disk.shear(q=p.disk_q, beta=pa),
    }


def knot_positions_kpc(p: MockGalaxyParams) -> np.ndarray:
    """Knot centres ``[n_knots, 2]`` as (x, y) in kpc, projected like the disk.

    Points are drawn by ``galsim.RandomKnots`` (exponential profile with the
    disk's half-light radius, seeded by ``p.seed``), then inclined and rotated
    with the disk's shear.
    """
    if p.n_knots == 0:
        return np.zeros((0, 2))
    knots = galsim.RandomKnots(
        p.n_knots, half_light_radius=p.disk_hlr_kpc, flux=1.0, rng=galsim.BaseDeviate(p.seed)
    )
    shear = galsim.Shear(q=p.disk_q, beta=p.position_angle_deg * galsim.degrees)
    return np.asarray(knots.points) @ shear.getMatrix().T


def _draw_knots(
    p: MockGalaxyParams, kpc_per_pixel: float, n: int, offset: tuple[float, float]
) -> np.ndarray:
    """Unit-flux image ``[n, n]`` of round Gaussian knots, integrated exactly over pixels.

    Knots are point sources given an intrinsic size ``knot_sigma_kpc``; the
    pixel integral of each Gaussian is a product of erf differences, which is
    exact and avoids the large FFT a GalSim sum of shifted Gaussians needs.
    """
    pos = knot_positions_kpc(p)
    if len(pos) == 0:
        return np.zeros((n, n))
    edges = np.arange(n + 1, dtype=np.float64)  # pixel edges, centre at n/2
    sig = p.knot_sigma_kpc / kpc_per_pixel * np.sqrt(2.0)
    cx = n / 2 + offset[1] + pos[:, 0] / kpc_per_pixel
    cy = n / 2 + offset[0] + pos[:, 1] / kpc_per_pixel
    wx = 0.5 * np.diff(erf((edges[None, :] - cx[:, None]) / sig), axis=1)  # [K, n]
    wy = 0.5 * np.diff(erf((edges[None, :] - cy[:, None]) / sig), axis=1)
    return np.einsum("ky,kx->yx", wy, wx) / len(pos)


def draw_components(
    params: MockGalaxyParams,
    kpc_per_pixel: float,
    n: int,
    bands: tuple[str, ...] = KNOWN_BANDS,
    offset: tuple[float, float] = (0.0, 0.0),
) -> dict[str, np.ndarray]:
    """Flux-per-pixel images of each component, ``{name: [C, n, n]}`` (float32).

    The galaxy centre sits at the image centre (edge coordinate n/2) plus
    ``offset = (dy, dx)`` in pixels. Light falling outside the image is lost.
    """
    unknown = set(bands) - set(KNOWN_BANDS)
    if unknown:
        raise ValueError(f"unknown bands {sorted(unknown)}; known: {KNOWN_BANDS}")
    unit: dict[str, np.ndarray] = {}
    for name, prof in _smooth_profiles(params).items():
        img = prof.drawImage(
            nx=n, ny=n, scale=kpc_per_pixel, offset=(offset[1], offset[0]), dtype=np.float64
        )
        unit[name] = np.clip(img.array, 0.0, None)  # FFT ringing is ~1e-8 of the flux
    unit["knots"] = _draw_knots(params, kpc_per_pixel, n, offset)
    out: dict[str, np.ndarray] = {}
    for name in COMPONENTS:
        fluxes = np.array([params.band_flux(name, b) for b in bands])
        out[name] = (fluxes[:, None, None] * unit[name][None]).astype(np.float32)
    return out


def draw_galaxy(
    params: MockGalaxyParams,
    kpc_per_pixel: float,
    n: int,
    bands: tuple[str, ...] = KNOWN_BANDS,
    offset: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Flux-per-pixel image ``[C, n, n]`` (float32) of a mock galaxy, C = len(bands)."""
    comps = draw_components(params, kpc_per_pixel, n, bands, offset)
    return sum(comps[name] for name in COMPONENTS)


def sample_params(rng: np.random.Generator, n_objects: int) -> list[MockGalaxyParams]:
    """Draw ``n_objects`` galaxies from a mix of late, intermediate and early types.

    - type mix 50/30/20 %: B/T ~ U(0, 0.2) / U(0.2, 0.6) / U(0.6, 0.95), knot
      share of the disk light U(0.1, 0.4) / U(0, 0.15) / U(0, 0.05);
    - disk half-light radius log-normal, median 2.5 kpc, 0.35 in ln, clipped to
      [0.8, 6] kpc; bulge hlr = disk hlr x U(0.15, 0.5), at least 0.3 kpc;
    - bulge Sersic n ~ U(1.5, 4) (late, intermediate), 4 (de Vaucouleurs, early);
      bulge axis ratio U(0.6, 1);
    - isotropic inclination (cos i ~ U(0, 1)), position angle U(0, 180) deg;
    - colours ordered per object: bulge g-r ~ N(0.75, 0.06), r-i ~ N(0.40, 0.04);
      disk redder-to-bluer offsets g-r -U(0.15, 0.45), r-i -U(0.05, 0.2); knots
      bluer than the disk by g-r U(0.1, 0.4), r-i U(0.05, 0.2).
    """
    out: list[MockGalaxyParams] = []
    for _ in range(n_objects):
        kind = rng.choice(3, p=[0.5, 0.3, 0.2])
        bt_lo, bt_hi = [(0.0, 0.2), (0.2, 0.6), (0.6, 0.95)][kind]
        fk_hi = [0.4, 0.15, 0.05][kind]
        fk_lo = 0.1 if kind == 0 else 0.0
        disk_hlr = float(np.clip(2.5 * np.exp(0.35 * rng.standard_normal()), 0.8, 6.0))
        bulge_gr = 0.75 + 0.06 * rng.standard_normal()
        bulge_ri = 0.40 + 0.04 * rng.standard_normal()
        disk_gr = bulge_gr - rng.uniform(0.15, 0.45)
        disk_ri = bulge_ri - rng.uniform(0.05, 0.2)
        out.append(
            MockGalaxyParams(
                seed=int(rng.integers(0, 2**31 - 1)),
                flux_r=1.0,
                bulge_fraction=float(rng.uniform(bt_lo, bt_hi)),
                bulge_hlr_kpc=max(0.3, disk_hlr * float(rng.uniform(0.15, 0.5))),
                bulge_sersic_n=4.0 if kind == 2 else float(rng.uniform(1.5, 4.0)),
                bulge_q=float(rng.uniform(0.6, 1.0)),
                disk_hlr_kpc=disk_hlr,
                inclination_deg=float(np.rad2deg(np.arccos(rng.uniform(0.0, 1.0)))),
                position_angle_deg=float(rng.uniform(0.0, 180.0)),
                knot_fraction=float(rng.uniform(fk_lo, fk_hi)),
                n_knots=int(rng.integers(10, 50)) if kind == 0 else int(rng.integers(0, 20)),
                knot_sigma_kpc=float(rng.uniform(0.1, 0.3)),
                bulge_gr=float(bulge_gr),
                bulge_ri=float(bulge_ri),
                disk_gr=float(disk_gr),
                disk_ri=float(disk_ri),
                knot_gr=float(disk_gr - rng.uniform(0.1, 0.4)),
                knot_ri=float(disk_ri - rng.uniform(0.05, 0.2)),
            )
        )
    return out
