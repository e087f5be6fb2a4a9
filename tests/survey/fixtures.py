"""Kept for old imports: the tiny prior and survey builders live in ``d4a_batch.testing``."""

from __future__ import annotations

from d4a_batch.testing import TINY_PRIOR, make_tiny_prior, make_tiny_survey, tiny_survey_config

__all__ = ["TINY_PRIOR", "make_tiny_prior", "make_tiny_survey", "tiny_survey_config"]
