"""The stage functions of the survey graph: each maps one batch to the next (no Ray here).

    read_partitions  {order, pixel, uri, limit, repeats} items -> input rows (engine column
                     names) with ``DUPLICATE`` (why a row is not processed; null: it is)
    stage_rows       input rows -> pack rows (``survey.packs.PACK_ROW_SCHEMA``)
    read_packs       {uri} items of staged Parquet files -> pack rows
    (sample          pack rows -> output rows: ``pipeline.actors.DeconvolveActor``)
    write_results    output rows -> per-partition result chunks -> chunk counts

``engine.py`` wires them into Ray Data operators; tests call them directly.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from d4a_batch.schema import Col
from d4a_batch.survey.hats_io import ORDER, PIXEL, Partition, read_partition
from d4a_batch.survey.output import OutputSpec, write_chunks, write_fits_maps
from d4a_batch.survey.packs import PACK_ROW_SCHEMA, pack_rows_table
from d4a_batch.survey.staging import Stager, unstaged
from d4a_batch.survey.storage import filesystem

DUPLICATE = "_d4a_duplicate"  # read -> stage: why a row is not processed (a repeated object_id)
# the chunk counts a write task returns (one row per partition of its batch)
CHUNK_SCHEMA = pa.schema(
    [
        (ORDER, pa.int64()),
        (PIXEL, pa.int64()),
        ("n", pa.int64()),
        ("n_ok", pa.int64()),
        ("n_error", pa.int64()),
        ("n_flagged", pa.int64()),
    ]
)


def read_partitions(
    batch: dict[str, Any],
    columns,
    bands: tuple[str, ...],
    healpix_column: str,
    storage_options: dict[str, Any] | None = None,
) -> pa.Table:
    """Rows of the partitions in ``batch`` (``order``, ``pixel``, ``uri``, ``limit`` lists;
    limit < 0: all rows; optional ``repeats``: ``repeats_json`` of the rows whose object_id
    an earlier partition holds), each with its ``DUPLICATE`` reason."""
    tables = []
    repeats = batch.get("repeats")
    for n, (order, pixel, uri, limit) in enumerate(
        zip(batch["order"], batch["pixel"], batch["uri"], batch["limit"])
    ):
        part = Partition(int(order), int(pixel), str(uri))
        t = read_partition(part, columns, bands, healpix_column, storage_options)
        t = t.slice(0, int(limit)) if limit >= 0 else t
        elsewhere = {} if repeats is None else parse_repeats(str(repeats[n]))
        tables.append(mark_duplicates(t, elsewhere))
    return pa.concat_tables(tables)


def repeats_json(repeats: dict[int, str]) -> str:
    """A partition's repeated rows ({row: why}) as the read items carry them."""
    return json.dumps({str(k): v for k, v in sorted(repeats.items())})


def parse_repeats(text: str) -> dict[int, str]:
    return {int(k): v for k, v in json.loads(text or "{}").items()}


def mark_duplicates(table: pa.Table, elsewhere: dict[int, str] | None = None) -> pa.Table:
    """``table`` with ``DUPLICATE``: null, or why the row is not processed (its object_id
    came earlier in the table, or in another partition: ``elsewhere``, {row: why}).

    HATS partitions by position, so repeats of an object at one position land in the
    same partition; an id repeated at another position is in another partition
    (``fingerprint.find_repeats`` finds those before the run).
    """
    elsewhere = elsewhere or {}
    first: dict[int, int] = {}
    out: list[str | None] = []
    for i, oid in enumerate(table[Col.OBJECT_ID].to_pylist()):
        if i in elsewhere:
            out.append(elsewhere[i])
        elif oid in first:
            out.append(
                f"duplicate object_id {oid}: input row {i} of this partition repeats row "
                f"{first[oid]}, which was processed; this row was not"
            )
        else:
            first[oid] = i
            out.append(None)
    return table.append_column(DUPLICATE, pa.array(out, pa.string()))


def stage_rows(batch: pa.Table, stager: Stager, pack_size: int, threads: int) -> pa.Table:
    """Input rows (with ``DUPLICATE``) -> pack rows; every row ends in exactly one pack."""
    rows = batch.to_pylist()
    reasons = [r.pop(DUPLICATE) for r in rows]
    staged = iter(stager.stage_rows([r for r, d in zip(rows, reasons) if d is None], threads))
    c = len(stager.prior.bands)
    objs = [next(staged) if d is None else unstaged(r, c, d) for r, d in zip(rows, reasons)]
    return pack_rows_table(objs, pack_size)


def read_packs(batch: dict[str, Any], storage_options: dict[str, Any] | None = None) -> pa.Table:
    """The pack rows of the staged Parquet files in ``batch["uri"]``."""
    tables = []
    for uri in batch["uri"]:
        fs, path = filesystem(str(uri), storage_options)
        tables.append(pq.read_table(path, filesystem=fs, schema=PACK_ROW_SCHEMA))
    return pa.concat_tables(tables)


def write_results(
    batch: pa.Table,
    work_root: str,
    output_root: str,
    spec: OutputSpec,
    keep_maps: bool,
    fits_maps: bool,
    zeropoint: float,
    storage_options: dict[str, Any] | None = None,
) -> pa.Table:
    """Output rows -> result chunks under ``work_root`` (+ FITS maps) -> ``CHUNK_SCHEMA`` rows."""
    if fits_maps:
        write_fits_maps(batch, output_root, spec, zeropoint, storage_options)
    if not keep_maps:
        batch = batch.drop_columns([n for n in spec.map_shapes() if n in batch.column_names])
    return pa.Table.from_pylist(write_chunks(batch, work_root, storage_options), CHUNK_SCHEMA)
