from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from d4a_batch.survey.tensors import tensor_array, tensor_numpy, tensor_type


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8, np.float64])
def test_tensor_columns_round_trip_through_parquet_and_pandas(tmp_path, dtype):
    arr = (np.arange(4 * 3 * 5 * 2) % 251).reshape(4, 3, 5, 2).astype(dtype)
    table = pa.table({"id": np.arange(4), "m": tensor_array(arr)})
    assert table.schema.field("m").type == tensor_type(dtype, (3, 5, 2))
    pq.write_table(table, tmp_path / "t.parquet")
    back = pq.read_table(tmp_path / "t.parquet")
    np.testing.assert_array_equal(tensor_numpy(back["m"]), arr)
    # pandas: flat cells, reshaped with the shape stored in the column type
    shape = pq.read_schema(tmp_path / "t.parquet").field("m").type.shape
    df = pd.read_parquet(tmp_path / "t.parquet")
    np.testing.assert_array_equal(np.stack(df["m"]).reshape(-1, *shape), arr)


def test_empty_and_chunked_tensor_columns():
    empty = tensor_array(np.zeros((0, 2, 3), np.float32))
    assert len(empty) == 0 and tensor_numpy(empty).shape == (0, 2, 3)
    a = np.ones((2, 2, 3), np.float32)
    chunked = pa.chunked_array([tensor_array(a), tensor_array(2 * a)])
    np.testing.assert_array_equal(tensor_numpy(chunked), np.concatenate([a, 2 * a]))
