"""Sampler settings on mock galaxies whose truth is known (``jobs/tune_sampler.py``'s logic).

Mocks (``make_mocks``): GalSim galaxies (``mock.galaxies``) per i-band magnitude, drawn at
the prior's kpc/pixel and N, at one redshift, scaled to the magnitude, observed with HSC
noise (``mock.observe.observe_truth``: area-overlap resampling, a Moffat PSF at the mock
survey's median seeing per band, sky variance + source/gain), then source-free stamps.
Per object (``object_metrics``) and per magnitude (``per_mag_medians``): psnr_x, psnr_flux,
chi2, cov68, flux68, halluc (the job's docstring defines them); ``choose`` picks a setting;
``write_outputs`` writes the JSON record and the Markdown page.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from d4a_batch.config import FlagThresholds, PhysicsConfig, to_dict
from d4a_batch.mock.galaxies import draw_galaxy, sample_params
from d4a_batch.mock.observe import observe_truth
from d4a_batch.mock.survey import MEDIAN_SEEING, draw_psf
from d4a_batch.physics.operator import ObservationBatch, model_pixel_scale
from d4a_batch.prior.artifact import Prior, load_prior
from d4a_batch.training.data import to_model_space

CHOICE_RULE = (
    "best worst-magnitude median psnr_x; median halluc <= 1 and (if any setting manages"
    " it) median chi2 <= chi2_max at every magnitude"
)
MOCK_PSF = "Moffat beta 3.5 at mock.survey.MEDIAN_SEEING"
MOCK_NOISE = "mock.survey SKY_VARIANCE + INV_GAIN * model"


def get_prior(path: Path, device: str, stats_steps: int) -> Prior:
    """An artifact folder, or a training checkpoint folder (EMA weights, stats computed here)."""
    if (path / "state.pt").exists():
        from d4a_batch.prior.unet import build_unet
        from d4a_batch.training.loop import load_checkpoint_dir

        state, cfg = load_checkpoint_dir(path)
        model = build_unet(cfg.prior)
        model.load_state_dict(state["ema"])
        prior = Prior(model.to(device), cfg.prior, f"{cfg.prior.name}@{path.name}", "checkpoint")
        prior.compute_stats(
            n=256, steps=stats_steps, generator=torch.Generator(device).manual_seed(0)
        )
        return prior
    return load_prior(path, device=device)


def make_mocks(prior: Prior, mags: list[float], per_mag: int, z: float, seed: int, blank: int = 0):
    """Truth flux images [M,C,N,N], observations (M rows) and magnitudes [M].

    ``blank`` source-free stamps (sky noise only, magnitude inf) follow the galaxies.
    """
    cfg, phys = prior.config, PhysicsConfig()
    n, bands = cfg.image_size, cfg.bands
    scale = float(model_pixel_scale(z, cfg, phys))
    stamp = 2 * math.ceil((n * scale + 12) / 2)
    rng = np.random.default_rng(seed)
    psf = np.stack([draw_psf(MEDIAN_SEEING[b], 0.0, 0.0) for b in bands])
    truths, images, variances, offsets, mag_of = [], [], [], [], []
    i_band = bands.index("i")
    cases = [(mag, p) for mag in mags for p in sample_params(rng, per_mag)]
    for mag, params in cases + [(math.inf, None)] * blank:
        img = np.zeros((len(bands), n, n))
        if params is not None:
            img = draw_galaxy(params, cfg.kpc_per_pixel, n, bands).astype(np.float64)
            img *= 10 ** (-0.4 * (mag - phys.zeropoint_ab)) / img[i_band].sum()
        offset = rng.uniform(-0.5, 0.5, 2)
        seen = observe_truth(img[None], psf, scale, offset[None], stamp, bands, rng, cfg.stretch.a)
        images.append(seen.image[0])
        variances.append(seen.variance[0])
        truths.append(img)
        offsets.append(offset)
        mag_of.append(mag)
    m = len(truths)
    obs = ObservationBatch.from_arrays(
        np.stack(images),
        np.stack(variances),
        np.ones((m, len(bands), stamp, stamp), bool),
        np.broadcast_to(psf, (m, *psf.shape)).copy(),
        np.stack(offsets),
    )
    return np.stack(truths), obs, np.array(mag_of)


def object_metrics(s, truths: np.ndarray, a: float, core: np.ndarray) -> list[dict]:
    """Metrics of each object; a blank stamp has only chi2 and halluc (the rest NaN)."""
    out = []
    for o in range(len(s)):
        t = truths[o]
        if not t.any():
            nan = {k: math.nan for k in METRICS}
            out.append({**nan, "chi2": float(s.chi2[o]), "halluc": float(s.hallucination[o])})
            continue
        xt = to_model_space(t, a)
        peak = t.reshape(t.shape[0], -1).max(1)[:, None, None]
        lo, hi = np.percentile(s.samples_x[o], [16, 84], axis=0)
        inside = (xt >= lo) & (xt <= hi)
        true_flux = t.sum((1, 2))
        out.append(
            {
                "object_id": int(s.object_id[o]),
                "psnr_x": float(10 * np.log10(4.0 / np.mean((s.mean_x[o] - xt) ** 2))),
                "psnr_flux": float(-10 * np.log10(np.mean(((s.mean_flux[o] - t) / peak) ** 2))),
                "chi2": float(s.chi2[o]),
                "cov68": float(inside[:, core].mean()),
                "flux68": float(np.mean(np.abs(s.flux[o] - true_flux) <= s.flux_err[o])),
                "halluc": float(s.hallucination[o]),
                "flux_rel_err": [float(v) for v in (s.flux[o] / true_flux - 1)],
            }
        )
    return out


METRICS = ("psnr_x", "psnr_flux", "chi2", "cov68", "flux68", "halluc")


def per_mag_medians(objs: list[dict], mags: np.ndarray) -> dict[str, dict[str, float]]:
    table = {}
    for mag in sorted(set(mags.tolist())):
        rows = [o for o, m in zip(objs, mags) if m == mag]
        key = f"{mag:g}" if math.isfinite(mag) else "blank"
        table[key] = {k: float(np.median([r[k] for r in rows])) for k in METRICS}
    return table


def choose(results: list[dict], chi2_max: float) -> dict:
    """Best worst-magnitude median psnr_x among the admissible settings.

    Admissible: median hallucination score <= 1 at every magnitude (a posterior wider
    than the prior makes the variance ratio meaningless) and, where any setting manages
    it, median chi2 <= chi2_max at every magnitude.
    """

    def galaxies(r: dict) -> list[dict]:
        return [v for k, v in r["per_mag"].items() if k != "blank"]

    def within(r: dict, key: str, limit: float) -> bool:
        return all(v[key] <= limit for v in galaxies(r))

    narrow = [r for r in results if within(r, "halluc", 1.0)] or results
    pool = [r for r in narrow if within(r, "chi2", chi2_max)] or narrow
    return max(pool, key=lambda r: min(v["psnr_x"] for v in galaxies(r)))


def json_safe(obj):
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def format_table(results: list[dict]) -> str:
    """Markdown table of the per-magnitude medians (missing values as "-")."""

    def f(v, spec: str) -> str:
        return "-" if v is None or not math.isfinite(v) else format(v, spec)

    head = "| rule | zeta | steps | i mag | PSNR x (dB) | PSNR flux (dB) | chi2/dof | cov68 | flux68 | halluc |"
    lines = [head, "|" + "---|" * 10]
    for r in results:
        for mag, v in r["per_mag"].items():
            lines.append(
                f"| {r['rule']} | {r['zeta']:g} | {r['steps']} | {mag} | {f(v['psnr_x'], '.1f')} |"
                f" {f(v['psnr_flux'], '.1f')} | {f(v['chi2'], '.2f')} | {f(v['cov68'], '.2f')} |"
                f" {f(v['flux68'], '.2f')} | {f(v['halluc'], '.2f')} |"
            )
    return "\n".join(lines)


def previous_results(path: Path, prior_doc: dict, mocks: dict) -> list[dict]:
    """Results already in ``path`` for the same prior and mocks (``--resume``)."""
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    same = doc.get("prior", {}).get("sha256") == prior_doc["sha256"] and doc.get("mocks") == mocks
    return doc["results"] if same else []


def parse_grid(entries: list[str]) -> list[tuple[str, float]]:
    """``rule:zeta,zeta,...`` entries -> (rule, zeta) settings, in order."""
    return [
        (rule, float(z))
        for entry in entries
        for rule, zs in [entry.split(":")]
        for z in zs.split(",")
    ]


def write_outputs(args, prior_doc: dict, mocks: dict, base, results: list[dict], t0: float):
    """Write the JSON and the Markdown page for the results so far; return the choice.

    ``args``: the job's options (out_json, out_md, steps, objects, mags, z, blank, samples,
    device)."""
    grid_steps = [r for r in results if r["steps"] == args.steps] or results
    best = choose(grid_steps, FlagThresholds().chi2_max)
    chosen = {k: best[k] for k in ("rule", "zeta", "steps")}
    doc = {
        "prior": prior_doc,
        "mocks": mocks,
        "sampler": to_dict(base),
        "device": args.device,
        "choice_rule": CHOICE_RULE,
        "chosen": chosen,
        "results": results,
        "seconds": time.perf_counter() - t0,
    }
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(json_safe(doc), indent=1, allow_nan=False) + "\n")
    md = [
        "# DPS tuning on mock galaxies",
        "",
        f"Written by `jobs/tune_sampler.py` (data: `{args.out_json.name}`). Prior"
        f" `{prior_doc['id']}`; {args.objects} GalSim mocks per i magnitude in {args.mags} at"
        f" z = {args.z}, plus {args.blank} source-free stamps (row `blank`: where objects without"
        f" information land); {args.samples} samples each; device {args.device}. Medians per"
        " magnitude; cov68 = fraction of core pixels whose truth lies inside the per-pixel 68 %"
        " interval (0.68 if calibrated), flux68 the same for the total flux per band.",
        "",
        format_table(results),
        "",
        f"Chosen: rule `{chosen['rule']}`, zeta = {chosen['zeta']:g} ({CHOICE_RULE}).",
        "",
    ]
    args.out_md.write_text("\n".join(md))
    return chosen
