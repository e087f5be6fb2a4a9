"""Measure where neighbour masking stops working: the BLENDED and TRUNCATED thresholds.

    python jobs/blend_thresholds.py [--objects 200] [--out docs/results/blend_thresholds.json]

Per mock target (``mock.survey`` galaxies, i = 20-23.5, z = 0.25-1, PSF FWHM 0.62-0.8'',
HSC COSMOS noise) one neighbour at 4-30 HSC pixels, 1 mag brighter to 1.5 mag fainter:
staging's detection (``quality.detection.find_sources``, default ``StagingConfig``) masks
it; then, knowing the truth, we measure

- ``true_fraction``: the neighbour's true light on the used footprint pixels / the target's;
- ``chi2_truth``: reduced chi2 of the *true* target model on the used pixels of the
  sampler's stamp (the pixels the likelihood and chi2 use): what the best possible fit of
  the target alone achieves once the neighbour is masked;
- ``true_contamination``: the neighbour's true light in noise units on those pixels,
  sum(nb^2 / V) / n_used (chi2_truth ~ 1 + true_contamination);

next to the estimates ``contamination`` (what BLENDED tests), ``blend_fraction`` and
``asymmetry`` (and ``truncated_fraction`` of these targets, which all fit the model field).
``--limit`` (default 1.2): the chi2/dof of the true model that a neighbour may push a target
to unflagged; the summary gives the largest contamination threshold that flags every
deblended target above it, and what the chosen threshold leaves unflagged. A table is
printed and written as JSON; the thresholds in ``FlagThresholds`` come from it
(docs/HISTORY.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from d4a_batch.config import FlagThresholds, StagingConfig
from d4a_batch.mock.observe import add_hsc_noise
from d4a_batch.mock.survey import (
    MockSurveyConfig,
    _galaxy,
    _render,
    _z_scale,
    draw_psf,
)
from d4a_batch.quality.detection import DetectionParams, find_sources
from d4a_batch.quality.detection_image import footprint_box


def measure(k: int, cfg: MockSurveyConfig, params: DetectionParams) -> dict:
    rng = np.random.default_rng([7, k])
    fwhm = rng.uniform(0.62, 0.8)
    psf = np.stack([draw_psf(fwhm * f, 0.01, 0.0) for f in (1.1, 1.05, 1.0)])
    z, mag = float(rng.uniform(0.25, 1.0)), float(rng.uniform(20, 23.5))
    scale = _z_scale(z, cfg)
    n_out = cfg.n_model * scale
    size = (64 if n_out + 16 <= 64 else 96) + 32
    off = (float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.5, 0.5)))
    target = _render(_galaxy(rng, cfg, mag), psf, scale, off, size)
    sep_px, phi = float(rng.uniform(4, 30)), rng.uniform(0, 2 * math.pi)
    noff = (off[0] + sep_px * math.sin(phi), off[1] + sep_px * math.cos(phi))
    dm = float(rng.uniform(-1.0, 1.5))
    zn = float(rng.uniform(0.25, 1.0))
    nb = _render(_galaxy(rng, cfg, mag + dm), psf, _z_scale(zn, cfg), noff, size)
    img, var = add_hsc_noise(target + nb, cfg.bands, rng)
    pad = 16
    s = find_sources(img, var, np.ones(img.shape, bool), psf, off, n_out, params, pad)
    used = np.broadcast_to(footprint_box((size, size), off, n_out) & ~s.neighbour_mask, img.shape)
    w = np.array([1 / np.median(v) for v in var])[:, None, None]
    inner = np.zeros((size, size), bool)
    inner[pad:-pad, pad:-pad] = True
    keep = np.broadcast_to(inner & ~s.neighbour_mask, img.shape)
    return {
        "object": k, "i_mag": mag, "dm_neighbour": dm, "separation_px": sep_px,
        "n_neighbours_masked": s.n_neighbours, "contamination": s.contamination,
        "blend_fraction": s.blend_fraction,
        "asymmetry": s.asymmetry, "truncated_fraction": s.truncated_fraction,
        "true_fraction": float((w * nb)[used].sum() / (w * target)[used].sum()),
        "true_contamination": float((nb**2 / var)[keep].mean()),
        "chi2_truth": float(((img - target) ** 2 / var)[keep].mean()),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--objects", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("docs/results/blend_thresholds.json"))
    p.add_argument("--deblend-cont", type=float, help="override StagingConfig.deblend_cont")
    p.add_argument("--limit", type=float, default=1.2, help="chi2/dof of the true model")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    st = StagingConfig()
    if args.deblend_cont is not None:
        st = dataclasses.replace(st, deblend_cont=args.deblend_cont)
    params = DetectionParams.from_staging(st)
    rows = [measure(k, MockSurveyConfig(), params) for k in range(args.objects)]
    keys = list(rows[0])
    print(" ".join(f"{k[:12]:>12}" for k in keys))
    for r in rows:
        print(" ".join(f"{r[k]:12.3f}" if isinstance(r[k], float) else f"{r[k]:12d}" for k in keys))
    t = FlagThresholds()
    deblended = [r for r in rows if r["n_neighbours_masked"] > 0]
    merged = [r for r in rows if r["n_neighbours_masked"] == 0]
    over = [r["contamination"] for r in deblended if r["chi2_truth"] > args.limit]
    quiet = [r for r in deblended if not r["contamination"] > t.contamination_max]
    flagged = [r for r in deblended if r["contamination"] > t.contamination_max]
    est, tru = (
        np.array([r[k] for r in deblended]) for k in ("contamination", "true_contamination")
    )
    summary = {
        "deblend_cont": st.deblend_cont,
        "chi2_truth limit": args.limit,
        f"smallest contamination with chi2_truth > {args.limit} (deblended)": min(
            over, default=None
        ),
        "largest chi2_truth unflagged at contamination_max (deblended)": max(
            (r["chi2_truth"] for r in quiet), default=None
        ),
        "smallest chi2_truth flagged at contamination_max (deblended)": min(
            (r["chi2_truth"] for r in flagged), default=None
        ),
        "flagged at contamination_max (deblended)": f"{len(flagged)} of {len(deblended)}",
        "old flux-share rule (blend_fraction > 0.015): flagged, largest chi2_truth unflagged": [
            sum(r["blend_fraction"] > 0.015 for r in deblended),
            max(
                (r["chi2_truth"] for r in deblended if not r["blend_fraction"] > 0.015),
                default=None,
            ),
        ],
        "median |contamination - true_contamination| (deblended)": float(
            np.median(np.abs(est - tru))
        ),
        "targets split (target segment not at the position or > 1 neighbour)": sum(
            r["n_neighbours_masked"] > 1 for r in rows
        ),
        "largest asymmetry, deblended": max((r["asymmetry"] for r in deblended), default=None),
        "largest asymmetry, deblended under contamination_max": max(
            (r["asymmetry"] for r in quiet), default=None
        ),
        "smallest asymmetry, merged": min((r["asymmetry"] for r in merged), default=None),
        "largest truncated_fraction": max(r["truncated_fraction"] for r in rows),
        "thresholds": {
            "contamination_max": t.contamination_max,
            "asymmetry_max": t.asymmetry_max,
            "truncated_fraction_max": t.truncated_fraction_max,
        },
    }
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
