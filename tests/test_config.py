"""Config dataclasses check their values when built: types, ranges, choices (``ConfigError``)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import d4a_batch.config as config_module
from d4a_batch.config import (
    CLASS_RULES,
    FIELD_RULES,
    RULES,
    ColumnMap,
    ConfigError,
    FlagThresholds,
    PhysicsConfig,
    PriorConfig,
    RunConfig,
    SamplerConfig,
    StagingConfig,
    StretchConfig,
    from_dict,
    to_dict,
)
from d4a_batch.schema import REPO_ROOT

CONFIG_CLASSES = [
    obj
    for obj in vars(config_module).values()
    if isinstance(obj, type)
    and dataclasses.is_dataclass(obj)
    and obj.__module__ == config_module.__name__
]


def test_every_config_field_declares_its_rules_and_every_class_checks_itself():
    assert len(CONFIG_CLASSES) >= 8
    for cls in CONFIG_CLASSES:
        missing = {f.name for f in dataclasses.fields(cls) if RULES not in f.metadata}
        assert not missing, f"declare {cls.__name__}.{sorted(missing)} with config.setting(...)"
        assert getattr(cls.__init__, "_d4a_checked", False), f"{cls.__name__} is not checked"
        assert set(FIELD_RULES[cls.__name__]) == {f.name for f in dataclasses.fields(cls)}
    assert set(CLASS_RULES) <= {c.__name__ for c in CONFIG_CLASSES}


def test_defaults_pass_and_round_trip():
    for cls in CONFIG_CLASSES:
        cfg = cls()
        assert from_dict(cls, json.loads(json.dumps(to_dict(cfg)))) == cfg


@pytest.mark.parametrize(
    "path", ["priors/demo-64/config.json", "jobs/configs/demo-64.json"], ids=lambda p: p
)
def test_saved_configs_still_load(path):
    data = json.loads((REPO_ROOT / path).read_text())
    data.pop("metadata", None)  # the artifact's own record beside the config fields
    cfg = from_dict(PriorConfig, data)
    assert cfg.parameterization in ("eps", "v") and cfg.bands == ("g", "r", "i")


BAD = [
    # (class, field, value, words the message must hold)
    (SamplerConfig, "steps", 0, "must be > 0"),
    (SamplerConfig, "steps", -3, "must be > 0"),
    (SamplerConfig, "steps", 2.5, "must be an int"),
    (SamplerConfig, "steps", True, "must be an int"),
    (SamplerConfig, "samples", 0, "must be > 0"),
    (SamplerConfig, "guidance", -0.1, "must be >= 0"),
    (SamplerConfig, "guidance", float("nan"), "NaN"),
    (SamplerConfig, "guidance", float("inf"), "finite"),
    (SamplerConfig, "guidance_rule", "rsm", "must be one of ('rms', 'raw'"),
    (SamplerConfig, "sampler", "dsp", "must be one of ('dps'"),
    (PriorConfig, "mock_structure", "smoth", "must be one of ('smooth', 'realistic')"),
    (SamplerConfig, "aperture_radius_frac", 0.0, "must be > 0"),
    (SamplerConfig, "aperture_radius_frac", 0.7, "must be <= 0.5"),
    (SamplerConfig, "keep_samples", -1, "must be >= 0"),
    (SamplerConfig, "seed", -1, "must be >= 0"),
    (SamplerConfig, "gauss_newton", 0, "must be > 0"),
    (SamplerConfig, "clip_x0", "yes", "must be a bool"),
    (SamplerConfig, "clip_data_step", 1, "must be a bool"),
    (SamplerConfig, "flags", {"chi2_max": 3.0}, "must be a FlagThresholds"),
    (FlagThresholds, "chi2_max", 0.0, "must be > 0"),
    (FlagThresholds, "masked_fraction_max", 1.5, "must be <= 1"),
    (FlagThresholds, "psf_sum_tolerance", -0.01, "must be >= 0"),
    (PriorConfig, "noise_schedule", "cosin", "must be one of ('linear', 'cosine')"),
    (PriorConfig, "parameterization", "x0", "must be one of ('eps', 'v')"),
    (PriorConfig, "image_size", 0, "must be > 0"),
    (PriorConfig, "bands", (), "must not be empty"),
    (PriorConfig, "bands", ("g", "g"), "must not repeat"),
    (PriorConfig, "bands", ["g", "r"], "must be a tuple"),
    (PriorConfig, "bands", ("g", 3), "item 1 (3) must be a str"),
    (PriorConfig, "channel_mult", (1, 0), "item 1 (0) must be > 0"),
    (PriorConfig, "num_heads_upsample", 0, "must be -1 or >= 1"),
    (PriorConfig, "dropout", 1.0, "must be < 1"),
    (PriorConfig, "kpc_per_pixel", 0.0, "must be > 0"),
    (PriorConfig, "z_min", 2.0, "z_max must exceed z_min"),
    (StretchConfig, "a", 0.0, "must be > 0"),
    (PhysicsConfig, "cosmology", "Planck99", "must be one of astropy's realizations"),
    (PhysicsConfig, "hsc_pixel_arcsec", -0.168, "must be > 0"),
    (PhysicsConfig, "profile_ridge", -1e-6, "must be >= 0"),
    (ColumnMap, "object_id", "", "must not be empty"),
    (ColumnMap, "cutout_uri", "cutout_uri", "must contain '{band}'"),
    (StagingConfig, "stamp_sizes", (), "must not be empty"),
    (StagingConfig, "stamp_sizes", (32, -48), "item 1 (-48) must be > 0"),
    (StagingConfig, "psf_margin", -1, "must be >= 0"),
    # issue 28: what the engine can use, not only a range
    (StagingConfig, "psf_size", 42, "must be odd"),
    (StagingConfig, "stamp_sizes", (4,), "must each exceed 2 x psf_margin"),
    (StagingConfig, "bad_mask_planes", "BAD", "must be a tuple"),
    (RunConfig, "map_dtype", "int8", "must be one of ('float32', 'float16')"),
    (RunConfig, "write_maps", 1, "must be a bool"),
    (RunConfig, "sampler", None, "must be a SamplerConfig"),
]


@pytest.mark.parametrize(
    ("cls", "name", "value", "words"), BAD, ids=[f"{c.__name__}.{n}={v!r}" for c, n, v, _ in BAD]
)
def test_a_bad_value_is_a_config_error_naming_class_and_field(cls, name, value, words):
    with pytest.raises(ConfigError) as err:
        cls(**{name: value})
    message = str(err.value)
    assert message.startswith(f"{cls.__name__}.") and words in message
    assert f"{cls.__name__}.{name}" in message or name in message
    assert isinstance(err.value, ValueError)  # callers catching ValueError still do
    with pytest.raises(ConfigError):  # replace and from_dict build through the same check
        dataclasses.replace(cls(), **{name: value})


def test_from_dict_and_nested_values_are_checked():
    with pytest.raises(ConfigError, match=r"SamplerConfig\.steps must be > 0"):
        from_dict(RunConfig, {"sampler": {"steps": 0}})
    with pytest.raises(ConfigError, match=r"SamplerConfig\.guidance_rule"):
        from_dict(RunConfig, {"sampler": {"guidance_rule": "RMS"}})
    with pytest.raises(ConfigError, match="unknown config keys"):
        from_dict(RunConfig, {"sampelr": {}})


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({"staging": {"bad_mask_planes": "BAD"}}, "StagingConfig.bad_mask_planes must be a list of str (got 'BAD')"),
        ({"staging": {"stamp_sizes": {"a": 32}}}, "StagingConfig.stamp_sizes must be a list of int"),
        ({"sampler": 5}, "RunConfig.sampler must be an object of SamplerConfig fields (got 5)"),
        ({"sampler": {"flags": [1, 2]}}, "SamplerConfig.flags must be an object of FlagThresholds"),
        ({"staging": {"psf_size": 42}}, "StagingConfig.psf_size must be odd"),
        ({"staging": {"stamp_sizes": [4]}}, "StagingConfig.stamp_sizes must each exceed 2 x psf_margin"),
        ([1, 2], "RunConfig: expected an object of its fields (got [1, 2])"),
    ],
    ids=["str-for-list", "dict-for-list", "int-for-config", "list-for-config", "even-psf",
         "tiny-stamp", "list-for-run"],
)  # fmt: skip
def test_json_is_parsed_by_the_fields_types(doc, words):
    """A string is not a list of its characters ("BAD" is not the planes B, A, D), a number is
    not a config: each is a ConfigError naming the field (issue 28)."""
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, doc)
    assert words in str(err.value)
    ok = from_dict(RunConfig, {"staging": {"bad_mask_planes": ["BAD"], "stamp_sizes": [17, 32]}})
    assert ok.staging.bad_mask_planes == ("BAD",) and ok.staging.stamp_sizes == (17, 32)


def test_good_values_of_other_types_pass():
    # numpy scalars (read from tables) and ints for float fields are fine
    cfg = SamplerConfig(steps=np.int64(3), samples=2, guidance=1, keep_samples=np.int32(2))
    assert cfg.steps == 3
    assert PriorConfig(z_min=0.0, z_max=0.01, attention_resolutions=()).z_max == 0.01
    assert FlagThresholds(chi2_max=float("inf")).chi2_max == float("inf")  # inf: check off
    assert PhysicsConfig(cosmology="Planck18").cosmology == "Planck18"


def test_a_retired_field_in_a_saved_config_is_dropped_with_a_warning():
    """An older output's run config (with ``blend_fraction_max``) still loads."""
    doc = to_dict(RunConfig())
    doc["sampler"]["flags"]["blend_fraction_max"] = 0.015
    with pytest.warns(UserWarning, match="blend_fraction_max is no longer used.*contamination"):
        cfg = from_dict(RunConfig, doc)
    assert cfg == RunConfig()
    doc["sampler"]["flags"]["not_a_field"] = 1
    with pytest.raises(ConfigError, match="not_a_field"):
        from_dict(RunConfig, doc)
