"""Rebuild a prior artifact from what ``jobs/configs/hsc-64-gpu.sh`` returns from a GPU call.

    python jobs/unpack_gpu_prior.py /work/.device/<call>/ --out priors/hsc-64 \
        --checkpoints runs/hsc-64-train

The call returns ``prior.tar`` (the exported artifact without ``weights.safetensors``: the
weights are the checkpoint's EMA, so they travel once) and the last checkpoint as
``ckpt.tar.part-*``. This joins the parts, unpacks the checkpoint under ``--checkpoints``
(``train_prior.py --single-process --storage <that parent>`` resumes from it), writes the
EMA weights with the artifact's config, statistics and metadata (``prior.artifact.save_prior``),
copies the training record, and checks that the weights' SHA-256 is the one the GPU's export
recorded (a mismatch is reported, not fatal: another safetensors version may order bytes
differently; the tensors are compared instead).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from d4a_batch.config import PriorConfig, from_dict
from d4a_batch.prior.artifact import load_prior, load_stats, save_prior
from d4a_batch.schema import PRIOR_CONFIG, PRIOR_STATS
from d4a_batch.training.loop import load_checkpoint_dir


def unpack(src: Path, out: Path, checkpoints: Path) -> dict:
    parts = sorted(src.glob("ckpt.tar.part-*"))
    if not parts:
        raise FileNotFoundError(f"{src}: no ckpt.tar.part-* files")
    checkpoints.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as t:
        names = {m.name.split("/")[0] for m in t.getmembers()}
        t.extractall(checkpoints, filter="data")
    [ckpt_name] = sorted(names)
    ckpt = checkpoints / ckpt_name
    state, cfg = load_checkpoint_dir(ckpt)
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(src / "prior.tar") as t:
        t.extractall(tmp, filter="data")
        exported = Path(tmp) / "prior"
        doc = json.loads((exported / PRIOR_CONFIG).read_text())
        meta = dict(doc.pop("metadata", {}))
        recorded = meta.pop("weights_sha256", None)
        meta.pop("format", None)
        prior_cfg = from_dict(PriorConfig, doc)
        if prior_cfg != cfg.prior:
            raise ValueError(f"{src}: the artifact's config is not the checkpoint's")
        stats = load_stats(exported / PRIOR_STATS, prior_cfg)
        if out.exists():
            shutil.rmtree(out)
        save_prior(out, state["ema"], prior_cfg, stats, meta)
        for extra in exported.iterdir():
            if extra.name not in (PRIOR_CONFIG, PRIOR_STATS) and extra.is_file():
                shutil.copy(extra, out / extra.name)
    prior = load_prior(out)
    written = prior.sha256
    return {
        "checkpoint": str(ckpt),
        "steps": int(state["step"]),
        "out": str(out),
        "weights_sha256": written,
        "recorded_sha256": recorded,
        "sha256_matches": recorded == written,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("src", type=Path, help="folder with prior.tar and ckpt.tar.part-*")
    p.add_argument("--out", type=Path, required=True, help="prior artifact folder to write")
    p.add_argument("--checkpoints", type=Path, required=True, help="where the checkpoint goes")
    args = p.parse_args(argv)
    report = unpack(args.src, args.out, args.checkpoints)
    print(json.dumps(report, indent=2))
    if not report["sha256_matches"]:
        print("[unpack] the weights' SHA-256 differs from the GPU export's record (tensors are"
              " the checkpoint's EMA; see the docstring)", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
