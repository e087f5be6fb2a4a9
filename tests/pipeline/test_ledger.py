"""The run ledger without Ray: fingerprints, the skip/process plan, records, the run listing."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from hats.pixel_math import HealpixPixel

from d4a_batch.config import ColumnMap
from d4a_batch.pipeline.ledger import (
    CONFIG_CHANGED,
    FAILED,
    FORCED,
    INPUT_CHANGED,
    NEW,
    OK,
    PRIOR_CHANGED,
    RETRY,
    Ledger,
    PartitionRecord,
    RunRecord,
    describe_runs,
    parse_pixel,
    partition_fingerprint,
    pixel_name,
    plan,
)
from d4a_batch.survey.hats_io import open_input_catalog

BANDS = ("g", "r", "i")


def _record(order=5, pixel=1, status=OK, fp="fp", prior="P", config="C", run="20260101T000000Z-a"):
    return PartitionRecord(order, pixel, run, status, fp, prior, config, rows=3, n_ok=3)


def test_plan_gives_each_partition_its_reason():
    state = {
        HealpixPixel(5, 1): _record(5, 1),
        HealpixPixel(5, 2): _record(5, 2, fp="old"),
        HealpixPixel(5, 3): _record(5, 3, prior="Q"),
        HealpixPixel(5, 4): _record(5, 4, config="D"),
        HealpixPixel(5, 5): _record(5, 5, status=FAILED),
    }
    fps = {HealpixPixel(5, k): "fp" for k in range(1, 7)}
    todo, done = plan(state, fps, "P", "C")
    assert done == [HealpixPixel(5, 1)]
    assert todo == {
        HealpixPixel(5, 2): INPUT_CHANGED,
        HealpixPixel(5, 3): PRIOR_CHANGED,
        HealpixPixel(5, 4): CONFIG_CHANGED,
        HealpixPixel(5, 5): RETRY,
        HealpixPixel(5, 6): NEW,
    }
    todo, done = plan(state, fps, "P", "C", force=True)
    assert done == [] and set(todo.values()) == {FORCED}


def test_newest_record_of_a_partition_wins(tmp_path):
    ledger = Ledger(str(tmp_path / "out"))
    assert not ledger.exists() and ledger.state() == {}
    ledger.write_partition(_record(run="20260101T000000Z-a", fp="one"))
    ledger.write_partition(_record(run="20260102T000000Z-b", fp="two", status=FAILED))
    ledger.write_partition(_record(pixel=2, run="20260101T000000Z-a"))
    state = ledger.state()
    assert ledger.exists() and set(state) == {HealpixPixel(5, 1), HealpixPixel(5, 2)}
    assert (
        state[HealpixPixel(5, 1)].fingerprint == "two"
        and state[HealpixPixel(5, 1)].status == FAILED
    )
    # no temporary files are left beside the records
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_fingerprint_follows_the_partition_its_files_and_the_limit(tiny_survey, tmp_path):
    root = tmp_path / "survey"
    shutil.copytree(tiny_survey, root)
    cat = open_input_catalog(str(root))
    part = cat.partitions[0]

    def fp(limit=-1):
        return partition_fingerprint(part, ColumnMap(), BANDS, cat.root, limit)

    base, n = fp()
    assert n == pq.read_metadata(part.uri).num_rows and fp() == (base, n)
    assert fp(limit=1) == (fp(limit=1)[0], 1) and fp(limit=1)[0] != base
    # a cutout of this partition is rewritten with other pixels: the fingerprint changes
    uri = pq.read_table(part.uri, columns=["r_cutout_uri"])["r_cutout_uri"][0].as_py()
    with fits.open(root / uri) as hdul:
        hdul[1].data = hdul[1].data + np.float32(1.0)
        hdul.writeto(root / "tmp.fits")
    (root / "tmp.fits").replace(root / uri)
    changed, _ = fp()
    assert changed != base
    # a cutout of another partition does not change this one
    other = cat.partitions[1]
    uri2 = pq.read_table(other.uri, columns=["g_cutout_uri"])["g_cutout_uri"][0].as_py()
    (root / uri2).write_bytes((root / uri2).read_bytes() + b"\0" * 2880)
    assert fp()[0] == changed
    # the partition file itself: content, not its name or time
    t = pq.read_table(part.uri)
    pq.write_table(t.slice(0, t.num_rows - 1), part.uri)
    assert fp()[0] not in (base, changed)


def test_a_missing_cutout_file_is_part_of_the_fingerprint(tiny_survey, tmp_path):
    root = tmp_path / "survey"
    shutil.copytree(tiny_survey, root)
    cat = open_input_catalog(str(root))
    part = cat.partitions[0]
    before, _ = partition_fingerprint(part, ColumnMap(), BANDS, cat.root, -1)
    uri = pq.read_table(part.uri, columns=["i_psf_uri"])["i_psf_uri"][0].as_py()
    (root / uri).unlink()
    after, _ = partition_fingerprint(part, ColumnMap(), BANDS, cat.root, -1)
    assert after != before


def test_an_unreadable_partition_raises(tmp_path, tiny_survey):
    root = tmp_path / "survey"
    shutil.copytree(tiny_survey, root)
    cat = open_input_catalog(str(root))
    part = cat.partitions[0]
    with open(part.uri, "wb") as f:
        f.write(b"PAR1 this is not parquet")
    with pytest.raises(Exception, match=r"(?i)parquet|magic"):
        partition_fingerprint(part, ColumnMap(), BANDS, cat.root, -1)


def test_run_listing_says_what_changed(tmp_path):
    ledger = Ledger(str(tmp_path / "out"))
    first = RunRecord("20260101T000000Z-a", "t1", "cat", "demo", "P" * 64, "C" * 64, "0.1.0")
    ledger.write_run(first)  # never finished: interrupted
    ledger.write_run(
        RunRecord(
            "20260102T000000Z-b", "t2", "cat", "demo", "Q" * 64, "C" * 64, "0.1.0",
            status=OK, processed={"5/1": PRIOR_CHANGED, "5/2": PRIOR_CHANGED},
            skipped=["5/3"], failed={"5/4": "cannot read partition"}, objects=6,
        )
    )  # fmt: skip
    text = describe_runs(str(tmp_path / "out"))
    lines = text.splitlines()
    assert "20260101T000000Z-a" in lines[0] and "interrupted" in lines[0]
    assert any("prior PPPPPPPPPPPP -> QQQQQQQQQQQQ" in line for line in lines)
    assert any("processed (prior changed): 5/1, 5/2" in line for line in lines)
    assert any("skipped: 1 partitions" in line for line in lines)
    assert any("FAILED 5/4: cannot read partition" in line for line in lines)
    assert "no run ledger" in describe_runs(str(tmp_path / "nothing"))


def test_an_interrupted_run_lists_what_it_committed_not_what_it_planned(tmp_path):
    """Issue 28: a run killed after one of its three partitions was listed "0 objects" and
    "processed: all three"; its partition records say what it really did."""
    out = str(tmp_path / "out")
    ledger = Ledger(out)
    run = RunRecord(
        "20260103T000000Z-c", "t3", "cat", "demo", "P" * 64, "C" * 64, "0.1.0",
        processed={"5/1": NEW, "5/2": NEW, "5/3": NEW},
    )  # fmt: skip
    ledger.write_run(run)
    ledger.write_partition(
        PartitionRecord(5, 1, run.run_id, OK, "f", "P" * 64, "C" * 64, rows=4, n_ok=4,
                        reason=NEW, seconds=12.0)
    )  # fmt: skip
    ledger.write_partition(
        PartitionRecord(5, 2, run.run_id, FAILED, "f", "P" * 64, "C" * 64, reason=NEW,
                        message="commit failed: disk full")
    )  # fmt: skip
    lines = describe_runs(out).splitlines()
    assert "interrupted (no end record)" in lines[0]
    assert "4 objects committed in 1 of 3 partitions planned" in lines[0]
    assert "12 s to its last commit" in lines[0]
    assert "    committed (new partition): 5/1" in lines
    assert "    FAILED 5/2: commit failed: disk full" in lines
    assert "    planned, not committed (the next run does them): 5/3" in lines
    assert not any("processed" in line for line in lines)


def test_partition_names_parse():
    assert parse_pixel(" 7/123 ") == HealpixPixel(7, 123)
    with pytest.raises(ValueError, match="ORDER/PIXEL"):
        parse_pixel("7-123")


def test_a_ledger_written_before_healpixpixel_keys_still_plans(tmp_path):
    """Records on disk keep their JSON form (order, pixel ints; "k/p" names in runs)."""
    import json

    old = {"order": 5, "pixel": 1, "run_id": "20250101T000000Z-old", "status": "ok",
           "fingerprint": "fp", "prior_hash": "P", "config_hash": "C", "rows": 3, "n_ok": 3,
           "n_error": 0, "n_flagged": 0, "reason": "new partition", "message": "",
           "seconds": 1.0, "committed_utc": "2025-01-01T00:00:00+00:00"}  # fmt: skip
    folder = tmp_path / "out" / "_d4a_ledger" / "partitions" / old["run_id"]
    folder.mkdir(parents=True)
    (folder / "5-1.json").write_text(json.dumps(old))
    state = Ledger(str(tmp_path / "out")).state()
    assert list(state) == [HealpixPixel(5, 1)]
    todo, done = plan(state, {HealpixPixel(5, 1): "fp", HealpixPixel(5, 2): "x"}, "P", "C")
    assert done == [HealpixPixel(5, 1)] and todo == {HealpixPixel(5, 2): NEW}
    assert pixel_name(HealpixPixel(5, 1)) == "5/1" and parse_pixel("5/1") == HealpixPixel(5, 1)
