"""Frozen configuration dataclasses.

Every configuration object is a frozen dataclass that round-trips through JSON
(`to_dict` / `from_dict`) and has a stable content hash (`config_hash`). The
prior's config is saved inside every prior artifact and training checkpoint;
the run config is saved inside every output catalog (and its hash in every row).

Ownership: each dataclass below is owned by the sub-package named in its
docstring; add fields there (with defaults, so old JSON still loads).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    return obj


def _from_jsonable(tp: Any, value: Any) -> Any:
    """Rebuild a value of (resolved) type ``tp`` from its JSON form."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _from_jsonable(args[0], value) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_jsonable(args[0], v) for v in value)
        if args:
            return tuple(_from_jsonable(a, v) for a, v in zip(args, value, strict=True))
        return tuple(value)
    if origin is dict:
        _, vt = typing.get_args(tp)
        return {k: _from_jsonable(vt, v) for k, v in value.items()}
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a (nested) config dataclass."""
    return _to_jsonable(cfg)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build ``cls`` from a dict; unknown keys are an error, missing keys take defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    kwargs = {k: _from_jsonable(hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))


def config_hash(cfg: Any, length: int = 16) -> str:
    """Stable content hash (hex) of a config: same values, same hash."""
    return hashlib.sha256(to_json(cfg).encode()).hexdigest()[:length]


# --------------------------------------------------------------------------- physics
@dataclass(frozen=True)
class StretchConfig:
    """asinh stretch x = 2 asinh(v/a)/asinh(1/a) - 1 with v = I/m (owner: physics)."""

    a: float = 0.01


@dataclass(frozen=True)
class PhysicsConfig:
    """Observation-model constants (owner: physics)."""

    hsc_pixel_arcsec: float = 0.168
    cosmology: str = "Planck15"  # any name in astropy.cosmology.realizations
    zeropoint_ab: float = 27.0
    # closed-form amplitude/background: ridge on alpha in the 2x2 normal equations,
    # relative to the trace of the matrix in the centred basis (see profile_amplitude)
    profile_ridge: float = 1e-6


# --------------------------------------------------------------------------- prior
@dataclass(frozen=True)
class PriorConfig:
    """Architecture, schedule and physical scale of a diffusion prior (owner: prior).

    Field names follow improved-diffusion's flags. ``attention_resolutions`` are
    resolutions in pixels (as the flag "16,8"), converted to downsample factors
    inside the UNet exactly as improved-diffusion does.
    """

    name: str = "demo-64"
    image_size: int = 64
    bands: tuple[str, ...] = ("g", "r", "i")
    num_channels: int = 32
    num_res_blocks: int = 1
    # (1, 1, 2, 2) with attention at 8 px: 1.31 M parameters, 23 ms per image for a
    # forward+backward on 2 CPU cores vs 48 ms for (1, 2, 2, 2) with attention at 16 (1.63 M)
    channel_mult: tuple[int, ...] = (1, 1, 2, 2)
    attention_resolutions: tuple[int, ...] = (8,)
    num_heads: int = 4
    num_heads_upsample: int = -1
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    learn_sigma: bool = False
    diffusion_steps: int = 1000
    noise_schedule: str = "cosine"  # "cosine" | "linear"
    # improved-diffusion flags: network sees t * 1000 / diffusion_steps (no-op at T = 1000);
    # reverse-step variance posterior_variance (True) or beta_t (False) when not learn_sigma
    rescale_timesteps: bool = False
    sigma_small: bool = False
    # what the network predicts: "eps" (improved-diffusion, the published weights) or "v"
    parameterization: str = "eps"
    kpc_per_pixel: float = 0.5
    stretch: StretchConfig = field(default_factory=StretchConfig)
    # photo-z range over which the prior's physical scale is trusted
    z_min: float = 0.02
    z_max: float = 1.5

    @property
    def in_channels(self) -> int:
        return len(self.bands)


# --------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class FlagThresholds:
    """Thresholds of the quality checks (owner: sampling.flags)."""

    hallucination_max: float = 0.5  # variance-ratio score in the core above this: prior-dominated
    upsampling_max: float = 4.0  # u = 0.168"/theta above this: unreliable (paper)
    chi2_max: float = 3.0  # reduced chi2 of the re-convolved mean above this: poor fit
    masked_fraction_max: float = 0.3
    psf_sum_tolerance: float = 0.02  # |sum - 1| above this: renormalised and flagged
    psf_centroid_tolerance: float = 0.5  # pixels


@dataclass(frozen=True)
class SamplerConfig:
    """DPS settings and summaries (owner: sampling)."""

    # steps and zeta measured on mocks with the demo prior: docs/sampler_tuning.md
    steps: int = 50  # respaced reverse steps (of the prior's diffusion_steps)
    samples: int = 16  # posterior samples per object
    guidance: float = 0.01  # zeta per step, applied to the unit-RMS-normalised gradient
    guidance_rule: str = "rms"  # "rms" (per-sample unit-RMS gradient) | "raw"
    clip_x0: bool = True
    marginalise_photoz: bool = False
    aperture_radius_frac: float = 30 / 256  # hallucination-score aperture, of the image side
    keep_samples: int = 0  # raw samples kept per object in the output
    seed: int = 0
    flags: FlagThresholds = field(default_factory=FlagThresholds)


# --------------------------------------------------------------------------- survey / pipeline
@dataclass(frozen=True)
class ColumnMap:
    """Input catalog column names (owner: survey). Defaults follow HSC PDR3."""

    object_id: str = "object_id"
    ra: str = "ra"
    dec: str = "dec"
    photoz: str = "photoz_best"
    photoz_err_min: str = "photoz_err68_min"
    photoz_err_max: str = "photoz_err68_max"
    # per-band URI columns: "{band}" is replaced by the band name
    cutout_uri: str = "{band}_cutout_uri"
    psf_uri: str = "{band}_psf_uri"


@dataclass(frozen=True)
class StagingConfig:
    """Cutout staging (owner: survey)."""

    stamp_sizes: tuple[int, ...] = (32, 48, 64, 96)  # HSC-pixel stamp buckets
    bad_mask_planes: tuple[str, ...] = ("BAD", "SAT", "INTRP", "CR", "EDGE", "NO_DATA", "SUSPECT")
    psf_size: int = 43
    # stamp side = smallest bucket >= ceil(n_out) + 2 * psf_margin (HSC pixels), else the largest
    psf_margin: int = 8


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's output (owner: pipeline).

    Its hash goes into every output row; changing any field reprocesses.
    """

    physics: PhysicsConfig = field(default_factory=PhysicsConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    columns: ColumnMap = field(default_factory=ColumnMap)
    staging: StagingConfig = field(default_factory=StagingConfig)
    write_maps: bool = True
    map_dtype: str = "float32"  # "float32" | "float16" for the tensor map columns
    fits_maps: bool = False  # also write per-object FITS maps (WCS at the model pixel scale)
