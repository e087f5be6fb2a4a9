"""An input catalog from your own files: a table of objects -> a HATS catalog the engine reads.

Longer than 400 lines: one concern, the ``d4a-make-catalog`` command: the input table's
formats and columns (documented at length below, for users), the per-row checks that
report every broken row, the HATS write and the command line. The checks (~100 lines) are
the column rules the docstring states; a split would separate the user documentation from
the code that enforces it.

``python jobs/make_catalog.py TABLE --output DIR`` (entry point ``d4a-make-catalog``).

TABLE is a CSV, Parquet or FITS table (by extension, or ``--format``) with one row per
object and these columns (other names: ``--id-column``, ``--ra-column``, ...):

- ``object_id`` (integer, unique, a signed 64-bit integer), ``ra``, ``dec`` (degrees, ICRS).
  Ids are read exactly as written and never pass through a float (a 17-digit HSC id does
  not fit a float's 53 bits): from CSV as text, from Parquet / FITS as stored; an empty,
  fractional or non-numeric id, one beyond int64 (e.g. 2**64 - 1) or a float id above 2**53
  (perhaps rounded already) is that row's problem;
- the redshift: ``photoz`` or ``z`` (the first present; ``photoz_best`` too), finite, > 0;
- optional ``photoz_err68_min``, ``photoz_err68_max``: the 68 % interval *bounds*, i.e. the
  16th and 84th percentile redshifts as HSC PDR3 gives them (not widths). Used only when
  the sampler marginalises over the photo-z; missing or NaN bounds leave z fixed. Finite
  bounds must satisfy min <= z <= max (bounds that are not: "looks like widths");
- per band (``--bands``, default g,r,i) ``{band}_cutout`` and ``{band}_psf``: an HSC
  cutout-service FITS file (IMAGE, MASK, VARIANCE; "image only" files are accepted) and a
  PSF-picker FITS file, as a local path (absolute, or relative to the table's folder) or
  a URL (``s3://...``, any fsspec protocol; ``--storage-options`` for credentials).

Every row is checked (every file must exist) and *all* problems are reported, one line
per broken row: ``row 3 (object_id 1042): g_cutout: /data/g/1042.fits not found; ...``
(rows are numbered from 1, the header not counted). With broken rows nothing is written
and the command exits 1, unless ``--skip-broken``: then the good rows are written and the
broken ones listed. A missing column or an unreadable table exits 2.

The catalog is written through lsdb (``lsdb.from_dataframe(...).write_catalog``) with the
engine's default column names (``config.ColumnMap``): object_id, ra, dec, photoz_best,
photoz_err68_min, photoz_err68_max, {band}_cutout_uri, {band}_psf_uri; local paths are
written absolute, URLs as given. ``--keep`` copies other columns along.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from d4a_batch.config import ColumnMap

Z_CANDIDATES = ("photoz", "z", "photoz_best")
FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".fits": "fits",
           ".fit": "fits", ".fits.gz": "fits"}  # fmt: skip
EXIT_OK, EXIT_BROKEN, EXIT_TABLE = 0, 1, 2
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT_EXACT_MAX = 2**53  # a float holds every integer up to this, and not every one beyond


class TableError(ValueError):
    """The table as a whole cannot be used (unreadable, missing columns)."""


@dataclass(frozen=True)
class InputColumns:
    """Column names in the user's table (``{band}`` is replaced by each band)."""

    object_id: str = "object_id"
    ra: str = "ra"
    dec: str = "dec"
    z: str | None = None  # None: the first of Z_CANDIDATES present
    z_min: str = "photoz_err68_min"
    z_max: str = "photoz_err68_max"
    cutout: str = "{band}_cutout"
    psf: str = "{band}_psf"


@dataclass
class CatalogReport:
    """What ``make_catalog`` did: rows read and written, and each broken row's problems."""

    n_rows: int
    n_written: int = 0
    problems: dict[int, list[str]] = field(default_factory=dict)  # 0-based row -> reasons
    object_ids: dict[int, Any] = field(default_factory=dict)  # 0-based row -> its object_id

    def lines(self) -> list[str]:
        """One line per broken row: ``row N (object_id X): reason; reason``."""
        out = []
        for i in sorted(self.problems):
            oid = self.object_ids.get(i)
            ident = f" (object_id {oid})" if oid is not None else ""
            out.append(f"row {i + 1}{ident}: " + "; ".join(self.problems[i]))
        return out


# --------------------------------------------------------------------------- reading
def table_format(path: str, fmt: str | None = None) -> str:
    if fmt:
        return fmt
    name = path.lower()
    for ext, f in sorted(FORMATS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(ext):
            return f
    raise TableError(f"{path}: unknown table format (use --format csv|parquet|fits)")


def read_table(path: str, fmt: str | None = None, id_column: str = "object_id") -> pd.DataFrame:
    """A CSV, Parquet or FITS table as a DataFrame (FITS byte strings decoded).

    ``id_column`` never passes through a float: CSV reads it as text, Parquet integer
    columns with nulls become Python ints (not float64, pandas' default), FITS keeps them
    integer (``check_rows`` parses them exactly).
    """
    kind = table_format(path, fmt)
    try:
        if kind == "csv":
            return pd.read_csv(path, dtype={id_column: str})
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pandas(integer_object_nulls=True)
        if kind == "fits":
            from astropy.table import Table

            t = Table.read(path)
            scalar = [c for c in t.colnames if t[c].ndim == 1]
            df = t[scalar].to_pandas()
            for c in df.columns:
                if df[c].dtype == object:
                    df[c] = [v.decode() if isinstance(v, bytes) else v for v in df[c]]
            return df
    except FileNotFoundError as e:
        raise TableError(f"{path}: table not found") from e
    except Exception as e:
        raise TableError(f"{path}: cannot read the {kind} table ({type(e).__name__}: {e})") from e
    raise TableError(f"{path}: unknown table format {kind!r} (csv|parquet|fits)")


# --------------------------------------------------------------------------- checks
def _is_url(value: str) -> bool:
    return "://" in value


def resolve_path(value: str, table_dir: Path) -> str:
    """A URL as given; a local path absolute (relative ones from the table's folder)."""
    if _is_url(value):
        return value
    p = Path(value).expanduser()
    return str((p if p.is_absolute() else table_dir / p).resolve())


def _exists(uri: str, storage_options: dict[str, Any]) -> bool:
    if not _is_url(uri):
        return os.path.isfile(uri)
    fs, path = fsspec.core.url_to_fs(uri, **storage_options.get(uri.split("://")[0], {}))
    return bool(fs.exists(path))


def _empty(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, float | np.floating):
        return math.isnan(value)
    return isinstance(value, str) and value.strip() == ""


def object_id(value: Any) -> tuple[int | None, str | None]:
    """``(id, None)``: ``value`` as an exact signed 64-bit integer; ``(None, why)`` when it is
    not one. Text is parsed exactly (``"43158176547848941"``, also ``"12.0"``, ``"1e3"``)."""
    if _empty(value):
        return None, "is empty"
    if isinstance(value, bool | np.bool_):
        return None, f"{value!r} is not an integer"
    if isinstance(value, int | np.integer):
        v = int(value)
    elif isinstance(value, float | np.floating):
        if not math.isfinite(value) or value != math.floor(value):
            return None, f"{value!r} is not an integer"
        if abs(value) > FLOAT_EXACT_MAX:
            return None, (
                f"{value!r} is a float beyond 2**53, which may already be rounded (a float "
                "holds 53 bits): store object ids as integers"
            )
        v = int(value)
    else:
        text = value.decode() if isinstance(value, bytes) else str(value)
        try:
            d = Decimal(text.strip())
        except InvalidOperation:
            return None, f"{value!r} is not an integer"
        if not d.is_finite() or d != d.to_integral_value():
            return None, f"{value!r} is not an integer"
        v = int(d)
    if not INT64_MIN <= v <= INT64_MAX:
        return None, f"{v} does not fit a signed 64-bit integer (-2**63 .. 2**63 - 1)"
    return v, None


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def check_rows(
    df: pd.DataFrame,
    cols: InputColumns,
    bands: tuple[str, ...],
    table_dir: Path,
    storage_options: dict[str, Any] | None = None,
) -> tuple[pd.DataFrame, CatalogReport]:
    """The engine's catalog table (``ColumnMap`` names) and every row's problems.

    Raises ``TableError`` naming every missing column.
    """
    so = storage_options or {}
    z_col = cols.z or next((c for c in Z_CANDIDATES if c in df.columns), None)
    required = [cols.object_id, cols.ra, cols.dec]
    required += [c.format(band=b) for b in bands for c in (cols.cutout, cols.psf)]
    missing = [c for c in required if c not in df.columns]
    if z_col is None or z_col not in df.columns:
        missing.append(z_col or " or ".join(Z_CANDIDATES))
    if missing:
        raise TableError(
            f"the table lacks columns {', '.join(missing)} (has: {', '.join(map(str, df.columns))});"
            " map other names with --id-column, --ra-column, --dec-column, --z-column,"
            " --cutout-column, --psf-column"
        )
    n = len(df)
    report = CatalogReport(n_rows=n)
    problems: dict[int, list[str]] = defaultdict(list)
    out = ColumnMap()
    data: dict[str, list[Any]] = defaultdict(list)
    # object ids: exact int64 (never through a float), unique
    ids: list[int | None] = []
    for i, v in enumerate(df[cols.object_id].tolist()):
        oid, why = object_id(v)
        if why is not None:
            problems[i].append(f"{cols.object_id} {why}")
        else:
            report.object_ids[i] = oid
        ids.append(oid)
    rows_of: dict[int, list[int]] = defaultdict(list)
    for i, oid in enumerate(ids):
        if oid is not None:
            rows_of[oid].append(i)
    for oid, rows in rows_of.items():
        if len(rows) > 1:
            for i in rows:
                others = ", ".join(str(j + 1) for j in rows if j != i)
                problems[i].append(f"duplicate {cols.object_id} {oid} (also row {others})")
    # coordinates and redshift
    ra = df[cols.ra].map(_float).to_numpy(np.float64)
    dec = df[cols.dec].map(_float).to_numpy(np.float64)
    z = df[z_col].map(_float).to_numpy(np.float64)
    has_lo, has_hi = cols.z_min in df.columns, cols.z_max in df.columns
    lo = df[cols.z_min].map(_float).to_numpy(np.float64) if has_lo else np.full(n, np.nan)
    hi = df[cols.z_max].map(_float).to_numpy(np.float64) if has_hi else np.full(n, np.nan)
    for i in range(n):
        if not (math.isfinite(ra[i]) and -360.0 <= ra[i] <= 360.0):
            problems[i].append(f"{cols.ra} {ra[i]:g} is not a finite angle in degrees")
        if not (math.isfinite(dec[i]) and -90.0 <= dec[i] <= 90.0):
            problems[i].append(f"{cols.dec} {dec[i]:g} is not in [-90, 90] degrees")
        if not (math.isfinite(z[i]) and z[i] > 0):
            problems[i].append(f"{z_col} {z[i]:g} is not a positive redshift")
        elif math.isfinite(lo[i]) and math.isfinite(hi[i]) and not lo[i] <= z[i] <= hi[i]:
            problems[i].append(
                f"{cols.z_min}/{cols.z_max} ({lo[i]:g}, {hi[i]:g}) do not bracket {z_col} "
                f"{z[i]:g}: they must be the 68 % interval bounds (16th/84th percentile "
                "redshifts), not widths"
            )
    # files
    for b in bands:
        for template, target in ((cols.cutout, out.cutout_uri), (cols.psf, out.psf_uri)):
            src = template.format(band=b)
            uris = []
            for i, v in enumerate(df[src].tolist()):
                if _empty(v):
                    problems[i].append(f"{src}: empty")
                    uris.append(None)
                    continue
                uri = resolve_path(str(v), table_dir)
                try:
                    found = _exists(uri, so)
                except Exception as e:  # bad URL, no credentials, ...
                    problems[i].append(f"{src}: cannot check {uri} ({type(e).__name__}: {e})")
                else:
                    if not found:
                        problems[i].append(f"{src}: {uri} not found")
                uris.append(uri)
            data[target.format(band=b)] = uris
    report.problems = dict(problems)
    table = pd.DataFrame(
        {
            out.object_id: pd.array([0 if v is None else v for v in ids], dtype="int64"),
            out.ra: ra,
            out.dec: dec,
            out.photoz: z,
            out.photoz_err_min: lo,
            out.photoz_err_max: hi,
            **data,
        },
        index=df.index,
    )
    return table, report


# --------------------------------------------------------------------------- writing
def make_catalog(
    table_path: str,
    output: str,
    *,
    cols: InputColumns = InputColumns(),
    bands: tuple[str, ...] = ("g", "r", "i"),
    name: str | None = None,
    skip_broken: bool = False,
    keep: tuple[str, ...] = (),
    fmt: str | None = None,
    partition_rows: int | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> CatalogReport:
    """Check ``table_path`` and write its rows as a HATS catalog at ``output`` (see module doc).

    Returns the report; with broken rows and not ``skip_broken`` nothing is written
    (``n_written == 0``). Raises ``TableError`` for an unusable table.
    """
    import lsdb  # heavy import, only when writing

    df = read_table(table_path, fmt, cols.object_id)
    if len(df) == 0:
        raise TableError(f"{table_path}: the table has no rows")
    absent = [c for c in keep if c not in df.columns]
    if absent:
        raise TableError(f"--keep: the table lacks columns {', '.join(absent)}")
    table, report = check_rows(
        df, cols, tuple(bands), Path(table_path).resolve().parent, storage_options
    )
    for c in keep:
        if c not in table.columns:
            table[c] = df[c].to_numpy()
    if report.problems and not skip_broken:
        return report
    good = table.drop(index=table.index[sorted(report.problems)]).reset_index(drop=True)
    if len(good) == 0:
        return report
    catalog = lsdb.from_dataframe(
        good,
        ra_column=ColumnMap().ra,
        dec_column=ColumnMap().dec,
        catalog_name=name or Path(output).name,
        margin_threshold=None,
        partition_rows=partition_rows,
    )
    catalog.write_catalog(output, as_collection=False, overwrite=overwrite, progress_bar=False)
    report.n_written = len(good)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="d4a-make-catalog",
        description="Make a HATS input catalog for d4a-batch from a table of your own files "
        "(CSV, Parquet or FITS: object_id, ra, dec, photoz or z, optional "
        "photoz_err68_min/max as 68%% interval bounds, {band}_cutout, {band}_psf).",
    )
    p.add_argument("table", help="CSV, Parquet or FITS table, one row per object")
    p.add_argument("--output", required=True, help="folder of the HATS catalog to write")
    p.add_argument("--bands", default="g,r,i", help="comma-separated bands (default g,r,i)")
    p.add_argument("--name", default=None, help="catalog name (default: the output folder's)")
    p.add_argument("--format", choices=("csv", "parquet", "fits"), default=None)
    p.add_argument("--id-column", default="object_id")
    p.add_argument("--ra-column", default="ra")
    p.add_argument("--dec-column", default="dec")
    p.add_argument("--z-column", default=None, help="default: photoz, z or photoz_best")
    p.add_argument("--z-min-column", default="photoz_err68_min", help="16th percentile z")
    p.add_argument("--z-max-column", default="photoz_err68_max", help="84th percentile z")
    p.add_argument("--cutout-column", default="{band}_cutout", help="template with {band}")
    p.add_argument("--psf-column", default="{band}_psf", help="template with {band}")
    p.add_argument("--keep", default="", help="comma-separated extra columns to copy along")
    p.add_argument(
        "--skip-broken",
        action="store_true",
        help="write the good rows and list the broken ones (default: write nothing, exit 1)",
    )
    p.add_argument("--partition-rows", type=int, default=None, help="rows per HATS partition")
    p.add_argument("--overwrite", action="store_true", help="replace an existing catalog")
    p.add_argument(
        "--storage-options",
        default="{}",
        help='JSON {protocol: fsspec options} for URL checks, e.g. {"s3": {"anon": true}}',
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cols = InputColumns(
        object_id=args.id_column,
        ra=args.ra_column,
        dec=args.dec_column,
        z=args.z_column,
        z_min=args.z_min_column,
        z_max=args.z_max_column,
        cutout=args.cutout_column,
        psf=args.psf_column,
    )
    try:
        report = make_catalog(
            args.table,
            args.output,
            cols=cols,
            bands=tuple(b.strip() for b in args.bands.split(",") if b.strip()),
            name=args.name,
            skip_broken=args.skip_broken,
            keep=tuple(c.strip() for c in args.keep.split(",") if c.strip()),
            fmt=args.format,
            partition_rows=args.partition_rows,
            overwrite=args.overwrite,
            storage_options=json.loads(args.storage_options),
        )
    except TableError as e:
        print(f"make_catalog: {e}", file=sys.stderr)
        return EXIT_TABLE
    except json.JSONDecodeError as e:
        print(f"make_catalog: --storage-options is not valid JSON ({e})", file=sys.stderr)
        return EXIT_TABLE
    lines = report.lines()
    if lines:
        verb = "skipped" if args.skip_broken else "broken"
        print(f"{len(lines)} of {report.n_rows} rows {verb}:", file=sys.stderr)
        for line in lines:
            print(f"  {line}", file=sys.stderr)
    if report.n_written:
        print(f"wrote {report.n_written} objects to the HATS catalog {args.output}")
        return EXIT_OK
    if lines and not args.skip_broken:
        print("nothing written (fix the rows above, or pass --skip-broken)", file=sys.stderr)
    else:
        print("nothing written: no usable row", file=sys.stderr)
    return EXIT_BROKEN


if __name__ == "__main__":
    sys.exit(main())
