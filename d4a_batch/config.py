"""Frozen configuration dataclasses.

Longer than 400 lines: one concern, the run's configuration. Each dataclass sits with its
fields, their defaults, the reasons for the defaults and their rules (``setting(default,
*rules)``, issue 32: rules beside their fields), and with the ~200 lines that parse JSON and
check every field on construction. ``_install_checks`` wraps the dataclasses *of this
module* (by ``__module__`` and ``globals()``), and ``to_dict`` / ``from_dict`` /
``config_hash`` / ``ConfigError`` are imported from here by some forty modules, jobs and
tests; moving the checks out would need those re-exports or forty import edits, and a
second module to read to see what a field accepts.

Every configuration object is a frozen dataclass that round-trips through JSON
(`to_dict` / `from_dict`) and has a stable content hash (`config_hash`). The
prior's config is saved inside every prior artifact and training checkpoint;
the run config is saved inside every output catalog (and its hash in every row).

Ownership: each dataclass below is owned by the sub-package named in its
docstring; add fields there (with defaults, so old JSON still loads).

Checks: every dataclass of this module checks its values when built (also through
``dataclasses.replace`` and ``from_dict``) and raises ``ConfigError`` (a ``ValueError``)
naming the class and field: each field's annotated type, then the rules declared beside
it, ``name: type = setting(default, *rules)`` (``CLASS_RULES``, after its class, for rules
across fields). Every field is declared with ``setting`` (``tests/test_config.py`` fails
without; ``setting(default)`` for a field that only needs its type checked). ``from_dict``
parses JSON by the annotated types first: a JSON object where a config is expected, a
list where a tuple is (a string is not a list of its characters), else ``ConfigError``.
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


def _from_jsonable(tp: Any, value: Any, where: str) -> Any:
    """Rebuild a value of (resolved) type ``tp`` from its JSON form; ``where``: the field
    (``Class.field``) the error names. Only the value's shape is parsed here (an object for
    a config, a list for a tuple); ``check_config`` checks the items' types and rules."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _from_jsonable(args[0], value, where) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be an object of {tp.__name__} fields (got {value!r})")
        return from_dict(tp, value)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):  # a str is not a list of its characters
            kind = f"a list of {_type_name(args[0])}" if args else "a list"
            raise ConfigError(f"{where} must be {kind} (got {value!r})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_jsonable(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if args:
            if len(args) != len(value):
                raise ConfigError(f"{where} must have {len(args)} items (got {value!r})")
            return tuple(
                _from_jsonable(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))
            )
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be an object (got {value!r})")
        _, vt = typing.get_args(tp)
        return {k: _from_jsonable(vt, v, f"{where}[{k!r}]") for k, v in value.items()}
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

    Keys in ``RETIRED_FIELDS`` are dropped with a ``UserWarning`` instead. Values are
    parsed by their fields' types (``_from_jsonable``), then checked (``check_config``).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected an object of its fields (got {data!r})")
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
    kwargs = {k: _from_jsonable(hints[k], v, f"{cls.__name__}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))


def config_hash(cfg: Any, length: int = 16) -> str:
    """Stable content hash (hex) of a config: same values, same hash."""
    return hashlib.sha256(to_json(cfg).encode()).hexdigest()[:length]


# --------------------------------------------------------------------------- rules
# A rule takes a field's value and returns what is wrong with it, or None.
Rule = typing.Callable[[Any], "str | None"]

GUIDANCE_RULES = ("rms", "raw", "rms_total")
SAMPLERS = ("dps", "dds", "daps")
NETWORK_PRECISIONS = ("auto", "bfloat16", "float32")
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


def odd(v: Any) -> str | None:
    return None if v % 2 == 1 else "must be odd (only an odd side has a centre pixel)"


RULES = "d4a_rules"  # a field's rules, in its metadata


def setting(default: Any, *rules: Rule) -> Any:
    """A config field with its rules beside it: ``steps: int = setting(50, positive)``.

    Its type is checked first (the annotation), then ``rules`` in order; the first problem
    is the ``ConfigError``.
    """
    return field(default=default, metadata={RULES: rules})


# a nested config field (``field(default_factory=Config, metadata=NESTED)``): no rules of its
# own, its class checks its fields
NESTED = {RULES: ()}


# rules across the fields of a class: (field names, predicate on the config, what must hold),
# beside the class they check
CLASS_RULES: dict[str, tuple[tuple[tuple[str, ...], typing.Callable[[Any], bool], str], ...]] = {}


# --------------------------------------------------------------------------- physics
@dataclass(frozen=True)
class StretchConfig:
    """asinh stretch x = 2 asinh(v/a)/asinh(1/a) - 1 with v = I/m (owner: physics)."""

    a: float = setting(0.01, positive, finite)


@dataclass(frozen=True)
class PhysicsConfig:
    """Observation-model constants (owner: physics)."""

    hsc_pixel_arcsec: float = setting(0.168, positive, finite)
    # any name in astropy.cosmology.realizations
    cosmology: str = setting("Planck15", cosmology_name)
    zeropoint_ab: float = setting(27.0, finite)
    # closed-form amplitude/background: ridge on alpha in the 2x2 normal equations,
    # relative to the trace of the matrix in the centred basis (see profile_amplitude)
    profile_ridge: float = setting(1e-6, non_negative, finite)


# --------------------------------------------------------------------------- prior
@dataclass(frozen=True)
class PriorConfig:
    """Architecture, schedule and physical scale of a diffusion prior (owner: prior).

    Field names follow improved-diffusion's flags. ``attention_resolutions`` are
    resolutions in pixels (as the flag "16,8"), converted to downsample factors
    inside the UNet exactly as improved-diffusion does.
    """

    name: str = setting("demo-64", non_empty)
    image_size: int = setting(64, positive)
    bands: tuple[str, ...] = setting(("g", "r", "i"), non_empty, distinct, each(non_empty))
    num_channels: int = setting(32, positive)
    num_res_blocks: int = setting(1, positive)
    # (1, 1, 2, 2) with attention at 8 px: 1.31 M parameters, 23 ms per image for a
    # forward+backward on 2 CPU cores vs 48 ms for (1, 2, 2, 2) with attention at 16 (1.63 M)
    channel_mult: tuple[int, ...] = setting((1, 1, 2, 2), non_empty, each(positive))
    attention_resolutions: tuple[int, ...] = setting((8,), each(positive))
    num_heads: int = setting(4, positive)
    num_heads_upsample: int = setting(
        -1, lambda v: None if v == -1 or v >= 1 else "must be -1 or >= 1"
    )
    dropout: float = setting(0.0, between(0, 1, hi_open=True))
    use_scale_shift_norm: bool = setting(True)
    learn_sigma: bool = setting(False)
    diffusion_steps: int = setting(1000, positive)
    noise_schedule: str = setting("cosine", one_of(*NOISE_SCHEDULES))  # "cosine" | "linear"
    # improved-diffusion flags: network sees t * 1000 / diffusion_steps (no-op at T = 1000);
    # reverse-step variance posterior_variance (True) or beta_t (False) when not learn_sigma
    rescale_timesteps: bool = setting(False)
    sigma_small: bool = setting(False)
    # what the network predicts: "eps" (improved-diffusion, the published weights) or "v"
    parameterization: str = setting("eps", one_of(*PARAMETERIZATIONS))
    kpc_per_pixel: float = setting(0.5, positive, finite)
    stretch: StretchConfig = field(default_factory=StretchConfig, metadata=NESTED)
    # photo-z range over which the prior's physical scale is trusted
    z_min: float = setting(0.02, non_negative, finite)
    z_max: float = setting(1.5, positive, finite)
    # training mocks (mock.galaxies.sample_params structure): "smooth" (the demo prior's)
    # or "realistic" (arms, bars, knots on arms, dust, published size-mass-z relations)
    mock_structure: str = setting("smooth", one_of(*MOCK_STRUCTURES))
    # added to the schedule's log-SNR at every t (0: the named schedule as it is). A prior
    # trained at half size on 2x-binned images (training.objective.phase_prior) has +2 ln 2,
    # "simple diffusion"'s shift, and is sampled with it
    logsnr_shift: float = setting(0.0, finite)

    @property
    def in_channels(self) -> int:
        return len(self.bands)


CLASS_RULES["PriorConfig"] = (
    (("z_max", "z_min"), lambda c: c.z_max > c.z_min, "must exceed z_min"),
)


# --------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class FlagThresholds:
    """Thresholds of the quality checks (owner: quality.rules)."""

    # variance-ratio score in the core above this: prior-dominated
    hallucination_max: float = setting(0.5, positive)
    # u = 0.168"/theta above this: unreliable (paper)
    upsampling_max: float = setting(4.0, positive)
    # reduced chi2 of the re-convolved mean above this: poor fit
    chi2_max: float = setting(3.0, positive)
    # MASKED_FRACTION_HIGH: unusable pixels of the model footprint (all bands) in the cutout
    # itself (bad MASK bits, non-finite, off the cutout); neighbour masking is not counted
    masked_fraction_max: float = setting(0.3, between(0, 1))
    # |sum - 1| above this: renormalised and flagged
    psf_sum_tolerance: float = setting(0.02, non_negative)
    psf_centroid_tolerance: float = setting(0.5, non_negative)  # pixels
    # a PSF larger than StagingConfig.psf_size is cropped (and renormalised): PSF_BAD when
    # the crop loses more than this fraction of its flux (issue 11)
    psf_crop_loss_max: float = setting(0.01, between(0, 1))
    # BLENDED (quality/detection.py; measured by jobs/blend_thresholds.py on mock targets
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
    contamination_max: float = setting(0.13, non_negative, finite)
    # asymmetry = light of the target's segment with no mirror image: <= 0.131 for every
    # deblended target under contamination_max, >= 0.145 for all 28 neighbours too close
    # to deblend (merged into the target's segment, true chi2/dof 1.5-66): 0.14 between.
    asymmetry_max: float = setting(0.14, non_negative)
    # TRUNCATED: the target's flux outside the model footprint / its total, both from its
    # point-symmetric template on its segment (a neighbour merged on one side does not
    # count) and its faint outskirts in the Kron ellipse (quality/symmetry.outskirts_light).
    # The 200 mock targets of jobs/blend_thresholds.py, which fit the field, measure <= 0.061
    # (99 %: <= 0.040; PSF wings, noise, neighbours); of 24 mocks 2-4x larger than usual
    # (jobs/truncation_check.py) 22 are measured within 0.05 of their true fraction (two at
    # i > 23 below it: 0.13 for 0.25, 0.29 for 0.34), and 0.1 flags all 6 with more than
    # 0.15 outside at i < 23 and none with less than 0.05
    truncated_fraction_max: float = setting(0.1, between(0, 1))
    # TRUNCATED also in noise units: the fit's excess chi2/dof outside the model footprint
    # (quality/regions.py, "outside") above truncated_chi2_max while the target's own
    # symmetric light there is at least truncated_light_min of its flux (so the misfit is
    # its light, not an undetected neighbour's alone). A bright galaxy can lose little of
    # its flux and still leave many sigma beyond the field: the HST galaxy of
    # jobs/real_hst_check.py (i = 20, demo-64) at z = 0.5 / 0.8 has 1.6 % / 4.0 % outside,
    # which adds 0.88 / 1.66 to chi2/dof (71 % / 87 % of the excess), and was flagged by
    # neither the 10 % share nor POOR_FIT (chi2/dof 2.24 / 2.91); at z = 0.3 (0.3 %
    # outside, chi2/dof 1.40) it is not. 0.2 mirrors contamination_max: light the model
    # cannot hold may raise a perfect fit's chi2/dof to about 1.2 unflagged
    truncated_chi2_max: float = setting(0.2, non_negative, finite)
    truncated_light_min: float = setting(0.01, between(0, 1))
    # where a poor fit's excess chi2 lies (quality/regions.py): the core is the disc of
    # core_radius_fwhm x the PSF FWHM around the object (HSC seeing 3.5-5 px: 5-8 px);
    # CORE_MISFIT when POOR_FIT and the core holds at least core_misfit_share of the
    # positive excess (a majority: the core explains most of the misfit). Measured: real
    # source 1000 (a star, scarlet's point source) 97 %; the demo's two POOR_FIT 1 % and 6 %
    # (light outside the footprint, a star's wing past its mask)
    core_radius_fwhm: float = setting(1.5, positive, finite)
    core_misfit_share: float = setting(0.5, between(0, 1))


@dataclass(frozen=True)
class SamplerConfig:
    """Posterior sampler settings and summaries (owner: sampling)."""

    # steps and zeta measured on mocks with the demo prior: docs/sampler_tuning.md
    steps: int = setting(50, positive)  # respaced reverse steps (of the prior's diffusion_steps)
    samples: int = setting(16, positive)  # posterior samples per object
    # zeta per step, applied to the unit-RMS-normalised gradient
    guidance: float = setting(0.01, non_negative, finite)
    # "rms" (per-sample unit-RMS gradient, zeta per step) | "raw" | "rms_total" (unit-RMS,
    # zeta * 50 / steps per step: the total pull does not change with the step count; the
    # default, so that --steps changes the discretisation, not the fit; at 50 steps = "rms")
    guidance_rule: str = setting("rms_total", one_of(*GUIDANCE_RULES))
    clip_x0: bool = setting(True)
    # "dds" (data-consistency CG on Tweedie's x̂0 each step, no network gradient:
    # sampling/dds.py; the default) | "dps" (guidance through the network, the paper's method,
    # kept to reproduce it) | "daps" (annealed decoupled sampling, no network gradient:
    # sampling/daps.py); steps = network calls per sample. DDS is the default since
    # 2026-12-03: on 42 held-out mocks (two seeds) at 50 x 16 it cost 0.47-0.80x DPS, had the
    # same posterior-mean PSNR within 0.3 dB, raw coverage nearer nominal and a lower chi2/dof
    # at i = 18-19 (docs/HISTORY.md, "DDS becomes the engine default")
    sampler: str = setting("dds", one_of(*SAMPLERS))
    inner_steps: int = setting(4, non_negative)  # daps: MALA steps per level (likelihood step)
    # daps/dds: CG iterations of the Gauss-Newton step per level/step (10: DDS's benchmarked
    # and calibrated setting; DAPS's exact-Gaussian test uses its own)
    cg_iterations: int = setting(10, non_negative)
    # dds: the same CG iterations per step, on Tweedie's x̂0; True: perturb-and-optimise (a
    # posterior draw of x0 given x_t, exact for Gaussian priors), False: the mode (as DDS)
    dds_randomize: bool = setting(True)
    # dds: Gauss-Newton iterations of that step (re-linearised, each safeguarded by
    # backtracking when > 1; sampling/dds.py). 1: one linearisation, DDS's original step.
    # 3 fits bright objects far better at 1.5x the cost of 1 (still <= 1.22x DPS-50); on
    # galsim mocks only together with clip_data_step = False (docs/HISTORY.md, 2026-12-03)
    gauss_newton: int = setting(3, positive)
    # dds: CG iterations of each Gauss-Newton iteration after the first (0: cg_iterations,
    # all alike, the behaviour before 2026-12-08). The first solves from x̂0, far from the
    # data; the later ones refine an iterate already near them (issue 30)
    refine_cg_iterations: int = setting(0, non_negative)
    # dds: a row stops its Gauss-Newton iterations once one lowered its perturbed objective by
    # less than this fraction (the residual is near-linear there: faint objects); later
    # iterations run on the other rows only. 0: every row runs all ``gauss_newton``. 0.1 with
    # bfloat16 below is the calibrated "fast" sampler (sampler_spec.NAMED): 0.72x the CPU
    # time, chi2/dof within 5 % per i magnitude, raw coverage 0.04-0.05 lower at i = 22-24
    # (docs/HISTORY.md 2026-12-08 session 3, issue 30)
    gauss_newton_tol: float = setting(0.0, between(0, 1, hi_open=True))
    # dds/daps: also clip the data step's output (DDS: x̂0' at every step; both: the final
    # sample) to the prior's range [-1, 1], as clip_x0 clips the network's x̂0. True was the
    # only behaviour before 2026-12-03: it pins empty-sky pixels that the data want below
    # zero flux at zero, a positive pedestal the re-convolved mean pays for in chi2 at high
    # S/N (galsim i = 18 with 3 Gauss-Newton iterations: chi2/dof 1.7-3.3 clipped, 1.2-1.7
    # free; docs/HISTORY.md, 2026-12-03 "the clip after the data step")
    clip_data_step: bool = setting(False)
    marginalise_photoz: bool = setting(False)
    # the network's arithmetic: "auto" (bfloat16 autocast on CUDA, float32 elsewhere) |
    # "bfloat16" (autocast on any device: 2.5x faster on CPUs with AMX or AVX512-BF16, slower
    # on those without, which get a warning: rows.network_autocast; samples depend on the
    # batch at ~1e-3, not 1e-4; DAPS on a very bright galaxy gave NaN) | "float32" (issue 30)
    network_precision: str = setting("auto", one_of(*NETWORK_PRECISIONS))
    # hallucination-score aperture, of the image side
    aperture_radius_frac: float = setting(30 / 256, between(0, 0.5, lo_open=True))
    keep_samples: int = setting(0, non_negative)  # raw samples kept per object in the output
    seed: int = setting(0, non_negative)
    flags: FlagThresholds = field(default_factory=FlagThresholds, metadata=NESTED)


# --------------------------------------------------------------------------- survey / pipeline
@dataclass(frozen=True)
class ColumnMap:
    """Input catalog column names (owner: survey). Defaults follow HSC PDR3."""

    object_id: str = setting("object_id", non_empty)
    ra: str = setting("ra", non_empty)
    dec: str = setting("dec", non_empty)
    photoz: str = setting("photoz_best", non_empty)
    photoz_err_min: str = setting("photoz_err68_min", non_empty)
    photoz_err_max: str = setting("photoz_err68_max", non_empty)
    # per-band URI columns: "{band}" is replaced by the band name
    cutout_uri: str = setting("{band}_cutout_uri", contains("{band}"))
    psf_uri: str = setting("{band}_psf_uri", contains("{band}"))


@dataclass(frozen=True)
class StagingConfig:
    """Cutout staging (owner: survey)."""

    # HSC-pixel stamp buckets, each > 2 psf_margin (CLASS_RULES below); the job also checks
    # that the largest holds the prior's footprint at its z_max (pipeline/plan.py)
    stamp_sizes: tuple[int, ...] = setting((32, 48, 64, 96), non_empty, distinct, each(positive))
    # MASK planes whose pixels are not used (names a cutout does not define are ignored)
    bad_mask_planes: tuple[str, ...] = setting(
        ("BAD", "SAT", "INTRP", "CR", "EDGE", "NO_DATA", "SUSPECT"), each(non_empty)
    )
    # every PSF is padded or cropped to psf_size x psf_size around its centre pixel
    # (survey/fits_io.fit_psf_size), which an even side does not have
    psf_size: int = setting(43, positive, odd)
    # stamp side = smallest bucket >= ceil(n_out) + 2 * psf_margin (HSC pixels), else the largest
    psf_margin: int = setting(8, non_negative)
    # neighbours (quality/detection.py): sep detection on the inverse-variance-weighted band
    # sum, in a stamp detection_pad pixels wider on each side than the sampler's stamp
    detect_neighbours: bool = setting(True)  # False: no detection, no neighbour mask, no BLENDED
    # sigma per pixel (1.5 found noise peaks as neighbours)
    detection_threshold: float = setting(2.0, positive)
    detection_minarea: int = setting(10, positive)  # pixels
    deblend_nthresh: int = setting(32, positive)
    # sep's default 0.005 merged 6 of the 7 sources of scarlet's hsc_cosmos_35 into one
    # segment; 0.0002 separates all but two; on 40 mocks 0.001 and 0.0001 split no target
    # (jobs/blend_thresholds.py --deblend-cont)
    deblend_cont: float = setting(0.0002, between(0, 1))
    # neighbour segments grow by this x the PSF FWHM
    neighbour_dilation: float = setting(1.0, non_negative)
    # pixels: nearest segment to the position within this
    target_radius: float = setting(3.0, non_negative)
    detection_pad: int = setting(16, non_negative)  # pixels


CLASS_RULES["StagingConfig"] = (
    (
        ("stamp_sizes", "psf_margin"),
        lambda c: min(c.stamp_sizes) > 2 * c.psf_margin,
        "must each exceed 2 x psf_margin (a stamp holds the model footprint and the margin "
        "on both sides; a smaller one holds no footprint at all)",
    ),
)


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's output (owner: pipeline).

    Its hash goes into every output row; changing any field reprocesses.
    """

    physics: PhysicsConfig = field(default_factory=PhysicsConfig, metadata=NESTED)
    sampler: SamplerConfig = field(default_factory=SamplerConfig, metadata=NESTED)
    columns: ColumnMap = field(default_factory=ColumnMap, metadata=NESTED)
    staging: StagingConfig = field(default_factory=StagingConfig, metadata=NESTED)
    write_maps: bool = setting(True)
    # "float32" | "float16" for the tensor map columns
    map_dtype: str = setting("float32", one_of(*MAP_DTYPES))
    # also write per-object FITS maps (WCS at the model pixel scale)
    fits_maps: bool = setting(False)


# --------------------------------------------------------------------------- checks
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
    for f in dataclasses.fields(cls):
        v = getattr(cfg, f.name)
        problem = _type_problem(hints[f.name], v)
        if problem is None and v is not None:
            for rule in f.metadata.get(RULES, ()):
                if (problem := rule(v)) is not None:
                    break
        if problem is not None:
            raise ConfigError(f"{cls.__name__}.{f.name} {problem} (got {v!r})")
    for names, rule, text in CLASS_RULES.get(cls.__name__, ()):
        if not rule(cfg):
            got = ", ".join(f"{n}={getattr(cfg, n)!r}" for n in names)
            raise ConfigError(f"{cls.__name__}.{names[0]} {text} (got {got})")


# {class name: {field: its rules}} of every field declared with ``setting`` (filled below)
FIELD_RULES: dict[str, dict[str, tuple[Rule, ...]]] = {}


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
            FIELD_RULES[obj.__name__] = {
                f.name: f.metadata[RULES] for f in dataclasses.fields(obj) if RULES in f.metadata
            }


_install_checks()  # keep last: classes defined below this line would not be checked
