"""Build a mock HSC survey in COSMOS (a HATS catalog + cutout and PSF FITS files + truth).

    python catalogs/make_demo_survey.py                        # the demo: 32 objects
    python catalogs/make_demo_survey.py --n 5000 --out catalogs/demo/bench5k --seed 1

Galaxies are drawn at the prior's kpc/pixel and image size (read from the prior
artifact's config.json; the package defaults when it is absent). Outputs under
catalogs/demo/ are not committed. See d4a_batch/mock/survey.py for the layout.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from d4a_batch.config import PriorConfig
from d4a_batch.mock.survey import MockSurveyConfig, build_mock_survey
from d4a_batch.prior.artifact import read_prior_config
from d4a_batch.schema import DEMO_PRIOR_DIR, DEMO_SURVEY_DIR, PRIOR_CONFIG


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=32, help="number of objects")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEMO_SURVEY_DIR, help="survey folder (HATS root)")
    p.add_argument("--prior", type=Path, default=DEMO_PRIOR_DIR, help="prior artifact folder")
    p.add_argument("--cutout-size", type=int, default=MockSurveyConfig.cutout_size)
    p.add_argument("--partition-rows", type=int, help="HATS partition threshold (default: n/2)")
    p.add_argument("--uri-root", help="write absolute URIs under this root (e.g. s3://bucket/x)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if (args.prior / PRIOR_CONFIG).exists():
        prior, _ = read_prior_config(args.prior)
    else:
        prior = PriorConfig()
        print(f"no prior at {args.prior}: using PriorConfig() defaults", flush=True)
    cfg = MockSurveyConfig(
        n_objects=args.n,
        seed=args.seed,
        bands=tuple(prior.bands),
        kpc_per_pixel=prior.kpc_per_pixel,
        n_model=prior.image_size,
        cutout_size=args.cutout_size,
        partition_rows=args.partition_rows,
    )
    t0 = time.monotonic()
    root = build_mock_survey(args.out, cfg, overwrite=args.overwrite, uri_root=args.uri_root)
    print(f"wrote {args.n} objects to {root} in {time.monotonic() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
