"""HATS catalogs: find an input catalog's partitions, read them, finish an output catalog.

Input partitions come from the catalog's own metadata (``hats.read_hats``);
each is one Parquet file (or folder) ``dataset/Norder=k/Dir=d/Npix=p``. Rows
are read with the configured column names (``ColumnMap``) and handed on under
the engine's own names (``INPUT_*`` below), tagged with their partition.

The output catalog is written the way hats' importer writes one: one Parquet
file per partition (same Norder/Npix as the input), then ``_metadata`` /
``_common_metadata``, ``partition_info.csv`` and ``hats.properties``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from d4a_batch import __version__
from d4a_batch.config import ColumnMap
from d4a_batch.schema import Col
from d4a_batch.survey.storage import filesystem, hats_storage_options

if TYPE_CHECKING:
    from hats.pixel_math import HealpixPixel

# ``hats`` is imported inside the functions that use it: importing it costs ~3.5 s of CPU
# (it loads pandas, nested-pandas, mocpy, numba, matplotlib), and the sampling actors and
# staging tasks that import this module for its names and ``read_partition`` never call
# hats; every new Ray worker would pay it (tests/pipeline/test_actors.py checks).

ORDER = "Norder"
PIXEL = "Npix"
# engine-side names of the input columns (output identity columns share d4a_batch.schema.Col)
INPUT_PHOTOZ_LO = "photoz_err68_min"
INPUT_PHOTOZ_HI = "photoz_err68_max"


def cutout_column(band: str) -> str:
    """Engine-side name of a band's cutout URI column."""
    return f"cutout_uri_{band}"


def psf_column(band: str) -> str:
    """Engine-side name of a band's PSF URI column."""
    return f"psf_uri_{band}"


@dataclass(frozen=True)
class Partition:
    """One HATS partition: HEALPix order and pixel, and the URI of its Parquet data."""

    order: int
    pixel: int
    uri: str

    @property
    def healpix(self) -> HealpixPixel:
        from hats.pixel_math import HealpixPixel

        return HealpixPixel(self.order, self.pixel)


@dataclass(frozen=True)
class InputCatalog:
    """What the engine needs of an input HATS catalog."""

    root: str
    name: str
    healpix_column: str
    partitions: tuple[Partition, ...]
    total_rows: int | None = None
    schema: pa.Schema | None = None  # the catalog's (``_common_metadata``), when it has one


def open_input_catalog(uri: str, storage_options: dict[str, Any] | None = None) -> InputCatalog:
    """Read a HATS catalog's metadata (a collection resolves to its main catalog)."""
    import hats
    from hats.io import paths as hats_paths

    cat = hats.read_hats(uri, storage_options=hats_storage_options(uri, storage_options))
    if hasattr(cat, "main_catalog"):
        cat = cat.main_catalog
    info = cat.catalog_info
    base = cat.catalog_base_dir
    parts = tuple(
        Partition(
            int(p.order),
            int(p.pixel),
            str(hats_paths.pixel_catalog_file(base, p, npix_suffix=info.npix_suffix)),
        )
        for p in cat.get_healpix_pixels()
    )
    return InputCatalog(
        root=str(base),
        name=info.catalog_name,
        healpix_column=info.healpix_column or "",
        partitions=parts,
        total_rows=info.total_rows,
        schema=getattr(cat, "schema", None),
    )


def input_column_names(columns: ColumnMap, bands: tuple[str, ...]) -> dict[str, str]:
    """{engine name: catalog column name} of every column the engine reads."""
    names = {
        Col.OBJECT_ID: columns.object_id,
        Col.RA: columns.ra,
        Col.DEC: columns.dec,
        Col.PHOTOZ: columns.photoz,
        INPUT_PHOTOZ_LO: columns.photoz_err_min,
        INPUT_PHOTOZ_HI: columns.photoz_err_max,
    }
    for b in bands:
        names[cutout_column(b)] = columns.cutout_uri.format(band=b)
        names[psf_column(b)] = columns.psf_uri.format(band=b)
    return names


_FLOAT_COLS = (Col.RA, Col.DEC, Col.PHOTOZ, INPUT_PHOTOZ_LO, INPUT_PHOTOZ_HI)


def _object_ids(col: pa.Array, name: str, uri: str) -> pa.Array:
    """The object ids as int64, exactly: an integer column only (never through a float), and
    every value within int64 (an unsigned 2**64 - 1 is not wrapped to -1)."""
    if not pa.types.is_integer(col.type):
        raise ValueError(f"{uri}: object id column {name!r} is {col.type}, not an integer type")
    if pa.types.is_uint64(col.type):
        too_big = pc.greater(col, pa.scalar(2**63 - 1, pa.uint64()))
        if pc.any(too_big).as_py():
            i = pc.index(too_big, True).as_py()
            raise ValueError(
                f"{uri}: object id {col[i].as_py()} (row {i}) does not fit a signed 64-bit "
                "integer (-2**63 .. 2**63 - 1)"
            )
    return col.cast(pa.int64())


def read_partition(
    part: Partition,
    columns: ColumnMap,
    bands: tuple[str, ...],
    healpix_column: str = "",
    storage_options: dict[str, Any] | None = None,
) -> pa.Table:
    """One partition's rows under the engine's names, plus ``_healpix_29``, Norder and Npix.

    A configured column missing from the catalog is an error (a configuration
    problem, not a bad object). Missing photo-z bounds are filled with NaN.
    """
    fs, path = filesystem(part.uri, storage_options)
    schema = pq.ParquetDataset(path, filesystem=fs).schema  # a file or an Npix folder
    names = input_column_names(columns, bands)
    optional = {INPUT_PHOTOZ_LO, INPUT_PHOTOZ_HI}
    missing = [c for k, c in names.items() if c not in schema.names and k not in optional]
    if missing:
        raise ValueError(
            f"{part.uri}: catalog lacks configured columns {missing} "
            f"(available: {', '.join(schema.names)}); set them in ColumnMap / --columns"
        )
    wanted = sorted(
        {c for c in names.values() if c in schema.names} | ({healpix_column} & set(schema.names))
    )
    table = pq.read_table(path, filesystem=fs, columns=wanted)
    n = table.num_rows
    out: dict[str, pa.Array] = {}
    for key, src in names.items():
        if src in table.column_names:
            col = table[src].combine_chunks()
        else:
            col = pa.nulls(n, pa.float64())
        if key == Col.OBJECT_ID:
            col = _object_ids(col, src, part.uri)
        elif key in _FLOAT_COLS:
            col = pc.fill_null(col.cast(pa.float64()), math.nan)
        else:
            col = col.cast(pa.string())
        out[key] = col
    if healpix_column and healpix_column in table.column_names:
        out[Col.HEALPIX] = table[healpix_column].combine_chunks().cast(pa.int64())
    else:
        from hats.pixel_math.spatial_index import compute_spatial_index

        ra = out[Col.RA].to_numpy(zero_copy_only=False)
        dec = out[Col.DEC].to_numpy(zero_copy_only=False)
        out[Col.HEALPIX] = pa.array(compute_spatial_index(ra, dec), pa.int64())
    out[ORDER] = pa.array(np.full(n, part.order, np.int64))
    out[PIXEL] = pa.array(np.full(n, part.pixel, np.int64))
    return pa.table(out)


# --------------------------------------------------------------------------- output catalog
def partition_uri(root: str, order: int, pixel: int) -> str:
    """URI of the Parquet file of partition (order, pixel) under catalog ``root``."""
    from hats.io import paths as hats_paths
    from hats.io.file_io import get_upath
    from hats.pixel_math import HealpixPixel

    return str(hats_paths.pixel_catalog_file(get_upath(root), HealpixPixel(order, pixel)))


def write_partition(
    table: pa.Table,
    root: str,
    order: int,
    pixel: int,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write one output partition (rows sorted by ``_healpix_29``); returns its URI."""
    uri = partition_uri(root, order, pixel)
    fs, path = filesystem(uri, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    table = table.sort_by([(Col.HEALPIX, "ascending"), (Col.OBJECT_ID, "ascending")])
    pq.write_table(table, path, filesystem=fs)
    return uri


def write_catalog_metadata(
    root: str,
    pixels: list[tuple[int, int]],
    catalog_name: str,
    extra_properties: dict[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Write ``_metadata``, ``_common_metadata``, ``partition_info.csv``, ``hats.properties``.

    Call after every partition file exists. Returns the catalog's total row count.
    """
    import hats.io
    from hats.catalog import PartitionInfo, TableProperties
    from hats.catalog.dataset.hats_properties import HatsProperties
    from hats.io import paths as hats_paths
    from hats.io.file_io import get_upath
    from hats.pixel_math import HealpixPixel
    from hats.pixel_math.spatial_index import SPATIAL_INDEX_ORDER

    base = get_upath(root, **hats_storage_options(root, storage_options))
    total = hats.io.write_parquet_metadata(base, create_per_partition_stats=True)
    healpix = [HealpixPixel(o, p) for o, p in pixels]
    info = PartitionInfo(healpix)
    info.write_to_file(hats_paths.get_partition_info_pointer(base))
    props = HatsProperties.new_provenance_dict(base, builder=f"d4a-batch v{__version__}")
    table_props = TableProperties(
        catalog_name=catalog_name,
        catalog_type="object",
        total_rows=int(total),
        ra_column=Col.RA,
        dec_column=Col.DEC,
        healpix_column=Col.HEALPIX,
        healpix_order=SPATIAL_INDEX_ORDER,
        hats_order=info.get_highest_order(),
        moc_sky_fraction=float(f"{info.calculate_fractional_coverage():.5g}"),
        **props,
        **(extra_properties or {}),
    )
    table_props.to_properties_file(base)
    return int(total)
