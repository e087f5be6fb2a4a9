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


def _snippet(heading: str) -> str:
    """The first Python block of the README after ``heading``."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _join_snippet() -> str:
    return _snippet("Joining the posteriors with the survey")


@pytest.fixture(scope="module")
def run_output(ray_local, tiny_survey, tiny_prior, tmp_path_factory):
    """A real run's output catalog on the tiny survey."""
    out = tmp_path_factory.mktemp("query") / "out"
    config = RunConfig(sampler=SamplerConfig(steps=2, samples=2, seed=3))
    run_survey(str(tiny_survey), str(out), str(tiny_prior), config, ExecutionOptions(batch_size=4))
    return out


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_join_selects_clean_objects_with_their_survey_columns(run_output, tiny_survey):
    out = run_output
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


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_size_example_plots_r50_against_mag_i_of_clean_objects(
    run_output, tmp_path, monkeypatch
):
    import matplotlib

    matplotlib.use("Agg")
    code = _snippet("### Sizes, shapes and structure")
    assert DEMO_OUTPUT in code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace(DEMO_OUTPUT, str(run_output)), "README.md", "exec"), scope)
    post = pd.read_parquet(run_output / "dataset")
    bad = int(
        Flag.PRIOR_DOMINATED | Flag.POOR_FIT | Flag.INPUT_ERROR | Flag.PSF_BAD
        | Flag.BLENDED | Flag.TRUNCATED
    )  # fmt: skip
    want = post[(post["status"] == "ok") & ((post["flags"] & bad) == 0)]
    clean = scope["clean"]
    assert sorted(clean.object_id) == sorted(want.object_id)
    assert (tmp_path / "r50_vs_mag_i.png").stat().st_size > 0
    # ok rows carry the sizes, their interval and the observed value; a NaN says why
    ok = post[post["status"] == "ok"]
    for col in ("r50_kpc", "r50_kpc_obs"):
        assert ok.loc[ok[col].isna(), "measure_notes"].str.len().gt(0).all(), col
    has = ok["r50_kpc"].notna()
    assert has.any() and ok["r50_kpc_obs"].notna().any()
    assert (ok.loc[has, "r50_kpc_p16"] <= ok.loc[has, "r50_kpc"]).all()
    assert (ok.loc[has, "r50_kpc"] <= ok.loc[has, "r50_kpc_p84"]).all()
    assert scope["compact"]["r50_kpc_p84"].lt(2).all()
