"""Choose the prior's field (image size N, kpc/pixel p) from galaxy sizes: a table and a JSON.

    python jobs/choose_field.py --out-json docs/results/choose_field.json

Two sources of sizes:

1. Real galaxies in ``../shared/data`` (when present): the scarlet HSC COSMOS cutouts,
   detected and deblended with sep on the g+r+i sum (segment areas; half-light and
   90 %-light radii ``sep.flux_radius`` normalised to the 2.5 Kron-radius flux, other
   sources' segments masked; observed, i.e. with the HSC PSF in them), and the HST/ACS F814W COSMOS galaxy (sky from the outer ring,
   light inside 3.5", the radii that hold 50 / 90 % of the light in circles and in centred
   squares). Angular sizes: these objects have no redshift here, so the table gives the
   field's angular half-width N theta(z) / 2 next to them.
2. The i < 24 population model of ``d4a_batch.mock.population`` (Ilbert et al. 2013 mass
   function, van der Wel et al. 2014 size-mass-redshift relations, Sersic n = 1 / 4,
   isotropic thick disks): at each z, the half-side s90 of the smallest centred square
   holding 90 % of each galaxy's light (Monte Carlo); a field of N p kpc holds >= 90 % of a
   galaxy's light when s90 <= N p / 2.

The choice: p as large as u = 0.168" / theta(z) >= 1 allows from z = 0.3 up (theta grows
as z falls below the angular-diameter turnover, so z = 0.3 binds), rounded down to 0.05
kpc; then the smallest N (a multiple of 16) for which >= 90 % of the targets have >= 90 %
of their light inside at every z in [0.1, 1.5], both for i < 24 and for the brighter
i < 22 targets (larger at every z; ``--no-require-bright`` drops that second condition).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from d4a_batch.mock.population import (
    MAG_LIMIT_I,
    light_radius_in_square,
    number_density,
    sample_population,
)
from d4a_batch.physics.cosmology import HSC_PIXEL_ARCSEC, arcsec_per_kpc, get_cosmology

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HST_PIXEL_ARCSEC = 0.03


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
    from d4a_batch.validation.real_hst import hst_galaxy_and_centre

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--z-min", type=float, default=0.1)
    ap.add_argument("--z-max", type=float, default=1.5)
    ap.add_argument("--z-step", type=float, default=0.1)
    ap.add_argument("--u-from-z", type=float, default=0.3, help="u >= 1 from this z up")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64, 80, 96, 128])
    ap.add_argument("--kpc", type=float, nargs="+", default=[0.25, 0.35, 0.5, 0.6, 0.75])
    ap.add_argument("--n-gal", type=int, default=2000, help="model galaxies per z")
    ap.add_argument("--n-points", type=int, default=1000, help="Monte Carlo points per galaxy")
    ap.add_argument("--target", type=float, default=0.9, help="fraction of targets that must fit")
    ap.add_argument("--bright-mag", type=float, default=22.0, help="also report i < this")
    ap.add_argument(
        "--no-require-bright",
        dest="require_bright",
        action="store_false",
        help="choose N on i < 24 alone (default: i < 24 and i < --bright-mag must both fit)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-json", type=Path, required=True)
    args = ap.parse_args(argv)

    z_grid = np.round(np.arange(args.z_min, args.z_max + 1e-9, args.z_step), 4)
    p_max = HSC_PIXEL_ARCSEC / float(arcsec_per_kpc(args.u_from_z))
    s90 = population_s90(z_grid, args.n_gal, args.n_points, args.seed, MAG_LIMIT_I)
    s90_bright = population_s90(z_grid, args.n_gal, args.n_points, args.seed + 1, args.bright_mag)
    dv = get_cosmology().differential_comoving_volume(z_grid).value
    w = dv * np.array([number_density(float(z)) for z in z_grid])
    w = w / w.sum()

    print(f"p_max for u >= 1 from z = {args.u_from_z}: {p_max:.3f} kpc/pixel")
    print("\ni < 24 population model: s90 = half-side (kpc) of the centred square with 90 % light")
    print(
        f"{'z':>5} {'s90 p50':>8} {'p90':>6} {'p95':>6} | i<{args.bright_mag:g}: {'p50':>5} {'p90':>6}"
    )
    for z in z_grid:
        a, b = s90[float(z)], s90_bright[float(z)]
        print(
            f"{z:5.2f} {np.median(a):8.2f} {np.percentile(a, 90):6.2f} {np.percentile(a, 95):6.2f}"
            f" | {'':>{len(str(args.bright_mag)) + 3}}{np.median(b):5.2f} {np.percentile(b, 90):6.2f}"
        )

    grid = []
    print("\nfraction of targets with >= 90 % of their light in the field (min over z; pooled)")
    print(f"{'N':>4} {'p':>5} {'field kpc':>9} {'u(0.3)':>7} {'u(1.5)':>7} {'min':>6} {'pooled':>7} "
          f"{'min i<22':>9}")  # fmt: skip
    for n in args.sizes:
        for p in args.kpc:
            half = n * p / 2
            frac = np.array([np.mean(s90[float(z)] <= half) for z in z_grid])
            frac_b = np.array([np.mean(s90_bright[float(z)] <= half) for z in z_grid])
            u = HSC_PIXEL_ARCSEC / (p * arcsec_per_kpc(z_grid))
            row = {
                "N": n,
                "kpc_per_pixel": p,
                "field_kpc": n * p,
                "u_min_from_z": float(HSC_PIXEL_ARCSEC / (p * arcsec_per_kpc(args.u_from_z))),
                "u_at_z_max": float(u[-1]),
                "fraction_by_z": dict(zip(map(float, z_grid), frac.tolist())),
                "fraction_min": float(frac.min()),
                "fraction_pooled": float((w * frac).sum()),
                "fraction_min_bright": float(frac_b.min()),
            }
            grid.append(row)
            print(
                f"{n:4d} {p:5.2f} {n * p:9.1f} {row['u_min_from_z']:7.2f} {u[-1]:7.2f} "
                f"{frac.min():6.3f} {row['fraction_pooled']:7.3f} {frac_b.min():9.3f}"
            )

    p_choice = float(np.floor(p_max / 0.05 + 1e-9) * 0.05)
    n_choice = None
    samples = [s90, s90_bright] if args.require_bright else [s90]
    for n in range(16, 1025, 16):
        half = n * p_choice / 2
        if all(np.mean(s[float(z)] <= half) >= args.target for s in samples for z in z_grid):
            n_choice = n
            break
    half = n_choice * p_choice / 2
    frac = np.array([np.mean(s90[float(z)] <= half) for z in z_grid])
    frac_b = np.array([np.mean(s90_bright[float(z)] <= half) for z in z_grid])
    u = HSC_PIXEL_ARCSEC / (p_choice * arcsec_per_kpc(z_grid))
    choice = {
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
    print(f"\nchoice: N = {n_choice}, p = {p_choice} kpc/pixel ({n_choice * p_choice:.1f} kpc)")
    print(f"{'z':>5} {'u':>6} {'field(as)':>9} {'frac i<24':>9} {'frac i<22':>9}")
    for k, z in enumerate(z_grid):
        print(f"{z:5.2f} {u[k]:6.2f} {choice['field_arcsec_by_z'][float(z)]:9.2f} "
              f"{frac[k]:9.3f} {frac_b[k]:9.3f}")  # fmt: skip

    real = {"hsc_cutouts": [], "hst_galaxy": None}
    if args.data.is_dir():
        real["hsc_cutouts"] = measure_hsc_cutouts(args.data)
        real["hst_galaxy"] = measure_hst_galaxy(args.data)
    if real["hsc_cutouts"]:
        r90 = np.array([r["r90_arcsec"] for r in real["hsc_cutouts"]])
        r50 = np.array([r["r50_arcsec"] for r in real["hsc_cutouts"]])
        print(f"\nHSC cutouts (sep, observed, PSF included): {len(r90)} sources, r50 median "
              f"{np.median(r50):.2f}\" (max {r50.max():.2f}), r90 median {np.median(r90):.2f}\" "
              f"(max {r90.max():.2f})")  # fmt: skip
        for z in (0.2, 0.3, 0.5, 1.0):
            half_arcsec = n_choice * p_choice * float(arcsec_per_kpc(z)) / 2
            print(f"  at z = {z}: field half-width {half_arcsec:.2f}\"; sources with r90 inside: "
                  f"{np.mean(r90 <= half_arcsec):.2f}")  # fmt: skip
    if real["hst_galaxy"]:
        h = real["hst_galaxy"]
        print(f"HST galaxy: r50 {h['circle_r50_arcsec']:.2f}\", r90 {h['circle_r90_arcsec']:.2f}\" "
              f"(square half-side s90 {h['square_r90_arcsec']:.2f}\"), axis ratio "
              f"{h['axis_ratio']:.2f}")  # fmt: skip

    report = {
        "inputs": vars(args) | {"data": str(args.data), "out_json": str(args.out_json)},
        "p_max_for_u_ge_1": p_max,
        "population_s90_kpc": {
            str(float(z)): {
                "p50": float(np.median(s90[float(z)])),
                "p90": float(np.percentile(s90[float(z)], 90)),
                "p95": float(np.percentile(s90[float(z)], 95)),
                "p90_bright": float(np.percentile(s90_bright[float(z)], 90)),
            }
            for z in z_grid
        },
        "dndz_weights": dict(zip(map(float, z_grid), w.tolist())),
        "grid": grid,
        "choice": choice,
        "real": real,
    }
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
