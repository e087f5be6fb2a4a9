"""A prior's interval calibration: ``calibration.json`` in the artifact folder.

The conformal layer (DESIGN.md §2b; Angelopoulos et al. 2022, arXiv 2202.05265, with the
risk-controlling prediction sets of Bates et al. 2021): the catalog's calibrated interval of
level p for a pixel is

    mean_flux ± λ_p(bin) · z_p · std_flux,          z_p = Φ⁻¹((1 + p)/2)  (1.0 at 68 %, 1.96 at 95 %)

with λ_p fitted per S/N bin on calibration mocks (``validation.conformal.fit_lambda``;
``jobs/calibrate_prior.py``). The S/N of an object is the observed aperture S/N per pixel
(``sampling.calibrate.observed_snr``), computable from the observation at run time.

The file holds one calibration per sampler config it was fitted for (format
``d4a-calibration/2``: ``{"format", "calibrations": [...]}``; a single
``d4a-calibration/1`` document, the format before, still loads as one entry), e.g. the
engine's default sampler and the demo's. Each records how λ was fitted (mock recipe, seed,
sampler config and its fingerprint, bin edges, α, δ, bound, n per bin). A calibration
applies only to the sampler config it was fitted for: ``sampler_fingerprint`` hashes every ``SamplerConfig`` field that changes the
posterior samples (not the seed, kept samples, flag thresholds or score aperture);
``Calibration.matches`` compares the recorded sampler config field by field (a field added
to SamplerConfig after the fit must be at its default), and the engine writes NaN
calibrated columns (with a warning) when no entry matches. An artifact without
``calibration.json`` loads with ``Prior.calibrations = ()``: the catalog's calibrated
columns are then NaN.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d4a_batch.config import config_hash, to_dict
from d4a_batch.schema import PRIOR_CALIBRATION

CALIBRATION_FORMAT = "d4a-calibration/1"  # one entry (a Calibration's own document)
CALIBRATION_SET_FORMAT = "d4a-calibration/2"  # the file: {"format", "calibrations": [...]}
# SamplerConfig fields that do not change the samples' distribution
_NOT_FINGERPRINTED = ("seed", "keep_samples", "flags", "aperture_radius_frac")


class CalibrationError(ValueError):
    """calibration.json cannot be used (format, missing keys, inconsistent bins)."""


# sampling.dps.TOTAL_REFERENCE_STEPS (not imported: dps imports the prior package)
_DPS_REFERENCE_STEPS = 50


# SamplerConfig fields each sampler does not read (``sampling.deconvolve``): they cannot
# change its samples, so a calibration does not depend on them
_UNUSED_BY = {
    "dps": ("inner_steps", "cg_iterations", "dds_randomize", "gauss_newton", "clip_data_step",
            "refine_cg_iterations", "gauss_newton_tol"),
    "dds": ("guidance", "guidance_rule", "inner_steps"),
    "daps": ("guidance", "guidance_rule", "dds_randomize", "gauss_newton",
             "refine_cg_iterations", "gauss_newton_tol"),
}  # fmt: skip
# fields added after calibrations were written, with the value that reproduces the sampler
# as it was before them: at that value they are left out, so older entries keep matching
_ADDED_LATER = {"gauss_newton": 1, "clip_data_step": True, "refine_cg_iterations": 0,
                "gauss_newton_tol": 0.0, "network_precision": "auto"}  # fmt: skip


def saved_sampler_dict(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A sampler config dict as saved by an earlier version, completed as it ran then.

    A field that the saved dict lacks did not exist when it was written: the fields of
    ``_ADDED_LATER`` get the value that reproduces the sampler of that time (not today's
    default, which ``config.from_dict`` would fill in), and a dict without ``sampler`` was
    drawn by DPS. Other missing fields keep today's defaults, which by the config convention
    are their old behaviour.
    """
    d = dict(saved)
    d.setdefault("sampler", "dps")
    for key, before in _ADDED_LATER.items():
        d.setdefault(key, before)
    return d


def canonical_sampler(sampler: Any) -> dict[str, Any]:
    """The sampler config as a dict in one canonical form per sampling procedure.

    The fields the chosen sampler does not read are dropped (DPS ignores ``cg_iterations``,
    DDS the guidance...). DPS's "rms_total" rule takes the per-step ζ·50/steps
    (``sampling/dps.py``), exactly the "rms" rule with guidance ζ·50/steps, so it is written
    as that (same float expression as the sampler's).
    """
    d = dict(sampler) if isinstance(sampler, Mapping) else to_dict(sampler)
    kind = d.get("sampler", "dps")
    if kind == "dps" and d.get("guidance_rule") == "rms_total":
        d["guidance"] = d["guidance"] * _DPS_REFERENCE_STEPS / d["steps"]
        d["guidance_rule"] = "rms"
    for key, before in _ADDED_LATER.items():
        if d.get(key, before) == before:
            d.pop(key, None)
    return {k: v for k, v in d.items() if k not in _UNUSED_BY.get(kind, ())}


def sampler_fingerprint(sampler: Any) -> str:
    """Hash of the sampler config's distribution-changing fields (a SamplerConfig or its dict)."""
    d = canonical_sampler(sampler)
    return config_hash({k: v for k, v in sorted(d.items()) if k not in _NOT_FINGERPRINTED})


def z_score(level: float) -> float:
    """Φ⁻¹((1 + level)/2): the Gaussian half-width in std of a central ``level`` interval."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    # the standard library's normal quantile (scipy.stats would cost each actor ~1 s to import)
    return statistics.NormalDist().inv_cdf((1 + level) / 2)


def level_key(level: float) -> str:
    """ "68" for 0.68, "95" for 0.95 (the column suffix of a level)."""
    return f"{round(100 * level):d}"


@dataclass(frozen=True)
class Calibration:
    """Interval scales λ per S/N bin and level, and how they were fitted.

    ``snr_edges`` (K+1 increasing, may end in inf) define K bins [e_k, e_{k+1});
    ``lambdas[level_key]`` holds K values (None: no valid λ for that bin, e.g. too few
    calibration objects for the bound at that α). ``levels`` are the nominal coverages
    (1 − α).
    """

    snr_edges: tuple[float, ...]
    levels: tuple[float, ...]
    lambdas: Mapping[str, tuple[float | None, ...]]
    sampler_fingerprint: str
    delta: float
    bound: str  # "wsr" (betting), "hb" (Hoeffding-Bentkus), "hoeffding", "none" (plug-in)
    n_per_bin: tuple[int, ...]
    sampler: Mapping[str, Any] = field(default_factory=dict)  # to_dict(SamplerConfig)
    mocks: Mapping[str, Any] = field(default_factory=dict)  # recipe, seed, noise, n
    details: Mapping[str, Any] = field(default_factory=dict)  # lambda_hat, risks, ...
    prior_sha256: str = ""  # the weights it was fitted with ("" = not recorded)

    def __post_init__(self) -> None:
        e = np.asarray(self.snr_edges, dtype=np.float64)
        if e.ndim != 1 or e.size < 2 or not np.all(np.diff(e) > 0) or np.isnan(e).any():
            raise CalibrationError(f"snr_edges must increase, got {self.snr_edges}")
        k = e.size - 1
        if len(self.n_per_bin) != k:
            raise CalibrationError(f"n_per_bin has {len(self.n_per_bin)} entries for {k} bins")
        for p in self.levels:
            lam = self.lambdas.get(level_key(p))
            if lam is None or len(lam) != k:
                raise CalibrationError(f"lambdas[{level_key(p)!r}] must have {k} entries")
            if any(v is not None and not (math.isfinite(v) and v > 0) for v in lam):
                raise CalibrationError(f"lambdas[{level_key(p)!r}] must be > 0 or null: {lam}")

    def bin_of(self, snr: np.ndarray | float) -> np.ndarray:
        """Bin index per S/N value (-1 outside the edges or not finite)."""
        s = np.atleast_1d(np.asarray(snr, dtype=np.float64))
        idx = np.searchsorted(np.asarray(self.snr_edges), s, side="right") - 1
        ok = np.isfinite(s) & (idx >= 0) & (idx < len(self.snr_edges) - 1)
        return np.where(ok, idx, -1)

    def lambda_for(self, level: float, snr: np.ndarray | float) -> np.ndarray:
        """λ per object at ``level`` (NaN where the bin is -1 or has no λ)."""
        lam = np.array(
            [np.nan if v is None else v for v in self.lambdas[level_key(level)]], np.float64
        )
        b = self.bin_of(snr)
        return np.where(b >= 0, lam[np.clip(b, 0, None)], np.nan)

    def matches(self, sampler: Any) -> bool:
        """Whether λ applies to this sampler config (a SamplerConfig or its dict).

        Every distribution-changing field recorded in ``self.sampler`` must equal the run's;
        a field the record lacks (added to SamplerConfig later) must be at its default, which
        by the config convention keeps the old behaviour -- or, for the fields of
        ``_ADDED_LATER``, at the value that reproduces the old sampler, whatever today's
        default is. Without a record, the fingerprints must match.
        """
        from d4a_batch.config import SamplerConfig

        run = canonical_sampler(sampler)
        if not self.sampler:
            return sampler_fingerprint(run) == self.sampler_fingerprint
        rec = canonical_sampler(self.sampler)
        # the defaults of the run's sampler (its unused fields dropped the same way)
        defaults = canonical_sampler(to_dict(SamplerConfig()) | {"sampler": run.get("sampler")})
        for k in set(run) | set(rec):
            if k in _NOT_FINGERPRINTED:
                continue
            if k not in run or (k in rec and rec[k] != run[k]):
                return False
            # a record without a field added later was fitted at the field's old value
            implied = _ADDED_LATER[k] if k in _ADDED_LATER else defaults.get(k)
            if k not in rec and run[k] != implied:
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        edges = [None if math.isinf(v) else float(v) for v in self.snr_edges]
        return {
            "format": CALIBRATION_FORMAT,
            "interval": "mean_flux ± lambda · z_p · std_flux (flux space, per pixel)",
            "snr_definition": "sampling.calibrate.observed_snr: aperture S/N per pixel, "
            "mean over bands",
            "snr_edges": edges,  # null = +inf
            "levels": list(self.levels),
            "alpha": [round(1 - p, 10) for p in self.levels],
            "lambdas": {k: list(v) for k, v in self.lambdas.items()},
            "n_per_bin": list(self.n_per_bin),
            "delta": self.delta,
            "bound": self.bound,
            "sampler_fingerprint": self.sampler_fingerprint,
            "prior_sha256": self.prior_sha256,
            "sampler": dict(self.sampler),
            "mocks": dict(self.mocks),
            "details": dict(self.details),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Calibration:
        if doc.get("format") != CALIBRATION_FORMAT:
            raise CalibrationError(f"format {doc.get('format')!r}, expected {CALIBRATION_FORMAT!r}")
        try:
            edges = tuple(math.inf if v is None else float(v) for v in doc["snr_edges"])
            return cls(
                snr_edges=edges,
                levels=tuple(float(p) for p in doc["levels"]),
                lambdas={
                    str(k): tuple(None if v is None else float(v) for v in vals)
                    for k, vals in doc["lambdas"].items()
                },
                sampler_fingerprint=str(doc["sampler_fingerprint"]),
                delta=float(doc["delta"]),
                bound=str(doc["bound"]),
                n_per_bin=tuple(int(n) for n in doc["n_per_bin"]),
                sampler=dict(doc.get("sampler", {})),
                mocks=dict(doc.get("mocks", {})),
                details=dict(doc.get("details", {})),
                prior_sha256=str(doc.get("prior_sha256", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, CalibrationError):
                raise
            raise CalibrationError(f"calibration.json: {type(e).__name__}: {e}") from e


def write_calibration(folder: str | Path, cal: Calibration) -> Path:
    """Add ``cal`` to ``<folder>/calibration.json``, replacing an entry fitted for the same
    sampler config (the same canonical fields, or fingerprint without a record) and keeping
    the others; returns the file's path."""
    path = Path(folder) / PRIOR_CALIBRATION

    def same_config(c: Calibration) -> bool:
        if c.sampler and cal.sampler:
            return c.matches(cal.sampler) and cal.matches(c.sampler)
        return c.sampler_fingerprint == cal.sampler_fingerprint

    kept = [c for c in read_calibrations(folder) if not same_config(c)]
    doc = {"format": CALIBRATION_SET_FORMAT, "calibrations": [c.to_json() for c in [*kept, cal]]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def read_calibrations(folder: str | Path) -> tuple[Calibration, ...]:
    """The artifact's calibrations, one per sampler config (() without calibration.json)."""
    path = Path(folder) / PRIOR_CALIBRATION
    if not path.exists():
        return ()
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{path}: not JSON ({e})") from e
    try:
        if doc.get("format") == CALIBRATION_SET_FORMAT:
            entries = doc.get("calibrations")
            if not isinstance(entries, list):
                raise CalibrationError("'calibrations' must be a list")
            return tuple(Calibration.from_json(e) for e in entries)
        return (Calibration.from_json(doc),)
    except CalibrationError as e:
        raise CalibrationError(f"{path}: {e}") from e


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Sequence):
        return list(v)
    raise TypeError(f"not JSON-serialisable: {type(v).__name__}")
