"""The training record of a prior trained across sessions (issue 29): one entry per scored
checkpoint, as a curve against cumulative CPU-hours.

An entry: the checkpoint's step, images seen, resolution phase, cumulative training wall
time and CPU time, the Fréchet distance of its EMA's samples to held-out realistic mocks
(``jobs/evaluate_prior.py``, with the metric's own noise floor) and, when run, the real
galaxy check (``jobs/real_hst_check.py``: χ²/dof and Pearson correlations of the posterior
mean and of the observation against HST, per assumed z). ``jobs/training_record.py``
makes the entries; this module merges them into ``record.json`` and draws the curve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RECORD_FILE = "record.json"


def read_record(folder: str | Path) -> list[dict[str, Any]]:
    path = Path(folder) / RECORD_FILE
    return json.loads(path.read_text())["entries"] if path.exists() else []


def add_entry(folder: str | Path, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Insert ``entry`` (replacing one of the same step and phase), sorted by CPU time;
    rewrite ``record.json``; return the entries."""
    entries = [
        e
        for e in read_record(folder)
        if (e["step"], e["downsample"]) != (entry["step"], entry["downsample"])
    ]
    entries.append(entry)
    entries.sort(key=lambda e: e["cpu_hours"])
    path = Path(folder) / RECORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "what": "hsc-64 prior trained on CPUs across sessions (issue 29); one entry per scored"
        " checkpoint; frechet_distance against held-out realistic mocks at the phase's own"
        " resolution (32 px phase: 1.5 kpc/px; 64 px: 0.75 kpc/px)",
        "entries": entries,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return entries


def curve_figure(entries: list[dict[str, Any]], path: str | Path) -> Path:
    """FD (and the real-galaxy χ²/dof where measured) against cumulative CPU-hours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ds, marker in ((2, "o"), (1, "s")):
        sel = [e for e in entries if e["downsample"] == ds]
        if not sel:
            continue
        label = "32 px phase" if ds == 2 else "64 px"
        h = [e["cpu_hours"] for e in sel]
        axes[0].plot(h, [e["frechet_distance"] for e in sel], marker=marker, label=label)
        axes[0].plot(h, [e["frechet_floor"] for e in sel], ls=":", color="grey")
        for z in sorted({r["z"] for e in sel for r in e.get("real_hst", [])}):
            pts = [(e["cpu_hours"], r["chi2"]) for e in sel for r in e.get("real_hst", [])
                   if r["z"] == z]  # fmt: skip
            if pts:
                axes[1].plot(*zip(*pts, strict=True), marker=marker, label=f"{label}, z={z:g}")
    axes[0].axhline(3.0, color="k", lw=0.8, ls="--", label="target FD 3.0")
    axes[0].set(xlabel="cumulative CPU-hours", ylabel="Fréchet distance (held-out mocks)",
                yscale="log", title="hsc-64 training")  # fmt: skip
    axes[1].axhline(1.5, color="k", lw=0.8, ls="--", label="target 1.5")
    axes[1].set(xlabel="cumulative CPU-hours", ylabel="χ²/dof, real HST galaxy",
                title="real-galaxy check")  # fmt: skip
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
