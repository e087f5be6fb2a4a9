"""One way to name a sampler configuration on every command line (issue 32 item 4).

Every job's ``--sampler`` (and ``--compare``, ``--engine-sampler``, ...) and the ``sampler``
section of the engine's ``--config`` take the same SPEC, resolved by ``sampler_config``:

- ``default``: the engine's ``SamplerConfig()``; ``demo``: the demo job's settings
  (``DEMO_SAMPLER``); ``fast``: the default in bfloat16 with ``gauss_newton_tol`` 0.1
  (``FAST_SAMPLER``, calibrated; issue 30). An empty SPEC is ``default``'s fields over the
  base (the base itself).
- tokens, the frontier's short form: ``dps``, ``dps:50``, ``daps:30:4:20``,
  ``dds:25:10[:gnK][:mode][:clip|:free][:rcgK][:tolX]``, and ``bf16``/``fp32`` for any
  algorithm (``spec_fields`` says what each token sets);
- a JSON object of ``SamplerConfig`` fields, e.g. ``'{"sampler": "dds", "steps": 25}'``;
- a path to a JSON file holding such an object, or a run config (``RunConfig`` fields,
  e.g. ``_d4a_run_config.json`` of an earlier run): its ``sampler`` section.

Named configs are taken whole; tokens, JSON and files set their fields over ``base`` (the
caller's starting point: ``SamplerConfig()`` unless a job has its own defaults). A job's
per-field flags (``--steps``, ``--samples``, ...) then override what the SPEC gave.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from d4a_batch.config import ConfigError, SamplerConfig, from_dict, to_dict

# the demo's sampler settings: sized to finish in about 5 minutes on 2 CPU cores. "dds"
# (sampling/dds.py): at 25 steps DPS under-fits bright galaxies (4 of 32 demo objects POOR_FIT
# at chi2/dof 3.9-8.8); DDS fits them (1.8-2.1) in less time
# (docs/HISTORY.md, 2026-12-02 DDS). The float32 network on CPU and every row through all three
# Gauss-Newton iterations: the demo's calibration (priors/demo-64) was fitted so
DEMO_SAMPLER = SamplerConfig(steps=25, samples=4, sampler="dds", cg_iterations=10,
                             network_precision="auto", gauss_newton_tol=0.0)  # fmt: skip
# the default at 0.72x its CPU time, with its own calibration in priors/demo-64: the network in
# bfloat16, rows stop Gauss-Newton at a 10 % gain (issue 30; not the default: raw coverage
# 0.04-0.05 lower at i = 22-24, samples batch-dependent at ~1e-3; docs/HISTORY.md 2026-12-08)
FAST_SAMPLER = SamplerConfig(network_precision="bfloat16", gauss_newton_tol=0.1)
NAMED = {"default": SamplerConfig(), "demo": DEMO_SAMPLER, "fast": FAST_SAMPLER}
ALGORITHMS = ("dps", "daps", "dds")
SPEC_HELP = (
    "sampler config: 'default', 'demo', 'fast', tokens (dps:50, daps:30:4:20, dds:25:10:gn3), a JSON "
    "object of SamplerConfig fields, or a JSON file of them (d4a_batch/sampler_spec.py)"
)
PRECISION = {"bf16": "bfloat16", "fp32": "float32"}


def sampler_config(
    spec: str | dict | None, base: SamplerConfig | None = None, **overrides: Any
) -> SamplerConfig:
    """The SamplerConfig a SPEC names (see the module docstring), then ``overrides`` (the
    job's per-field flags; ``None`` values are flags not given). ``ConfigError`` on a bad
    SPEC or field."""
    base = SamplerConfig() if base is None else base
    text = spec.strip() if isinstance(spec, str) else spec
    if isinstance(text, dict):
        cfg = _over(base, text, "sampler")
    elif not text:
        cfg = base
    elif text in NAMED:
        cfg = NAMED[text]
    elif text.startswith("{"):
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"sampler {text!r}: not valid JSON ({e})") from None
        cfg = _over(base, fields, text)
    elif text.split(":")[0] in ALGORITHMS:
        cfg = _over(base, spec_fields(text), text)
    elif Path(text).is_file():
        cfg = _over(base, _file_fields(Path(text)), text)
    else:
        raise ConfigError(
            f"sampler {text!r}: expected 'default', 'demo', tokens such as dps:50 or "
            "dds:25:10, a JSON object of SamplerConfig fields or a JSON file of them"
        )
    given = {k: v for k, v in overrides.items() if v is not None}
    return _over(cfg, given, "flags") if given else cfg


def sampler_arg(text: str) -> str:
    """argparse ``type`` of a ``--sampler`` SPEC: checked here (a bad one is a usage error,
    exit 2), resolved later over the job's base by ``sampler_config``."""
    try:
        sampler_config(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _over(base: SamplerConfig, fields: Any, what: str) -> SamplerConfig:
    if not isinstance(fields, dict):
        raise ConfigError(f"sampler {what}: expected an object of SamplerConfig fields")
    try:
        return from_dict(SamplerConfig, to_dict(base) | fields)
    except ConfigError as e:
        raise ConfigError(f"sampler {what}: {e}") from None


def _file_fields(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"sampler file {path}: cannot read it as JSON ({e})") from None
    if isinstance(doc, dict) and isinstance(doc.get("sampler"), dict):  # a run config
        return doc["sampler"]
    return doc


def spec_fields(spec: str) -> dict:
    """``dps:50`` / ``daps:30:4:20`` / ``dds:25:10[:gnK][:mode][:clip|:free]`` -> fields.

    The algorithm, then STEPS (optional); daps: INNER and CG; dds: CG, then in any order
    ``gnK`` (K Gauss-Newton iterations per step, ``gauss_newton``), ``mode`` for the
    deterministic (DDS) variant, ``clip`` / ``free`` for a clipped / unclipped data step
    (``clip_data_step``), ``rcgK`` (``refine_cg_iterations``), ``tolX``
    (``gauss_newton_tol``). Any algorithm: ``bf16`` / ``fp32`` (``network_precision``).
    """
    parts = spec.split(":")
    extra_precision = [p for p in parts[1:] if p in PRECISION]
    parts = [p for p in parts if p not in PRECISION]
    name = parts[0]
    if name not in ALGORITHMS or (len(parts) > 1 and not parts[1].isdigit()):
        raise ConfigError(
            f"sampler spec {spec!r}: expected dps[:STEPS], daps[:STEPS[:INNER[:CG]]] or "
            "dds[:STEPS[:CG[:gnK][:mode][:clip|:free]]]"
        )
    out: dict = {"sampler": name}
    if len(parts) > 1:
        out["steps"] = int(parts[1])
    for p in extra_precision:
        out["network_precision"] = PRECISION[p]
    if name == "daps":
        for key, p in zip(("inner_steps", "cg_iterations"), parts[2:4], strict=False):
            out[key] = _int(p, spec)
        if len(parts) > 4:
            raise ConfigError(f"sampler spec {spec!r}: daps takes STEPS:INNER:CG at most")
    if name == "dps" and len(parts) > 2:
        raise ConfigError(f"sampler spec {spec!r}: dps takes STEPS only")
    if name == "dds":
        if len(parts) > 2:
            out["cg_iterations"] = _int(parts[2], spec)
        for extra in parts[3:]:
            out.update(_dds_token(extra, spec))
    return out


def _int(text: str, spec: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"sampler spec {spec!r}: {text!r} is not a count")
    return int(text)


def _dds_token(extra: str, spec: str) -> dict:
    if extra == "mode":
        return {"dds_randomize": False}
    if extra in ("clip", "free"):
        return {"clip_data_step": extra == "clip"}
    if extra.startswith("gn") and extra[2:].isdigit() and int(extra[2:]) > 0:
        return {"gauss_newton": int(extra[2:])}
    if extra.startswith("rcg") and extra[3:].isdigit():
        return {"refine_cg_iterations": int(extra[3:])}
    if extra.startswith("tol") and _is_fraction(extra[3:]):
        return {"gauss_newton_tol": float(extra[3:])}
    raise ConfigError(
        f"sampler spec {spec!r}: after dds:STEPS:CG only 'mode', 'clip', 'free', "
        "'gnK' (K >= 1), 'rcgK', 'tolX' (0 <= X < 1), 'bf16', 'fp32'"
    )


def _is_fraction(text: str) -> bool:
    try:
        return 0.0 <= float(text) < 1.0
    except ValueError:
        return False


def run_config_sampler(section: Any, base: SamplerConfig | None = None) -> dict:
    """The ``sampler`` section of a run config document as SamplerConfig fields: a SPEC
    string resolved (``"demo"``, ``"dds:25:10"``, a file), an object of fields kept."""
    if isinstance(section, str):
        return to_dict(sampler_config(section, base))
    return section


# a job's per-field flags (argparse dests) -> the SamplerConfig field each overrides
FIELD_FLAGS = {
    "steps": "steps", "samples": "samples", "guidance": "guidance", "seed": "seed",
    "inner_steps": "inner_steps", "cg": "cg_iterations", "gauss_newton": "gauss_newton",
    "clip_data_step": "clip_data_step",
}  # fmt: skip


def sampler_from_args(args: argparse.Namespace, base: SamplerConfig | None = None) -> SamplerConfig:
    """A job's sampler: its ``--sampler`` SPEC over ``base``, then those of its per-field flags
    (``FIELD_FLAGS``) that it has and that were given (not None); ``--clip-data-step`` is
    ``true``/``false``."""
    flags = {f: getattr(args, d, None) for d, f in FIELD_FLAGS.items()}
    if isinstance(flags["clip_data_step"], str):
        flags["clip_data_step"] = flags["clip_data_step"] == "true"
    return sampler_config(getattr(args, "sampler", None), base, **flags)
