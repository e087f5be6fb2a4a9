"""Prior artifacts: save/load a trained prior, and its prior statistics.

Longer than 400 lines: one concern, the prior artifact's format: the folder layout, the
``Prior`` object it loads into, its statistics, and the improved-diffusion checkpoints
accepted in its place (flag parsing, state checks). Saving and loading are read against
each other (same file names, same metadata keys, same checks on the state dict), so they
stay in one file.

An artifact is a folder with ``weights.safetensors`` (the EMA UNet state dict),
``config.json`` (``to_dict(PriorConfig)`` plus a ``"metadata"`` object) and
``stats.safetensors`` (``mean`` and ``var`` [C,N,N] of unconditional samples in
x-space), and optionally ``calibration.json`` (interval scales λ per S/N bin,
``prior/calibration.py``; absent -> ``Prior.calibrations`` is () and the catalog's
calibrated interval columns are NaN). An improved-diffusion checkpoint (a ``.pt`` state dict, or a
``.safetensors`` file) plus its flags is accepted too. Nothing is ever
unpickled beyond tensors: ``.pt`` files go through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from d4a_batch.config import PriorConfig, from_dict, to_dict
from d4a_batch.prior.calibration import Calibration, CalibrationError, read_calibrations
from d4a_batch.prior.diffusion import GaussianDiffusion, SpacedDiffusion, build_diffusion
from d4a_batch.prior.unet import UNetModel, build_unet
from d4a_batch.schema import PRIOR_CALIBRATION, PRIOR_CONFIG, PRIOR_STATS, PRIOR_WEIGHTS

ARTIFACT_FORMAT = "d4a-prior/1"


class PriorFormatError(ValueError):
    """A prior file or folder cannot be used (wrong format, refused pickle, config/weights mismatch)."""


class PriorStatsMissing(RuntimeError):
    """The prior has no prior statistics (e.g. loaded from a bare improved-diffusion .pt)."""


@dataclass(frozen=True)
class PriorStats:
    """Pixel-wise mean and variance [C,N,N] (x-space, float32, CPU) of unconditional samples."""

    mean: torch.Tensor
    var: torch.Tensor
    n_samples: int
    steps: int


# --------------------------------------------------------------------------- flags
# improved-diffusion's model_and_diffusion_defaults(): values of flags absent from a flags dict
IMPROVED_DIFFUSION_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "attention_resolutions": "16,8",
    "dropout": 0.0,
    "learn_sigma": False,
    "sigma_small": False,
    "class_cond": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": True,
    "rescale_learned_sigmas": True,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
}
# improved-diffusion's script_util: channel_mult is implied by image_size
_CHANNEL_MULT_BY_SIZE = {
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 2, 4, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}
# flags that only affect training or sampling scripts, not the network or its process
_IGNORED_FLAGS = {
    "use_kl", "rescale_learned_sigmas", "use_checkpoint", "timestep_respacing", "use_fp16",
    "fp16_scale_growth", "lr", "weight_decay", "lr_anneal_steps", "batch_size", "microbatch",
    "ema_rate", "log_interval", "save_interval", "resume_checkpoint", "data_dir",
    "schedule_sampler", "clip_denoised", "num_samples", "use_ddim", "model_path",
}  # fmt: skip
_BOOL_FLAGS = ("learn_sigma", "sigma_small", "rescale_timesteps", "use_scale_shift_norm")
_INT_FLAGS = (
    "image_size", "num_channels", "num_res_blocks", "num_heads", "num_heads_upsample",
    "diffusion_steps",
)  # fmt: skip


def _as_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("yes", "true", "t", "y", "1"):
        return True
    if s in ("no", "false", "f", "n", "0"):
        return False
    raise PriorFormatError(f"flag {name}={v!r} is not a boolean")


def _as_ints(v: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in (v.split(",") if isinstance(v, str) else v))


def config_from_flags(flags: Mapping[str, Any], name: str = "improved-diffusion") -> PriorConfig:
    """PriorConfig of an improved-diffusion flags dict (absent flags take improved-diffusion's defaults).

    Besides improved-diffusion's flags, PriorConfig field names (``bands``,
    ``kpc_per_pixel``, ``channel_mult``, ...) are accepted. Training-only flags
    are ignored; unknown flags, ``class_cond`` and ``predict_xstart`` are errors.
    """
    prior_fields = set(PriorConfig.__dataclass_fields__)
    unknown = set(flags) - prior_fields - set(IMPROVED_DIFFUSION_DEFAULTS) - _IGNORED_FLAGS
    if unknown:
        raise PriorFormatError(f"unknown flags {sorted(unknown)}")
    f = {**IMPROVED_DIFFUSION_DEFAULTS, **flags}
    for k in ("class_cond", "predict_xstart"):
        if _as_bool(k, f[k]):
            raise PriorFormatError(f"flag {k}=True is not supported (unconditional ε-models only)")
    vals: dict[str, Any] = {k: _as_bool(k, f[k]) for k in _BOOL_FLAGS}
    vals |= {k: int(f[k]) for k in _INT_FLAGS}
    vals["dropout"] = float(f["dropout"])
    vals["noise_schedule"] = str(f["noise_schedule"])
    vals["attention_resolutions"] = _as_ints(f["attention_resolutions"])
    if "channel_mult" in f and f["channel_mult"] not in ("", None):
        vals["channel_mult"] = _as_ints(f["channel_mult"])
    elif vals["image_size"] in _CHANNEL_MULT_BY_SIZE:
        vals["channel_mult"] = _CHANNEL_MULT_BY_SIZE[vals["image_size"]]
    else:
        raise PriorFormatError(
            f"no channel_mult flag and no default for image_size {vals['image_size']}"
        )
    extra = {k: v for k, v in flags.items() if k in prior_fields and k not in vals}
    return replace(from_dict(PriorConfig, {"name": name, **extra}), **vals)


# --------------------------------------------------------------------------- the prior
class Prior:
    """A loaded diffusion prior: frozen eval-mode UNet on a device, config, base diffusion, stats.

    ``stats_mean``/``stats_var`` raise PriorStatsMissing while ``stats`` is None.
    """

    def __init__(
        self,
        model: UNetModel,
        config: PriorConfig,
        prior_id: str,
        sha256: str,
        stats: PriorStats | None = None,
        metadata: Mapping[str, Any] | None = None,
        calibrations: tuple[Calibration, ...] = (),
    ):
        self.model = model.eval().requires_grad_(False)
        if self.device.type == "cpu":
            # oneDNN's convolutions in NHWC: 0.73x the forward time at 8-64 rows, the same
            # output to 1e-5 (issue 30; inputs may stay NCHW)
            self.model = self.model.to(memory_format=torch.channels_last)
        self.config = config
        self.diffusion: GaussianDiffusion = build_diffusion(config)
        self.prior_id = prior_id
        self.sha256 = sha256
        self.metadata = dict(metadata or {})
        self.stats = stats
        # interval scales (calibration.json), one per sampler config they were fitted for
        self.calibrations = tuple(calibrations)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def stats_mean(self) -> torch.Tensor:
        """Prior mean map [C,N,N] (x-space)."""
        return self._require_stats().mean

    @property
    def stats_var(self) -> torch.Tensor:
        """Prior variance map [C,N,N] (x-space)."""
        return self._require_stats().var

    def _require_stats(self) -> PriorStats:
        if self.stats is None:
            raise PriorStatsMissing(
                f"prior {self.prior_id!r} has no prior statistics (an improved-diffusion checkpoint "
                "carries none): call prior.compute_stats(n=256, steps=...) or load an artifact "
                "folder written by save_prior with stats"
            )
        return self.stats

    def spaced(self, steps: str | int) -> SpacedDiffusion:
        """The base diffusion respaced to ``steps`` (int, "ddimN" or section counts)."""
        return self.diffusion.respace(steps)

    def eps(self, x: torch.Tensor, t_original: torch.Tensor) -> torch.Tensor:
        """ε̂(x[R,C,N,N], original timesteps t[R]) -> [R,C,N,N] (differentiable in x).

        A v-network's output is converted to ε̂ (``GaussianDiffusion.eps_and_xstart``).
        """
        C, N = self.config.in_channels, self.config.image_size
        if x.shape[1:] != (C, N, N):
            raise ValueError(f"expected x of shape [R, {C}, {N}, {N}], got {tuple(x.shape)}")
        t = t_original
        if self.config.rescale_timesteps:
            t = t.float() * (1000.0 / self.config.diffusion_steps)
        return self.diffusion.eps_and_xstart(self.model(x, t)[:, :C], x, t_original)[0]

    def compute_stats(
        self,
        n: int = 256,
        steps: str | int = 100,
        batch_size: int = 64,
        generator: torch.Generator | None = None,
    ) -> PriorStats:
        """Compute (and keep) the prior statistics from ``n`` unconditional samples."""
        C, N = self.config.in_channels, self.config.image_size
        self.stats = compute_prior_stats(
            self.model, self.diffusion, (C, N, N), n, steps, batch_size, generator
        )
        return self.stats


@torch.no_grad()
def compute_prior_stats(
    model: UNetModel,
    diffusion: GaussianDiffusion,
    image_shape: tuple[int, int, int],
    n: int = 256,
    steps: str | int = 100,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> PriorStats:
    """Mean and unbiased variance [C,N,N] of ``n`` ≥ 256 ancestral samples of the respaced process.

    ``diffusion`` is the base process; ``generator`` (on the model's device)
    makes the statistics reproducible.
    """
    if n < 256:
        raise ValueError(f"prior statistics need at least 256 samples, got n={n}")
    spaced = diffusion.respace(steps)
    device = next(model.parameters()).device
    s1 = torch.zeros(image_shape, dtype=torch.float64, device=device)
    s2 = torch.zeros_like(s1)
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        x = spaced.p_sample_loop(model, (b, *image_shape), generator=generator, device=device)
        x = x.double()
        s1 += x.sum(0)
        s2 += (x * x).sum(0)
        done += b
    mean = s1 / n
    var = ((s2 - n * mean * mean) / (n - 1)).clamp(min=0)
    return PriorStats(
        mean=mean.float().cpu(), var=var.float().cpu(), n_samples=n, steps=spaced.num_timesteps
    )


# --------------------------------------------------------------------------- files
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_state(state: Mapping[str, Any], cfg: PriorConfig, source: str) -> None:
    """Raise PriorFormatError naming the first key whose presence or shape disagrees with ``cfg``."""
    expected = {k: tuple(v.shape) for k, v in build_unet(cfg, device="meta").state_dict().items()}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise PriorFormatError(f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor")
    missing = [k for k in expected if k not in state]
    if missing:
        raise PriorFormatError(
            f"{source}: weights lack key {missing[0]!r} that the config expects"
            f" ({len(missing)} missing)"
        )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise PriorFormatError(
            f"{source}: weights have key {unexpected[0]!r} that the config does not"
            f" ({len(unexpected)} unexpected)"
        )
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise PriorFormatError(
                f"{source}: key {k!r} has shape {tuple(state[k].shape)} in the weights but"
                f" {shape} in the config"
            )


def _build_model(state: Mapping[str, torch.Tensor], cfg: PriorConfig, device, source: str):
    _check_state(state, cfg, source)
    model = build_unet(cfg, device="meta")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


def save_prior(
    folder: str | Path,
    model_state: Mapping[str, torch.Tensor],
    cfg: PriorConfig,
    stats: PriorStats | None,
    extra_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write an artifact folder (weights, config + metadata, stats) and return its path.

    ``model_state`` is the (EMA) UNet state dict and must match ``cfg``;
    ``extra_meta`` (JSON-serialisable) is kept under config.json's "metadata";
    its "prior_id" (default ``cfg.name``) names the prior. ``stats`` may be None
    (then the loaded prior raises PriorStatsMissing until it computes them).
    """
    folder = Path(folder)
    _check_state(model_state, cfg, str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model_state.items()}
    save_file(weights, folder / PRIOR_WEIGHTS, metadata={"format": "pt"})
    meta: dict[str, Any] = {"prior_id": cfg.name, **dict(extra_meta or {})}
    meta["format"] = ARTIFACT_FORMAT
    meta["weights_sha256"] = _sha256(folder / PRIOR_WEIGHTS)
    stats_path = folder / PRIOR_STATS
    if stats is not None:
        shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if tuple(stats.mean.shape) != shape or tuple(stats.var.shape) != shape:
            raise ValueError(
                f"stats must be {shape}, got {tuple(stats.mean.shape)}, {tuple(stats.var.shape)}"
            )
        save_file(
            {"mean": stats.mean.detach().cpu().float().contiguous(),
             "var": stats.var.detach().cpu().float().contiguous()},
            stats_path,
            metadata={"n_samples": str(stats.n_samples), "steps": str(stats.steps)},
        )  # fmt: skip
    elif stats_path.exists():
        stats_path.unlink()
    if (folder / PRIOR_CALIBRATION).exists():  # fitted for the weights being replaced
        (folder / PRIOR_CALIBRATION).unlink()
    doc = {**to_dict(cfg), "metadata": meta}
    (folder / PRIOR_CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return folder


def read_prior_config(folder: str | Path) -> tuple[PriorConfig, dict[str, Any]]:
    """(PriorConfig, metadata) of an artifact folder's config.json."""
    doc = json.loads((Path(folder) / PRIOR_CONFIG).read_text())
    meta = doc.pop("metadata", {})
    try:
        return from_dict(PriorConfig, doc), meta
    except (ValueError, TypeError) as e:
        raise PriorFormatError(f"{folder}/{PRIOR_CONFIG}: {e}") from e


def load_stats(path: Path, cfg: PriorConfig) -> PriorStats:
    """The prior statistics of a stats.safetensors file, checked against ``cfg``."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        names = set(f.keys())
        if names != {"mean", "var"}:
            raise PriorFormatError(
                f"{path}: expected tensors 'mean' and 'var', found {sorted(names)}"
            )
        mean, var = f.get_tensor("mean").float(), f.get_tensor("var").float()
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if tuple(mean.shape) != shape or tuple(var.shape) != shape:
        raise PriorFormatError(
            f"{path}: stats have shape {tuple(mean.shape)}, config implies {shape}"
        )
    return PriorStats(mean, var, int(meta.get("n_samples", 0)), int(meta.get("steps", 0)))


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise PriorFormatError(f"{path}: not a safetensors file ({e})") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise PriorFormatError(
            f"{path}: refusing to load: the file holds objects other than tensors"
            " (only plain state dicts are accepted)"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise PriorFormatError(
            f"{path}: expected a state dict (str -> tensor), got {type(state).__name__}"
        )
    return state


def load_prior(
    path: str | Path,
    device: torch.device | str = "cpu",
    flags: Mapping[str, Any] | PriorConfig | None = None,
) -> Prior:
    """Load an artifact folder, or an improved-diffusion checkpoint file plus its ``flags``.

    ``flags`` (only for a checkpoint file): a PriorConfig or a dict of
    improved-diffusion flags (see ``config_from_flags``; the prior's name
    defaults to the file's stem). Keys and shapes are checked against the
    config; a mismatch raises PriorFormatError naming the key.
    """
    path = Path(path)
    if path.is_dir():
        if flags is not None:
            raise ValueError(
                "flags are only for checkpoint files; an artifact folder has its config"
            )
        cfg, meta = read_prior_config(path)
        weights_path = path / PRIOR_WEIGHTS
        sha = _sha256(weights_path)
        if meta.get("weights_sha256", sha) != sha:
            raise PriorFormatError(
                f"{weights_path}: sha256 {sha} differs from config.json's record"
            )
        model = _build_model(_load_checkpoint(weights_path), cfg, device, str(weights_path))
        stats = load_stats(path / PRIOR_STATS, cfg) if (path / PRIOR_STATS).exists() else None
        try:
            calibrations = read_calibrations(path)
        except CalibrationError as e:
            raise PriorFormatError(str(e)) from e
        stale = [c for c in calibrations if c.prior_sha256 not in ("", sha)]
        if stale:
            warnings.warn(
                f"{path}/{PRIOR_CALIBRATION}: {len(stale)} entry(ies) fitted for weights "
                f"{sorted({c.prior_sha256 for c in stale})}, not these ({sha}): ignored "
                "(calibrated columns of those sampler configs will be NaN)",
                stacklevel=2,
            )
        calibrations = tuple(c for c in calibrations if c not in stale)
        return Prior(
            model, cfg, str(meta.get("prior_id", cfg.name)), sha, stats, meta, calibrations
        )
    if not path.is_file():
        raise FileNotFoundError(f"no prior at {path}")
    if flags is None:
        raise ValueError(f"{path}: a checkpoint file needs its flags (dict or PriorConfig)")
    cfg = flags if isinstance(flags, PriorConfig) else config_from_flags(flags, name=path.stem)
    sha = _sha256(path)
    model = _build_model(_load_checkpoint(path), cfg, device, str(path))
    return Prior(model, cfg, cfg.name, sha, None, {"source": str(path)})
