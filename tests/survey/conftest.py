"""Session fixtures: a tiny real prior artifact and a tiny mock survey (read-only: copy to modify)."""

from __future__ import annotations

import pytest

from d4a_batch.testing import make_tiny_prior, make_tiny_survey


@pytest.fixture(scope="session")
def tiny_prior(tmp_path_factory):
    return make_tiny_prior(tmp_path_factory.mktemp("prior") / "tiny")


@pytest.fixture(scope="session")
def tiny_survey(tmp_path_factory):
    return make_tiny_survey(tmp_path_factory.mktemp("survey") / "survey")
