"""Deconvolve a HATS catalog of HSC galaxies with a diffusion prior; write a HATS catalog of posteriors.

    d4a-deconvolve                              # = python jobs/deconvolve_survey.py
    python jobs/deconvolve_survey.py            # the demo: mock COSMOS survey, priors/demo-64
    python jobs/deconvolve_survey.py --catalog s3://bucket/survey --output s3://bucket/out \\
        --prior /shared/priors/demo-64 --storage-options '{"anon": false}' --samples 16 --steps 100
    ray job submit --working-dir . -- python jobs/deconvolve_survey.py --output /abs/path/out

Without arguments it builds the demo survey (catalogs/demo/survey, if absent or built
for another prior), starts a local Ray cluster and writes catalogs/out/demo_posteriors.
With RAY_ADDRESS set (as under ``ray job submit``) or ``--address`` it joins that cluster
and passes no resources to ``ray.init``; the job's working directory is a temporary
copy there, so ``--output`` must then be an absolute path or a URL.

Re-runs are incremental: the run ledger next to the output says which partitions are
up to date (same input fingerprint, prior and config) and only the others are
processed; ``--force`` redoes them, ``--partitions`` limits the run to some.
``python jobs/list_runs.py OUTPUT`` lists the runs and what each changed.

Figures (``pipeline.figures``, into ``OUTPUT/_d4a_figures/``): ``--figures 1001,1002``
draws those objects' posteriors (observation, re-convolved mean, residual/σ, posterior
mean and std, variance ratio, samples if kept); ``--report`` draws the run report
(score, χ², upsampling, flag and status distributions over the whole catalog). The demo
writes the report unless ``--no-report``.

One writer per output: the run holds a lease file in the output root
(``_d4a_lease.json``, renewed every ``--lease-ttl``/4 s); a second run on the same
output stops at once, touching nothing. A killed run's lease goes stale after
``--lease-ttl`` seconds (default 600) and the next run takes it over.

Exit codes (for schedulers): 0 every partition ok (objects may still have error
rows: that is data); 3 some partitions failed (listed on stderr; re-run to retry
them); 2 a job-level error before any work, with a one-line reason (bad arguments
or config values, an output that is, lies inside or holds the catalog or the prior,
an output that holds another catalog's results (--force to write there anyway), an
output that cannot be written, an unreadable catalog or storage, a missing column,
non-integer object ids, a prior that does not load or match its config, no cutout
or PSF folder reachable); 4 the output is being written by another run (its lease
is live; nothing was done); 5 too many error rows (more than --max-error-fraction,
default 0.5, of the objects this run processed; everything was committed and the
output is complete); 130 interrupted (Ctrl-C: what was committed is kept, Ray is
shut down, the lease released; the same command does the rest); 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from d4a_batch.config import ColumnMap, ConfigError, RunConfig, from_dict
from d4a_batch.sampler_spec import DEMO_SAMPLER, SPEC_HELP, run_config_sampler, sampler_config
from d4a_batch.schema import DEMO_OUTPUT_DIR, DEMO_PRIOR_DIR, DEMO_SURVEY_DIR
from d4a_batch.survey.storage import is_absolute, output_location_problem

DEMO_OBJECTS = 32
EXIT_OK, EXIT_CRASH, EXIT_JOB_ERROR, EXIT_PARTITIONS_FAILED = 0, 1, 2, 3
EXIT_LEASE_HELD, EXIT_TOO_MANY_ERRORS = 4, 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C'd command
MAX_ERROR_FRACTION = 0.5  # default: a run where most objects fail is a failed run


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return v


def _object_ids(text: str) -> list[int]:
    try:
        return [int(i) for i in text.split(",") if i.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated object ids, got {text!r}"
        ) from None


def _column_pairs(text: str) -> dict[str, str]:
    keys = [f.name for f in dataclasses.fields(ColumnMap)]
    pairs = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, eq, name = (part.strip() for part in item.partition("="))
        if not eq or not key or not name:
            raise argparse.ArgumentTypeError(
                f"expected key=name pairs, e.g. 'photoz=photoz_mizuki', got {item.strip()!r}"
            )
        if key not in keys:
            raise argparse.ArgumentTypeError(f"unknown key {key!r} (keys: {', '.join(keys)})")
        pairs[key] = name
    return pairs


def _partition_names(text: str) -> tuple[str, ...]:
    from d4a_batch.pipeline.ledger import parse_pixel

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for name in names:
        try:
            parse_pixel(name)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


def json_object_arg(text: str) -> dict:
    """argparse type: a JSON object (exit 2 with the reason otherwise)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--catalog", help="input HATS catalog (path or URL); default: the demo survey")
    p.add_argument("--output", help=f"output HATS catalog; default: {DEMO_OUTPUT_DIR}")
    p.add_argument("--prior", help=f"prior artifact folder; default: {DEMO_PRIOR_DIR}")
    p.add_argument("--config", type=Path, help="JSON of RunConfig fields (CLI options override)")
    p.add_argument("--sampler", help=SPEC_HELP + "; over --config's (the options below override)")
    p.add_argument("--samples", type=int, help="posterior samples per object")
    p.add_argument("--steps", type=int, help="reverse diffusion steps")
    p.add_argument("--seed", type=int, help="sampler seed")
    p.add_argument(
        "--columns",
        type=_column_pairs,
        help="input column names as key=name pairs, e.g. 'photoz=photoz_mizuki,ra=ra2000' "
        f"(keys: {', '.join(f.name for f in dataclasses.fields(ColumnMap))})",
    )
    p.add_argument("--no-maps", action="store_true", help="scalars only, no tensor map columns")
    p.add_argument("--fits-maps", action="store_true", help="also write per-object FITS maps")
    p.add_argument("--limit", type=int, help="process only the first N objects")
    p.add_argument(
        "--batch-size", type=int, default=8, help="objects per sampler call (GPU: 64 or more)"
    )
    p.add_argument("--actors", type=int, help="sampling actors (default: one per GPU or CPU)")
    p.add_argument("--gpus", type=float, help="GPUs per actor (default: 1 if the cluster has GPUs)")
    p.add_argument("--cpus-per-actor", type=float, help="CPUs per actor (default: derived)")
    p.add_argument(
        "--storage-options",
        type=json_object_arg,
        help="JSON of fsspec storage options for all URIs",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="delete the existing output (and its ledger) first"
    )
    p.add_argument(
        "--force", action="store_true", help="reprocess partitions the ledger says are up to date"
    )
    p.add_argument(
        "--partitions",
        type=_partition_names,
        help="only these partitions, as ORDER/PIXEL pairs: '7/123,7/124' (default: all)",
    )
    p.add_argument("--write-staged", help="also write the staged packs here (Parquet)")
    p.add_argument("--read-staged", help="read staged packs from here instead of staging")
    p.add_argument(
        "--figures",
        type=_object_ids,
        help="object ids to draw, e.g. '1001,1002' (into OUTPUT/_d4a_figures)",
    )
    p.add_argument("--report", action="store_true", help="draw the run report (the demo does)")
    p.add_argument("--no-report", action="store_true", help="not even for the demo")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster")
    p.add_argument(
        "--max-error-fraction", type=_fraction, default=MAX_ERROR_FRACTION,
        help="exit 5 (after committing everything) when more than this fraction of the objects "
        f"processed became error rows (default {MAX_ERROR_FRACTION})",
    )  # fmt: skip
    p.add_argument(
        "--lease-ttl", type=float, default=600.0,
        help="seconds after its last heartbeat that a run's output lease is stale (default 600)",
    )  # fmt: skip
    return p.parse_args(argv)


def run_config(args: argparse.Namespace, demo: bool) -> RunConfig:
    """RunConfig from --config (or the demo's), with the CLI options on top."""
    cfg = RunConfig(sampler=DEMO_SAMPLER) if demo else RunConfig()
    if args.config:
        try:
            doc = json.loads(args.config.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config {args.config}: not valid JSON ({e})") from None
        except OSError as e:
            raise ConfigError(f"--config {args.config}: cannot read it ({e})") from None
        try:
            if isinstance(doc, dict) and "sampler" in doc:  # a SPEC or an object of fields
                doc = {**doc, "sampler": run_config_sampler(doc["sampler"])}
            cfg = from_dict(RunConfig, doc)
        except ConfigError as e:
            raise ConfigError(f"--config {args.config}: {e}") from None
    sampler = sampler_config(
        args.sampler, cfg.sampler, samples=args.samples, steps=args.steps, seed=args.seed
    )
    cfg = dataclasses.replace(cfg, sampler=sampler)
    if args.columns:  # checked key=name pairs (_column_pairs)
        cfg = dataclasses.replace(cfg, columns=dataclasses.replace(cfg.columns, **args.columns))
    if args.no_maps:
        cfg = dataclasses.replace(cfg, write_maps=False)
    if args.fits_maps:
        cfg = dataclasses.replace(cfg, fits_maps=True)
    return cfg


def demo_catalog(prior: str) -> str:
    """The demo's mock survey for ``prior`` (built if absent or built for another prior)."""
    from d4a_batch.mock.survey import DEMO_REAL_DATA_MIX, MockSurveyConfig, ensure_mock_survey
    from d4a_batch.prior.artifact import read_prior_config

    prior_cfg, _ = read_prior_config(prior)
    survey_cfg = MockSurveyConfig(
        n_objects=DEMO_OBJECTS,
        bands=tuple(prior_cfg.bands),
        kpc_per_pixel=prior_cfg.kpc_per_pixel,
        n_model=prior_cfg.image_size,
        mock_structure=prior_cfg.mock_structure,
        **DEMO_REAL_DATA_MIX,  # neighbours, image-only cutouts, too-large galaxies
    )
    catalog = str(ensure_mock_survey(DEMO_SURVEY_DIR, survey_cfg))
    print(f"[d4a] demo survey: {catalog} ({DEMO_OBJECTS} mock HSC galaxies)", flush=True)
    return catalog


def draw_figures(args, demo: bool, catalog: str, output: str, prior: str, so) -> None:
    """--figures and --report (the demo's report) after the run; a figure never fails the job."""
    from d4a_batch.pipeline.figures import write_object_figures, write_run_report

    if args.figures:
        for oid, where in write_object_figures(
            output, catalog, prior, args.figures, None, so
        ).items():
            print(f"[d4a] figure of object {oid}: {where}", flush=True)
    if (args.report or demo) and not args.no_report:
        print(f"[d4a] run report: {write_run_report(output, None, so)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with contextlib.ExitStack() as stack:  # holds the output's lease until the end
            return _job(args, stack)
    except KeyboardInterrupt:  # the stack shut down the Ray it started and released the lease
        print(
            "[d4a] interrupted: the partitions committed so far are kept (python "
            "jobs/list_runs.py OUTPUT lists them); the same command does the rest",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        return EXIT_INTERRUPTED


def _shutdown_ray_if_interrupted(exc_type, exc, tb) -> None:
    """ExitStack callback for the local Ray this job started: on Ctrl-C shut it down now
    (raylet, GCS, dashboard and runtime-env agents), not whenever its processes notice."""
    if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
        import ray

        ray.shutdown()


def _job_error(message: str) -> int:
    print(f"[d4a] job error (nothing was done): {message}", file=sys.stderr, flush=True)
    return EXIT_JOB_ERROR


def _job(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    logging.basicConfig(level=logging.INFO, format="[d4a] %(message)s", stream=sys.stdout)
    address = args.address or os.environ.get("RAY_ADDRESS")
    demo = args.catalog is None
    try:  # the config's values are checked before any work (config.check_config)
        config = run_config(args, demo)
    except (ConfigError, TypeError) as e:
        print(f"[d4a] job error (bad configuration, nothing was done): {e}", file=sys.stderr)
        return EXIT_JOB_ERROR
    if address and not (args.output and is_absolute(args.output)):
        print("[d4a] job error: on a Ray cluster --output must be an absolute path or a URL (the "
              "job's working directory is a temporary copy)", file=sys.stderr)  # fmt: skip
        return EXIT_JOB_ERROR
    output = args.output or str(DEMO_OUTPUT_DIR)
    prior = args.prior or str(DEMO_PRIOR_DIR)
    catalog = args.catalog or str(DEMO_SURVEY_DIR)
    # never the input: checked before the lease, whose file would be the first write there
    if (problem := output_location_problem(output, catalog, prior)) is not None:
        return _job_error(problem)
    from d4a_batch.pipeline.engine import ExecutionOptions, JobError, run_job
    from d4a_batch.pipeline.lease import LeaseError, LeaseHeld, hold_lease
    from d4a_batch.pipeline.ledger import Ledger, pixel_name
    from d4a_batch.pipeline.plan import check_job

    so = args.storage_options
    options = ExecutionOptions(
        actors=args.actors,
        gpus_per_actor=args.gpus,
        cpus_per_actor=args.cpus_per_actor,
        batch_size=args.batch_size,
        limit=args.limit,
        storage_options=so,
        # the demo's own output, if an older version left it without a ledger
        overwrite=args.overwrite
        or (demo and args.output is None and not Ledger(output, so).exists()),
        force=args.force,
        partitions=args.partitions,
        write_staged=args.write_staged,
        read_staged=args.read_staged,
    )
    if not demo:  # prior, catalog, columns, stamps, the output's catalog: before any write
        try:
            job = check_job(catalog, output, prior, config, options)
        except JobError as e:
            return _job_error(str(e))
    try:  # one writer per output (pipeline/lease.py): before Ray starts or anything is written
        stack.enter_context(hold_lease(output, so, ttl_s=args.lease_ttl))
    except LeaseHeld as e:
        print(f"[d4a] output busy, nothing was done: {e}", file=sys.stderr, flush=True)
        return EXIT_LEASE_HELD
    except (LeaseError, ValueError) as e:
        return _job_error(str(e))
    except OSError as e:  # the first write to the output: a folder that cannot be written
        return _job_error(f"cannot write the output {output}: {type(e).__name__}: {e}")
    if demo:  # the demo survey is built (once) while the demo's output lease is held
        catalog = demo_catalog(prior)
        try:
            job = check_job(catalog, output, prior, config, options)
        except JobError as e:
            return _job_error(str(e))

    import ray

    from d4a_batch.ray_setup import init_ray

    if not ray.is_initialized():  # a job that starts Ray shuts it down on Ctrl-C
        stack.push(_shutdown_ray_if_interrupted)
    if address:
        init_ray(address=address)
    else:
        init_ray(
            num_cpus=args.num_cpus or os.cpu_count(),
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    try:
        summary = run_job(job)
    except JobError as e:  # found by the plan (e.g. no cutout folder reachable)
        print(f"[d4a] job error (nothing was processed): {e}", file=sys.stderr, flush=True)
        return EXIT_JOB_ERROR
    out = summary.output
    print(f"[d4a] {summary.line()}", flush=True)
    print(
        f"[d4a] output HATS catalog: {out}  ({summary.partitions} partitions written, "
        f"{len(summary.skipped)} up to date)"
    )
    print("[d4a] query it, e.g.:")
    cols = "['object_id', 'status', 'flag_names', 'mag_i', 'hallucination_score', 'chi2_reduced']"
    print(
        f"  python -c \"import pandas as pd; df = pd.read_parquet('{out}/dataset'); "
        f"print(df[df.status == 'ok'][{cols}].to_string())\""
    )
    draw_figures(args, demo, catalog, out, prior, options.storage_options)
    if summary.failed_partitions:
        print(f"[d4a] {len(summary.failed_partitions)} partitions FAILED:", file=sys.stderr)
        for pixel, msg in sorted(summary.failed_partitions.items()):
            print(f"  {pixel_name(pixel)}: {msg}", file=sys.stderr)
        return EXIT_PARTITIONS_FAILED
    if summary.objects and summary.failed > args.max_error_fraction * summary.objects:
        print(
            f"[d4a] {summary.failed} of the {summary.objects} objects processed are error rows "
            f"({summary.failed / summary.objects:.0%}), more than --max-error-fraction "
            f"{args.max_error_fraction:g}: see their status_message (everything was committed)",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        return EXIT_TOO_MANY_ERRORS
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
