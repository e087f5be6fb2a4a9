"""The prior's field (image size N, kpc/pixel p) from galaxy sizes (``jobs/choose_field.py``).

- Model sizes: ``population_s90`` draws the i < ``mag_limit`` population of
  ``mock.population`` at each z and measures s90, the half-side (kpc) of the smallest
  centred square holding 90 % of each galaxy's light; a field of N p kpc holds >= 90 % of a
  galaxy's light when s90 <= N p / 2. ``field_row`` scores one (N, p) over the z grid
  (the smallest fraction over z, and pooled with ``dndz_weights``); ``choose_field`` applies
  the two rules: p as large as u = 0.168" / theta(z) >= 1 allows from ``u_from_z`` up,
  rounded down to 0.05 kpc, then the smallest N (a multiple of 16) for which >= ``target``
  of the galaxies fit at every z, in each size sample given.
- Real sizes (angular, observed): ``measure_hsc_cutouts`` (sep on the scarlet HSC COSMOS
  cutouts' g+r+i sum: segments, half-light and 90 %-light radii normalised to the 2.5
  Kron-radius flux, other sources' segments masked) and ``measure_hst_galaxy`` (the
  HST/ACS F814W COSMOS galaxy of ``validation.real_hst``: radii holding 50 / 90 % of its
  light in circles and centred squares, and its axis ratio).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from d4a_batch.mock.population import light_radius_in_square, number_density, sample_population
from d4a_batch.physics.cosmology import HSC_PIXEL_ARCSEC, arcsec_per_kpc, get_cosmology
from d4a_batch.validation.real_hst import HST_PIXEL_ARCSEC, hst_galaxy_and_centre


def z_grid(z_min: float, z_max: float, z_step: float) -> np.ndarray:
    """The redshifts from ``z_min`` to ``z_max`` (inclusive) by ``z_step``."""
    return np.round(np.arange(z_min, z_max + 1e-9, z_step), 4)


def p_max(u_from_z: float) -> float:
    """The largest kpc/pixel with u = 0.168" / theta(z) >= 1 from ``u_from_z`` up."""
    return HSC_PIXEL_ARCSEC / float(arcsec_per_kpc(u_from_z))


def population_s90(
    z_grid: np.ndarray, n_gal: int, n_points: int, seed: int, mag_limit: float
) -> dict[float, np.ndarray]:
    """{z: s90[n_gal]} (kpc) of the i < mag_limit population model."""
    rng = np.random.default_rng(seed)
    out = {}
    for z in z_grid:
        pop = sample_population(rng, float(z), n_gal, mag_limit)
        out[float(z)] = light_radius_in_square(rng, pop, 0.9, n_points)
    return out


def dndz_weights(z_grid: np.ndarray) -> np.ndarray:
    """Weights of the z grid (sum 1): comoving volume times the i < 24 number density."""
    dv = get_cosmology().differential_comoving_volume(z_grid).value
    w = dv * np.array([number_density(float(z)) for z in z_grid])
    return w / w.sum()


def fraction_inside(s90: dict[float, np.ndarray], z_grid: np.ndarray, half: float) -> np.ndarray:
    """Per z: the fraction of galaxies with s90 <= ``half`` (kpc)."""
    return np.array([np.mean(s90[float(z)] <= half) for z in z_grid])


def field_row(
    n: int, p: float, s90: dict[float, np.ndarray], s90_bright: dict[float, np.ndarray],
    z_grid: np.ndarray, w: np.ndarray, u_from_z: float,
) -> dict[str, Any]:  # fmt: skip
    """One (N, p) of the grid: its upsampling factors and the fractions that fit."""
    frac = fraction_inside(s90, z_grid, n * p / 2)
    frac_b = fraction_inside(s90_bright, z_grid, n * p / 2)
    u = HSC_PIXEL_ARCSEC / (p * arcsec_per_kpc(z_grid))
    return {
        "N": n,
        "kpc_per_pixel": p,
        "field_kpc": n * p,
        "u_min_from_z": float(HSC_PIXEL_ARCSEC / (p * arcsec_per_kpc(u_from_z))),
        "u_at_z_max": float(u[-1]),
        "fraction_by_z": dict(zip(map(float, z_grid), frac.tolist())),
        "fraction_min": float(frac.min()),
        "fraction_pooled": float((w * frac).sum()),
        "fraction_min_bright": float(frac_b.min()),
    }


def choose_field(
    s90: dict[float, np.ndarray], s90_bright: dict[float, np.ndarray], z_grid: np.ndarray,
    p_limit: float, target: float, require_bright: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """The choice: p = ``p_limit`` rounded down to 0.05 kpc, then the smallest N (a multiple
    of 16, up to 1024) for which >= ``target`` of the targets fit at every z (i < 24, and the
    bright sample too unless ``require_bright`` is false)."""
    p_choice = float(np.floor(p_limit / 0.05 + 1e-9) * 0.05)
    samples = [s90, s90_bright] if require_bright else [s90]
    n_choice = next(
        (
            n
            for n in range(16, 1025, 16)
            if all(
                np.mean(s[float(z)] <= n * p_choice / 2) >= target for s in samples for z in z_grid
            )
        ),
        None,
    )
    if n_choice is None:
        raise ValueError(f"no N <= 1024 at p = {p_choice} holds {target} of the targets")
    frac = fraction_inside(s90, z_grid, n_choice * p_choice / 2)
    frac_b = fraction_inside(s90_bright, z_grid, n_choice * p_choice / 2)
    u = HSC_PIXEL_ARCSEC / (p_choice * arcsec_per_kpc(z_grid))
    return {
        "N": n_choice,
        "kpc_per_pixel": p_choice,
        "field_kpc": n_choice * p_choice,
        "fraction_by_z": dict(zip(map(float, z_grid), frac.tolist())),
        "fraction_by_z_bright": dict(zip(map(float, z_grid), frac_b.tolist())),
        "u_by_z": dict(zip(map(float, z_grid), u.tolist())),
        "field_arcsec_by_z": dict(
            zip(map(float, z_grid), (n_choice * p_choice * arcsec_per_kpc(z_grid)).tolist())
        ),
    }


def s90_quantiles(
    s90: dict[float, np.ndarray], s90_bright: dict[float, np.ndarray], z_grid: Sequence[float]
) -> dict[str, dict[str, float]]:
    """Per z (as a string): the median, 90th and 95th percentiles of s90, and the bright
    sample's 90th."""
    return {
        str(float(z)): {
            "p50": float(np.median(s90[float(z)])),
            "p90": float(np.percentile(s90[float(z)], 90)),
            "p95": float(np.percentile(s90[float(z)], 95)),
            "p90_bright": float(np.percentile(s90_bright[float(z)], 90)),
        }
        for z in z_grid
    }


def measure_hsc_cutouts(data_dir: Path) -> list[dict]:
    """sep sizes (arcsec, observed) of the detected sources in the scarlet HSC cutouts."""
    import sep

    rows = []
    for name in ("hsc_cosmos_35.npz", "hsc_cosmos.npz"):
        path = data_dir / "scarlet" / name
        if not path.exists():
            continue
        d = np.load(path)
        bands = list(d["filters"])
        img = sum(d["images"][bands.index(b)].astype(np.float64) for b in ("g", "r", "i"))
        img = np.ascontiguousarray(img)
        bkg = sep.Background(img, bw=16, bh=16)
        data = img - bkg.back()
        objs, seg = sep.extract(
            data, 1.5, err=bkg.globalrms, segmentation_map=True, deblend_cont=0.005
        )
        seg_id = np.arange(1, len(objs) + 1, dtype=np.int32)
        masked = dict(seg_id=seg_id, segmap=seg)  # other sources' segments are masked
        kron, _ = sep.kron_radius(
            data, objs["x"], objs["y"], objs["a"], objs["b"], objs["theta"], 6.0, **masked
        )
        flux, _, _ = sep.sum_ellipse(
            data, objs["x"], objs["y"], objs["a"], objs["b"], objs["theta"],
            2.5 * np.maximum(kron, 1.0), subpix=1, **masked,
        )  # fmt: skip
        rmax = 2.5 * np.maximum(kron, 1.0) * objs["a"]
        radii, rflag = sep.flux_radius(
            data, objs["x"], objs["y"], rmax, [0.5, 0.9], normflux=flux, subpix=5, **masked
        )
        for k, o in enumerate(objs):
            rows.append(
                {
                    "cutout": name,
                    "x": float(o["x"]),
                    "y": float(o["y"]),
                    "segment_pixels": int((seg == k + 1).sum()),
                    "segment_radius_arcsec": float(
                        np.sqrt((seg == k + 1).sum() / np.pi) * HSC_PIXEL_ARCSEC
                    ),
                    "r50_arcsec": float(radii[k, 0] * HSC_PIXEL_ARCSEC),
                    "r90_arcsec": float(radii[k, 1] * HSC_PIXEL_ARCSEC),
                    "axis_ratio": float(o["b"] / o["a"]),
                    "sep_flag": int(rflag[k]),
                }
            )
    return rows


def measure_hst_galaxy(data_dir: Path) -> dict | None:
    """Radii (arcsec) holding 50 / 90 % of the HST galaxy's light: circles and centred squares."""
    path = data_dir / "galsim" / "cosmos_147246_f814w.fits"
    if not path.exists():
        return None
    img, (gy, gx) = hst_galaxy_and_centre(path)  # sky-subtracted, cut to 3.5''
    y, x = np.indices(img.shape)
    r = np.hypot(y - gy, x - gx)
    inside = r < 3.5 / HST_PIXEL_ARCSEC
    out = {"file": path.name, "aperture_arcsec": 3.5}
    for kind, dist in (("circle", r), ("square", np.maximum(np.abs(y - gy), np.abs(x - gx)))):
        order = np.argsort(dist[inside])
        cum = np.cumsum(img[inside][order])
        for f in (0.5, 0.9):
            rad = float(np.interp(f * cum[-1], cum, dist[inside][order])) * HST_PIXEL_ARCSEC
            out[f"{kind}_r{int(f * 100)}_arcsec"] = rad
    m = img / img.sum()
    qyy, qxx = (m * (y - gy) ** 2).sum(), (m * (x - gx) ** 2).sum()
    qxy = (m * (y - gy) * (x - gx)).sum()
    ev = np.linalg.eigvalsh([[qxx, qxy], [qxy, qyy]])
    out["axis_ratio"] = float(np.sqrt(ev[0] / ev[1]))
    return out


def measure_real(data_dir: Path) -> dict[str, Any]:
    """Both real measurements (empty when ``data_dir`` is not a folder)."""
    if not data_dir.is_dir():
        return {"hsc_cutouts": [], "hst_galaxy": None}
    return {
        "hsc_cutouts": measure_hsc_cutouts(data_dir),
        "hst_galaxy": measure_hst_galaxy(data_dir),
    }
