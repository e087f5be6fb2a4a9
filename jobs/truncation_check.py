"""TRUNCATED against the truth: measured vs true flux outside the model field on mock galaxies.

    python jobs/truncation_check.py [--work /tmp/d4a_truncation] [--n 8]
                                    [--out docs/results/truncation_check.json]

Mock surveys (``mock.survey``, no neighbours, stars, cosmic rays or bad columns) whose
galaxies are drawn ``large_factor`` times larger than usual on a grid that many times wider
(``MockSurveyConfig.large_factor``): the truth table's ``flux_outside_field`` is each galaxy's
exact flux share outside the prior's field. Every object is staged as the engine stages it
(``survey.staging.Stager``, default ``StagingConfig``, the demo prior's 64 × 0.5 kpc field),
and its ``truncated_fraction`` (``quality.symmetry.outskirts_light``) is compared with the
truth; one survey of usual-size galaxies (factor 1: nothing outside) checks false alarms.
Prints a table and a summary, writes both as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from d4a_batch.config import ColumnMap, FlagThresholds, PhysicsConfig, PriorConfig, StagingConfig
from d4a_batch.mock.survey import TRUTH_FILE, MockSurveyConfig, build_mock_survey
from d4a_batch.schema import Col
from d4a_batch.survey.hats_io import open_input_catalog, read_partition
from d4a_batch.survey.staging import Stager

# (large_factor, survey seed, objects): 1 = usual-size galaxies
SURVEYS = ((2.0, 12, 1), (3.0, 11, 1), (4.0, 14, 1), (1.0, 13, 3))


def measure(work: Path, factor: float, seed: int, n: int) -> pd.DataFrame:
    """Stage one mock survey; rows of (object, factor, i, z, true, measured)."""
    cfg = MockSurveyConfig(n_objects=n, seed=seed, large_fraction=1.0 if factor > 1 else 0.0,
                           large_factor=max(factor, 1.0), neighbour_fraction=0.0,
                           star_fraction=0.0, cr_fraction=0.0,
                           bad_column_fraction=0.0)  # fmt: skip
    root = build_mock_survey(work / f"x{factor:g}_seed{seed}", cfg, overwrite=True)
    truth = pd.read_parquet(root / TRUTH_FILE).set_index("object_id")
    prior = PriorConfig()
    cat = open_input_catalog(str(root))
    rows = [r for p in cat.partitions
            for r in read_partition(p, ColumnMap(), prior.bands, cat.healpix_column).to_pylist()]  # fmt: skip
    stager = Stager(str(root), prior, PhysicsConfig(), StagingConfig())
    out = []
    for o in stager.stage_rows(rows, threads=1):
        oid = int(o.ident[Col.OBJECT_ID])
        out.append({"object_id": oid, "large_factor": factor, "seed": seed,
                    "i_mag": float(truth.loc[oid, "i_mag_true"]),
                    "z": float(truth.loc[oid, "z_true"]), "footprint_px": o.footprint,
                    "true_outside": float(truth.loc[oid, "flux_outside_field"]),
                    "truncated_fraction": o.truncated_fraction, "error": o.error})  # fmt: skip
    return pd.DataFrame(out)


def summary(df: pd.DataFrame, threshold: float) -> dict:
    large = df[df.large_factor > 1]
    usual = df[df.large_factor == 1]
    err = (large.truncated_fraction - large.true_outside).abs()
    bright = large[large.i_mag < 23]
    return {
        "large galaxies": len(large),
        "within 0.05 of the truth": int((err <= 0.05).sum()),
        "median |measured - true|": float(err.median()),
        "largest |measured - true|, i < 23": float(
            (bright.truncated_fraction - bright.true_outside).abs().max()
        ),
        "largest overestimate": float((large.truncated_fraction - large.true_outside).max()),
        "TRUNCATED on true > 0.15 (i < 23)": f"{int((bright[bright.true_outside > 0.15].truncated_fraction > threshold).sum())} of {int((bright.true_outside > 0.15).sum())}",
        "TRUNCATED on true < 0.05": int(
            (df[df.true_outside < 0.05].truncated_fraction > threshold).sum()
        ),
        "usual-size galaxies": len(usual),
        "largest truncated_fraction, usual size": float(usual.truncated_fraction.max()),
        "truncated_fraction_max": threshold,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/d4a_truncation"))
    p.add_argument("--n", type=int, default=8, help="galaxies per survey (x3 for usual size)")
    p.add_argument("--out", type=Path, default=Path("docs/results/truncation_check.json"))
    args = p.parse_args(argv)
    df = pd.concat([measure(args.work, f, s, args.n * k) for f, s, k in SURVEYS])
    if df.error.notna().any():
        print(df[df.error.notna()], file=sys.stderr)
        return 1
    s = summary(df, FlagThresholds().truncated_fraction_max)
    pd.set_option("display.width", 200)
    print(df.drop(columns=["error"]).round(3).to_string(index=False))
    print(json.dumps(s, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(df.drop(columns=["error"]).to_json(orient="records"))
    args.out.write_text(json.dumps({"summary": s, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
