"""Ray Train (V2) training of the diffusion prior, checkpoints, resume and artifact export.

Longer than 400 lines: one concern, the Ray Train run of the prior and what it leaves:
``TrainConfig``, the learning-rate schedule, the per-worker loop, the checkpoint folder
format it writes and resumes from, the driver (``run_training``) and the export of a
checkpoint to a prior artifact. The checkpoint's layout (``STATE_FILE``, ``CONFIG_FILE``,
the state dict's keys) is written by the loop and read by resume, listing and export; a
split would separate the writer of that format from its readers.

``train_loop_per_worker`` runs on every worker of a ``TorchTrainer``: DDP model
(gloo on CPU, nccl on GPU, via ``prepare_model``), its shard of the ``"train"``
dataset (column ``x`` [C,N,N] in x-space), random shifts/flips/rotations, the
ε-MSE of ``GaussianDiffusion.training_losses``, AdamW with warmup + cosine
decay, an EMA of the weights, bf16 autocast on GPU only. Every step all ranks
call ``ray.train.report`` (loss, images/s); every ``checkpoint_every`` steps
rank 0 attaches a checkpoint folder (``state.pt``: model, EMA, optimizer, step,
history; ``config.json``: the TrainConfig), and a restarted run (worker
failure under ``FailureConfig``, or the driver run again with the same
storage path and name) continues from ``ray.train.get_checkpoint()``. The storage
path is a local folder or a URL on object storage (``train_storage``).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from d4a_batch.config import PriorConfig, from_dict, to_dict
from d4a_batch.prior.artifact import compute_prior_stats, save_prior
from d4a_batch.prior.diffusion import build_diffusion
from d4a_batch.prior.unet import build_unet
from d4a_batch.survey.storage import filesystem, has_scheme, join_uri
from d4a_batch.training.data import X_COLUMN, augment, default_max_shift
from d4a_batch.training.objective import (
    LOSS_WEIGHTINGS,
    TIMESTEP_SAMPLINGS,
    loss_weights,
    phase_prior,
    sample_timesteps,
)

STATE_FILE = "state.pt"
LR_SCHEDULES = ("cosine", "constant")
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one training run (batch size is per worker)."""

    prior: PriorConfig = field(default_factory=PriorConfig)
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_fraction: float = 0.1  # cosine decay from lr to this fraction at max_steps
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # ramped as min(decay, (1 + step) / (10 + step))
    max_steps: int = 2000
    max_train_seconds: float = 0.0  # also stop (and finish the schedule) at this time; 0: none
    checkpoint_every: int = 200
    max_shift: int = -1  # random shift in pixels; -1: default_max_shift(image_size)
    shuffle_buffer: int = 256
    seed: int = 0
    # what a step optimises (training.objective): Min-SNR-γ weighting, log-SNR-centred
    # timestep sampling, progressive resolution (train at image_size / downsample on binned
    # images, schedule shifted by 2 ln(downsample)); the defaults are the plain DDPM recipe
    loss_weighting: str = "uniform"  # "uniform" | "min_snr"
    min_snr_gamma: float = 5.0
    timestep_sampling: str = "uniform"  # "uniform" | "logsnr_normal" | "logsnr_laplace"
    logsnr_loc: float = 0.0
    logsnr_scale: float = 2.0
    lr_schedule: str = "cosine"  # "cosine" | "constant" (after warmup: every EMA usable)
    downsample: int = 1
    # single-process runs: also checkpoint every this many seconds of training (0: steps
    # only), keep only the newest keep_checkpoints folders (0: all)
    checkpoint_every_seconds: float = 0.0
    keep_checkpoints: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (
            ("loss_weighting", LOSS_WEIGHTINGS),
            ("timestep_sampling", TIMESTEP_SAMPLINGS),
            ("lr_schedule", LR_SCHEDULES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")  # fmt: skip
        if not (self.min_snr_gamma > 0 and self.logsnr_scale > 0 and self.downsample >= 1):
            raise ValueError(
                "TrainConfig: min_snr_gamma and logsnr_scale must be > 0, downsample >= 1"
            )

    @property
    def trained_prior(self) -> PriorConfig:
        """The PriorConfig of the network this run trains (``prior`` itself, or its
        half-size pre-training phase when ``downsample > 1``)."""
        return phase_prior(self.prior, self.downsample)


def progress(cfg: TrainConfig, step: int, seconds: float) -> float:
    """Fraction of the run done: by steps or by training time, whichever is further along."""
    frac = step / cfg.max_steps
    if cfg.max_train_seconds > 0:
        frac = max(frac, seconds / cfg.max_train_seconds)
    return frac


def lr_at(cfg: TrainConfig, step: int, seconds: float = 0.0) -> float:
    """Learning rate of step ``step`` (0-based): linear warmup, then cosine to min_lr_fraction
    (or constant, ``lr_schedule = "constant"``).

    The cosine follows ``progress`` (steps or time), rescaled to start after the warmup.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    start = cfg.warmup_steps / cfg.max_steps
    frac = min(1.0, max(0.0, (progress(cfg, step, seconds) - start) / max(1e-9, 1 - start)))
    return cfg.lr * (
        cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * frac))
    )


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm.detach(), 1.0 - decay)


def save_checkpoint_dir(folder: Path, state: dict[str, Any], cfg: TrainConfig) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / STATE_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True))
    return folder


def load_checkpoint_dir(folder: str | Path) -> tuple[dict[str, Any], TrainConfig]:
    """(state, TrainConfig) of a checkpoint folder; tensors only are unpickled."""
    folder = Path(folder)
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(
            f"{folder / STATE_FILE}: refusing to load: the checkpoint holds objects other than"
            " tensors and plain containers (unpickling them could run code)"
        ) from e
    cfg = from_dict(TrainConfig, json.loads((folder / CONFIG_FILE).read_text()))
    return state, cfg


def checkpoint_state(
    net: torch.nn.Module,
    ema: torch.nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    history: list,
    train_seconds: float,
    world_size: int,
) -> dict[str, Any]:
    """What a checkpoint's state.pt holds (weights on the CPU); ``restore_state`` reads it."""
    return {
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()},
        "optimizer": opt.state_dict(),
        "step": step,
        "history": history,
        "train_seconds": train_seconds,
        "world_size": world_size,
    }


def restore_state(
    state: dict[str, Any], net: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer
) -> tuple[int, list, float]:
    """Load a checkpoint state into the model, EMA and optimizer: (step, history, seconds)."""
    net.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state["history"]), float(state["train_seconds"])


def train_step(
    model: torch.nn.Module,
    net: torch.nn.Module,
    ema: torch.nn.Module,
    opt: torch.optim.Optimizer,
    diffusion: Any,
    x0: torch.Tensor,
    t: torch.Tensor,
    lr: float,
    cfg: TrainConfig,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step, shared by the Ray Train worker and ``train_single_process``.

    ``model``: what is called (``net`` itself, or its DDP wrapper); ``x0`` [B, C, N, N] and
    ``t`` [B] on the model's device. The per-sample losses are weighted as
    ``cfg.loss_weighting`` says (``objective.loss_weights``). The loss runs under bf16 autocast on CUDA (fp32
    elsewhere); gradients are clipped to ``cfg.grad_clip``; the EMA decay is ramped as
    min(decay, (1 + step) / (10 + step)). Returns (loss, grad norm) as 0-d tensors on the
    device, unsynchronised.
    """
    for g in opt.param_groups:
        g["lr"] = lr
    weights = loss_weights(
        diffusion.alphas_cumprod, t, cfg.loss_weighting, cfg.min_snr_gamma,
        diffusion.parameterization,
    )  # fmt: skip
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=x0.device.type == "cuda"):
        loss = (diffusion.training_losses(model, x0, t)["loss"] * weights).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    opt.step()
    ema_update(ema, net, min(cfg.ema_decay, (1 + step) / (10 + step)))
    return loss.detach(), grad_norm.detach()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function; ``config = {"train": to_dict(TrainConfig), "threads": int}``."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainConfig, config["train"])
    torch.set_num_threads(int(config.get("threads", 1)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + 1000 * rank)
    gen = torch.Generator().manual_seed(cfg.seed + 7919 * rank)

    if cfg.downsample != 1:
        raise ValueError("progressive resolution (downsample > 1) runs in train_single_process")
    net = build_unet(cfg.prior)
    ema = build_unet(cfg.prior)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, history, train_seconds, resumed_from = 0, [], 0.0, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state, _ = load_checkpoint_dir(d)
        step, history, train_seconds = restore_state(state, net, ema, opt)
        resumed_from = step
        if rank == 0:
            print(f"[train] resumed from checkpoint at step {step}", flush=True)
    ema.to(device).eval().requires_grad_(False)
    model = ray.train.torch.prepare_model(net)
    diffusion = build_diffusion(cfg.prior)
    max_shift = default_max_shift(cfg.prior.image_size) if cfg.max_shift < 0 else cfg.max_shift
    shard = ray.train.get_dataset_shard("train")

    done = step >= cfg.max_steps
    while not done:
        batches = shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            dtypes=torch.float32,
        )
        for batch in batches:
            t0 = time.perf_counter()
            x0 = batch[X_COLUMN]
            if x0.shape[1:] != (cfg.prior.in_channels, cfg.prior.image_size, cfg.prior.image_size):
                raise ValueError(
                    f"training batch of shape {tuple(x0.shape)} does not fit the prior"
                )
            x0 = augment(x0.cpu(), gen, max_shift).to(device)
            t = sample_timesteps(
                diffusion.alphas_cumprod, x0.shape[0], gen, cfg.timestep_sampling,
                cfg.logsnr_loc, cfg.logsnr_scale,
            ).to(device)  # fmt: skip
            lr = lr_at(cfg, step, train_seconds)
            loss, grad_norm = train_step(model, net, ema, opt, diffusion, x0, t, lr, cfg, step)
            step += 1
            dt = time.perf_counter() - t0
            train_seconds += dt
            metrics = {
                "step": step,
                "loss": float(loss.detach()),
                "grad_norm": float(grad_norm),
                "lr": lr,
                "images_per_s": world * x0.shape[0] / dt,
                "train_seconds": train_seconds,
                "resumed_from": -1 if resumed_from is None else resumed_from,
            }
            history.append([step, metrics["loss"], metrics["images_per_s"]])
            frac = torch.tensor([progress(cfg, step, train_seconds)])
            if world > 1:  # every rank must agree on the last step
                torch.distributed.all_reduce(frac, op=torch.distributed.ReduceOp.MAX)
            done = float(frac) >= 1.0
            if rank == 0 and (step % 10 == 0 or step == 1 or done):
                print(
                    f"[train] step {step}/{cfg.max_steps} loss {metrics['loss']:.4f} "
                    f"{metrics['images_per_s']:.1f} img/s lr {metrics['lr']:.2e} "
                    f"train {train_seconds:.0f} s",
                    flush=True,
                )
            if step % cfg.checkpoint_every == 0 or done:
                with tempfile.TemporaryDirectory() as tmp:
                    checkpoint = None
                    if rank == 0:
                        state = checkpoint_state(net, ema, opt, step, history, train_seconds, world)
                        save_checkpoint_dir(Path(tmp), state, cfg)
                        checkpoint = ray.train.Checkpoint.from_directory(tmp)
                    ray.train.report(
                        metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:07d}"
                    )
            else:
                ray.train.report(metrics)
            if done:
                break


def train_storage(
    storage_path: str | Path, storage_options: dict[str, Any] | None = None
) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``.

    A local path: made absolute, no filesystem (Ray Train's local default). A URL
    (``s3://bucket/prefix``): the path within its fsspec filesystem and that filesystem
    wrapped for pyarrow, built from the same ``storage_options`` as the survey engine's
    (``survey.storage.filesystem``: endpoint, keys, retries), so checkpoints land on the
    object store every node can reach.
    """
    if not has_scheme(str(storage_path)):
        return str(Path(storage_path).resolve()), None
    import pyarrow.fs as pafs

    fs, path = filesystem(str(storage_path), storage_options)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def run_training(
    cfg: TrainConfig,
    dataset: Any,
    storage_path: str | Path,
    name: str,
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: int = 1,
    max_failures: int = 3,
    storage_options: dict[str, Any] | None = None,
    placement_strategy: str = "PACK",
):
    """Fit a ``TorchTrainer`` on ``dataset`` (Ray dataset with column ``x``); returns its Result.

    ``storage_path``: a local folder or a URL (``s3://...``, reached with
    ``storage_options``, see ``train_storage``). Running again with the same
    ``storage_path`` and ``name`` continues from the latest checkpoint of that run.
    ``placement_strategy``: Ray's for the workers' bundles (``"SPREAD"`` puts them on
    different nodes when it can).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    path, storage_fs = train_storage(storage_path, storage_options)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": to_dict(cfg), "threads": cpus_per_worker},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker},
            placement_strategy=placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
        datasets={"train": dataset},
    )
    return trainer.fit()


def list_checkpoints(
    storage_path: str | Path, name: str, storage_options: dict[str, Any] | None = None
) -> list[Path] | list[str]:
    """Checkpoint folders of a run, oldest first: Paths, or URLs for a URL ``storage_path``."""
    if not has_scheme(str(storage_path)):
        run = Path(storage_path) / name
        return sorted(p for p in run.glob("checkpoint_*") if (p / STATE_FILE).exists())
    fs, path = filesystem(join_uri(str(storage_path), name), storage_options)
    found = fs.glob(f"{path}/checkpoint_*/{STATE_FILE}")
    return sorted(fs.unstrip_protocol(f.rsplit("/", 1)[0]) for f in found)


def fetch_checkpoint(
    checkpoint: str | Path, dest: str | Path, storage_options: dict[str, Any] | None = None
) -> Path:
    """A checkpoint folder as a local folder: ``checkpoint`` itself when local, else a copy
    of the URL's folder at ``dest/<its name>``."""
    if not has_scheme(str(checkpoint)):
        return Path(checkpoint)
    fs, path = filesystem(str(checkpoint), storage_options)
    local = Path(dest) / path.rstrip("/").rsplit("/", 1)[-1]
    local.mkdir(parents=True, exist_ok=True)
    for f in (STATE_FILE, CONFIG_FILE):
        fs.get_file(f"{path}/{f}", str(local / f))
    return local


def training_record(state: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """Summary of a checkpoint's training: steps, loss curve, wall time, machine."""
    hist = torch.tensor([h[:2] for h in state["history"]], dtype=torch.float64)
    losses = hist[:, 1]
    n = len(losses)
    window = max(1, min(50, n // 10))
    starts = sorted({*range(0, n - window + 1, max(1, n // 20)), n - window})
    # mean loss over each window, labelled by the window's last step
    curve = [[int(hist[s + window - 1, 0]), float(losses[s : s + window].mean())] for s in starts]
    return {
        "steps": int(state["step"]),
        "images_seen": int(state["step"]) * cfg.batch_size * int(state.get("world_size", 1)),
        "train_seconds": float(state["train_seconds"]),
        "loss_first": float(losses[:window].mean()),
        "loss_last": float(losses[-window:].mean()),
        "loss_window_steps": window,
        "loss_curve": curve,
        "images_per_s_median": float(torch.tensor([h[2] for h in state["history"]]).median()),
        "world_size": int(state.get("world_size", 1)),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "train_config": to_dict(cfg),
    }


def export_prior(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    n_stats: int = 256,
    stats_steps: int = 100,
    seed: int = 0,
    extra_meta: dict[str, Any] | None = None,
    record_extra: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Write the prior artifact of a checkpoint: EMA weights, config, stats, training record.

    ``record_extra`` (JSON-serialisable) is merged into training_record.json. The prior
    statistics (ancestral samples) are drawn on ``device``.
    """
    state, cfg = load_checkpoint_dir(checkpoint_dir)
    prior = cfg.trained_prior  # a pre-training phase exports as its half-size prior
    model = build_unet(prior)
    model.load_state_dict(state["ema"])
    model.to(device).eval().requires_grad_(False)
    C, N = prior.in_channels, prior.image_size
    t0 = time.perf_counter()
    stats = compute_prior_stats(
        model,
        build_diffusion(prior),
        (C, N, N),
        n=n_stats,
        steps=stats_steps,
        generator=torch.Generator(device=device).manual_seed(seed),
    )
    record = training_record(state, cfg)
    record["stats_seconds"] = time.perf_counter() - t0
    record["stats_samples"], record["stats_steps"] = n_stats, stats_steps
    record.update(record_extra or {})
    meta = {"training": {"steps": record["steps"], "checkpoint": Path(checkpoint_dir).name}}
    out = save_prior(out_dir, state["ema"], prior, stats, {**meta, **(extra_meta or {})})
    (out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
    return out
