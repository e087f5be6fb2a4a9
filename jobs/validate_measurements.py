"""The catalog's sizes, shapes and structure against the truth, on held-out mocks (issue 31).

    python jobs/calibrate_prior.py --n-calib 72 --n-score 64 --work runs/calibration
    python jobs/validate_measurements.py --packs runs/calibration/packs \
        --out docs/results/measurements

Reads sampled packs (``validation.science.save_sampled_pack``: the output rows with the
morphology columns, every object's truth image; the packs a calibration or science run
leaves), measures each truth with the catalog's own code at its true redshift, and compares
the posterior median, its 16–84 % interval and the observed stamp's value with it, per i
magnitude and per size bin (true r50 / PSF HWHM) (``d4a_batch.validation.measurements``).
Writes ``OUT/measurements.json`` (per-object table, summaries, the issue's done-when checks,
the packs' sampler) and ``OUT/measurements.png``; prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from d4a_batch.config import PhysicsConfig
from d4a_batch.prior.artifact import read_prior_config
from d4a_batch.schema import DEMO_PRIOR_DIR
from d4a_batch.validation import measurements as vm
from d4a_batch.validation.science import read_sampled_pack


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--packs", type=Path, nargs="+", required=True,
                   help="sampled-pack .npz files or folders holding them")  # fmt: skip
    p.add_argument("--prior", type=Path, default=DEMO_PRIOR_DIR, help="the packs' prior")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-sersic", action="store_true",
                   help="skip the PSF-convolved Sérsic fit of the observed stamps (the baseline)")  # fmt: skip
    args = p.parse_args(argv)
    files = sorted(f for x in args.packs for f in (x.glob("*.npz") if x.is_dir() else [x]))
    if not files:
        print(f"no sampled packs under {[str(x) for x in args.packs]}", file=sys.stderr)
        return 2
    prior_cfg, physics = read_prior_config(args.prior)[0], PhysicsConfig()
    geo = vm.Geometry(prior_cfg.kpc_per_pixel, physics.cosmology, physics.hsc_pixel_arcsec,
                      tuple(prior_cfg.bands))  # fmt: skip
    table = pd.concat(
        [vm.pack_table(read_sampled_pack(f), geo, sersic=not args.no_sersic) for f in files],
        ignore_index=True,
    )
    by_mag = vm.summary_rows(table, "mag_true", vm.MAG_EDGES)
    by_size = vm.summary_rows(table, "size_ratio", vm.SIZE_EDGES)
    checks = vm.done_when(table)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "packs": [str(f) for f in files],
        "prior": str(args.prior),
        "n_objects": len(table),
        "n_ok": int((table["status"] == "ok").sum()),
        "n_flagged": int(((table["status"] == "ok") & (table["flags"] != 0)).sum()),
        "done_when": checks,
        "by_mag": by_mag,
        "by_size": by_size,
        "objects": json.loads(table.to_json(orient="records")),
    }
    (args.out / "measurements.json").write_text(json.dumps(doc, indent=1, default=float))
    vm.figure(table, args.out / "measurements.png")
    cols = ["quantity", "n_objects", "post_n", "post_bias", "post_scatter", "post_median_abs",
            "post_coverage_16_84", "obs_bias", "obs_scatter", "obs_median_abs", "fit_bias",
            "fit_scatter", "fit_median_abs", "fit_coverage_16_84"]  # fmt: skip
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        for name, rows, key in (("i magnitude", by_mag, "mag_true"),
                                ("true r50 / PSF HWHM", by_size, "size_ratio")):  # fmt: skip
            df = pd.DataFrame(rows)
            df = df[[c for c in (cols[0], key, *cols[1:]) if c in df]]
            print(f"\n{name}:\n{df.round(3).to_string(index=False)}")
    print(f"\n{doc['n_ok']} of {doc['n_objects']} objects ok ({doc['n_flagged']} flagged)")
    for name, c in checks.items():
        print(f"{name}: {'PASS' if c['passed'] else 'FAIL'} "
              f"{json.dumps({k: v for k, v in c.items() if k != 'passed'}, default=float)}")  # fmt: skip
    print(f"wrote {args.out / 'measurements.json'} and measurements.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
