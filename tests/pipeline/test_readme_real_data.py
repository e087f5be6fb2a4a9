"""The README's "Running on real HSC data" path end to end, and its python snippets, run.

A user's table of cutout/PSF files (one object image-only, one with a 31x31 PSF) ->
``jobs/make_catalog.py`` -> ``run_survey`` -> every ```python block of README.md runs against
the output (its demo paths replaced by this run's), e.g. the query with ``df["flags"]``.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest

from d4a_batch.config import RunConfig, SamplerConfig
from d4a_batch.pipeline.engine import ExecutionOptions, run_survey
from d4a_batch.schema import REPO_ROOT, Col, Flag, Status
from d4a_batch.survey.fits_io import read_hsc_cutout, read_psf, write_hsc_cutout, write_psf
from d4a_batch.survey.make_catalog import main as make_catalog_main
from tests.survey.test_make_catalog import BANDS, user_table, write_table

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

CONFIG = RunConfig(sampler=SamplerConfig(steps=2, samples=2, seed=3))
OPTIONS = ExecutionOptions(batch_size=4, progress_interval_s=0.0)
DEMO_OUTPUT, DEMO_SURVEY = "catalogs/out/demo_posteriors", "catalogs/demo/survey"


def readme_python_blocks() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def readme_run(ray_local, tiny_prior, tiny_survey, tmp_path_factory):
    base = tmp_path_factory.mktemp("readme")
    files = base / "files"
    shutil.copytree(tiny_survey, files)
    table = user_table(files, base)
    survey = pd.read_parquet(tiny_survey / "dataset")[["object_id", "i_cmodel_mag"]]
    table = table.merge(survey, on="object_id")
    image_only, small_psf = int(table.loc[1, "object_id"]), int(table.loc[2, "object_id"])
    for b in BANDS:  # object 1: image-only cutouts; object 2: a 31x31 PSF in band r
        path = files / f"cutouts/{b}/{image_only}.fits"
        cut = read_hsc_cutout(str(path))
        write_hsc_cutout(str(path), cut.image, None, None, cut.wcs)
    psf_path = files / f"psfs/r/{small_psf}.fits"
    write_psf(str(psf_path), read_psf(str(psf_path)).array[6:37, 6:37])
    path = write_table(table, base / "objects.csv")
    catalog, out = base / "catalog", base / "posteriors"
    argv = [str(path), "--output", str(catalog), "--keep", "i_cmodel_mag", "--partition-rows", "4"]
    assert make_catalog_main(argv) == 0
    summary = run_survey(str(catalog), str(out), str(tiny_prior), CONFIG, OPTIONS)
    return catalog, out, table, summary, image_only, small_psf


def test_make_catalog_output_runs_and_image_only_objects_are_flagged(readme_run):
    _, out, table, summary, image_only, small_psf = readme_run
    df = pd.read_parquet(out / "dataset").set_index(Col.OBJECT_ID)
    assert sorted(df.index) == sorted(table["object_id"]) and summary.objects == len(table)
    assert (df[Col.STATUS] == Status.OK).all(), df[Col.MESSAGE].dropna().tolist()
    assert np.isfinite(df[Col.CHI2]).all()
    noisy = (df[Col.FLAGS] & int(Flag.NOISE_ESTIMATED)) != 0
    assert noisy.tolist() == (df.index == image_only).tolist()
    reasons = df.loc[image_only, Col.FLAG_REASONS]
    for b in BANDS:
        assert re.search(
            rf"{b}: MASK and VARIANCE empty: sky var \S+ from \d+ source-free pixels", reasons
        ), reasons
    # the 31x31 PSF was padded: no PSF_BAD
    assert not df.loc[small_psf, Col.FLAGS] & int(Flag.PSF_BAD), df.loc[small_psf, Col.FLAG_REASONS]


def test_readme_python_snippets_run_on_a_real_output(readme_run, capsys, tmp_path, monkeypatch):
    catalog, out, table, *_ = readme_run
    monkeypatch.chdir(tmp_path)  # the size example saves its figure where it runs
    blocks = readme_python_blocks()
    assert len(blocks) >= 2
    assert any('df["flags"]' in b for b in blocks)
    assert not any("df.flags" in b for b in blocks)  # pandas' own attribute: TypeError
    for block in blocks:
        code = block.replace(DEMO_OUTPUT, str(out)).replace(DEMO_SURVEY, str(catalog))
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
        printed = capsys.readouterr().out
        assert "object_id" in printed  # every snippet prints a table of objects
        if "df" in namespace:
            assert len(namespace["df"]) == len(table)
        if "joined" in namespace:
            assert len(namespace["joined"]) == len(table)
