"""Fixtures for the prior tests: tiny configs and UNets with random (non-zero) weights."""

from __future__ import annotations

import pytest
import torch

from d4a_batch.config import PriorConfig
from d4a_batch.prior.unet import UNetModel, build_unet


@pytest.fixture
def tiny_cfg() -> PriorConfig:
    """16×16, 32 channels, two levels, attention at 8 px (ds 2), learned sigma."""
    return PriorConfig(
        name="tiny",
        image_size=16,
        num_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2),
        attention_resolutions=(8,),
        num_heads=2,
        learn_sigma=True,
    )


@pytest.fixture
def random_unet():
    """Factory: the UNet of a config with every parameter drawn N(0, 0.05²) from ``seed``."""

    def make(cfg: PriorConfig, seed: int = 0) -> UNetModel:
        model = build_unet(cfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        return model

    return make
