"""Posterior samples in flux units: ``flux_samples`` lives in ``sampling/summaries.py``
(the sampler's definition of a flux sample); re-exported here for the validation code."""

from __future__ import annotations

from d4a_batch.sampling.summaries import flux_samples

__all__ = ["flux_samples"]
