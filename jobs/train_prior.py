"""Train the diffusion prior on mock galaxies with Ray Train and export the prior artifact.

    python jobs/train_prior.py --out priors/demo-64 --storage /tmp/d4a_train --name demo-64 \
        --prior-config jobs/configs/demo-64.json --lr 4e-4 --max-train-seconds 2700 \
        --cpus-per-worker 2 --stats-steps 50          # how the shipped demo prior was made
    ray job submit --working-dir . -- python jobs/train_prior.py --address auto ...

Without ``--address`` the script starts a local Ray cluster; with it, it joins
the existing one (no resources passed to ``ray.init``). Training images are
generated with Ray Data and materialised as Parquet under ``--data`` (reused if
present). Running the same command again with the same ``--storage`` and
``--name`` resumes from the run's latest checkpoint. ``--export-checkpoint``
skips training and exports a given checkpoint folder.

The HSC-field prior (``jobs/configs/hsc-64.json``: 64 px at 0.75 kpc/pixel, realistic
mocks with arms, bars, knots and dust; why: ``jobs/configs/hsc-64.md``) trains with

    python jobs/train_prior.py --storage /tmp/d4a_train --name hsc-64 \
        --prior-config jobs/configs/hsc-64.json --n-images 20000 --steps 20000 \
        --lr 2e-4 --batch-size 64 --checkpoint-every 500 --gpu --out priors/hsc-64

(the same command again resumes from the latest checkpoint).

On a multi-node cluster keep the training images and checkpoints where every node reaches
them and spread the workers (a lost node: the worker group restarts from the last
checkpoint, up to ``--max-failures`` times; the same command again resumes it too):

    ray job submit --working-dir . -- python jobs/train_prior.py --workers 2 \
        --placement-strategy SPREAD --storage s3://bucket/train --name hsc-64 \
        --storage-options '{"client_kwargs": {"endpoint_url": "https://..."}}' ...

Without Ray (``--single-process``): the same model, step, schedule, EMA and checkpoints in
this one process on one device (``--device``, default CUDA when present), with the training
images from a file written by ``jobs/make_training_set.py`` (``--data mocks.npy.xz``) or
generated here. It is the path for training ``priors/hsc-64`` on a lent GPU machine that has
PyTorch but neither Ray nor GalSim (nothing can be installed there; ``jobs/configs/hsc-64-gpu.sh``):

    python jobs/make_training_set.py --prior-config jobs/configs/hsc-64.json \
        --n-images 20000 --processes 2 --out training/hsc-64/mocks.npy.xz   # here, with GalSim
    python jobs/train_prior.py --single-process --data training/hsc-64/mocks.npy.xz \
        --prior-config jobs/configs/hsc-64.json --storage /tmp/train --name hsc-64 ...

``jobs/configs/demo-64.json`` is the demo architecture (``PriorConfig()``) with a
v-predicting network and posterior-variance reverse steps; without
``--prior-config`` the network predicts ε, as improved-diffusion's do (see
``prior.diffusion`` for why the demo uses v).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from d4a_batch.config import PriorConfig, from_dict
from d4a_batch.survey.storage import filesystem, join_uri
from d4a_batch.training.inputs import (
    data_folder_name,
    training_images,
    write_prior_samples,
)
from d4a_batch.training.loop import (
    LR_SCHEDULES,
    TrainConfig,
    export_prior,
    list_checkpoints,
    run_training,
)
from d4a_batch.training.objective import LOSS_WEIGHTINGS, TIMESTEP_SAMPLINGS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help="prior artifact folder to write at the end")
    p.add_argument(
        "--storage",
        required=True,
        help="Ray Train storage: a local folder or a URL (s3://bucket/prefix) every node reaches",
    )
    p.add_argument(
        "--storage-options",
        help="JSON of fsspec storage options for a URL --storage/--data (e.g. an S3 endpoint)",
    )
    p.add_argument("--name", default="prior", help="run name (same name + storage: resume)")
    p.add_argument(
        "--data",
        help="Parquet folder or URL of training images (default: storage/data-<n>-<seed>)",
    )
    p.add_argument("--n-images", type=int, default=6000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument(
        "--prior-config", type=Path, help="JSON of PriorConfig fields (default: PriorConfig())"
    )
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--max-train-seconds", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--max-failures", type=int, default=3)
    p.add_argument(
        "--placement-strategy",
        default="PACK",
        choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
        help="Ray placement of the workers (SPREAD: over the nodes)",
    )
    p.add_argument(
        "--address", help="existing Ray cluster (e.g. 'auto'); default: start a local one"
    )
    p.add_argument("--num-cpus", type=int, help="logical CPUs of the local cluster")
    p.add_argument("--stats-samples", type=int, default=256)
    p.add_argument("--stats-steps", type=int, default=100)
    p.add_argument("--export-checkpoint", type=Path, help="only export this checkpoint folder")
    p.add_argument(
        "--single-process",
        action="store_true",
        help="train in this process without Ray (local --storage; --data: a .npy[.xz] file)",
    )
    p.add_argument("--device", help="--single-process: torch device (default: cuda if present)")
    p.add_argument("--log-every", type=int, default=50, help="--single-process: steps per log line")
    p.add_argument(
        "--samples-out",
        type=Path,
        help="--single-process: after export, draw --n-samples-out ancestral samples of the"
        " exported prior (--stats-steps steps) on the training device into this .npz (x,"
        " float16) for jobs/evaluate_prior.py --samples",
    )
    p.add_argument("--n-samples-out", type=int, default=512)
    o = p.add_argument_group("objective (training.objective; issue 29)")
    o.add_argument("--loss-weighting", default="uniform", choices=LOSS_WEIGHTINGS)
    o.add_argument("--min-snr-gamma", type=float, default=5.0)
    o.add_argument("--timestep-sampling", default="uniform", choices=TIMESTEP_SAMPLINGS)
    o.add_argument("--logsnr-loc", type=float, default=0.0)
    o.add_argument("--logsnr-scale", type=float, default=2.0)
    o.add_argument("--lr-schedule", default="cosine", choices=LR_SCHEDULES)
    o.add_argument(
        "--downsample", type=int, default=1,
        help="progressive resolution: train at image size / this on binned images",
    )  # fmt: skip
    r = p.add_argument_group("sessions (--single-process)")
    r.add_argument(
        "--checkpoint-every-seconds", type=float, default=0.0,
        help="also checkpoint every this many seconds of training",
    )  # fmt: skip
    r.add_argument("--keep-checkpoints", type=int, default=0, help="keep the newest N (0: all)")
    r.add_argument(
        "--resume-state", type=Path,
        help="a checkpoint folder to resume from when --storage/--name has none (the"
        " committed training/<name>/state)",
    )  # fmt: skip
    r.add_argument(
        "--stop-after-seconds", type=float, default=0.0,
        help="end this call (with a checkpoint) after this many seconds of its own training",
    )  # fmt: skip
    r.add_argument(
        "--save-state", type=Path,
        help="after training (or alone, with --export-checkpoint as the source), write the"
        " compact resumable state (Adam moments in bfloat16) to this folder",
    )  # fmt: skip
    return p.parse_args(argv)


def main_single_process(args: argparse.Namespace, cfg: TrainConfig) -> int:
    """``--single-process``: train without Ray, then export (stats drawn on the same device)."""
    import platform

    import torch

    from d4a_batch.training.single import save_resumable_state, train_single_process

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.cpus_per_worker)
    else:
        torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    images, source = training_images(args.data, args.n_images, args.data_seed, cfg.prior)
    print(f"[data] {tuple(images.shape)} {images.dtype} in {time.perf_counter() - t0:.0f} s")
    t_fit = time.perf_counter()
    last = train_single_process(
        cfg, images, Path(args.storage) / args.name, device, log_every=args.log_every,
        resume_from=args.resume_state, stop_after_seconds=args.stop_after_seconds,
    )  # fmt: skip
    fit_seconds = time.perf_counter() - t_fit
    print(f"[train] finished in {fit_seconds:.0f} s: {last}", flush=True)
    if args.save_state is not None:
        print(f"[state] wrote {save_resumable_state(last, args.save_state)}", flush=True)
    if args.out is not None:
        job = {
            "job_fit_seconds": fit_seconds,
            "n_training_images": int(images.shape[0]),
            "training_images": source,
            "single_process": True,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
        }
        out = export_prior(
            last, args.out, args.stats_samples, args.stats_steps, record_extra=job, device=device
        )
        print(f"[export] wrote {out}", flush=True)
        if args.samples_out is not None:
            t0 = time.perf_counter()
            n = write_prior_samples(out, args.samples_out, args.n_samples_out, args.stats_steps,
                                    args.seed + 1, device)  # fmt: skip
            print(f"[samples] {n} in {time.perf_counter() - t0:.0f} s -> {args.samples_out}")
    return 0


def train_config(args: argparse.Namespace) -> TrainConfig:
    prior = PriorConfig()
    if args.prior_config is not None:
        prior = from_dict(PriorConfig, json.loads(args.prior_config.read_text()))
    return TrainConfig(
        prior=prior,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        ema_decay=args.ema_decay,
        max_steps=args.steps,
        max_train_seconds=args.max_train_seconds,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        loss_weighting=args.loss_weighting,
        min_snr_gamma=args.min_snr_gamma,
        timestep_sampling=args.timestep_sampling,
        logsnr_loc=args.logsnr_loc,
        logsnr_scale=args.logsnr_scale,
        lr_schedule=args.lr_schedule,
        downsample=args.downsample,
        checkpoint_every_seconds=args.checkpoint_every_seconds,
        keep_checkpoints=args.keep_checkpoints,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export_checkpoint is not None and args.save_state is not None and args.out is None:
        from d4a_batch.training.single import save_resumable_state

        print(f"[state] wrote {save_resumable_state(args.export_checkpoint, args.save_state)}")
        return 0
    if args.export_checkpoint is not None:
        if args.out is None:
            sys.exit("--export-checkpoint needs --out")
        out = export_prior(args.export_checkpoint, args.out, args.stats_samples, args.stats_steps)
        print(f"[export] wrote {out}", flush=True)
        return 0
    if args.single_process:
        return main_single_process(args, train_config(args))

    import ray
    import ray.data

    from d4a_batch.ray_setup import init_ray
    from d4a_batch.training.data import read_training_dataset, write_mock_parquet

    if args.address or os.environ.get("RAY_ADDRESS"):
        init_ray(address=args.address)  # join: no resources passed
    else:
        init_ray(num_cpus=args.num_cpus, include_dashboard=False)

    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = train_config(args)
    prior = cfg.prior
    t_job = time.perf_counter()
    so = json.loads(args.storage_options) if args.storage_options else None
    data = args.data or join_uri(
        args.storage, data_folder_name(prior, args.n_images, args.data_seed)
    )
    fs, data_path = filesystem(data, so)
    if not fs.glob(f"{data_path}/*.parquet"):
        t0 = time.perf_counter()
        write_mock_parquet(data, args.n_images, prior, args.data_seed, storage_options=so)
        print(f"[data] {args.n_images} mock galaxies -> {data} in {time.perf_counter() - t0:.0f} s")
    t_fit = time.perf_counter()
    result = run_training(
        cfg,
        read_training_dataset(data, so).materialize(),  # epochs re-read memory, not Parquet
        args.storage,
        args.name,
        num_workers=args.workers,
        use_gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures,
        storage_options=so,
        placement_strategy=args.placement_strategy,
    )
    fit_seconds = time.perf_counter() - t_fit
    print(f"[train] finished in {fit_seconds:.0f} s: {result.metrics}", flush=True)
    ckpts = list_checkpoints(args.storage, args.name, so)
    print(f"[train] checkpoints: {[str(c).rsplit('/', 1)[-1] for c in ckpts]}", flush=True)
    if args.out is not None:
        job = {
            "job_fit_seconds": fit_seconds,
            "job_seconds_before_export": time.perf_counter() - t_job,
            "n_training_images": args.n_images,
            "data_seed": args.data_seed,
            "workers": args.workers,
            "cpus_per_worker": args.cpus_per_worker,
        }
        with tempfile.TemporaryDirectory() as tmp:  # a local copy (object storage too)
            name = Path(result.checkpoint.path).name
            last = result.checkpoint.to_directory(str(Path(tmp) / name))
            out = export_prior(
                last, args.out, args.stats_samples, args.stats_steps, record_extra=job
            )
        print(f"[export] wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
