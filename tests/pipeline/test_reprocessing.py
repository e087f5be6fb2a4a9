"""Re-runs on a local Ray cluster: the ledger skips what is up to date and redoes what changed.

One sequence of runs on a copy of the tiny survey (module fixture), then checks of
the final catalog row by row and of the ledger; plus the job's exit codes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from hats.pixel_math import HealpixPixel

from d4a_batch.config import RunConfig, SamplerConfig, config_hash
from d4a_batch.pipeline.engine import ExecutionOptions, JobError, run_survey
from d4a_batch.pipeline.ledger import (
    CONFIG_CHANGED,
    FAILED,
    FORCED,
    INPUT_CHANGED,
    NEW,
    OK,
    RETRY,
    Ledger,
    describe_runs,
    pixel_name,
)
from d4a_batch.schema import Col, Status
from d4a_batch.survey.hats_io import open_input_catalog
from d4a_batch.testing import load_job

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

CONFIG = RunConfig(sampler=SamplerConfig(steps=2, samples=2, seed=3), write_maps=False)
OPTS = ExecutionOptions(batch_size=4, progress_interval_s=0.0)


def _job():
    return load_job("deconvolve_survey")


def _files(out) -> dict[str, int]:
    return {str(f): f.stat().st_mtime_ns for f in (out / "dataset").rglob("Npix=*.parquet")}


def _rows(out) -> pd.DataFrame:
    return pd.read_parquet(out / "dataset")


def _input_ids(root) -> list[int]:
    cat = open_input_catalog(str(root))
    return sorted(i for p in cat.partitions for i in pq.read_table(p.uri)["object_id"].to_pylist())


def _bump_cutout(root, part_uri: str) -> None:
    uri = pq.read_table(part_uri, columns=["g_cutout_uri"])["g_cutout_uri"][0].as_py()
    with fits.open(root / uri) as hdul:
        hdul[1].data = hdul[1].data * np.float32(1.5)
        hdul.writeto(root / "tmp.fits")
    (root / "tmp.fits").replace(root / uri)


@pytest.fixture(scope="module")
def sequence(ray_local, tiny_survey, tiny_prior, tmp_path_factory):
    root = tmp_path_factory.mktemp("rerun") / "survey"
    shutil.copytree(tiny_survey, root)
    out = tmp_path_factory.mktemp("rerun_out") / "posteriors"
    parts = sorted((p.order, p.pixel, p.uri) for p in open_input_catalog(str(root)).partitions)
    a, b, c = parts[0], parts[1], parts[2]
    args = (str(root), str(out), str(tiny_prior))
    seq = {"root": root, "out": out, "parts": parts}
    seq["first"] = run_survey(*args, CONFIG, OPTS)
    seq["files_first"] = _files(out)
    seq["rows_first"] = _rows(out)
    seq["state_first"] = Ledger(str(out)).state()
    seq["again"] = run_survey(*args, CONFIG, OPTS)
    seq["files_again"] = _files(out)
    _bump_cutout(root, a[2])
    seq["changed"] = run_survey(*args, CONFIG, OPTS)
    new_cfg = dataclasses.replace(CONFIG, sampler=dataclasses.replace(CONFIG.sampler, seed=4))
    seq["new_config"] = run_survey(
        *args, new_cfg, dataclasses.replace(OPTS, partitions=(pixel_name(HealpixPixel(*b[:2])),))
    )
    seq["forced"] = run_survey(
        *args,
        CONFIG,
        dataclasses.replace(OPTS, force=True, partitions=(pixel_name(HealpixPixel(*c[:2])),)),
    )
    seq["names"] = [HealpixPixel(o, p) for o, p, _ in parts]
    seq["a"], seq["b"], seq["c"] = (HealpixPixel(*x[:2]) for x in (a, b, c))
    seq["new_cfg"] = new_cfg
    return seq


def test_first_run_processes_everything_and_records_it(sequence):
    s = sequence["first"]
    assert sorted(s.committed) == sorted(sequence["names"]) and not s.skipped
    assert not s.failed_partitions
    state = sequence["state_first"]
    assert set(state) == set(sequence["names"])
    assert all(r.status == OK and r.reason == NEW and r.run_id == s.run_id for r in state.values())
    assert sum(r.rows for r in state.values()) == len(_input_ids(sequence["root"]))


def test_a_rerun_with_the_same_inputs_does_no_work(sequence):
    s = sequence["again"]
    assert s.objects == 0 and s.committed == [] and sorted(s.skipped) == sorted(sequence["names"])
    assert sequence["files_again"] == sequence["files_first"]  # not one file rewritten


def test_a_changed_input_partition_is_processed_alone(sequence):
    s = sequence["changed"]
    assert s.committed == [sequence["a"]]
    assert len(s.skipped) == len(sequence["names"]) - 1
    run = next(r for r in Ledger(str(sequence["out"])).runs() if r.run_id == s.run_id)
    assert run.processed == {pixel_name(sequence["a"]): INPUT_CHANGED} and run.status == OK


def test_a_new_config_reprocesses_what_partitions_names_and_force_redoes(sequence):
    assert sequence["new_config"].committed == [sequence["b"]]
    assert sequence["forced"].committed == [sequence["c"]]
    state = Ledger(str(sequence["out"])).state()
    b, c = sequence["b"], sequence["c"]
    assert state[b].reason == CONFIG_CHANGED
    assert state[b].config_hash == config_hash(sequence["new_cfg"])
    assert state[c].reason == FORCED and state[c].config_hash == config_hash(CONFIG)


def test_final_catalog_has_one_row_per_object_with_its_provenance(sequence):
    df = _rows(sequence["out"])
    assert sorted(df.object_id) == _input_ids(sequence["root"]) and df.object_id.is_unique
    assert (df[Col.STATUS] == Status.OK).all()
    # each partition's rows carry the run that last wrote it
    first = set(sequence["rows_first"][Col.RUN_ID])
    assert first == {sequence["first"].run_id}
    by_run = df.groupby(Col.RUN_ID).size()
    assert sequence["changed"].run_id in by_run and sequence["forced"].run_id in by_run
    assert set(df[Col.CONFIG_HASH]) == {config_hash(CONFIG), config_hash(sequence["new_cfg"])}
    assert not (sequence["out"] / "_d4a_work").exists()


def test_run_listing_names_each_run_and_its_reasons(sequence):
    text = describe_runs(str(sequence["out"]))
    for key in ("first", "again", "changed", "new_config", "forced"):
        assert sequence[key].run_id in text
    assert f"processed (input changed): {pixel_name(sequence['a'])}" in text
    assert f"processed (config changed): {pixel_name(sequence['b'])}" in text
    assert f"processed (forced): {pixel_name(sequence['c'])}" in text
    assert "interrupted" not in text


def test_job_errors_before_any_work_exit_2(ray_local, tiny_survey, tiny_prior, tmp_path):
    job = _job()
    out = tmp_path / "out"
    base = ["--catalog", str(tiny_survey), "--output", str(out), "--steps", "2", "--samples", "2"]
    code = job.main([*base, "--prior", str(tiny_prior), "--columns", "photoz=photoz_nope"])
    assert code == job.EXIT_JOB_ERROR == 2
    assert not list(out.rglob("*.parquet"))
    # a prior whose weights do not match its config
    bad = tmp_path / "prior"
    shutil.copytree(tiny_prior, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_channels"] = 2 * cfg["num_channels"]
    (bad / "config.json").write_text(json.dumps(cfg))
    assert job.main([*base, "--prior", str(bad)]) == 2
    with pytest.raises(JobError, match="photoz_nope"):
        run_survey(
            str(tiny_survey),
            str(out),
            str(tiny_prior),
            dataclasses.replace(
                CONFIG, columns=dataclasses.replace(CONFIG.columns, photoz="photoz_nope")
            ),
            OPTS,
        )


def test_failed_partition_exits_3_the_rest_is_kept_and_a_rerun_retries_it(
    ray_local, tiny_survey, tiny_prior, tmp_path, capsys
):
    root = tmp_path / "survey"
    shutil.copytree(tiny_survey, root)
    parts = sorted(open_input_catalog(str(root)).partitions, key=lambda p: (p.order, p.pixel))
    broken, dup, evil = parts[0], parts[1], parts[2]
    shutil.copyfile(broken.uri, tmp_path / "saved.parquet")
    shutil.copyfile(evil.uri, tmp_path / "saved_evil.parquet")
    with open(broken.uri, "wb") as f:
        f.write(b"PAR1 truncated")
    # an object_id that is a path, not an integer: the partition fails, nothing is written
    t = pq.read_table(evil.uri)
    ids = pa.array(["../../escape", *map(str, t["object_id"].to_pylist()[1:])])
    pq.write_table(t.set_column(t.schema.get_field_index("object_id"), "object_id", ids), evil.uri)
    t = pq.read_table(dup.uri)
    pq.write_table(pa.concat_tables([t, t.slice(0, 1)]), dup.uri)  # object_id repeated
    dup_id = t["object_id"][0].as_py()
    job = _job()
    out = tmp_path / "out"
    argv = ["--catalog", str(root), "--output", str(out), "--prior", str(tiny_prior)]
    argv += ["--steps", "2", "--samples", "2", "--no-maps"]
    assert job.main(argv) == job.EXIT_PARTITIONS_FAILED == 3
    err = capsys.readouterr().err
    name = pixel_name(broken.healpix)
    assert f"{name}: cannot read partition" in err
    assert f"{pixel_name(evil.healpix)}: cannot read partition" in err
    assert not list(tmp_path.rglob("escape*")) and not (tmp_path.parent / "escape").exists()
    df = _rows(out)
    # every object of the readable partitions, the repeated one twice (one row per input row)
    readable = [p for p in parts if p is not broken and p is not evil]
    want = sorted(i for p in readable for i in pq.read_table(p.uri)["object_id"].to_pylist())
    assert sorted(df.object_id) == want
    rep = df[df.object_id == dup_id].sort_values(Col.STATUS)
    assert list(rep[Col.STATUS]) == [Status.ERROR, Status.OK]
    assert "duplicate object_id" in rep[Col.MESSAGE].iloc[0]
    state = Ledger(str(out)).state()
    assert state[broken.healpix].status == FAILED
    assert state[broken.healpix].reason == NEW  # first attempt: not a retry
    # the partition is repaired: the next run processes it alone
    shutil.copyfile(tmp_path / "saved.parquet", broken.uri)
    shutil.copyfile(tmp_path / "saved_evil.parquet", evil.uri)
    assert job.main(argv) == 0
    state = Ledger(str(out)).state()
    assert state[broken.healpix].status == OK
    assert state[broken.healpix].reason == RETRY
    runs = Ledger(str(out)).runs()
    assert runs[-1].processed == {name: RETRY, pixel_name(evil.healpix): RETRY}
    repaired = sum(pq.read_metadata(p.uri).num_rows for p in (broken, evil))
    assert len(_rows(out)) == len(want) + repaired
