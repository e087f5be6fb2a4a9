"""GalSim mock galaxies: Sersic bulge + exponential disk + star-forming knots, in g, r, i.

Longer than 400 lines: one concern, the mock galaxy model. ``MockGalaxyParams``, the
drawing of its components (bulge, disk, knots, bar, arms, dust) and the two populations
that fill it (``sample_params``, ``sample_realistic_params``) are read together: every range
a sampler draws is a field documented on the dataclass, and the drawing's defaults (no
arms, no dust) are what make "smooth" exact. The population samplers (~200 lines) are the
one seam; moving them would split each field's meaning from the numbers drawn for it and
touch every caller of ``sample_params`` (mock survey, training data, benchmarks, tests).

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

Two populations (``structure``): ``"smooth"`` (the default, what the demo prior
and the tests were made with: bulge + disk + random knots) and ``"realistic"``
(``sample_params(..., structure="realistic")``): sizes from the i < 24
size-mass-redshift relations of ``mock.population`` (van der Wel et al. 2014),
logarithmic spiral arms and bars (drawn face-on on a fine grid and projected
through ``galsim.InterpolatedImage``), knots strung along the arms, and dust: a
mixed star-dust slab whose optical depth grows with inclination plus a midplane
lane in nearly edge-on disks (Cardelli et al. 1989 extinction curve), which
reddens and dims the inner disk and bulge. With zero arm/bar fractions and no
dust (the defaults of ``MockGalaxyParams``) the drawing is exactly the smooth model.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import galsim
import numpy as np
from scipy.special import erf

COMPONENTS = ("bulge", "disk", "knots")
# drawn only when their flux is > 0 (realistic structure); draw_components adds their keys then
STRUCTURE_COMPONENTS = ("bar", "arms")
ALL_COMPONENTS = COMPONENTS + STRUCTURE_COMPONENTS
STRUCTURES = ("smooth", "realistic")
# effective wavelengths (micron) of HSC g, r, i, for the extinction curve
BAND_WAVELENGTH_UM = {"g": 0.475, "r": 0.617, "i": 0.769}
# face-on grid of the arm pattern: out to this many disk half-light radii
ARM_GRID_EXTENT = 5.0
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
    # realistic structure (all off by default: the smooth model)
    bar_fraction: float = 0.0  # share of the r-band total in the bar
    bar_hlr_kpc: float = 1.0  # half-light radius of the bar (Sersic n = 0.5) before squashing
    bar_q: float = 0.3  # in-plane axis ratio of the bar
    bar_angle_deg: float = 0.0  # in-plane angle of the bar from the line of nodes
    arm_fraction: float = 0.0  # share of the disk's r-band light in spiral arms
    n_arms: int = 2
    arm_pitch_deg: float = 15.0  # pitch angle of the logarithmic spiral
    arm_sharpness: float = 4.0  # arm profile ((1 + cos)/2)^sharpness: larger = narrower arms
    arm_phase_deg: float = 0.0
    arm_flocculence: float = 0.0  # rms (in ln) of a smooth random modulation of the arms
    knots_on_arms: float = 0.0  # fraction of the knots placed along the arms
    dust_tau_v: float = 0.0  # face-on central V-band optical depth of the disk
    bar_gr: float = 0.65
    bar_ri: float = 0.35
    arm_gr: float = 0.30
    arm_ri: float = 0.18

    @property
    def disk_q(self) -> float:
        """Projected axis ratio of a thick disk: sqrt(cos^2 i + q0^2 sin^2 i)."""
        inc = np.deg2rad(self.inclination_deg)
        return float(np.sqrt(np.cos(inc) ** 2 + (DISK_THICKNESS * np.sin(inc)) ** 2))

    def component_fluxes_r(self) -> dict[str, float]:
        """Intrinsic (before dust) r-band flux of each component (they sum to ``flux_r``).

        Bar ``f_bar F``; the rest of the disk ``(1 - B/T - f_bar) F`` splits into
        knots (``knot_fraction``), arms (``arm_fraction``) and the smooth disk.
        """
        disk = (1.0 - self.bulge_fraction - self.bar_fraction) * self.flux_r
        return {
            "bulge": self.bulge_fraction * self.flux_r,
            "disk": disk * (1.0 - self.knot_fraction - self.arm_fraction),
            "knots": disk * self.knot_fraction,
            "bar": self.bar_fraction * self.flux_r,
            "arms": disk * self.arm_fraction,
        }

    def colour(self, component: str) -> tuple[float, float]:
        """(g-r, r-i) of a component."""
        prefix = {"bulge": "bulge", "disk": "disk", "knots": "knot", "bar": "bar", "arms": "arm"}[
            component
        ]
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


def _projection(p: MockGalaxyParams) -> galsim.Shear:
    """The disk's projection: inclination (axis ratio ``disk_q``) along the position angle."""
    return galsim.Shear(q=p.disk_q, beta=p.position_angle_deg * galsim.degrees)


def arm_pattern_faceon(p: MockGalaxyParams, scale_kpc: float) -> np.ndarray:
    """Face-on surface brightness of the spiral arms ``[G, G]`` on a grid of ``scale_kpc``.

    Exponential disk times a logarithmic spiral, ``((1 + cos(m (phi - phi_arm(R)))) / 2)^s``
    with ``phi_arm(R) = phase + ln(R / R_d) / tan(pitch)``, tapered to zero inside the bulge
    and bar (``1 - exp(-(R / R_in)^2)``) and, with ``arm_flocculence`` > 0, modulated by a
    smooth log-normal random field (seed ``p.seed``). The grid spans ``ARM_GRID_EXTENT``
    disk half-light radii; x is along the line of nodes. Sums to 1.
    """
    g = 2 * int(np.ceil(ARM_GRID_EXTENT * p.disk_hlr_kpc / scale_kpc))
    c = (np.arange(g) + 0.5 - g / 2) * scale_kpc
    x, y = np.meshgrid(c, c)
    r = np.hypot(x, y)
    rd = p.disk_hlr_kpc / 1.6783  # exponential scale length
    phi = np.arctan2(y, x)
    spiral = np.deg2rad(p.arm_phase_deg) + np.log(np.maximum(r, 1e-3 * rd) / rd) / np.tan(
        np.deg2rad(p.arm_pitch_deg)
    )
    arms = ((1.0 + np.cos(p.n_arms * (phi - spiral))) / 2.0) ** p.arm_sharpness
    r_in = max(p.bulge_hlr_kpc, 1.5 * p.bar_hlr_kpc if p.bar_fraction > 0 else 0.0, 0.3 * rd)
    img = np.exp(-r / rd) * arms * (1.0 - np.exp(-((r / r_in) ** 2)))
    if p.arm_flocculence > 0:
        from scipy.ndimage import gaussian_filter

        rng = np.random.default_rng([p.seed, 1])
        field = gaussian_filter(rng.standard_normal((g, g)), sigma=max(0.3 * rd / scale_kpc, 1.0))
        field /= field.std() + 1e-12
        img = img * np.exp(p.arm_flocculence * field)
    img[r > ARM_GRID_EXTENT * p.disk_hlr_kpc] = 0.0
    return img / img.sum()


def _arm_grid_scale(p: MockGalaxyParams, kpc_per_pixel: float) -> float:
    return min(0.5 * kpc_per_pixel, p.disk_hlr_kpc / 8.0)


def knot_positions_kpc(p: MockGalaxyParams) -> np.ndarray:
    """Knot centres ``[n_knots, 2]`` as (x, y) in kpc, projected like the disk.

    Points are drawn by ``galsim.RandomKnots`` (exponential profile with the
    disk's half-light radius, seeded by ``p.seed``), then inclined and rotated
    with the disk's shear. With ``knots_on_arms`` > 0 (and arms), that fraction
    of the knots is drawn instead from the face-on arm pattern (seed ``p.seed``).
    """
    if p.n_knots == 0:
        return np.zeros((0, 2))
    knots = galsim.RandomKnots(
        p.n_knots, half_light_radius=p.disk_hlr_kpc, flux=1.0, rng=galsim.BaseDeviate(p.seed)
    )
    pts = np.asarray(knots.points)
    n_arm = round(p.knots_on_arms * p.n_knots) if p.arm_fraction > 0 else 0
    if n_arm > 0:
        scale = p.disk_hlr_kpc / 8.0
        pattern = arm_pattern_faceon(p, scale)
        g = pattern.shape[0]
        rng = np.random.default_rng([p.seed, 2])
        idx = rng.choice(pattern.size, size=n_arm, p=pattern.ravel())
        iy, ix = np.divmod(idx, g)
        arm_pts = (np.stack([ix, iy], axis=1) + rng.uniform(0, 1, (n_arm, 2)) - g / 2) * scale
        pa = np.deg2rad(p.position_angle_deg)  # the grid's x axis is the line of nodes
        rot = np.array([[np.cos(pa), -np.sin(pa)], [np.sin(pa), np.cos(pa)]])
        pts = np.concatenate([arm_pts @ rot.T, pts[n_arm:]])
    return pts @ _projection(p).getMatrix().T


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


def extinction_ccm89(wavelength_um: float, r_v: float = 3.1) -> float:
    """A_lambda / A_V of Cardelli, Clayton & Mathis 1989 (optical/NIR, 0.3-3.3 micron)."""
    x = 1.0 / wavelength_um
    if 1.1 <= x <= 3.3:
        y = x - 1.82
        a = np.polyval([0.32999, -0.77530, 0.01979, 0.72085, -0.02427, -0.50447, 0.17699, 1.0], y)
        b = np.polyval([-2.09002, 5.30260, -0.62251, -5.38434, 1.07233, 2.28305, 1.41338, 0.0], y)
    elif 0.3 <= x < 1.1:
        a, b = 0.574 * x**1.61, -0.527 * x**1.61
    else:
        raise ValueError(f"wavelength {wavelength_um} micron outside 0.3-3.3 micron")
    return float(a + b / r_v)


def dust_transmission(
    p: MockGalaxyParams,
    kpc_per_pixel: float,
    n: int,
    bands: tuple[str, ...],
    offset: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Fraction of light that escapes the dust, per band and pixel ``[C, n, n]`` (1 without dust).

    Mixed star-dust slab: ``T = (1 - exp(-tau)) / tau`` with
    ``tau_b = tau_V (A_b / A_V) exp(-R / R_d) / q_disk`` (R: radius in the disk plane,
    R_d: disk scale length; the path through the slab grows as 1 / q_disk), times a
    midplane lane screen ``exp(-3 tau_b exp(-R / R_d) exp(-d^2 / 2 w^2) sin^6 i)`` (d: distance
    from the projected major axis, w = max(0.15 kpc, 0.4 t R_hl), t = DISK_THICKNESS: half
    the disk's projected thickness; the lane's optical depth is 3x the face-on one because a
    sight line along the midplane crosses more dust) that shows in near edge-on disks.
    Evaluated at pixel centres.
    """
    if p.dust_tau_v <= 0:
        return np.ones((len(bands), n, n))
    c = np.arange(n) + 0.5 - n / 2
    xx = (c[None, :] - offset[1]) * kpc_per_pixel
    yy = (c[:, None] - offset[0]) * kpc_per_pixel
    inv = np.linalg.inv(_projection(p).getMatrix())
    xp = inv[0, 0] * xx + inv[0, 1] * yy
    yp = inv[1, 0] * xx + inv[1, 1] * yy
    rd = p.disk_hlr_kpc / 1.6783
    radial = np.exp(-np.hypot(xp, yp) / rd)
    pa = np.deg2rad(p.position_angle_deg)
    d = -np.sin(pa) * xx + np.cos(pa) * yy  # distance from the projected major axis
    w = max(0.15, 0.4 * DISK_THICKNESS * p.disk_hlr_kpc)
    lane = radial * np.exp(-0.5 * (d / w) ** 2) * np.sin(np.deg2rad(p.inclination_deg)) ** 6
    out = np.empty((len(bands), n, n))
    for k, b in enumerate(bands):
        tau_b = p.dust_tau_v * extinction_ccm89(BAND_WAVELENGTH_UM[b])
        tau = tau_b * radial / p.disk_q
        slab = np.where(tau > 1e-8, -np.expm1(-tau) / np.maximum(tau, 1e-8), 1.0 - tau / 2)
        out[k] = slab * np.exp(-3.0 * tau_b * lane)
    return out


def _unit_images(
    params: MockGalaxyParams, kpc_per_pixel: float, n: int, offset: tuple[float, float]
) -> dict[str, np.ndarray]:
    """Unit-flux images ``[n, n]`` (before dust) of every component with flux > 0."""
    p = params
    pa = p.position_angle_deg * galsim.degrees
    profiles = _smooth_profiles(p)
    if p.bar_fraction > 0:
        bar = galsim.Sersic(n=0.5, half_light_radius=p.bar_hlr_kpc, flux=1.0)
        bar = bar.shear(q=p.bar_q, beta=(p.position_angle_deg + p.bar_angle_deg) * galsim.degrees)
        profiles["bar"] = bar.shear(q=p.disk_q, beta=pa)
    if p.arm_fraction > 0:
        scale = _arm_grid_scale(p, kpc_per_pixel)
        pattern = galsim.Image(arm_pattern_faceon(p, scale), scale=scale)
        # the grid's x axis is the line of nodes: rotate it to the position angle, then incline
        arms = galsim.InterpolatedImage(pattern, flux=1.0, x_interpolant="linear")
        profiles["arms"] = arms.rotate(pa).shear(q=p.disk_q, beta=pa)
    unit: dict[str, np.ndarray] = {}
    for name, prof in profiles.items():
        img = prof.drawImage(
            nx=n, ny=n, scale=kpc_per_pixel, offset=(offset[1], offset[0]), dtype=np.float64
        )
        unit[name] = np.clip(img.array, 0.0, None)  # FFT ringing is ~1e-8 of the flux
    unit["knots"] = _draw_knots(params, kpc_per_pixel, n, offset)
    return unit


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
    Keys: ``COMPONENTS`` always, ``"bar"`` / ``"arms"`` when their flux is > 0. With
    dust, every component is multiplied by ``dust_transmission`` (so they still sum to
    the galaxy).
    """
    unknown = set(bands) - set(KNOWN_BANDS)
    if unknown:
        raise ValueError(f"unknown bands {sorted(unknown)}; known: {KNOWN_BANDS}")
    unit = _unit_images(params, kpc_per_pixel, n, offset)
    trans = None
    if params.dust_tau_v > 0:
        trans = dust_transmission(params, kpc_per_pixel, n, bands, offset)
    out: dict[str, np.ndarray] = {}
    for name in ALL_COMPONENTS:
        if name not in unit:
            continue
        fluxes = np.array([params.band_flux(name, b) for b in bands])
        img = fluxes[:, None, None] * unit[name][None]
        if trans is not None:
            img = img * trans
        out[name] = img.astype(np.float32)
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
    return sum(comps[name] for name in ALL_COMPONENTS if name in comps)


def sample_params(
    rng: np.random.Generator, n_objects: int, structure: str = "smooth"
) -> list[MockGalaxyParams]:
    """Draw ``n_objects`` galaxies: ``structure`` "smooth" (below) or "realistic".

    "realistic" is ``sample_realistic_params``. "smooth" draws from a mix of late,
    intermediate and early types:

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
    if structure == "realistic":
        return sample_realistic_params(rng, n_objects)
    if structure != "smooth":
        raise ValueError(f"unknown mock structure {structure!r}; known: {STRUCTURES}")
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


# redshift range of the realistic population (the prior's z range from z = 0.1)
REALISTIC_Z_RANGE = (0.1, 1.5)


def _redshift_weights(z: np.ndarray) -> np.ndarray:
    """dN/dz of i < 24 galaxies: comoving volume element times the number density."""
    from d4a_batch.mock.population import number_density
    from d4a_batch.physics.cosmology import get_cosmology

    dv = get_cosmology().differential_comoving_volume(z).value
    return dv * np.array([number_density(float(zz)) for zz in z])


@functools.lru_cache(maxsize=1)
def _redshift_cdf() -> tuple[np.ndarray, np.ndarray]:
    z = np.linspace(*REALISTIC_Z_RANGE, 57)
    w = _redshift_weights(z)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (w[1:] + w[:-1]) * np.diff(z))])
    return z, cdf / cdf[-1]


def sample_realistic_params(rng: np.random.Generator, n_objects: int) -> list[MockGalaxyParams]:
    """Galaxies of the i < 24 population at 0.1 < z < 1.5, with arms, bars, knots and dust.

    - z from dN/dz of i < 24 (``mock.population``: Ilbert et al. 2013 mass function above
      the i = 24 mass limit, times the comoving volume element); stellar mass, type and
      semi-major-axis half-light radius R_eff from van der Wel et al. 2014 at that z
      (``population.sample_population``); GalSim's (circularised) half-light radius is
      ``R_eff sqrt(q)``;
    - late types (star-forming): B/T ~ U(0, 0.1) + 0.25 U(0, 1) (log M - 9)/2 clipped to
      [0, 0.4], bulge n ~ U(1, 2.5); 70 % have spiral arms (m = 2 with 60 %, else 3-4;
      pitch U(10, 30) deg; 15-40 % of the disk light; flocculence 0.2-0.8), 30 % of those
      with log M > 9.5 a bar (8-20 % of the light, length ~ 0.3-0.6 disk hlr, q 0.2-0.35);
      10-60 knots holding 5-25 % of the disk light (up to 45 % at z > 1, where disks are
      clumpy), 70 % of them on the arms; isotropic inclination of a 0.15-thick disk;
      face-on dust tau_V ~ U(0.2, 1.0) (x 1.5 above log M = 10.3);
    - early types: B/T ~ U(0.7, 1), bulge n ~ U(3, 5) holding R_eff, bulge q from the
      population (N(0.72, 0.15)); a faint disk (1.5-2.5 R_eff), 10 % with a bar (S0s);
      0-3 knots (<= 2 % of the disk light); tau_V ~ U(0, 0.2);
    - colours: bulge g-r N(0.75, 0.06) (late: 0.1 bluer), disk 0.15-0.45 bluer, arms
      0.05-0.2 bluer than the disk, knots 0.1-0.4 bluer than the disk; bar between the
      bulge and disk; r-i in the same order.
    """
    from d4a_batch.mock.population import sample_population

    zg, cdf = _redshift_cdf()
    out: list[MockGalaxyParams] = []
    for _ in range(n_objects):
        z = float(np.interp(rng.uniform(), cdf, zg))
        pop = sample_population(rng, z, 1)
        logm, early, r_eff, q_pop = (
            float(pop.logm[0]),
            bool(pop.early[0]),
            float(pop.r_eff_kpc[0]),
            float(pop.q[0]),
        )
        cos_i = rng.uniform(0.0, 1.0)
        bulge_gr = 0.75 + 0.06 * rng.standard_normal() - (0.0 if early else 0.1)
        bulge_ri = 0.40 + 0.04 * rng.standard_normal() - (0.0 if early else 0.05)
        disk_gr = bulge_gr - rng.uniform(0.15, 0.45)
        disk_ri = bulge_ri - rng.uniform(0.05, 0.2)
        mix = rng.uniform()
        common = dict(
            seed=int(rng.integers(0, 2**31 - 1)),
            position_angle_deg=float(rng.uniform(0.0, 180.0)),
            bulge_gr=float(bulge_gr),
            bulge_ri=float(bulge_ri),
            disk_gr=float(disk_gr),
            disk_ri=float(disk_ri),
            knot_gr=float(disk_gr - rng.uniform(0.1, 0.4)),
            knot_ri=float(disk_ri - rng.uniform(0.05, 0.2)),
            arm_gr=float(disk_gr - rng.uniform(0.05, 0.2)),
            arm_ri=float(disk_ri - rng.uniform(0.02, 0.1)),
            bar_gr=float(mix * bulge_gr + (1 - mix) * disk_gr),
            bar_ri=float(mix * bulge_ri + (1 - mix) * disk_ri),
            arm_phase_deg=float(rng.uniform(0.0, 360.0)),
            bar_angle_deg=float(rng.uniform(0.0, 180.0)),
        )
        if early:
            disk_hlr = r_eff * rng.uniform(1.5, 2.5)
            inc = float(np.rad2deg(np.arccos(cos_i)))
            barred = rng.uniform() < 0.1
            p = MockGalaxyParams(
                **common,
                bulge_fraction=float(rng.uniform(0.7, 1.0)),
                bulge_hlr_kpc=max(0.1, r_eff * np.sqrt(q_pop)),
                bulge_sersic_n=float(rng.uniform(3.0, 5.0)),
                bulge_q=q_pop,
                disk_hlr_kpc=float(disk_hlr),
                inclination_deg=inc,
                knot_fraction=float(rng.uniform(0.0, 0.02)),
                n_knots=int(rng.integers(0, 4)),
                knot_sigma_kpc=float(rng.uniform(0.1, 0.3)),
                dust_tau_v=float(rng.uniform(0.0, 0.2)),
            )
            if barred:
                bar_frac = float(min(rng.uniform(0.03, 0.1), 0.9 * (1 - p.bulge_fraction)))
                p = dataclasses.replace(
                    p,
                    bar_fraction=bar_frac,
                    bar_hlr_kpc=float(disk_hlr * rng.uniform(0.3, 0.5)),
                    bar_q=float(rng.uniform(0.25, 0.4)),
                )
            out.append(p)
            continue
        # late type: q_pop came from the same isotropic thick-disk law; use it for the disk
        inc = float(np.rad2deg(np.arccos(np.sqrt(max(q_pop**2 - 0.15**2, 0.0) / (1 - 0.15**2)))))
        bt = float(np.clip(rng.uniform(0, 0.1) + 0.25 * rng.uniform() * (logm - 9) / 2, 0, 0.4))
        disk_hlr = float(max(0.3, r_eff * np.sqrt(q_pop)))
        has_arms = rng.uniform() < 0.7
        barred = logm > 9.5 and rng.uniform() < 0.3
        clumpy = z > 1.0
        fk = float(rng.uniform(0.05, 0.45 if clumpy else 0.25))
        fa = float(rng.uniform(0.15, 0.4)) if has_arms else 0.0
        fa = min(fa, 0.9 - fk)
        tau = float(rng.uniform(0.2, 1.0)) * (1.5 if logm > 10.3 else 1.0)
        out.append(
            MockGalaxyParams(
                **common,
                bulge_fraction=bt,
                bulge_hlr_kpc=float(max(0.1, disk_hlr * rng.uniform(0.1, 0.3))),
                bulge_sersic_n=float(rng.uniform(1.0, 2.5)),
                bulge_q=float(rng.uniform(0.6, 1.0)),
                disk_hlr_kpc=disk_hlr,
                inclination_deg=inc,
                knot_fraction=fk,
                n_knots=int(rng.integers(10, 60)),
                knot_sigma_kpc=float(rng.uniform(0.08, 0.25)),
                arm_fraction=fa,
                n_arms=2 if rng.uniform() < 0.6 else int(rng.integers(3, 5)),
                arm_pitch_deg=float(rng.uniform(10.0, 30.0)),
                arm_sharpness=float(rng.uniform(2.0, 8.0)),
                arm_flocculence=float(rng.uniform(0.2, 0.8)),
                knots_on_arms=0.7 if has_arms else 0.0,
                bar_fraction=float(rng.uniform(0.08, 0.2)) if barred else 0.0,
                bar_hlr_kpc=float(disk_hlr * rng.uniform(0.3, 0.6)),
                bar_q=float(rng.uniform(0.2, 0.35)),
                dust_tau_v=tau,
            )
        )
    return out
