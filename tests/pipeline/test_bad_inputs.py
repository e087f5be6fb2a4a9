"""Bad input never stops a run: one survey run with every kind of bad input, each on its own object.

The cases and how to make them are those of the staging unit tests
(``tests/survey/test_staging.py::BAD_INPUTS``); here they go through the whole engine
and every output row is checked: one row per input object, the status, the message,
the flags. The objects are broken across the partitions, so some partitions hold only
bad objects and others mix bad and good ones.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from d4a_batch.config import ColumnMap, RunConfig, SamplerConfig
from d4a_batch.mock.survey import build_mock_survey
from d4a_batch.pipeline.engine import ExecutionOptions, run_survey
from d4a_batch.schema import Col, Flag, Status, flag_names
from d4a_batch.survey.hats_io import ORDER, PIXEL, open_input_catalog, read_partition
from d4a_batch.testing import TINY_PRIOR, tiny_survey_config
from tests.survey.test_staging import BAD_INPUTS, break_object

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

CONFIG = RunConfig(sampler=SamplerConfig(steps=2, samples=2))
OPTIONS = ExecutionOptions(batch_size=4, progress_interval_s=0)
N_OBJECTS = 20  # 16 cases + 4 untouched objects, over 8 partitions of 1-5 objects
INPUT_FLAGS = Flag.INPUT_ERROR | Flag.PSF_BAD | Flag.PHOTOZ_BAD


def _partition_rows(root) -> list[list[dict]]:
    cat = open_input_catalog(str(root))
    return [
        read_partition(p, ColumnMap(), TINY_PRIOR.bands, cat.healpix_column).to_pylist()
        for p in cat.partitions
    ]


@pytest.fixture(scope="module")
def bad_run(ray_local, tiny_prior, tmp_path_factory):
    """``(output rows, {object_id: input row}, {object_id: case}, summary, output root)``."""
    root = tmp_path_factory.mktemp("bad_inputs") / "survey"
    build_mock_survey(root, dataclasses.replace(tiny_survey_config(N_OBJECTS), partition_rows=5))
    parts = _partition_rows(root)
    # round robin over the partitions: the first object of each, then the second, ...
    order = [p[k] for k in range(max(map(len, parts))) for p in parts if k < len(p)]
    cases = {row[Col.OBJECT_ID]: case for row, case in zip(order, BAD_INPUTS)}
    inputs = {row[Col.OBJECT_ID]: row for part in parts for row in part}
    for row in order[: len(BAD_INPUTS)]:
        break_object(root, row, cases[row[Col.OBJECT_ID]])
    out = tmp_path_factory.mktemp("bad_inputs_out") / "posteriors"
    summary = run_survey(str(root), str(out), str(tiny_prior), CONFIG, OPTIONS)
    df = pd.read_parquet(out / "dataset")
    return df, inputs, cases, summary, out


def test_every_input_object_has_exactly_one_row(bad_run):
    df, inputs, cases, summary, _ = bad_run
    assert len(cases) == len(BAD_INPUTS) and len(inputs) == N_OBJECTS
    assert Counter(df[Col.OBJECT_ID].tolist()) == Counter(inputs.keys())  # none missing or extra
    errors = sum(BAD_INPUTS[c].message is not None for c in cases.values())
    ok = df[df[Col.STATUS] == Status.OK]
    assert len(ok) == N_OBJECTS - errors and (df[Col.STATUS] != Status.OK).sum() == errors
    assert (summary.objects, summary.failed, summary.ok) == (N_OBJECTS, errors, len(ok)), summary
    assert summary.flagged == int((ok[Col.FLAGS] != 0).sum()), summary


def test_partitions_are_independent(bad_run):
    """Each output partition holds its input objects; all-bad and mixed partitions both finish."""
    _, inputs, _, _, out = bad_run
    want: dict[tuple[int, int], list[int]] = {}
    for oid, row in inputs.items():
        want.setdefault((row[ORDER], row[PIXEL]), []).append(oid)
    got, statuses = {}, []
    for f in (out / "dataset").glob("Norder=*/Dir=*/Npix=*.parquet"):
        pix = (int(f.parent.parent.name.split("=")[1]), int(f.stem.split("=")[1]))
        t = pq.read_table(f, columns=[Col.OBJECT_ID, Col.STATUS])
        got[pix] = sorted(t[Col.OBJECT_ID].to_pylist())
        statuses.append(set(t[Col.STATUS].to_pylist()))
    assert got == {k: sorted(v) for k, v in want.items()} and len(got) >= 6
    assert {Status.ERROR} in statuses  # a partition of bad objects only
    assert {Status.OK, Status.ERROR} in statuses  # bad objects next to good ones


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_row(bad_run, case):
    df, inputs, cases, _, _ = bad_run
    (oid,) = [k for k, c in cases.items() if c == case]
    row = df.set_index(Col.OBJECT_ID).loc[oid]
    spec = BAD_INPUTS[case]
    bits = int(row[Col.FLAGS])
    assert row[Col.FLAG_NAMES].split("|") == flag_names(bits)
    assert bits & INPUT_FLAGS == spec.flags, row[Col.FLAG_NAMES]
    if spec.message is None:  # PSF renormalised or off centre: sampled and flagged
        assert row[Col.STATUS] == Status.OK and pd.isna(row[Col.MESSAGE])
        assert re.search(spec.reason, row[Col.FLAG_REASONS]), row[Col.FLAG_REASONS]
        assert np.isfinite(row[Col.CHI2]) and np.isfinite(np.stack(row[Col.MEAN_X])).all()
        return
    assert row[Col.STATUS] == Status.ERROR
    assert re.fullmatch(spec.message_regex(inputs[oid]), row[Col.MESSAGE]), row[Col.MESSAGE]
    assert f"INPUT_ERROR: input error: {row[Col.MESSAGE]}" in row[Col.FLAG_REASONS]
    assert np.isnan(row[Col.CHI2]) and np.isnan(np.stack(row[Col.MEAN_X])).all()


def test_untouched_objects_are_sampled_without_input_flags(bad_run):
    df, _, cases, _, _ = bad_run
    clean = df[~df[Col.OBJECT_ID].isin(list(cases))]
    assert len(clean) == N_OBJECTS - len(cases)
    assert (clean[Col.STATUS] == Status.OK).all() and clean[Col.MESSAGE].isna().all()
    assert ((clean[Col.FLAGS] & int(INPUT_FLAGS)) == 0).all()
    assert np.isfinite(clean[Col.CHI2]).all()
