"""``d4a_batch.cli.compare`` on catalogs written the way the engine writes them (Parquet with
``fixed_shape_tensor`` maps)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from d4a_batch.cli.compare import compare, main, read_catalog
from d4a_batch.schema import Col
from d4a_batch.survey.tensors import tensor_array


def _write(root, ids, r50, maps, status, run_id):
    (root / "dataset").mkdir(parents=True)
    table = pa.table({
        Col.OBJECT_ID: pa.array(ids, pa.int64()),
        Col.STATUS: status,
        Col.FLAGS: pa.array([0] * len(ids), pa.int64()),
        Col.R50_KPC: pa.array(r50, pa.float64()),
        Col.MEAN_FLUX: tensor_array(np.asarray(maps, np.float32)),
        Col.RUN_ID: [run_id] * len(ids),
        Col.MESSAGE: pa.array([None] * len(ids), pa.string()),
    })  # fmt: skip
    pq.write_table(table, root / "dataset" / "part0.parquet")


def test_identical_catalogs_differ_only_in_their_run_columns(tmp_path):
    maps = np.arange(3 * 2 * 4 * 4, dtype=np.float32).reshape(3, 2, 4, 4)
    _write(tmp_path / "a", [3, 1, 2], [1.0, np.nan, 2.0], maps, ["ok"] * 3, "r1")
    _write(tmp_path / "b", [1, 2, 3], [np.nan, 2.0, 1.0], maps[[1, 2, 0]], ["ok"] * 3, "r2")
    diff = compare(read_catalog(tmp_path / "a"), read_catalog(tmp_path / "b"))
    assert all(c["n_different"] == 0 for c in diff["columns"].values())
    assert diff["run_columns"] == [Col.RUN_ID]
    assert not diff["status_or_flags_changed"] and not diff["only_in_first"]


def test_changes_are_found_and_sized(tmp_path, capsys):
    maps = np.ones((3, 1, 4, 4), np.float32)
    changed = maps.copy()
    changed[2, 0, 1, 1] += 1e-3
    _write(tmp_path / "a", [1, 2, 3], [1.0, 2.0, 3.0], maps, ["ok"] * 3, "r1")
    _write(tmp_path / "b", [1, 2, 4], [1.0, np.nan, 3.0], changed, ["ok", "error", "ok"], "r1")
    diff = compare(read_catalog(tmp_path / "a"), read_catalog(tmp_path / "b"))
    assert diff["only_in_first"] == [3] and diff["only_in_second"] == [4]
    # shared objects 1, 2: r50 NaN on one side, status changed; the map change is on object 4
    assert diff["columns"][Col.R50_KPC]["n_different"] == 1
    assert diff["columns"][Col.R50_KPC]["max_abs"] == np.inf
    assert diff["columns"][Col.MEAN_FLUX]["n_different"] == 0
    assert diff["status_or_flags_changed"] == [
        {"object_id": 2, "column": Col.STATUS, "first": "ok", "second": "error"}
    ]
    _write(tmp_path / "c", [1, 2, 3], [1.0, 2.0, 3.0], changed, ["ok"] * 3, "r1")
    assert main([str(tmp_path / "a"), str(tmp_path / "c"), "--json", str(tmp_path / "d.json")]) == 0
    doc = json.loads((tmp_path / "d.json").read_text())
    assert doc["columns"][Col.MEAN_FLUX]["n_different"] == 1
    assert abs(doc["columns"][Col.MEAN_FLUX]["max_abs"] - 1e-3) < 1e-6
    assert "mean_flux: 1 objects" in capsys.readouterr().out
    # a text column that differs is listed without sizes
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "status: 1 objects\n" in capsys.readouterr().out
