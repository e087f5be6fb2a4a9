"""Planning a survey run at scale: seconds, storage requests, driver memory, ledger size vs rows.

    python jobs/benchmark_planning.py                           # 1e4, 1e5, 1e6 rows
    python jobs/benchmark_planning.py --rows 10000 --files 50   # quick

For each row count it builds a real HATS catalog (pyarrow + hats metadata writers; ~1,000
rows per order-10 partition over a patch whose area grows with the rows; every row names
6 cutout / PSF files drawn from a shared pool of ``--files`` per band and kind, so rows
share files) twice: once on local disk and once on moto's S3 server (a separate process
that counts every HTTP request it answers). Then, for each, a fresh process plans a run
exactly as ``run_survey`` does (``check_job``, ``prepare_output``, ``plan_run`` on a local
Ray, ``start_run``: the run record in the ledger) and reports seconds, its peak RSS
(``VmHWM``; "growth" is the peak minus the peak before planning began, i.e. after
imports and joining Ray); the parent adds the S3 requests the server answered during the
plan (from every process: driver and Ray workers) and the ledger's size.

Prints a table and writes planning.json to ``--out`` (default runs/planning-<time>).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from d4a_batch.validation.planning import (  # noqa: E402
    BUCKET,
    CREDS,
    ORDER,
    ROWS_PER_PARTITION,
    build_catalog,
    build_files,
    ledger_bytes,
    peak_rss_kb,
    requests,
    results_table,
    serve_moto,
)


# --------------------------------------------------------------------------- one plan
def plan_once(catalog: str, output: str, prior: str, so: dict | None) -> dict[str, Any]:
    """Plan a run as ``run_survey`` does, in this (fresh) process; what it cost."""
    from d4a_batch.config import RunConfig
    from d4a_batch.pipeline import plan as planning
    from d4a_batch.pipeline.commit import start_run
    from d4a_batch.pipeline.ledger import Ledger
    from d4a_batch.pipeline.options import ExecutionOptions
    from d4a_batch.ray_setup import init_ray

    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    base_kb = peak_rss_kb()
    opts = ExecutionOptions(storage_options=so)
    t0 = time.monotonic()
    job = planning.check_job(catalog, output, prior, RunConfig(), opts)
    ledger = Ledger(job.output, so)
    planning.prepare_output(job.output, opts.overwrite, ledger, so)
    plan = planning.plan_run(job, ledger)
    start_run(plan, ledger)
    seconds = time.monotonic() - t0
    peak_kb = peak_rss_kb()
    return {
        "seconds": seconds,
        "partitions": len(plan.todo) + len(plan.done) + len(plan.failed),
        "failed": len(plan.failed),
        "rows": sum(plan.limits.values()),
        "driver_peak_mb": peak_kb / 1024,
        "driver_growth_mb": (peak_kb - base_kb) / 1024,
    }


def run_plan(catalog, output, prior, so, moto_url) -> dict[str, Any]:
    if moto_url:
        requests(moto_url, reset=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--plan-one", json.dumps([catalog, output, prior, so])],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"plan failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if moto_url:
        counted = requests(moto_url)
        res["requests"] = sum(counted.values())
        res["requests_by_method"] = counted
    res["ledger_bytes"] = ledger_bytes(output, so)
    return res


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--files", type=int, default=200, help="files per band and kind (shared)")
    ap.add_argument("--workdir", default="/tmp/d4a_bench_planning")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plan-one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--serve-moto", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_moto:
        return serve_moto()
    if args.plan_one:
        catalog, output, prior, so = json.loads(args.plan_one)
        print(json.dumps(plan_once(catalog, output, prior, so)))
        return None

    import s3fs

    from d4a_batch import testing

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = Path(args.out or REPO / "runs" / f"planning-{time.strftime('%Y%m%dT%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    moto = subprocess.Popen(
        [sys.executable, __file__, "--serve-moto"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{int(moto.stdout.readline())}"
        so = CREDS | {"client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"}}
        fs = s3fs.S3FileSystem(**so)
        import boto3

        boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id=CREDS["key"],
            aws_secret_access_key=CREDS["secret"],
        ).create_bucket(Bucket=BUCKET)
        prior = str(testing.make_tiny_prior(work / "prior"))
        build_files(str(work / "files"), args.files)
        build_files(f"s3://{BUCKET}/files", args.files, so)
        results = []
        for rows in args.rows:
            for where in ("local", "s3"):
                t0 = time.monotonic()
                files_root = str(work / "files") if where == "local" else f"s3://{BUCKET}/files"
                local_cat = work / f"cat_{rows}_{where}"
                parts = build_catalog(local_cat, rows, files_root, args.files)
                if where == "s3":
                    catalog, output = f"s3://{BUCKET}/cat_{rows}", f"s3://{BUCKET}/out_{rows}"
                    fs.put(str(local_cat), catalog.removeprefix("s3://"), recursive=True)
                    shutil.rmtree(local_cat)
                    res = run_plan(catalog, output, prior, so, url)
                else:
                    catalog, output = str(local_cat), str(work / f"out_{rows}")
                    res = run_plan(catalog, output, prior, None, None)
                res |= {"storage": where, "catalog_rows": rows, "catalog_partitions": parts,
                        "build_seconds": time.monotonic() - t0 - res["seconds"]}  # fmt: skip
                results.append(res)
                print(json.dumps(res), flush=True)
    finally:
        moto.terminate()
        moto.wait(timeout=30)
    print(results_table(results))
    doc = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "files_per_band_kind": args.files,
        "rows_per_partition_target": ROWS_PER_PARTITION,
        "order": ORDER,
        "results": results,
    }
    (out / "planning.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out / 'planning.json'}")
    return None


if __name__ == "__main__":
    main()
