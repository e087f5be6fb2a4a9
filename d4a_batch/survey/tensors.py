"""numpy <-> Arrow ``fixed_shape_tensor`` columns (the canonical Arrow extension type).

Readers without Arrow's extension types (pandas) see each cell as a flat array;
the shape is in the column type (``pyarrow.parquet.read_schema(f).field(name).type.shape``),
so ``np.stack(df[name]).reshape(-1, *shape)`` restores the tensors.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def tensor_array(arr: np.ndarray) -> pa.ExtensionArray:
    """``arr[n, *shape]`` -> an n-row fixed_shape_tensor array (n may be 0)."""
    arr = np.ascontiguousarray(arr)
    shape = [int(s) for s in arr.shape[1:]]
    storage = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), int(np.prod(shape)))
    return pa.ExtensionArray.from_storage(
        pa.fixed_shape_tensor(pa.from_numpy_dtype(arr.dtype), shape), storage
    )


def tensor_type(dtype: np.dtype | type, shape: tuple[int, ...]) -> pa.DataType:
    """The fixed_shape_tensor type of ``shape`` cells of ``dtype``."""
    return pa.fixed_shape_tensor(pa.from_numpy_dtype(np.dtype(dtype)), [int(s) for s in shape])


def tensor_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_shape_tensor column -> ``[n, *shape]`` numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.to_numpy_ndarray()
