"""Observe a truth with HSC noise: the one place a noiseless model becomes a mock observation.

``observe_truth``: truth flux images [B,C,N,N] (counts per model pixel) through the physics
operator (area-overlap resampling to HSC pixels, then the PSF; ``ForwardOperator.linear``),
then ``add_hsc_noise``: Gaussian noise of the HSC COSMOS coadd VARIANCE plane, sky variance +
source/gain per band (``hsc_variance``; ``SKY_VARIANCE``, ``INV_GAIN`` below). The
magnitude experiment, the sampler tuning, the prior-truth check and the blend thresholds
observe through these; the mock survey draws its noise band by band (with a background
offset between the draws, so its random stream is its own) but with ``hsc_variance``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from d4a_batch.physics.operator import ForwardOperator

# HSC COSMOS coadd noise, measured on /work/shared/data/scarlet/hsc_cosmos_35.npz (g, r, i):
# median VARIANCE (sky) and the slope of VARIANCE against IMAGE (1/gain, counts^-1)
SKY_VARIANCE = {"g": 1.60e-4, "r": 1.99e-4, "i": 4.11e-4}
INV_GAIN = {"g": 4.3e-5, "r": 3.3e-5, "i": 2.6e-5}


def hsc_variance(model: np.ndarray, bands: Sequence[str]) -> np.ndarray:
    """The VARIANCE plane of an HSC coadd over the noiseless ``model`` [..., C, H, W]:
    sky variance + max(model, 0) / gain, per band."""
    sky = np.array([SKY_VARIANCE[b] for b in bands])[:, None, None]
    inv_gain = np.array([INV_GAIN[b] for b in bands])[:, None, None]
    return sky + np.clip(model, 0, None) * inv_gain


def add_hsc_noise(
    model: np.ndarray, bands: Sequence[str], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(image, variance) of the noiseless ``model`` [..., C, H, W]: one standard normal draw of
    ``model``'s shape from ``rng``, scaled by the HSC standard deviation (``hsc_variance``)."""
    variance = hsc_variance(model, bands)
    return model + np.sqrt(variance) * rng.standard_normal(model.shape), variance


@dataclass(frozen=True)
class MockObservation:
    """What ``observe_truth`` returns: arrays [B,C,H,W] on the HSC stamp."""

    model: np.ndarray  # the noiseless observation: resampled, PSF-convolved truth
    image: np.ndarray  # model + noise
    variance: np.ndarray  # the VARIANCE plane the noise was drawn with


def observe_truth(
    truth: np.ndarray,
    psf: np.ndarray,
    scale: np.ndarray | float,
    offset: np.ndarray,
    stamp: int,
    bands: Sequence[str],
    rng: np.random.Generator,
    stretch_a: float | None = None,
) -> MockObservation:
    """Truth flux [B,C,N,N] observed by HSC on a ``stamp`` × ``stamp`` cutout.

    ``psf`` [B,C,P,P] (or [C,P,P], the same for every row), ``scale`` HSC pixels per model
    pixel ([B] or one value), ``offset`` [B,2] of the model field's centre from the stamp's
    (HSC pixels), ``stretch_a`` the operator's stretch (``ForwardOperator``'s default if
    None; the operator's ``linear`` does not use it). Noise: ``add_hsc_noise`` with ``rng``.
    """
    truth = np.asarray(truth, dtype=np.float64)
    b = truth.shape[0]
    psf = np.asarray(psf, dtype=np.float64)
    psf = np.broadcast_to(psf, (b, *psf.shape)).copy() if psf.ndim == 3 else psf
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (b,)).copy()
    extra = () if stretch_a is None else (stretch_a,)
    op = ForwardOperator(
        torch.as_tensor(psf),
        torch.as_tensor(scale),
        torch.as_tensor(np.asarray(offset, dtype=np.float64)),
        (stamp, stamp),
        *extra,
    )
    with torch.no_grad():
        model = op.linear(torch.as_tensor(truth)).numpy()
    image, variance = add_hsc_noise(model, bands, rng)
    return MockObservation(model=model, image=image, variance=variance)
