"""Frozen configuration dataclasses.

Every configuration object is a frozen dataclass that round-trips through JSON
(`to_dict` / `from_dict`) and has a stable content hash (`config_hash`). The
prior's config is saved inside every prior artifact and training checkpoint;
the run config is saved inside every output catalog (and its hash in every row).

Ownership: each dataclass below is owned by the sub-package named in its
docstring; add fields there (with defaults, so old JSON still loads).

Checks: every dataclass of this module checks its values when built (also through
``dataclasses.replace`` and ``from_dict``) and raises ``ConfigError`` (a ``ValueError``)
naming the class and field: each field's annotated type, then its rules in ``FIELD_RULES``
(and ``CLASS_RULES`` for rules across fields) at the end of this module. A new field needs
an entry in ``FIELD_RULES`` (``tests/test_config.py`` fails without one; ``()`` for a field
that only needs its type checked).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import numbers
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value out of range, of the wrong type or not one of the choices."""


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


# Fields that existed once. Configs saved before they went (an older output's run.json, a
# user's JSON) still load: the key is dropped with a warning that says what replaced it.
RETIRED_FIELDS: dict[tuple[str, str], str] = {
    ("FlagThresholds", "blend_fraction_max"): (
        "BLENDED is decided by contamination_max (neighbour light on the used pixels in noise "
        "units) since 2026-12; the flux share is still reported in the reason"
    ),
}


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build ``cls`` from a dict; unknown keys are an error, missing keys take defaults.

    Keys in ``RETIRED_FIELDS`` are dropped with a ``UserWarning`` instead.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(set(data) - names):
        why = RETIRED_FIELDS.get((cls.__name__, key))
        if why is not None:
            msg = f"{cls.__name__}.{key} is no longer used and was ignored: {why}"
            warnings.warn(msg, UserWarning, stacklevel=2)
            data = {k: v for k, v in data.items() if k != key}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
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
    # training mocks (mock.galaxies.sample_params structure): "smooth" (the demo prior's)
    # or "realistic" (arms, bars, knots on arms, dust, published size-mass-z relations)
    mock_structure: str = "smooth"

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
    # MASKED_FRACTION_HIGH: unusable pixels of the model footprint (all bands) in the cutout
    # itself (bad MASK bits, non-finite, off the cutout); neighbour masking is not counted
    masked_fraction_max: float = 0.3
    psf_sum_tolerance: float = 0.02  # |sum - 1| above this: renormalised and flagged
    psf_centroid_tolerance: float = 0.5  # pixels
    # a PSF larger than StagingConfig.psf_size is cropped (and renormalised): PSF_BAD when
    # the crop loses more than this fraction of its flux (issue 11)
    psf_crop_loss_max: float = 0.01
    # BLENDED (survey/detection.py; measured by jobs/blend_thresholds.py on mock targets
    # with one neighbour at 4-30 px, i 20-23.5 -> docs/results/blend_thresholds.json):
    # contamination = the neighbours' light left on the used stamp pixels in noise units,
    # sum (T^2/V) per used pixel: the chi2/dof it adds to a perfect fit of the target (the
    # S/N-blind flux share, blend_fraction, stays in the reason). On 200 targets the true
    # target model's chi2/dof on the used pixels is 1 + the neighbour's true contamination
    # (median deviation 0.011, the noise); limit: a neighbour may push it to 1.2 unflagged.
    # The smallest estimated contamination of a deblended target above 1.2 was 0.142, so
    # 0.13 flags every one of them (48 of 172 deblended; largest unflagged chi2/dof 1.16,
    # smallest flagged 1.06). The flux share is S/N-blind: 0.015 of it flagged 55 of 172
    # and left a chi2/dof of 1.59 unflagged.
    contamination_max: float = 0.13
    # asymmetry = light of the target's segment with no mirror image: <= 0.131 for every
    # deblended target under contamination_max, >= 0.145 for all 28 neighbours too close
    # to deblend (merged into the target's segment, true chi2/dof 1.5-66): 0.14 between.
    asymmetry_max: float = 0.14
    # TRUNCATED: the target's flux outside the model footprint / its total, both from its
    # point-symmetric template on its segment (a neighbour merged on one side does not
    # count) and its faint outskirts in the Kron ellipse (survey/detection.outskirts_light).
    # The 200 mock targets of jobs/blend_thresholds.py, which fit the field, measure <= 0.061
    # (99 %: <= 0.040; PSF wings, noise, neighbours); of 24 mocks 2-4x larger than usual
    # (jobs/truncation_check.py) 22 are measured within 0.05 of their true fraction (two at
    # i > 23 below it: 0.13 for 0.25, 0.29 for 0.34), and 0.1 flags all 6 with more than
    # 0.15 outside at i < 23 and none with less than 0.05
    truncated_fraction_max: float = 0.1
    # TRUNCATED also in noise units: the fit's excess chi2/dof outside the model footprint
    # (sampling/residuals.py, "outside") above truncated_chi2_max while the target's own
    # symmetric light there is at least truncated_light_min of its flux (so the misfit is
    # its light, not an undetected neighbour's alone). A bright galaxy can lose little of
    # its flux and still leave many sigma beyond the field: the HST galaxy of
    # jobs/real_hst_check.py (i = 20, demo-64) at z = 0.5 / 0.8 has 1.6 % / 4.0 % outside,
    # which adds 0.88 / 1.66 to chi2/dof (71 % / 87 % of the excess), and was flagged by
    # neither the 10 % share nor POOR_FIT (chi2/dof 2.24 / 2.91); at z = 0.3 (0.3 %
    # outside, chi2/dof 1.40) it is not. 0.2 mirrors contamination_max: light the model
    # cannot hold may raise a perfect fit's chi2/dof to about 1.2 unflagged
    truncated_chi2_max: float = 0.2
    truncated_light_min: float = 0.01
    # where a poor fit's excess chi2 lies (sampling/residuals.py): the core is the disc of
    # core_radius_fwhm x the PSF FWHM around the object (HSC seeing 3.5-5 px: 5-8 px);
    # CORE_MISFIT when POOR_FIT and the core holds at least core_misfit_share of the
    # positive excess (a majority: the core explains most of the misfit). Measured: real
    # source 1000 (a star, scarlet's point source) 97 %; the demo's two POOR_FIT 1 % and 6 %
    # (light outside the footprint, a star's wing past its mask)
    core_radius_fwhm: float = 1.5
    core_misfit_share: float = 0.5


@dataclass(frozen=True)
class SamplerConfig:
    """Posterior sampler settings and summaries (owner: sampling)."""

    # steps and zeta measured on mocks with the demo prior: docs/sampler_tuning.md
    steps: int = 50  # respaced reverse steps (of the prior's diffusion_steps)
    samples: int = 16  # posterior samples per object
    guidance: float = 0.01  # zeta per step, applied to the unit-RMS-normalised gradient
    # "rms" (per-sample unit-RMS gradient, zeta per step) | "raw" | "rms_total" (unit-RMS,
    # zeta * 50 / steps per step: the total pull does not change with the step count; the
    # default, so that --steps changes the discretisation, not the fit; at 50 steps = "rms")
    guidance_rule: str = "rms_total"
    clip_x0: bool = True
    # "dds" (data-consistency CG on Tweedie's x̂0 each step, no network gradient:
    # sampling/dds.py; the default) | "dps" (guidance through the network, the paper's method,
    # kept to reproduce it) | "daps" (annealed decoupled sampling, no network gradient:
    # sampling/daps.py); steps = network calls per sample. DDS is the default since
    # 2026-12-03: on 42 held-out mocks (two seeds) at 50 x 16 it cost 0.47-0.80x DPS, had the
    # same posterior-mean PSNR within 0.3 dB, raw coverage nearer nominal and a lower chi2/dof
    # at i = 18-19 (docs/RESULTS.md, "DDS becomes the engine default")
    sampler: str = "dds"
    inner_steps: int = 4  # daps: MALA steps per level (likelihood step)
    # daps/dds: CG iterations of the Gauss-Newton step per level/step (10: DDS's benchmarked
    # and calibrated setting; DAPS's exact-Gaussian test uses its own)
    cg_iterations: int = 10
    # dds: the same CG iterations per step, on Tweedie's x̂0; True: perturb-and-optimise (a
    # posterior draw of x0 given x_t, exact for Gaussian priors), False: the mode (as DDS)
    dds_randomize: bool = True
    # dds: Gauss-Newton iterations of that step (re-linearised, each safeguarded by
    # backtracking when > 1; sampling/dds.py). 1: one linearisation, DDS's original step.
    # 3 fits bright objects far better at 1.5x the cost of 1 (still <= 1.22x DPS-50); on
    # galsim mocks only together with clip_data_step = False (docs/RESULTS.md, 2026-12-03)
    gauss_newton: int = 3
    # dds/daps: also clip the data step's output (DDS: x̂0' at every step; both: the final
    # sample) to the prior's range [-1, 1], as clip_x0 clips the network's x̂0. True was the
    # only behaviour before 2026-12-03: it pins empty-sky pixels that the data want below
    # zero flux at zero, a positive pedestal the re-convolved mean pays for in chi2 at high
    # S/N (galsim i = 18 with 3 Gauss-Newton iterations: chi2/dof 1.7-3.3 clipped, 1.2-1.7
    # free; docs/RESULTS.md, 2026-12-03 "the clip after the data step")
    clip_data_step: bool = False
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
    # neighbours (survey/detection.py): sep detection on the inverse-variance-weighted band
    # sum, in a stamp detection_pad pixels wider on each side than the sampler's stamp
    detect_neighbours: bool = True  # False: no detection, no neighbour mask, no BLENDED
    detection_threshold: float = 2.0  # sigma per pixel (1.5 found noise peaks as neighbours)
    detection_minarea: int = 10  # pixels
    deblend_nthresh: int = 32
    # sep's default 0.005 merged 6 of the 7 sources of scarlet's hsc_cosmos_35 into one
    # segment; 0.0002 separates all but two; on 40 mocks 0.001 and 0.0001 split no target
    # (jobs/blend_thresholds.py --deblend-cont)
    deblend_cont: float = 0.0002
    neighbour_dilation: float = 1.0  # neighbour segments grow by this x the PSF FWHM
    target_radius: float = 3.0  # pixels: nearest segment to the position within this
    detection_pad: int = 16  # pixels


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


# --------------------------------------------------------------------------- checks
# A rule takes a field's value and returns what is wrong with it, or None.
Rule = typing.Callable[[Any], "str | None"]

GUIDANCE_RULES = ("rms", "raw", "rms_total")
SAMPLERS = ("dps", "dds", "daps")
NOISE_SCHEDULES = ("linear", "cosine")
PARAMETERIZATIONS = ("eps", "v")
MAP_DTYPES = ("float32", "float16")
MOCK_STRUCTURES = ("smooth", "realistic")  # mock.galaxies.sample_params


def between(lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False):
    """Rule: lo <= v <= hi (``lo_open`` / ``hi_open``: strict); None is no bound."""

    def rule(v: Any) -> str | None:
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo}"
        if hi is not None and (v >= hi if hi_open else v > hi):
            return f"must be {'<' if hi_open else '<='} {hi}"
        return None

    return rule


positive = between(0, lo_open=True)
non_negative = between(0)


def finite(v: Any) -> str | None:
    return None if abs(v) < float("inf") else "must be finite"


def one_of(*choices: Any) -> Rule:
    return lambda v: None if v in choices else f"must be one of {choices}"


def each(*rules: Rule) -> Rule:
    """Rule: every item of a tuple passes ``rules``."""

    def rule(v: Any) -> str | None:
        for i, item in enumerate(v):
            for r in rules:
                if (problem := r(item)) is not None:
                    return f"item {i} ({item!r}) {problem}"
        return None

    return rule


def non_empty(v: Any) -> str | None:
    return None if len(v) else "must not be empty"


def distinct(v: Any) -> str | None:
    return None if len(set(v)) == len(v) else "must not repeat items"


def contains(text: str) -> Rule:
    return lambda v: None if text in v else f"must contain {text!r}"


def cosmology_name(v: Any) -> str | None:
    from astropy.cosmology import realizations

    names = tuple(realizations.available)
    return None if v in names else f"must be one of astropy's realizations {names}"


def _type_problem(tp: Any, v: Any) -> str | None:
    """What is wrong with ``v`` as a value of the resolved annotation ``tp``, or None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        problems = [_type_problem(a, v) for a in args]
        return None if None in problems else f"must be {' or '.join(map(_type_name, args))}"
    if tp is type(None):
        return None if v is None else "must be None"
    if tp is bool:
        return None if isinstance(v, bool | np.bool_) else "must be a bool"
    if tp is int:
        ok = isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_)
        return None if ok else "must be an int"
    if tp is float:
        if not isinstance(v, numbers.Real) or isinstance(v, bool | np.bool_):
            return "must be a number"
        return "must not be NaN" if v != v else None
    if tp is str:
        return None if isinstance(v, str) else "must be a str"
    if origin is tuple:
        if not isinstance(v, tuple):
            return "must be a tuple"
        items = [args[0]] * len(v) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if args and len(items) != len(v):
            return f"must have {len(items)} items"
        for i, (a, item) in enumerate(zip(items, v, strict=False)):
            if (problem := _type_problem(a, item)) is not None:
                return f"item {i} ({item!r}) {problem}"
        return None
    if origin is dict:
        if not isinstance(v, dict):
            return "must be a dict"
        kt, vt = args or (Any, Any)
        for k, item in v.items():
            if (problem := _type_problem(kt, k) or _type_problem(vt, item)) is not None:
                return f"entry {k!r} {problem}"
        return None
    if isinstance(tp, type):
        return None if isinstance(v, tp) else f"must be a {tp.__name__}"
    return None  # an annotation these checks do not know: no type check


def _type_name(tp: Any) -> str:
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def check_config(cfg: Any) -> None:
    """Raise ``ConfigError`` naming the first field of ``cfg`` that breaks its type or rules."""
    cls = type(cfg)
    hints = typing.get_type_hints(cls)
    rules = FIELD_RULES.get(cls.__name__, {})
    for f in dataclasses.fields(cls):
        v = getattr(cfg, f.name)
        problem = _type_problem(hints[f.name], v)
        if problem is None and v is not None:
            for rule in rules.get(f.name, ()):
                if (problem := rule(v)) is not None:
                    break
        if problem is not None:
            raise ConfigError(f"{cls.__name__}.{f.name} {problem} (got {v!r})")
    for names, rule, text in CLASS_RULES.get(cls.__name__, ()):
        if not rule(cfg):
            got = ", ".join(f"{n}={getattr(cfg, n)!r}" for n in names)
            raise ConfigError(f"{cls.__name__}.{names[0]} {text} (got {got})")


FIELD_RULES: dict[str, dict[str, tuple[Rule, ...]]] = {
    "StretchConfig": {"a": (positive, finite)},
    "PhysicsConfig": {
        "hsc_pixel_arcsec": (positive, finite),
        "cosmology": (cosmology_name,),
        "zeropoint_ab": (finite,),
        "profile_ridge": (non_negative, finite),
    },
    "PriorConfig": {
        "name": (non_empty,),
        "image_size": (positive,),
        "bands": (non_empty, distinct, each(non_empty)),
        "num_channels": (positive,),
        "num_res_blocks": (positive,),
        "channel_mult": (non_empty, each(positive)),
        "attention_resolutions": (each(positive),),
        "num_heads": (positive,),
        "num_heads_upsample": (lambda v: None if v == -1 or v >= 1 else "must be -1 or >= 1",),
        "dropout": (between(0, 1, hi_open=True),),
        "use_scale_shift_norm": (),
        "learn_sigma": (),
        "diffusion_steps": (positive,),
        "noise_schedule": (one_of(*NOISE_SCHEDULES),),
        "rescale_timesteps": (),
        "sigma_small": (),
        "parameterization": (one_of(*PARAMETERIZATIONS),),
        "kpc_per_pixel": (positive, finite),
        "stretch": (),
        "z_min": (non_negative, finite),
        "z_max": (positive, finite),
        "mock_structure": (one_of(*MOCK_STRUCTURES),),
    },
    "FlagThresholds": {
        "hallucination_max": (positive,),
        "upsampling_max": (positive,),
        "chi2_max": (positive,),
        "masked_fraction_max": (between(0, 1),),
        "psf_sum_tolerance": (non_negative,),
        "psf_centroid_tolerance": (non_negative,),
        "psf_crop_loss_max": (between(0, 1),),
        "contamination_max": (non_negative, finite),
        "asymmetry_max": (non_negative,),
        "truncated_fraction_max": (between(0, 1),),
        "truncated_chi2_max": (non_negative, finite),
        "truncated_light_min": (between(0, 1),),
        "core_radius_fwhm": (positive, finite),
        "core_misfit_share": (between(0, 1),),
    },
    "SamplerConfig": {
        "steps": (positive,),
        "samples": (positive,),
        "guidance": (non_negative, finite),
        "guidance_rule": (one_of(*GUIDANCE_RULES),),
        "clip_x0": (),
        "sampler": (one_of(*SAMPLERS),),
        "inner_steps": (non_negative,),
        "cg_iterations": (non_negative,),
        "dds_randomize": (),
        "gauss_newton": (positive,),
        "clip_data_step": (),
        "marginalise_photoz": (),
        "aperture_radius_frac": (between(0, 0.5, lo_open=True),),
        "keep_samples": (non_negative,),
        "seed": (non_negative,),
        "flags": (),
    },
    "ColumnMap": {
        "object_id": (non_empty,),
        "ra": (non_empty,),
        "dec": (non_empty,),
        "photoz": (non_empty,),
        "photoz_err_min": (non_empty,),
        "photoz_err_max": (non_empty,),
        "cutout_uri": (contains("{band}"),),
        "psf_uri": (contains("{band}"),),
    },
    "StagingConfig": {
        "stamp_sizes": (non_empty, distinct, each(positive)),
        "bad_mask_planes": (each(non_empty),),
        "psf_size": (positive,),
        "psf_margin": (non_negative,),
        "detect_neighbours": (),
        "detection_threshold": (positive,),
        "detection_minarea": (positive,),
        "deblend_nthresh": (positive,),
        "deblend_cont": (between(0, 1),),
        "neighbour_dilation": (non_negative,),
        "target_radius": (non_negative,),
        "detection_pad": (non_negative,),
    },
    "RunConfig": {
        "physics": (),
        "sampler": (),
        "columns": (),
        "staging": (),
        "write_maps": (),
        "map_dtype": (one_of(*MAP_DTYPES),),
        "fits_maps": (),
    },
}
# rules across fields: (field names, predicate on the config, what must hold)
CLASS_RULES: dict[str, tuple[tuple[tuple[str, ...], typing.Callable[[Any], bool], str], ...]] = {
    "PriorConfig": ((("z_max", "z_min"), lambda c: c.z_max > c.z_min, "must exceed z_min"),),
}


def _checked_init(init: typing.Callable[..., None]) -> typing.Callable[..., None]:
    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if type(self).__module__ == __name__:  # a subclass elsewhere checks its own fields
            check_config(self)

    __init__._d4a_checked = True  # type: ignore[attr-defined]
    return __init__


def _install_checks() -> None:
    """Every dataclass of this module checks itself when built (see the module docstring)."""
    for obj in list(globals().values()):
        if (
            isinstance(obj, type)
            and dataclasses.is_dataclass(obj)
            and obj.__module__ == __name__
            and not getattr(obj.__init__, "_d4a_checked", False)
        ):
            obj.__init__ = _checked_init(obj.__init__)


_install_checks()  # keep last: classes defined below this line would not be checked
