"""The engine's stage functions and pre-run checks, called directly (no Ray is started)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hats.pixel_math import HealpixPixel

from d4a_batch.config import ColumnMap, RunConfig, SamplerConfig, to_dict
from d4a_batch.pipeline.actors import DeconvolveActor
from d4a_batch.pipeline.commit import committed_pixels
from d4a_batch.pipeline.ledger import Ledger
from d4a_batch.pipeline.options import ExecutionOptions, JobError
from d4a_batch.pipeline.plan import apply_limit, check_job, prepare_output, select_partitions
from d4a_batch.pipeline.stages import (
    CHUNK_SCHEMA,
    DUPLICATE,
    mark_duplicates,
    read_packs,
    read_partitions,
    stage_rows,
    write_results,
)
from d4a_batch.prior.artifact import read_prior_config
from d4a_batch.schema import LEDGER_DIR, WORK_DIR, Col, Status
from d4a_batch.survey.hats_io import ORDER, PIXEL, open_input_catalog, write_partition
from d4a_batch.survey.output import OutputSpec, Provenance, fits_maps_uri, merge_chunks
from d4a_batch.survey.packs import KIND_ERRORS, PACK_ROW_SCHEMA, pack_from_bytes
from d4a_batch.survey.staging import Stager
from d4a_batch.testing import TINY_PRIOR

CONFIG = RunConfig(sampler=SamplerConfig(steps=2, samples=2), fits_maps=True)
BANDS = TINY_PRIOR.bands


def _items(cat, limit=-1):
    parts = cat.partitions[:2]
    return {
        "order": [p.order for p in parts],
        "pixel": [p.pixel for p in parts],
        "uri": [p.uri for p in parts],
        "limit": [limit] * len(parts),
    }


@pytest.fixture(scope="module")
def cat(tiny_survey):
    return open_input_catalog(str(tiny_survey))


def test_read_takes_rows_of_each_partition_up_to_its_limit(cat):
    rows = read_partitions(_items(cat), ColumnMap(), BANDS, cat.healpix_column)
    pq_rows = sum(pq.read_metadata(p.uri).num_rows for p in cat.partitions[:2])
    assert rows.num_rows == pq_rows and rows[DUPLICATE].null_count == rows.num_rows
    limited = read_partitions(_items(cat, 1), ColumnMap(), BANDS, cat.healpix_column)
    assert limited.num_rows == 2
    assert set(zip(limited[ORDER].to_pylist(), limited[PIXEL].to_pylist())) == {
        (p.order, p.pixel) for p in cat.partitions[:2]
    }


def test_repeated_object_ids_are_marked_with_the_row_they_repeat():
    t = mark_duplicates(pa.table({Col.OBJECT_ID: pa.array([5, 7, 5, 5], pa.int64())}))
    reasons = t[DUPLICATE].to_pylist()
    assert reasons[:2] == [None, None]
    assert reasons[2].startswith("duplicate object_id 5: input row 2") and "row 0" in reasons[2]
    assert "input row 3" in reasons[3]


def test_every_read_row_ends_in_exactly_one_pack(cat, tiny_survey, tmp_path):
    rows = read_partitions(_items(cat), ColumnMap(), BANDS, cat.healpix_column)
    rows = pa.concat_tables([rows, rows.slice(0, 1)]).drop_columns([DUPLICATE])
    rows = mark_duplicates(rows)  # the last row repeats the first object_id
    stager = Stager(str(tiny_survey), TINY_PRIOR, CONFIG.physics, CONFIG.staging)
    packs = stage_rows(rows, stager, pack_size=2, threads=1)
    assert packs.schema == PACK_ROW_SCHEMA
    assert sum(packs["n_objects"].to_pylist()) == rows.num_rows
    ids = [
        i for b in packs["pack"].to_pylist() for i in pack_from_bytes(b)[Col.OBJECT_ID].to_pylist()
    ]
    assert sorted(ids) == sorted(rows[Col.OBJECT_ID].to_pylist())
    errors = [pack_from_bytes(b) for b, k in zip(packs["pack"].to_pylist(), packs["kind"].to_pylist())
              if k == KIND_ERRORS]  # fmt: skip
    assert len(errors) == 1 and "duplicate object_id" in errors[0][Col.MESSAGE][0].as_py()
    objects = [n for n, k in zip(packs["n_objects"].to_pylist(), packs["kind"].to_pylist())
               if k != KIND_ERRORS]  # fmt: skip
    assert objects and max(objects) <= 2
    # staged packs round-trip through Parquet files (--write-staged / --read-staged)
    pq.write_table(packs, tmp_path / "packs.parquet")
    again = read_packs({"uri": [str(tmp_path / "packs.parquet")]})
    assert again.equals(packs)


def test_write_results_makes_chunks_and_fits_maps_that_merge_back(
    cat, tiny_survey, tiny_prior, tmp_path
):
    cfg, meta = read_prior_config(tiny_prior)
    prov = Provenance("r", cfg.name, meta["weights_sha256"], "h", "v", 0, 2, 2, datetime.now(UTC))
    spec = OutputSpec(bands=cfg.bands, image_size=cfg.image_size)
    actor = DeconvolveActor(str(tiny_prior), to_dict(CONFIG), spec, prov, torch_threads=1)
    rows = read_partitions(_items(cat, 2), ColumnMap(), BANDS, cat.healpix_column)
    stager = Stager(str(tiny_survey), TINY_PRIOR, CONFIG.physics, CONFIG.staging)
    out_rows = actor(stage_rows(rows, stager, pack_size=8, threads=1))
    work, out = str(tmp_path / "work"), str(tmp_path / "out")
    counts = write_results(out_rows, work, out, spec, False, True, 27.0)
    assert counts.schema == CHUNK_SCHEMA and sum(counts["n"].to_pylist()) == rows.num_rows
    for c in counts.to_pylist():
        merged = merge_chunks(work, HealpixPixel(c[ORDER], c[PIXEL]))
        assert merged.num_rows == c["n"] and Col.MEAN_X not in merged.column_names
        for oid, status in zip(merged[Col.OBJECT_ID].to_pylist(), merged[Col.STATUS].to_pylist()):
            uri = fits_maps_uri(out, HealpixPixel(c[ORDER], c[PIXEL]), oid)
            assert (status == Status.OK) == Path(uri).is_file()


def test_partition_selection_limits_and_unknown_names(cat):
    first, second = cat.partitions[:2]
    assert select_partitions(cat, None) == list(cat.partitions)
    name = f"{second.order}/{second.pixel}"
    assert select_partitions(cat, (name, first.healpix)) == sorted(
        [first, second], key=lambda p: p.healpix
    )
    with pytest.raises(JobError, match="not in catalog"):
        select_partitions(cat, ("0/9999",))
    counts = {p.healpix: 3 for p in cat.partitions}
    assert apply_limit(list(cat.partitions), counts, None) == counts
    limited = apply_limit(list(cat.partitions), counts, 4)
    assert [limited[p.healpix] for p in cat.partitions[:3]] == [3, 1, 0]


def test_job_checks_refuse_bad_inputs_before_any_write(tiny_survey, tiny_prior, tmp_path):
    out = tmp_path / "out"
    opts = ExecutionOptions()
    job = check_job(str(tiny_survey), str(out), str(tiny_prior), CONFIG, opts)
    assert job.bands == BANDS and job.provenance.config_hash and not out.exists()
    with pytest.raises(JobError, match="prior"):
        check_job(str(tiny_survey), str(out), str(tmp_path / "no-prior"), CONFIG, opts)
    bad_columns = RunConfig(columns=ColumnMap(photoz="no_such_column"))
    with pytest.raises(JobError, match="lacks required columns"):
        check_job(str(tiny_survey), str(out), str(tiny_prior), bad_columns, opts)
    with pytest.raises(JobError, match="not in catalog"):
        check_job(str(tiny_survey), str(out), str(tiny_prior), CONFIG,
                  ExecutionOptions(partitions=("0/9999",)))  # fmt: skip
    assert not out.exists()


def test_output_preparation_and_committed_partitions(tmp_path):
    out = tmp_path / "out"
    (out / "something").mkdir(parents=True)
    with pytest.raises(JobError, match="no run ledger"):
        prepare_output(str(out), False, Ledger(str(out)), None)
    prepare_output(str(out), True, Ledger(str(out)), None)  # overwrite
    assert out.is_dir() and not any(out.iterdir())
    (out / WORK_DIR / "old-run").mkdir(parents=True)
    (out / LEDGER_DIR).mkdir()  # an output with a ledger is an earlier run's: kept
    prepare_output(str(out), False, Ledger(str(out)), None)
    assert not (out / WORK_DIR).exists()  # a killed run's leftovers are removed
    table = pa.table(
        {Col.OBJECT_ID: pa.array([1], pa.int64()), Col.HEALPIX: pa.array([0], pa.int64())}
    )
    for order, pixel in ((1, 40), (0, 4)):
        write_partition(table, str(out), order, pixel)
    assert committed_pixels(str(out), None) == [HealpixPixel(0, 4), HealpixPixel(1, 40)]
    shutil.rmtree(out / "dataset")
    assert committed_pixels(str(out), None) == []
