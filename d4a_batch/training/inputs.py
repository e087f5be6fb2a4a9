"""What the training job reads and writes around the training itself (``jobs/train_prior.py``).

``data_folder_name``: the Parquet folder of a training set; ``load_image_file`` and
``training_images``: the training images of a file (``make_training_set.py``'s) or drawn
here; ``write_prior_samples``: a grid of an exported prior's samples for the record.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import numpy as np
import torch

from d4a_batch.config import PriorConfig


def data_folder_name(prior: PriorConfig, n_images: int, seed: int) -> str:
    """Parquet folder name of a training set: the demo's name for smooth 0.5 kpc mocks, else
    one that names the mock structure and the kpc/pixel (so runs never share wrong data)."""
    if prior.mock_structure == "smooth" and prior.kpc_per_pixel == 0.5:
        return f"data-{prior.image_size}-{n_images}-{seed}"
    kpc = f"{prior.kpc_per_pixel:g}".replace(".", "p")
    return f"data-{prior.mock_structure}-{prior.image_size}-{kpc}kpc-{n_images}-{seed}"


def load_image_file(path: Path):
    """Training images ``[K, C, N, N]`` (uint8 or float32) of a .npy or .npy.xz file."""
    opener = lzma.open if path.name.endswith(".xz") else open
    with opener(path, "rb") as f:
        return torch.from_numpy(np.load(f))


def training_images(
    data: str | Path | None, n_images: int, data_seed: int, prior: PriorConfig
) -> tuple[torch.Tensor, dict]:
    """(images [K,C,N,N], their source record): the file ``data`` (with its recipe, the
    ``.json`` beside it, when present) or ``n_images`` mocks of ``prior`` drawn from
    ``data_seed`` and quantised to 8 bits."""
    if data:
        images = load_image_file(Path(data))
        source = {"file": str(data)}
        recipe = Path(str(data) + ".json")
        if recipe.exists():
            source["recipe"] = json.loads(recipe.read_text())
        return images, source
    from d4a_batch.training.data import mock_images, quantise_u8

    images = torch.from_numpy(quantise_u8(mock_images(range(n_images), data_seed, prior)))
    return images, {"generated": n_images, "data_seed": data_seed}


def write_prior_samples(
    prior_dir: str | Path, path: Path, n: int, steps: int, seed: int, device: torch.device
) -> int:
    """``n`` ancestral samples (``steps`` steps, ``seed``) of the prior artifact at
    ``prior_dir`` into ``path`` (npz, ``x`` in float16); returns how many."""
    from d4a_batch.prior.artifact import load_prior
    from d4a_batch.training.evaluate import draw_samples

    prior = load_prior(prior_dir)
    x = draw_samples(prior.model, prior.config, n, steps, seed, batch=256, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x=x.astype(np.float16))
    return len(x)
