"""What every sampler shares about rows: per-row randomness, the network's precision, callbacks.

Rows: object o, sample k -> row ``r = o*S + k`` (R = B·S rows in one network batch). Every
random draw of row (o, k) -- x_T, each step's noise, its data-step perturbations, its photo-z
-- comes from its own generator seeded by ``(seed, object_id, k)`` only (``sample_seed``), so
a sample does not depend on the batch it runs in (to float tolerance). Generators live on
the sampling device: results are reproducible per device type, not across CPU and CUDA.

The algorithms (``dps``, ``dds``, ``daps``) import this module and ``likelihood``; the entry
point ``sampling.deconvolve`` imports the algorithms (no import circle: issue 32).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike

log = logging.getLogger(__name__)

_STREAM_NOISE = 0  # x_T and the per-step noise
_STREAM_PHOTOZ = 1  # the per-sample photo-z draw

ResidualFn = Callable[[torch.Tensor], torch.Tensor]
# callback(i, x[R,C,N,N]): after each reverse step (level, for "daps"), spaced index i counting down
StepCallback = Callable[[int, torch.Tensor], None]
# consistency(i, x̂0[R,C,N,N]) -> x̂0' (spaced index i): a data-consistency step on Tweedie's estimate
ConsistencyFn = Callable[[int, torch.Tensor], torch.Tensor]


def sample_seed(seed: int, object_id: int, k: int, stream: int = _STREAM_NOISE) -> int:
    """64-bit seed of sample ``k`` of ``object_id`` (stable: numpy SeedSequence of the ints).

    Negative integers are taken modulo 2**64 (object ids are 64-bit).
    """
    entropy = [int(v) % 2**64 for v in (seed, object_id, k, stream)]
    words = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int(words[0]) | (int(words[1]) << 32)


def row_generators(
    seed: int,
    object_ids: Sequence[int],
    samples: int,
    device: torch.device | str = "cpu",
) -> list[torch.Generator]:
    """One generator per row ``o*S + k`` on ``device``, seeded by ``sample_seed(seed, id_o, k)``."""
    gens = []
    for oid in object_ids:
        for k in range(samples):
            g = torch.Generator(device=device)
            g.manual_seed(sample_seed(seed, int(oid), k))
            gens.append(g)
    return gens


def randn_rows(
    generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str
) -> torch.Tensor:
    """Standard normal [R, *shape] (float32), row r drawn from ``generators[r]``."""
    out = torch.empty((len(generators), *shape), device=device, dtype=torch.float32)
    for r, g in enumerate(generators):
        out[r].normal_(generator=g)
    return out


def draw_photoz(
    z: ArrayLike,
    err68: ArrayLike,
    object_ids: Sequence[int],
    samples: int,
    seed: int,
    z_range: tuple[float, float],
) -> np.ndarray:
    """Per-sample redshifts [B·S] from a split normal around z with the 68% bounds ``err68``.

    ``z[B]``: the photo-z (mode); ``err68[B, 2]``: (photoz_err68_min, photoz_err68_max),
    the lower and upper bounds of the 68% interval (HSC convention: redshifts, not
    widths). Side widths s_lo = z - min, s_hi = max - z; a draw is z - |n| s_lo with
    probability s_lo / (s_lo + s_hi), else z + |n| s_hi. Draws are clipped to ``z_range``
    widened to include z; an object with non-finite or inverted bounds keeps z. Sample k of object o uses its
    own generator (``sample_seed(seed, id_o, k, stream=1)``).
    """
    z = np.asarray(z, dtype=np.float64)
    err = np.asarray(err68, dtype=np.float64).reshape(-1, 2)
    if err.shape[0] != z.shape[0] or len(object_ids) != z.shape[0]:
        raise ValueError(f"draw_photoz: z[{z.shape[0]}], err68{err.shape}, {len(object_ids)} ids")
    out = np.repeat(z, samples)
    for o, oid in enumerate(object_ids):
        s_lo, s_hi = z[o] - err[o, 0], err[o, 1] - z[o]
        if not (np.isfinite(s_lo) and np.isfinite(s_hi)) or s_lo < 0 or s_hi < 0:
            continue
        if s_lo + s_hi == 0:
            continue
        for k in range(samples):
            rng = np.random.default_rng(sample_seed(seed, int(oid), k, _STREAM_PHOTOZ))
            lower = rng.uniform() < s_lo / (s_lo + s_hi)
            n = abs(rng.standard_normal())
            out[o * samples + k] = z[o] - n * s_lo if lower else z[o] + n * s_hi
    lo = np.repeat(np.minimum(z, z_range[0]), samples)
    hi = np.repeat(np.maximum(z, z_range[1]), samples)
    return np.clip(out, lo, hi)


def rand_rows(generators: Sequence[torch.Generator], n: int, device) -> torch.Tensor:
    """Uniforms [n, R] in (0, 1), column r from ``generators[r]``."""
    out = torch.empty((len(generators), n), device=device, dtype=torch.float32)
    for r, g in enumerate(generators):
        out[r].uniform_(generator=g)
    return out.T.clamp_min(1e-12)


def network_autocast(precision: str, device: torch.device):
    """A context factory for the network's forward pass at ``precision`` on ``device``.

    "auto": bfloat16 autocast on CUDA, float32 elsewhere; "bfloat16": autocast on any device
    (CPU: oneDNN's bfloat16 kernels, native on AMX / AVX512-BF16); "float32": none. The
    sampler's own arithmetic (x_t, the data step) stays float32 whatever the choice.
    """
    if precision not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"unknown network precision {precision!r}")
    on = precision == "bfloat16" or (precision == "auto" and device.type == "cuda")
    if on and device.type == "cpu" and not cpu_has_native_bfloat16():
        _warn_emulated_bfloat16()
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU runs bfloat16 matrix arithmetic natively (AVX512-BF16 or AMX, as
    oneDNN reports it); True when torch cannot tell."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


@functools.cache
def _warn_emulated_bfloat16() -> None:
    log.warning(
        "network_precision 'bfloat16' on a CPU without native bfloat16 (no AVX512-BF16 or "
        "AMX): the network may run slower than in float32 (the samples differ only at "
        "bfloat16 rounding); for speed set the sampler's network_precision to 'float32' (its calibrated "
        "interval columns then need a calibration for that config: jobs/calibrate_prior.py)"
    )
