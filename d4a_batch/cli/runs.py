"""List the runs recorded in an output catalog's ledger and what each changed.

    d4a-runs catalogs/out/demo_posteriors        # or: python jobs/list_runs.py ...
    d4a-runs s3://bucket/out --storage-options '{"anon": false}'

One block per run, oldest first: run id, status, prior, config, code version, objects and
time; then what changed against the previous run (prior, config, catalog) and which
partitions it processed and why (new, input changed, prior changed, config changed,
previous attempt failed, forced). A run that never wrote its end record is ``running``
while it holds the output's lease, else ``interrupted``; for it the objects and
partitions are those it committed (its partition records), and the ones it planned but
did not commit are listed apart.
"""

from __future__ import annotations

import argparse
import sys

from d4a_batch.cli.deconvolve import json_object_arg
from d4a_batch.pipeline.ledger import describe_runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("output", help="output HATS catalog (path or URL)")
    p.add_argument("--storage-options", type=json_object_arg, help="JSON of fsspec storage options")
    args = p.parse_args(argv)
    print(describe_runs(args.output, args.storage_options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
