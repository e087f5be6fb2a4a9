"""The calibration job's sets and reports (``jobs/calibrate_prior.py``'s logic).

``sampled_config``: the run config the cached samples of a work folder were drawn with
(samples of two sampler configs are never mixed); ``load_set``: a set's cached packs as
flux samples, truths and S/N; ``score_sets``: coverage before and after calibration
(``validation.calibration.calibration_report``) with the fitted λ and the plug-in λ
(``plug_in_lambdas``) per object; ``report_markdown``: the job's Markdown page.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from d4a_batch.config import RunConfig, from_dict, to_dict
from d4a_batch.pack_sampler import pack_observations
from d4a_batch.prior.calibration import (
    Calibration,
    level_key,
    sampler_fingerprint,
    saved_sampler_dict,
)
from d4a_batch.sampling.calibrate import degenerate_intervals, observed_snr
from d4a_batch.schema import Col, band_col
from d4a_batch.survey.packs import SCALE
from d4a_batch.validation.calibration import calibration_report
from d4a_batch.validation.report import markdown_table
from d4a_batch.validation.samples import flux_samples
from d4a_batch.validation.science import read_sampled_pack, truth_snr


def sampled_config(work: Path, requested: RunConfig) -> RunConfig:
    """The run config the cached samples under ``work`` were drawn with (recorded on the first
    sampling as ``requested``). Samples of another sampler config are never mixed in: a
    folder that holds them is an error (use another --work).

    A record written before ``SamplerConfig.sampler`` existed was sampled by DPS; one written
    before ``gauss_newton`` / ``clip_data_step`` existed, with one Gauss-Newton iteration and a
    clipped data step (``prior.calibration.saved_sampler_dict``), whatever today's defaults.
    """
    path = work / "run_config.json"
    if not path.exists():
        path.write_text(json.dumps(to_dict(requested), indent=2) + "\n")
        return requested
    doc = json.loads(path.read_text())
    doc["sampler"] = saved_sampler_dict(doc["sampler"])
    config = from_dict(RunConfig, doc)
    if sampler_fingerprint(config.sampler) != sampler_fingerprint(requested.sampler):
        raise SystemExit(
            f"{work} holds samples of sampler {to_dict(config.sampler)}, not the requested "
            f"{to_dict(requested.sampler)}: use another --work"
        )
    return config


def load_set(work: Path, name: str, prior_cfg, config: RunConfig) -> dict[str, np.ndarray]:
    """All cached packs of one set: flux samples [G,S,C,N,N], truth, observed and true S/N."""
    physics, sampler = config.physics, config.sampler
    out: dict[str, list] = {k: [] for k in ("flux", "truth", "snr", "snr_true", "mag_i", "z",
                                            "object_id", "chi2")}  # fmt: skip
    for path in sorted((work / "packs").glob(f"{name}_*.npz")):
        arrays, rows, maps, truths = read_sampled_pack(path)
        samples_x = maps[Col.SAMPLES_X]
        ids = [int(v) for v in arrays[Col.OBJECT_ID]]
        truth = np.stack([truths[i]["truth"] for i in ids])
        z_true = np.array([truths[i]["z_true"] for i in ids])
        mag = np.array([truths[i]["i_mag_true"] for i in ids])
        obs = pack_observations(arrays, dtype=torch.float64)
        flux, _ = flux_samples(samples_x, obs, arrays[SCALE], prior_cfg.stretch.a,
                               physics.profile_ridge)  # fmt: skip
        beta = np.stack([rows[band_col(Col.BETA, b)].to_numpy() for b in prior_cfg.bands], 1)
        snr = observed_snr(obs, beta, arrays[SCALE], sampler.aperture_radius_frac,
                           prior_cfg.image_size)  # fmt: skip
        for i in range(len(rows)):
            out["snr_true"].append(truth_snr(truth[i], arrays, i, float(z_true[i]), prior_cfg,
                                             sampler.aperture_radius_frac, physics))  # fmt: skip
        out["flux"].append(flux)
        out["truth"].append(truth)
        out["snr"].append(snr)
        out["mag_i"].append(mag)
        out["z"].append(z_true)
        out["object_id"].append(arrays[Col.OBJECT_ID])
        out["chi2"].append(rows[Col.CHI2].to_numpy())
    if not out["flux"]:
        raise SystemExit(f"no sampled packs of set {name!r} under {work / 'packs'}")
    return {k: np.concatenate(v) if k != "snr_true" else np.array(v) for k, v in out.items()}


def score_sets(
    cal: Calibration,
    details: dict,
    sets: dict,
    edges: tuple,
    core: np.ndarray,
    levels: tuple,
    core_radius: float,
) -> dict:
    """Per set (``load_set``'s dicts by name): ``calibration_report`` with the fitted λ, its
    ``_plugin`` columns from the plug-in λ, and each galaxy's id, magnitude, z, S/N, χ²."""
    reports = {}
    for name, data in sets.items():
        # the catalog gives no interval where it would be degenerate (sampling.calibrate)
        usable = ~degenerate_intervals(data["flux"].std(1), core)
        lam = {level_key(p): np.where(usable, cal.lambda_for(p, data["snr"]), np.nan)
               for p in levels}  # fmt: skip
        hat = {
            level_key(p): np.where(usable, plug_in_lambdas(cal, details, level_key(p),
                                                           data["snr"]), np.nan)
            for p in levels
        }  # fmt: skip
        rep = calibration_report(data["flux"], data["truth"], data["snr"], edges, core, levels,
                                 lam, core_radius=core_radius)  # fmt: skip
        rep_hat = calibration_report(data["flux"], data["truth"], data["snr"], edges, core,
                                     levels, hat, core_radius=core_radius)  # fmt: skip
        for grp, grp_hat in zip([*rep["bins"], rep["pooled"]],
                                [*rep_hat["bins"], rep_hat["pooled"]], strict=True):  # fmt: skip
            for k, v in grp_hat.items():
                if "_calibrated" in k:
                    grp[k.replace("_calibrated", "_plugin")] = v
        rep["n_degenerate"] = int((~usable).sum())
        for i, g in enumerate(rep["per_galaxy"]):
            g |= {"object_id": int(data["object_id"][i]), "mag_i": float(data["mag_i"][i]),
                  "degenerate": bool(not usable[i]),
                  "z": float(data["z"][i]), "snr_true": float(data["snr_true"][i]),
                  "chi2": float(data["chi2"][i])}  # fmt: skip
        reports[name] = rep
    return reports


def plug_in_lambdas(cal: Calibration, details: dict, key: str, snr: np.ndarray) -> np.ndarray:
    """The plug-in λ (empirical risk ≤ α, no guarantee) per object, by the same bin rule."""
    per_bin = []
    for info in details[key]["bins"]:
        fit = info if info["source"] == "bin" else details[key]["pooled"]
        per_bin.append(np.nan if fit.get("lambda_hat") is None else fit["lambda_hat"])
    b = cal.bin_of(snr)
    return np.where(b >= 0, np.asarray(per_bin)[np.clip(b, 0, None)], np.nan)


def report_markdown(doc: dict) -> str:
    """Coverage before/after per S/N bin (score mocks), and the fitted λ."""
    cal = doc["calibration"]
    lines = [
        f"Sampler {doc['sampler_fingerprint']}: {json.dumps(doc['sampler'])}",
        f"λ ({cal['bound']}, δ = {cal['delta']}) per S/N bin {cal['snr_edges']}: "
        f"{json.dumps(cal['lambdas'])}; n per bin {cal['n_per_bin']}",
        "",
    ]
    ref = next(iter(doc["reports"].values()))
    if ref.get("gauss_coverage_if_exact"):
        exact = ", ".join(f"{k} %: {v:.3f}" for k, v in ref["gauss_coverage_if_exact"].items()
                          if v is not None)  # fmt: skip
        lines += [f"An exact posterior seen through {ref['samples']} samples gives cov*_gauss = "
                  f"{exact} (Student-t; `exact_gauss_coverage`).", ""]  # fmt: skip
    cols = ["snr_bin", "n", "cov68_core_quantile", "cov68_core_gauss", "cov68_core_calibrated",
            "cov68_core_plugin", "cov95_core_quantile", "cov95_core_gauss",
            "cov95_core_calibrated", "cov95_core_plugin", "cov68_stamp_gauss",
            "cov95_stamp_gauss"]  # fmt: skip
    for name, rep in doc["reports"].items():
        lines += [f"{name} mocks (core pixels, flux space; mean over objects):", ""]
        rows = []
        for g in [*rep["bins"], rep["pooled"]]:
            if g["n"]:
                rows.append({c: g.get(c) for c in cols}
                            | {"tarp_dev": g["tarp_core"]["max_deviation"]})  # fmt: skip
        lines += [markdown_table(rows, [*cols, "tarp_dev"]), ""]
    return "\n".join(lines)
