"""Throughput measurements of the DPS sampler: timing, FLOPs, machine peak, memory.

Every measurement here runs ``sampler = "dps"`` (``THROUGHPUT_SAMPLER``), whatever the
engine's default sampler is, so that timings, FLOP counts and the earlier throughput tables
describe the same computation (DDS, the default since 2026-12-03, took 0.47-0.80x DPS wall time:
docs/HISTORY.md).

- FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` around real DPS steps
  (``sampling.dps.dps_sample``: network forward, guidance backward, operator): it counts matmul / convolution / attention ops, forward and backward, and
  leaves out FFTs and elementwise ops, so achieved FLOP/s are a slight undercount.
- The machine's peak is measured in the same process: a large square matmul and a
  3×3 convolution of UNet-like size, each timed after a warm-up, FLOPs counted the same way.
- Memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's anonymous
  resident memory (RSS less file-backed and shared pages, which the kernel maps in and
  evicts on its own) polled every few milliseconds by a thread (``psutil``), reported as
  the peak above its value at entry, after a ``gc.collect()`` so that garbage left by
  earlier code is not freed inside the block (torch's CPU allocator is invisible to
  tracemalloc). glibc keeps freed blocks resident once its dynamic mmap threshold has
  grown, which hides a call's memory behind the previous call's; ``return_freed_memory``
  pins the thresholds so that large tensors go back to the system when freed and each
  call's peak shows. The value is process-wide: other threads of the process (a Ray
  driver's, a test session's) allocate and free within the block too, so a precise
  measurement runs in a process of its own (``jobs/benchmark_throughput.py``).
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from d4a_batch.config import SamplerConfig
from d4a_batch.physics.operator import (
    ForwardOperator,
    ObservationBatch,
    model_pixel_scale,
    whitened_residual,
)
from d4a_batch.prior.artifact import Prior
from d4a_batch.sampling.deconvolve import deconvolve
from d4a_batch.sampling.dps import dps_sample
from d4a_batch.sampling.rows import row_generators
from d4a_batch.validation.magnitude import MagnitudeConfig, make_observations

THROUGHPUT_SAMPLER = "dps"  # the sampler every measurement here runs (see above)


class _GlobalOnly:
    """Stand-in for ``FlopCounterMode``'s module tracker: all FLOPs count under "Global".

    The tracker's backward hooks fail under ``torch.autograd.grad`` (which DPS guidance
    uses: "A leaf node was passed to _will_engine_execute_node"); per-module totals are
    not needed here.
    """

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc) -> None:
        return None


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (no display) that works with ``torch.autograd.grad``."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    return counter


def return_freed_memory(threshold: int = 128 * 1024) -> bool:
    """glibc: mmap blocks of ``threshold`` bytes and more, trim the heap above it (fixed
    values switch glibc's dynamic threshold off). False where glibc is not there."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(
        libc.mallopt(m_trim_threshold, threshold)
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], Any], device: torch.device, clock: str = "wall") -> tuple[float, Any]:
    """(seconds, result) of fn(), synchronised on CUDA. ``clock``: "wall" (elapsed) or "cpu"
    (this process's CPU time, all threads: the other load of a shared machine does not
    enter it; with T threads it is up to T times the wall time on T free cores)."""
    tick = CLOCKS[clock]
    synchronize(device)
    t0 = tick()
    out = fn()
    synchronize(device)
    return tick() - t0, out


def anonymous_rss(proc: psutil.Process) -> int:
    """Resident anonymous memory of ``proc`` (bytes): RSS less file-backed and shared pages
    on Linux (``RssAnon``), RSS elsewhere."""
    info = proc.memory_info()
    return int(info.rss - getattr(info, "shared", 0))


class PeakMemory:
    """Context manager: peak memory of the block (bytes) in ``peak`` (see module docstring).

    On CPU ``samples`` counts the poller's readings; ``wait_for_samples(n)`` blocks until it
    has taken ``n`` more (to hold an allocation until it has been seen, whatever the load).
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval = interval_s
        self.peak = 0
        self.samples = 0
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "anon_rss_above_entry"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._proc = psutil.Process()
        gc.collect()
        self._base = anonymous_rss(self._proc)
        self._max = self._base
        self._stop = threading.Event()

        def poll() -> None:
            while not self._stop.is_set():
                self._max = max(self._max, anonymous_rss(self._proc))
                self.samples += 1
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, anonymous_rss(self._proc))
        self.peak = int(self._max - self._base)

    def wait_for_samples(self, n: int = 2, timeout_s: float = 60.0) -> None:
        """Block until the CPU poller has taken ``n`` more readings (TimeoutError after
        ``timeout_s``); on CUDA the peak is exact and this returns at once."""
        if self.device.type == "cuda":
            return
        target, deadline = self.samples + n, time.monotonic() + timeout_s
        while self.samples < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the memory poller took no reading in {timeout_s} s")
            time.sleep(self.interval / 2)


def synthetic_batch(
    prior: Prior, n_objects: int, z: float = 0.3
) -> tuple[ObservationBatch, list[float], list[int]]:
    """B mock observations for the prior (one galaxy at i = 19..23 mag, HSC noise, Gaussian
    PSFs; ``validation.magnitude``): (obs on the prior's device, redshifts, object ids)."""
    cfg = prior.config
    mags = tuple(float(m) for m in np.linspace(19.0, 23.0, n_objects))
    data = make_observations(
        cfg.bands, cfg.kpc_per_pixel, cfg.image_size, MagnitudeConfig(magnitudes=mags, z=z),
        SamplerConfig().aperture_radius_frac,
    )  # fmt: skip
    obs = data.obs.to(device=prior.device, dtype=torch.float32)
    return obs, [z] * n_objects, list(range(1, n_objects + 1))


def select(obs: ObservationBatch, rows: slice) -> ObservationBatch:
    """Rows ``rows`` of an observation batch."""
    return ObservationBatch(
        obs.image[rows], obs.variance[rows], obs.valid[rows], obs.psf[rows], obs.offset[rows]
    )


def dps_step_flops(prior: Prior, obs: ObservationBatch, z: Sequence[float], samples: int) -> int:
    """FLOPs of one DPS step over B·S rows (``FlopCounterMode``; see the module docstring)."""
    rows = obs.repeat_interleave(samples)
    scale = model_pixel_scale(np.repeat(np.asarray(z, dtype=np.float64), samples), prior.config)
    op = ForwardOperator.for_observations(
        rows, torch.as_tensor(scale, dtype=torch.float32, device=prior.device),
        prior.config.stretch.a,
    )  # fmt: skip
    gens = row_generators(0, list(range(obs.image.shape[0])), samples, prior.device)
    counter = flop_counter()
    with counter:  # two steps (a one-step respacing is degenerate); every step does the same ops
        dps_sample(
            prior, lambda x0: whitened_residual(x0, rows, op)[0], gens, steps=2,
            guidance=SamplerConfig().guidance,
        )  # fmt: skip
    return int(counter.get_total_flops()) // 2


def measured_peak(
    device: torch.device,
    size: int = 2048,
    conv_images: int = 32,
    repeats: int = 5,
    clock: str = "wall",
) -> dict[str, float]:
    """FLOP/s of a size×size float32 matmul and of a UNet-like 3×3 conv (64→64 channels,
    ``conv_images`` images of 64²), best of ``repeats`` (the first call, counted, warms up)."""
    out: dict[str, float] = {}
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    x = torch.randn(conv_images, 64, 64, 64, device=device)
    w = torch.randn(64, 64, 3, 3, device=device)
    ops = {
        "matmul": lambda: a @ b,
        "conv3x3": lambda: torch.nn.functional.conv2d(x, w, padding=1),
    }
    for name, fn in ops.items():
        counter = flop_counter()
        with counter:
            fn()
        flops = counter.get_total_flops()
        best = min(timed(fn, device, clock)[0] for _ in range(repeats))
        out[name] = flops / best
    return out


def sample_once(
    prior: Prior,
    obs: ObservationBatch,
    z: Sequence[float],
    ids: Sequence[int],
    steps: int,
    samples: int,
    seed: int = 0,
    clock: str = "wall",
) -> float:
    """Seconds (``clock``) of one ``deconvolve`` call (B objects × ``samples``), synchronised."""
    cfg = SamplerConfig(sampler=THROUGHPUT_SAMPLER, steps=steps, samples=samples, seed=seed)
    seconds, _ = timed(lambda: deconvolve(obs, z, prior, cfg, ids), prior.device, clock)
    return seconds


def naive_loop(
    prior: Prior,
    obs: ObservationBatch,
    z: Sequence[float],
    ids: Sequence[int],
    steps: int,
    samples: int,
    batch: int,
    clock: str = "wall",
) -> float:
    """Seconds to draw the same samples one object at a time, ``batch`` samples per call
    (the reference code's pattern); chunks use different seeds so the samples differ."""
    if samples % batch:
        raise ValueError(f"naive_loop: samples {samples} not a multiple of batch {batch}")
    total = 0.0
    for o in range(obs.image.shape[0]):
        for chunk in range(samples // batch):
            one = select(obs, slice(o, o + 1))
            total += sample_once(prior, one, [z[o]], [ids[o]], steps, batch, chunk, clock)
    return total


def per_step_seconds(
    prior: Prior,
    obs: ObservationBatch,
    z: Sequence[float],
    ids: Sequence[int],
    samples: int,
    steps: tuple[int, int] = (2, 6),
    clock: str = "wall",
) -> float:
    """Seconds per DPS step for B·S rows: (T(steps_b) − T(steps_a)) / (steps_b − steps_a), which
    removes the per-call overhead (operator setup, summaries)."""
    a, b = steps
    t_b = sample_once(prior, obs, z, ids, b, samples, clock=clock)
    t_a = sample_once(prior, obs, z, ids, a, samples, clock=clock)
    return (t_b - t_a) / (b - a)


class _NoAutocast(torch.nn.Module):
    """The network with autocast switched off inside (``dps_sample`` enables bf16 on CUDA)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.inner(x.float(), t)


VARIANTS = ("fp32", "bf16", "bf16+compile", "bf16+cudagraphs")


def variant_prior(prior: Prior, variant: str) -> Prior:
    """The same prior run another way: "fp32" (autocast off), "bf16" (``dps_sample``'s own
    autocast on CUDA), "bf16+compile" (``torch.compile``), "bf16+cudagraphs"
    (``torch.compile(mode="reduce-overhead")``, CUDA graphs)."""
    model = prior.model
    if variant == "fp32":
        model = _NoAutocast(model)
    elif variant == "bf16+compile":
        model = torch.compile(model)
    elif variant == "bf16+cudagraphs":
        model = torch.compile(model, mode="reduce-overhead")
    elif variant != "bf16":
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return Prior(model, prior.config, prior.prior_id, prior.sha256, prior.stats, prior.metadata)
