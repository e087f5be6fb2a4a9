"""Single-process training (no Ray) that spans sessions: exact resume, atomic checkpoints.

``train_single_process`` runs the Ray Train worker's model, ``train_step``, augmentation,
learning-rate schedule, EMA and checkpoint folders in one process on one device: for a
machine where Ray cannot run (a lent GPU with no package registry) and for the CPU run of
issue 29, which trains one prior across many sessions of a few hours each.

A checkpoint (``run_dir/checkpoint_<step>``: state.pt + config.json, what ``export_prior``
reads) holds the complete state: weights and EMA (float32), optimiser moments, step, loss
history, the torch RNG and the data generator's states, and the data order (this epoch's
permutation and the position in it). Resuming from it replays nothing and skips nothing:
N steps in one call and N/2 + N/2 in two give the same weights (tested). It is written
to ``<name>.partial`` and renamed, so a kill at any moment leaves the previous checkpoint
whole; SIGTERM or SIGINT during a step finishes that step, checkpoints and returns.

``save_resumable_state`` writes the compact copy committed to the repository at the end of
each session (``TRAINING_STATE_DIR``): the same state with the Adam moments in bfloat16,
within the 40 MB limit for hsc-64's 3 M parameters (weights + EMA 24 MB in float32); a run
resumed from it continues the same trajectory up to that rounding of the moments.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from d4a_batch.prior.diffusion import build_diffusion
from d4a_batch.prior.unet import build_unet
from d4a_batch.training.data import augment, default_max_shift, dequantise_u8
from d4a_batch.training.loop import (
    STATE_FILE,
    TrainConfig,
    checkpoint_state,
    load_checkpoint_dir,
    lr_at,
    progress,
    restore_state,
    save_checkpoint_dir,
    train_step,
)
from d4a_batch.training.objective import bin_images, sample_timesteps

PARTIAL_SUFFIX = ".partial"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete ``checkpoint_*`` folders under ``run_dir``, oldest first (not the
    ``.partial`` ones a kill leaves)."""
    return sorted(
        p
        for p in Path(run_dir).glob("checkpoint_*")
        if not p.name.endswith(PARTIAL_SUFFIX) and (p / STATE_FILE).exists()
    )


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``run_dir``, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def write_checkpoint_atomic(folder: Path, state: dict[str, Any], cfg: TrainConfig) -> Path:
    """Write a checkpoint folder as ``<folder>.partial`` and rename it into place."""
    tmp = folder.with_name(folder.name + PARTIAL_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)
    save_checkpoint_dir(tmp, state, cfg)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` complete checkpoints (``keep <= 0``: none)."""
    if keep <= 0:
        return
    for p in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def _step_of(checkpoint: str | Path) -> int:
    """The step a checkpoint folder holds: its record.json, else its name
    (``checkpoint_<step>``), else its state (loaded only then)."""
    record = Path(checkpoint) / "record.json"
    if record.exists():
        return int(json.loads(record.read_text())["step"])
    name = Path(checkpoint).name
    if re.fullmatch(r"checkpoint_\d+", name):
        return int(name.split("_")[1])
    return int(load_checkpoint_dir(checkpoint)[0]["step"])


class _StopOnSignal:
    """SIGTERM / SIGINT set a flag (the loop checkpoints and returns) while installed."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        print(f"[train] signal {signum}: checkpointing after this step", flush=True)
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train_single_process(
    cfg: TrainConfig,
    images: torch.Tensor,
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    log_every: int = 50,
    resume_from: str | Path | None = None,
    stop_after_seconds: float = 0.0,
) -> Path:
    """Train in this process on one device, without Ray; returns the last checkpoint folder.

    images: ``[K, C, N, N]`` at the prior's full size, uint8 (``quantise_u8``: x = q / 127.5
    - 1) or float x-space; with ``cfg.downsample > 1`` they are binned once
    (``objective.bin_images``) and the half-size phase (``cfg.trained_prior``) is trained.
    Each epoch visits them in a fresh random order; the last partial batch is dropped.

    Resumes from the newest checkpoint in ``run_dir`` or from ``resume_from`` (a checkpoint
    folder, e.g. the committed ``save_resumable_state`` copy), whichever holds the later
    step, else starts.
    The run ends when ``progress(cfg, ...)`` reaches 1 (max_steps / max_train_seconds of
    cumulative training time); this call also ends, with a checkpoint, after
    ``stop_after_seconds`` of its own training time (0: no limit) or on SIGTERM / SIGINT.
    Checkpoints every ``cfg.checkpoint_every`` steps and every
    ``cfg.checkpoint_every_seconds`` of training time; older ones pruned to
    ``cfg.keep_checkpoints``.
    """
    device = torch.device(device)
    prior = cfg.prior
    C, N = prior.in_channels, prior.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (C, N, N):
        raise ValueError(
            f"training images of shape {tuple(images.shape)} do not fit [K, {C}, {N}, {N}]"
        )
    if images.shape[0] < cfg.batch_size:
        raise ValueError(f"{images.shape[0]} training images < batch size {cfg.batch_size}")
    trained = cfg.trained_prior
    if cfg.downsample > 1:
        t0 = time.perf_counter()
        images = bin_images(images, cfg.downsample, prior.stretch.a)
        print(
            f"[train] {cfg.downsample}x-binned images {tuple(images.shape)} at"
            f" {trained.kpc_per_pixel} kpc/px, log-SNR shift {trained.logsnr_shift:+.3f}"
            f" ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    images = images.to(device)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(f"checkpoint_*{PARTIAL_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = build_unet(trained).to(device)
    ema = build_unet(trained).to(device)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, history, train_seconds, cpu_seconds = 0, [], 0.0, 0.0
    K, B = images.shape[0], cfg.batch_size
    order, pos = None, 0
    last = latest_checkpoint(run_dir)
    source = last
    if resume_from is not None and (last is None or _step_of(resume_from) > _step_of(last)):
        source = Path(resume_from)  # the committed state is newer than this machine's run
    if source is not None:
        state, _ = load_checkpoint_dir(source)
        step, history, train_seconds = restore_state(state, net, ema, opt)
        cpu_seconds = float(state.get("cpu_seconds", train_seconds))
        rng = state.get("rng")
        if rng is not None:  # exact resume: RNG states and the data order
            torch.set_rng_state(rng["torch"])
            gen.set_state(rng["data"])
            saved = state["data_order"]
            if len(saved) == K:
                order, pos = saved.to(torch.int64), int(state["data_pos"])
            else:
                print(f"[train] {K} images now, {len(saved)} in the checkpoint: new epoch")
        else:  # a checkpoint from before exact resume: a fresh epoch, new draws
            gen.manual_seed(cfg.seed + step)
        print(f"[train] resumed from {source.name} at step {step}", flush=True)
    ema.eval().requires_grad_(False)
    net.train()
    diffusion = build_diffusion(trained)
    max_shift = default_max_shift(trained.image_size) if cfg.max_shift < 0 else cfg.max_shift

    def to_x(batch: torch.Tensor) -> torch.Tensor:
        return dequantise_u8(batch) if batch.dtype == torch.uint8 else batch.float()

    pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) not yet read back

    def flush(seconds: float, n_steps: int) -> None:
        if not pending:
            return
        losses = torch.stack([v for _, v in pending]).float().cpu().tolist()
        rate = n_steps * B / max(seconds, 1e-9)
        history.extend([s, loss, rate] for (s, _), loss in zip(pending, losses, strict=True))
        pending.clear()

    cpu_start = time.process_time()

    def checkpoint() -> Path:
        state = checkpoint_state(net, ema, opt, step, history, train_seconds, 1)
        # CPU seconds of this process (all its threads) spent training, over all calls:
        # what a run on a shared machine costs, where wall time also counts the neighbours
        state["cpu_seconds"] = cpu_seconds + time.process_time() - cpu_start
        state["rng"] = {"torch": torch.get_rng_state(), "data": gen.get_state()}
        state["data_order"] = order.to(torch.int32)
        state["data_pos"] = pos
        folder = write_checkpoint_atomic(run_dir / f"checkpoint_{step:07d}", state, cfg)
        prune_checkpoints(run_dir, cfg.keep_checkpoints)
        return folder

    call_seconds, last_ckpt_seconds = 0.0, train_seconds
    done = progress(cfg, step, train_seconds) >= 1.0
    t_window, steps_window = time.perf_counter(), 0
    with _StopOnSignal() as stop:
        while not done:
            if order is None or pos + B > K:
                order, pos = torch.randperm(K, generator=gen), 0
            idx = order[pos : pos + B].to(device)
            pos += B
            x0 = augment(to_x(images[idx]), gen, max_shift)
            t = sample_timesteps(
                diffusion.alphas_cumprod, B, gen, cfg.timestep_sampling, cfg.logsnr_loc,
                cfg.logsnr_scale,
            ).to(device)  # fmt: skip
            lr = lr_at(cfg, step, train_seconds)
            loss, _ = train_step(net, net, ema, opt, diffusion, x0, t, lr, cfg, step)
            step += 1
            steps_window += 1
            pending.append((step, loss))
            now = time.perf_counter()
            elapsed = now - t_window  # the clock reads the host; synchronised at log lines
            done = progress(cfg, step, train_seconds + elapsed) >= 1.0
            stop_call = stop.requested or (
                stop_after_seconds > 0 and call_seconds + elapsed >= stop_after_seconds
            )
            by_time = (
                cfg.checkpoint_every_seconds > 0
                and train_seconds + elapsed - last_ckpt_seconds >= cfg.checkpoint_every_seconds
            )
            ckpt_now = step % cfg.checkpoint_every == 0 or done or stop_call or by_time
            if step % log_every == 0 or ckpt_now:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                train_seconds += now - t_window
                call_seconds += now - t_window
                flush(now - t_window, steps_window)
                t_window, steps_window = now, 0
                print(
                    f"[train] step {step}/{cfg.max_steps} loss {history[-1][1]:.4f} "
                    f"{history[-1][2]:.1f} img/s lr {lr:.2e} train {train_seconds:.0f} s",
                    flush=True,
                )
            if ckpt_now:
                last = checkpoint()
                last_ckpt_seconds = train_seconds
                t_window = time.perf_counter()  # checkpoint writing is not training time
            if stop_call and not done:
                print(f"[train] stopping this call at step {step}: {last.name}", flush=True)
                break
    if last is None:
        raise RuntimeError(f"{run_dir}: no checkpoint written (max_steps {cfg.max_steps})")
    return last


def save_resumable_state(checkpoint_dir: str | Path, dest: str | Path) -> Path:
    """Write the compact, committed copy of a checkpoint: a checkpoint folder at ``dest``
    (state.pt + config.json + record.json) with the Adam moments in bfloat16.

    ``train_single_process(..., resume_from=dest)`` continues from it. Written beside
    ``dest`` and renamed into place.
    """
    state, cfg = load_checkpoint_dir(checkpoint_dir)
    opt = state["optimizer"]
    for st in opt["state"].values():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st and st[key].is_floating_point():
                st[key] = st[key].to(torch.bfloat16)
    dest = Path(dest)
    write_checkpoint_atomic(dest, state, cfg)
    record = {
        "from_checkpoint": Path(checkpoint_dir).name,
        "step": int(state["step"]),
        "train_seconds": float(state["train_seconds"]),
        "cpu_seconds": float(state.get("cpu_seconds", state["train_seconds"])),
        "images_seen": int(state["step"]) * cfg.batch_size,
        "downsample": cfg.downsample,
        "bytes": (dest / STATE_FILE).stat().st_size,
        "optimizer_moments": "bfloat16",
    }
    (dest / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    return dest
