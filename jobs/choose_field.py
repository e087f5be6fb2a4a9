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

from d4a_batch.mock.population import MAG_LIMIT_I
from d4a_batch.physics.cosmology import arcsec_per_kpc
from d4a_batch.validation.field_choice import (
    choose_field,
    dndz_weights,
    field_row,
    measure_real,
    p_max,
    population_s90,
    s90_quantiles,
    z_grid,
)

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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

    zs = z_grid(args.z_min, args.z_max, args.z_step)
    p_limit = p_max(args.u_from_z)
    s90 = population_s90(zs, args.n_gal, args.n_points, args.seed, MAG_LIMIT_I)
    s90_bright = population_s90(zs, args.n_gal, args.n_points, args.seed + 1, args.bright_mag)
    w = dndz_weights(zs)

    print(f"p_max for u >= 1 from z = {args.u_from_z}: {p_limit:.3f} kpc/pixel")
    print("\ni < 24 population model: s90 = half-side (kpc) of the centred square with 90 % light")
    print(
        f"{'z':>5} {'s90 p50':>8} {'p90':>6} {'p95':>6} | i<{args.bright_mag:g}: {'p50':>5} {'p90':>6}"
    )
    for z in zs:
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
            grid.append(row := field_row(n, p, s90, s90_bright, zs, w, args.u_from_z))
            print(
                f"{n:4d} {p:5.2f} {n * p:9.1f} {row['u_min_from_z']:7.2f} {row['u_at_z_max']:7.2f} "
                f"{row['fraction_min']:6.3f} {row['fraction_pooled']:7.3f} "
                f"{row['fraction_min_bright']:9.3f}"
            )

    choice = choose_field(s90, s90_bright, zs, p_limit, args.target, args.require_bright)
    n_choice, p_choice = choice["N"], choice["kpc_per_pixel"]
    print(f"\nchoice: N = {n_choice}, p = {p_choice} kpc/pixel ({n_choice * p_choice:.1f} kpc)")
    print(f"{'z':>5} {'u':>6} {'field(as)':>9} {'frac i<24':>9} {'frac i<22':>9}")
    for z in map(float, zs):
        print(f"{z:5.2f} {choice['u_by_z'][z]:6.2f} {choice['field_arcsec_by_z'][z]:9.2f} "
              f"{choice['fraction_by_z'][z]:9.3f} {choice['fraction_by_z_bright'][z]:9.3f}")  # fmt: skip

    real = measure_real(args.data)
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
        "p_max_for_u_ge_1": p_limit,
        "population_s90_kpc": s90_quantiles(s90, s90_bright, zs),
        "dndz_weights": dict(zip(map(float, zs), w.tolist())),
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
