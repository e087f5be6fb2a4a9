"""The README's join example (posteriors joined with the survey, clean objects) on a real run."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from d4a_batch.config import RunConfig, SamplerConfig
from d4a_batch.pipeline.engine import ExecutionOptions, run_survey
from d4a_batch.schema import REPO_ROOT, Flag

DEMO_SURVEY = "catalogs/demo/survey"
DEMO_OUTPUT = "catalogs/out/demo_posteriors"


def _join_snippet() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("Joining the posteriors with the survey") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_join_selects_clean_objects_with_their_survey_columns(
    ray_local, tiny_survey, tiny_prior, tmp_path
):
    out = tmp_path / "out"
    config = RunConfig(sampler=SamplerConfig(steps=2, samples=2, seed=3))
    run_survey(str(tiny_survey), str(out), str(tiny_prior), config, ExecutionOptions(batch_size=4))
    code = _join_snippet()
    assert DEMO_SURVEY in code and DEMO_OUTPUT in code  # the README's own paths
    code = code.replace(DEMO_SURVEY, str(tiny_survey)).replace(DEMO_OUTPUT, str(out))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    joined, clean = scope["joined"], scope["clean"]

    survey = pd.read_parquet(tiny_survey / "dataset").set_index("object_id")
    post = pd.read_parquet(out / "dataset").set_index("object_id")
    # every object once, with the survey's values next to its posterior
    assert sorted(joined.object_id) == sorted(survey.index)
    np.testing.assert_array_equal(
        joined.set_index("object_id").i_cmodel_mag.loc[survey.index], survey.i_cmodel_mag
    )
    # exactly the ok rows without the chosen flags
    bad = int(Flag.PRIOR_DOMINATED | Flag.POOR_FIT | Flag.INPUT_ERROR | Flag.PSF_BAD)
    want = post[(post["status"] == "ok") & ((post["flags"] & bad) == 0)].index
    assert sorted(clean.object_id) == sorted(want)
    assert (clean["status"] == "ok").all() and ((clean["flags"] & bad) == 0).all()
