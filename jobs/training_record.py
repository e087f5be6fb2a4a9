"""Score one checkpoint of the hsc-64 CPU training and add it to the training record.

    python jobs/training_record.py --checkpoint training/hsc-64/state \
        --out docs/results/hsc64_training [--real-hst]

Exports the checkpoint's EMA as a prior artifact (its phase's: 32 px at 1.5 kpc/px while
pre-training at half size), scores it with ``jobs/evaluate_prior.py`` (``--n-samples``
ancestral samples of ``--steps`` steps against 512 held-out realistic mocks; a sample
grid), optionally runs ``jobs/real_hst_check.py`` at z = 0.3, 0.5, 0.8, and adds the entry to
``OUT/record.json`` (``d4a_batch.training.record``) and the curve ``OUT/curve.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from d4a_batch.testing import load_job
from d4a_batch.training.loop import export_prior, load_checkpoint_dir
from d4a_batch.training.record import add_entry, curve_figure

OBJECTIVE_FIELDS = ("loss_weighting", "min_snr_gamma", "timestep_sampling", "lr_schedule", "lr",
                    "batch_size", "ema_decay")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-samples", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--stats-samples", type=int, default=256)
    p.add_argument("--n-heldout", type=int, default=512)
    p.add_argument("--real-hst", action="store_true", help="also run real_hst_check.py")
    p.add_argument("--session", default="", help="label of the session that trained it")
    args = p.parse_args(argv)
    state, cfg = load_checkpoint_dir(args.checkpoint)
    step = int(state["step"])
    tag = f"step{step:07d}_ds{cfg.downsample}"
    with tempfile.TemporaryDirectory() as tmp:
        prior_dir = export_prior(args.checkpoint, Path(tmp) / "prior", args.stats_samples, 50)
        eval_json = args.out / f"eval_{tag}.json"
        load_job("evaluate_prior").main([
            "--prior", f"{tag}={prior_dir}", "--n-samples", str(args.n_samples),
            "--steps", str(args.steps), "--n-heldout", str(args.n_heldout), "--real-z", "0.3", "0.6",
            "--out-json", str(eval_json), "--samples-png", str(args.out / f"samples_{tag}.png"),
        ])  # fmt: skip
        ev = json.loads(eval_json.read_text())
        real = []
        if args.real_hst:
            hst_out = args.out / f"real_hst_{tag}"
            load_job("real_hst_check").main(["--prior", str(prior_dir), "--z", "0.3", "0.5",
                                             "0.8", "--threads", "1", "--out", str(hst_out)])  # fmt: skip
            doc = json.loads((hst_out / "real_hst.json").read_text())
            keys = ("z", "chi2", "pearson_mean_footprint", "pearson_obs_footprint", "flags")
            real = [{k: r[k] for k in keys} for r in doc["results"]]
    entry = {
        "session": args.session,
        "step": step,
        "downsample": cfg.downsample,
        "images_seen": step * cfg.batch_size,
        "train_hours": float(state["train_seconds"]) / 3600,
        "cpu_hours": float(state.get("cpu_seconds", state["train_seconds"])) / 3600,
        "objective": {k: getattr(cfg, k) for k in OBJECTIVE_FIELDS},
        "frechet_distance": ev["priors"][0]["frechet_distance"],
        "frechet_floor": ev["heldout"]["floor_frechet_distance"],
        "n_samples": args.n_samples,
        "sampling_steps": args.steps,
        "real_hst": real,
    }
    entries = add_entry(args.out, entry)
    curve_figure(entries, args.out / "curve.png")
    print(json.dumps(entry, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
