"""validation.planning: the benchmark's file pool and HATS catalog, its table, its sizes."""

from __future__ import annotations

import pyarrow.parquet as pq

from d4a_batch.schema import LEDGER_DIR, Col
from d4a_batch.survey.hats_io import open_input_catalog
from d4a_batch.validation.planning import (
    BANDS,
    build_catalog,
    build_files,
    ledger_bytes,
    peak_rss_kb,
    results_table,
)


def test_the_catalog_points_into_the_shared_file_pool(tmp_path):
    build_files(str(tmp_path / "files"), 2)
    assert len(list((tmp_path / "files").rglob("*.fits"))) == 2 * 2 * len(BANDS)
    parts = build_catalog(tmp_path / "cat", 40, str(tmp_path / "files"), 2)
    cat = open_input_catalog(str(tmp_path / "cat"))
    assert parts == len(cat.partitions) >= 1
    rows = [r for p in cat.partitions for r in pq.read_table(p.uri).to_pylist()]
    assert len(rows) == 40 and len({r[Col.OBJECT_ID] for r in rows}) == 40
    uris = {r[f"{b}_{k}_uri"] for r in rows for b in BANDS for k in ("cutout", "psf")}
    assert all((tmp_path / "files").as_posix() in u and u.endswith(".fits") for u in uris)
    (tmp_path / "out" / LEDGER_DIR).mkdir(parents=True)
    (tmp_path / "out" / LEDGER_DIR / "run.json").write_text("x" * 10)
    assert ledger_bytes(str(tmp_path / "out"), None) == 10 and peak_rss_kb() > 0


def test_the_table_has_a_line_per_result_and_a_dash_without_requests():
    row = {"storage": "local", "catalog_rows": 10, "partitions": 2, "seconds": 1.0,
           "driver_peak_mb": 100.0, "driver_growth_mb": 5.0, "ledger_bytes": 2048}  # fmt: skip
    text = results_table([row, {**row, "storage": "s3", "requests": 8}])
    lines = text.splitlines()
    assert len(lines) == 3 and lines[0].split()[:2] == ["storage", "rows"]
    assert lines[1].split()[4:6] == ["-", "-"] and lines[2].split()[4:6] == ["8", "4.00"]
