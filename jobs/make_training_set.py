"""Write a prior's training mocks to one compact file, for training where GalSim is absent.

    python jobs/make_training_set.py --prior-config jobs/configs/hsc-64.json \
        --n-images 20000 --processes 2 --out runs/hsc-64-train/mocks.npy.xz

Each image is ``d4a_batch.training.data.mock_images([id], seed, cfg)``: the same
deterministic galaxy per (seed, id) as the Ray Data path of ``train_prior.py``, in
x-space [-1, 1]. Stored as 8 bits per value (x = q / 127.5 - 1, the quantisation of
8-bit image datasets that DDPMs are trained on; the largest error is 1/255 in x,
2e-4 of a band's peak flux at the faint end of the stretch) in an xz-compressed
``.npy`` of shape [K, C, N, N] uint8, beside a JSON of the recipe (prior config,
seed, ids, quantisation). ``jobs/train_prior.py --single-process --data FILE`` reads it.

It is how the hsc-64 prior's mocks reach a lent GPU machine, which has no GalSim and no
Ray (no package registry there; ``jobs/configs/hsc-64-gpu.sh``): the 20,000 mocks
(~1.7 KB each) travel as one 33.9 MB file.
"""

from __future__ import annotations

import argparse
import json
import lzma
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from d4a_batch.config import PriorConfig, config_hash, from_dict, to_dict
from d4a_batch.training.data import mock_images_u8


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prior-config", type=Path, required=True)
    p.add_argument("--n-images", type=int, required=True)
    p.add_argument("--seed", type=int, default=0, help="data seed (held-out mocks use 20000)")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--chunk", type=int, default=250)
    p.add_argument("--out", type=Path, required=True, help="file ending in .npy.xz")
    args = p.parse_args(argv)
    prior = from_dict(PriorConfig, json.loads(args.prior_config.read_text()))
    ids = list(range(args.n_images))
    chunks = [ids[i : i + args.chunk] for i in range(0, len(ids), args.chunk)]
    t0 = time.perf_counter()
    parts: list[np.ndarray] = []
    pool = ProcessPoolExecutor(args.processes) if args.processes > 1 else None
    try:
        mapper = pool.map if pool is not None else map
        for part in mapper(
            mock_images_u8, chunks, [args.seed] * len(chunks), [prior] * len(chunks)
        ):
            parts.append(part)
            done = sum(len(q) for q in parts)
            print(f"[mocks] {done}/{len(ids)} in {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        if pool is not None:
            pool.shutdown()
    q = np.concatenate(parts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(args.out, "wb", preset=9) as f:
        np.save(f, q)
    recipe = {
        "prior": to_dict(prior),
        "prior_config_hash": config_hash(prior),
        "seed": args.seed,
        "ids": [0, args.n_images],
        "shape": list(q.shape),
        "dtype": "uint8",
        "x_from_q": "x = q / 127.5 - 1",
        "seconds": time.perf_counter() - t0,
        "processes": args.processes,
    }
    Path(str(args.out) + ".json").write_text(json.dumps(recipe, indent=2) + "\n")
    print(
        f"[mocks] wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) in {recipe['seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
