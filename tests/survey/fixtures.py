"""Builders shared by the survey and pipeline tests: a tiny real prior and a tiny mock survey."""

from __future__ import annotations

from pathlib import Path

import torch

from d4a_batch.config import PriorConfig
from d4a_batch.mock.survey import MockSurveyConfig, build_mock_survey
from d4a_batch.prior.artifact import compute_prior_stats, save_prior
from d4a_batch.prior.diffusion import build_diffusion
from d4a_batch.prior.unet import build_unet

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


def make_tiny_prior(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised (every weight N(0, 0.05²)) prior artifact with real prior stats."""
    model = build_unet(TINY_PRIOR)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    stats = compute_prior_stats(
        model,
        build_diffusion(TINY_PRIOR),
        (TINY_PRIOR.in_channels, TINY_PRIOR.image_size, TINY_PRIOR.image_size),
        n=256,
        steps=2,
        batch_size=256,
        generator=torch.Generator().manual_seed(seed + 1),
    )
    return save_prior(folder, model.state_dict(), TINY_PRIOR, stats)


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
    return build_mock_survey(folder, tiny_survey_config(n_objects, seed))
