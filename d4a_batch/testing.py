"""Tiny real things for tests and benchmarks: random-weight priors and small mock surveys.

Real parts, small sizes: a real UNet with small random weights (saved as a real prior
artifact when asked) and a real mock HATS survey at that prior's scale. Every test and
benchmark that needs such a prior or survey builds it here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

from d4a_batch.config import PriorConfig
from d4a_batch.mock.survey import MockSurveyConfig, build_mock_survey
from d4a_batch.prior.artifact import Prior, PriorStats, compute_prior_stats, save_prior
from d4a_batch.prior.diffusion import build_diffusion
from d4a_batch.prior.unet import build_unet
from d4a_batch.schema import REPO_ROOT

# 16x16 model images of 1 kpc: footprints of 12-25 HSC pixels over z 0.25-1 -> stamps 32 and 48
TINY_PRIOR = PriorConfig(
    name="tiny-test",
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    channel_mult=(1, 1),
    attention_resolutions=(),
    num_heads=1,
    kpc_per_pixel=1.0,
)


def random_prior(
    cfg: PriorConfig = TINY_PRIOR,
    *,
    seed: int = 0,
    weight_std: float = 0.05,
    keep_init: bool = False,
    computed_stats: bool = False,
    device: str | torch.device = "cpu",
    sha256: str = "0" * 64,
) -> Prior:
    """A real UNet prior with random weights.

    Weights: N(0, weight_std²) drawn from a generator seeded with ``seed``; with
    ``keep_init`` the UNet's own initialisation plus N(0, weight_std²) from torch's
    global generator seeded with ``seed`` (the zero-initialised output layers become
    non-zero). Stats: unit variance and zero mean, or with ``computed_stats`` the real
    statistics of 256 two-step samples (generator seeded ``seed + 1``).
    """
    if keep_init:
        torch.manual_seed(seed)
    model = build_unet(cfg, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if keep_init:
                p.add_(weight_std * torch.randn_like(p))
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device) * weight_std)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if computed_stats:
        stats = compute_prior_stats(
            model,
            build_diffusion(cfg),
            shape,
            n=256,
            steps=2,
            batch_size=256,
            generator=torch.Generator(device=device).manual_seed(seed + 1),
        )
    else:
        ones = torch.ones(shape)
        stats = PriorStats(0 * ones, ones, 256, 2)
    return Prior(model, cfg, cfg.name, sha256, stats)


def write_prior(folder: Path, prior: Prior) -> Path:
    """Save ``prior`` as a prior artifact folder (weights, config, stats); the folder."""
    return save_prior(folder, prior.model.state_dict(), prior.config, prior.stats)


def make_tiny_prior(folder: Path, seed: int = 0) -> Path:
    """The tests' prior artifact: ``TINY_PRIOR`` with N(0, 0.05²) weights and real stats."""
    return write_prior(folder, random_prior(TINY_PRIOR, seed=seed, computed_stats=True))


def tiny_survey_config(n_objects: int = 8, seed: int = 1) -> MockSurveyConfig:
    """A mock survey at the tiny prior's scale, split over several HATS partitions."""
    return MockSurveyConfig(
        n_objects=n_objects,
        seed=seed,
        kpc_per_pixel=TINY_PRIOR.kpc_per_pixel,
        n_model=TINY_PRIOR.image_size,
        cutout_size=64,
        partition_rows=3,
    )


def make_tiny_survey(folder: Path, n_objects: int = 8, seed: int = 1) -> Path:
    """A tiny mock HATS survey (``tiny_survey_config``) under ``folder``."""
    return build_mock_survey(folder, tiny_survey_config(n_objects, seed))


def load_job(name: str) -> ModuleType:
    """``jobs/<name>.py`` loaded from its file as a module (jobs/ is not a package), as a
    scheduler's ``python jobs/<name>.py`` would run it."""
    path = REPO_ROOT / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"job_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
