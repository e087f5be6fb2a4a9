"""Compare two output catalogs object by object: what a re-run or a code change changed.

    python jobs/compare_catalogs.py catalogs/out/before catalogs/out/after [--json diff.json]

Reads both catalogs' rows (``<catalog>/dataset``, pandas), joins them on ``object_id`` and
reports: objects only in one; columns only in one; per shared column the number of objects
whose value differs and, for numbers and image maps, the largest absolute difference and
the largest difference relative to the column's scale (its largest |value| in the first
catalog); objects whose status or flags changed. Two runs of the same code on the same
input and seed must show no difference; a change that keeps the answers shows differences
at float rounding only (relative ≲ 1e-5 for float32 maps).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import pandas as pd

from d4a_batch.schema import Col

# columns that record which run wrote a row and when, not what it found (reported apart)
RUN_COLUMNS = (Col.RUN_ID, Col.CODE_VERSION, Col.CREATED)


def read_catalog(root: str, storage_options: dict | None = None) -> pd.DataFrame:
    """The rows of an output catalog, indexed by object id."""
    df = pd.read_parquet(f"{str(root).rstrip('/')}/dataset", storage_options=storage_options)
    return df.set_index(Col.OBJECT_ID).sort_index()


def _as_array(values: pd.Series) -> np.ndarray | None:
    """A numeric column as float64 [n, ...] (image maps stacked), None if not numeric."""
    v = values.to_numpy()
    if v.dtype.kind in "biuf":
        return v.astype(np.float64)
    if v.dtype == object and len(v) and isinstance(v[0], np.ndarray | list):
        try:
            return np.stack([np.asarray(x, np.float64) for x in v])
        except (TypeError, ValueError):
            return None
    return None


def _text(values: pd.Series) -> np.ndarray:
    """A column as strings, missing values (None, NaN, pandas' NA) as one token."""
    return np.array(["<missing>" if _missing(v) else str(v) for v in values], dtype=object)


def _missing(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):  # arrays: not a missing scalar
        return False


def compare(a: pd.DataFrame, b: pd.DataFrame) -> dict[str, Any]:
    """The differences between catalogs a and b (``read_catalog``; see the module docstring)."""
    shared = a.index.intersection(b.index)
    out: dict[str, Any] = {
        "objects": [len(a), len(b)],
        "only_in_first": [int(i) for i in a.index.difference(b.index)],
        "only_in_second": [int(i) for i in b.index.difference(a.index)],
        "columns_only_in_first": sorted(set(a.columns) - set(b.columns)),
        "columns_only_in_second": sorted(set(b.columns) - set(a.columns)),
        "columns": {},
    }
    a, b = a.loc[shared], b.loc[shared]
    for col in sorted(set(a.columns) & set(b.columns)):
        if col in RUN_COLUMNS:
            out.setdefault("run_columns", []).append(col)
            continue
        xa, xb = _as_array(a[col]), _as_array(b[col])
        if xa is not None and xb is not None and xa.shape == xb.shape:
            both_nan = np.isnan(xa) & np.isnan(xb)
            diff = np.where(both_nan, 0.0, np.abs(xa - xb))
            diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only
            per_obj = diff.reshape(len(shared), -1).max(1) if len(shared) else diff
            scale = np.nanmax(np.abs(xa)) if np.isfinite(xa).any() else 0.0
            out["columns"][col] = {
                "n_different": int((per_obj > 0).sum()),
                "max_abs": float(per_obj.max()) if per_obj.size else 0.0,
                "max_rel": float(per_obj.max() / scale) if per_obj.size and scale > 0 else 0.0,
            }
        else:
            same = _text(a[col]) == _text(b[col])
            out["columns"][col] = {"n_different": int((~same).sum())}
    changed = []
    for col in (Col.STATUS, Col.FLAGS):
        if col in a and col in b:
            for oid in shared[_text(a[col]) != _text(b[col])]:
                changed.append({"object_id": int(oid), "column": col,
                                "first": str(a.at[oid, col]), "second": str(b.at[oid, col])})  # fmt: skip
    out["status_or_flags_changed"] = changed
    return out


def describe(diff: dict[str, Any], show: int = 20) -> str:
    """A few lines for a terminal: the differing columns, largest first."""
    lines = [f"objects: {diff['objects'][0]} and {diff['objects'][1]}; "
             f"only in the first {len(diff['only_in_first'])}, "
             f"only in the second {len(diff['only_in_second'])}"]  # fmt: skip
    for key in ("columns_only_in_first", "columns_only_in_second"):
        if diff[key]:
            lines.append(f"{key.replace('_', ' ')}: {', '.join(diff[key])}")
    cols = diff["columns"]
    differing = sorted((c for c in cols if cols[c]["n_different"]),
                       key=lambda c: -cols[c].get("max_rel", np.inf))  # fmt: skip
    lines.append(f"{len(cols)} shared columns, {len(differing)} with differences")
    for c in differing[:show]:
        d = cols[c]
        nums = ""
        if "max_abs" in d:
            nums = f", max |diff| {d['max_abs']:.3g} ({d['max_rel']:.2g} of the column's scale)"
        lines.append(f"  {c}: {d['n_different']} objects{nums}")
    for ch in diff["status_or_flags_changed"][:show]:
        lines.append(f"  object {ch['object_id']}: {ch['column']} {ch['first']} -> {ch['second']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("first", help="output catalog (path or URL)")
    p.add_argument("second", help="output catalog (path or URL)")
    p.add_argument("--json", help="also write the full comparison here")
    p.add_argument("--storage-options", type=json.loads, help="JSON of fsspec storage options")
    args = p.parse_args(argv)
    diff = compare(read_catalog(args.first, args.storage_options),
                   read_catalog(args.second, args.storage_options))  # fmt: skip
    print(describe(diff))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(diff, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
