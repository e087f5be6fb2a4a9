"""List the runs recorded in an output catalog's ledger and what each changed.

    d4a-runs catalogs/out/demo_posteriors        # or: python jobs/list_runs.py ...
    d4a-runs s3://bucket/out --storage-options '{"anon": false}'

One block per run, oldest first: run id, status (``interrupted`` when the run never
wrote its end record), prior, config, code version, objects and time; then what
changed against the previous run and which partitions it processed and why (new,
input changed, prior changed, config changed, previous attempt failed, forced).
"""

from __future__ import annotations

import argparse
import json
import sys

from d4a_batch.pipeline.ledger import describe_runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("output", help="output HATS catalog (path or URL)")
    p.add_argument("--storage-options", help="JSON of fsspec storage options")
    args = p.parse_args(argv)
    so = json.loads(args.storage_options) if args.storage_options else None
    print(describe_runs(args.output, so))
    return 0


if __name__ == "__main__":
    sys.exit(main())
