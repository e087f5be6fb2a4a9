"""The tiny prior and mock survey of the survey tests (read-only: copy a survey to modify it)."""

from __future__ import annotations

from tests.survey.conftest import tiny_prior, tiny_survey

__all__ = ["tiny_prior", "tiny_survey"]
