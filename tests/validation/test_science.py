"""validation.science: the cached sampled pack round trip (calibration and paired comparisons)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from d4a_batch.schema import Col
from d4a_batch.validation.science import read_sampled_pack, save_sampled_pack


def test_a_sampled_pack_reads_back_as_it_was_saved(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.array([7, 3], dtype=np.int64)
    arrays = {
        Col.OBJECT_ID: ids,
        "image": rng.normal(size=(2, 3, 8, 8)).astype(np.float32),
        "names": np.array(["a", None], dtype=object),  # object arrays are not cached
    }
    rows = pd.DataFrame({Col.OBJECT_ID: ids, Col.CHI2: [1.25, np.nan], "note": ["x", "y"]})
    maps = {Col.SAMPLES_X: rng.normal(size=(2, 4, 3, 6, 6)).astype(np.float32)}
    truth = {
        3: {"truth": np.full((3, 6, 6), 3.0), "z_true": 0.5, "i_mag_true": 21.0},
        7: {"truth": np.full((3, 6, 6), 7.0), "z_true": 0.25, "i_mag_true": 18.5},
        99: {"truth": np.zeros((3, 6, 6)), "z_true": 1.0, "i_mag_true": 24.0},  # not in the pack
    }
    path = tmp_path / "calib_000_0.npz"
    save_sampled_pack(path, arrays, rows, maps, truth)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib_000_0.npz"]  # no temp file left

    a, r, m, t = read_sampled_pack(path)
    assert set(a) == {Col.OBJECT_ID, "image"}
    np.testing.assert_array_equal(a[Col.OBJECT_ID], ids)
    np.testing.assert_array_equal(a["image"], arrays["image"])
    np.testing.assert_array_equal(m[Col.SAMPLES_X], maps[Col.SAMPLES_X])
    assert list(r[Col.OBJECT_ID]) == [7, 3]
    assert r[Col.CHI2].iloc[0] == 1.25 and np.isnan(r[Col.CHI2].iloc[1])
    assert list(t) == [7, 3]  # the pack's objects, in its order
    for oid in (3, 7):
        np.testing.assert_array_equal(t[oid]["truth"], truth[oid]["truth"])
        assert t[oid]["z_true"] == truth[oid]["z_true"]
        assert t[oid]["i_mag_true"] == truth[oid]["i_mag_true"]
