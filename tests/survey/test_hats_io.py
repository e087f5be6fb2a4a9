from __future__ import annotations

import math

import hats
import lsdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hats.io.validation import is_valid_catalog
from hats.pixel_math.spatial_index import compute_spatial_index

from d4a_batch.config import ColumnMap
from d4a_batch.schema import Col
from d4a_batch.survey.hats_io import (
    INPUT_PHOTOZ_HI,
    INPUT_PHOTOZ_LO,
    ORDER,
    PIXEL,
    cutout_column,
    open_input_catalog,
    psf_column,
    read_partition,
    write_catalog_metadata,
    write_partition,
)

BANDS = ("g", "r", "i")


def test_partitions_come_from_the_hats_metadata(tiny_survey):
    cat = open_input_catalog(str(tiny_survey))
    ref = hats.read_hats(tiny_survey)
    assert [(p.order, p.pixel) for p in cat.partitions] == [
        (p.order, p.pixel) for p in ref.get_healpix_pixels()
    ]
    assert cat.healpix_column == "_healpix_29" and cat.total_rows == 8
    rows = [read_partition(p, ColumnMap(), BANDS, cat.healpix_column) for p in cat.partitions]
    assert sum(t.num_rows for t in rows) == 8
    for part, t in zip(cat.partitions, rows):
        assert set(t[ORDER].to_pylist()) == {part.order}
        assert set(t[PIXEL].to_pylist()) == {part.pixel}
        # every row's spatial index lies in its partition's pixel
        shift = 2 * (29 - part.order)
        assert set((t[Col.HEALPIX].to_numpy() >> shift).tolist()) == {part.pixel}


def _renamed_catalog(root, with_healpix_column=True):
    n = 5
    rng = np.random.default_rng(3)
    df = pd.DataFrame(
        {
            "objid": np.arange(n, dtype=np.int32) + 10,
            "ra_deg": 150.0 + rng.uniform(-0.1, 0.1, n),
            "dec_deg": 2.0 + rng.uniform(-0.1, 0.1, n),
            "z_phot": np.array([0.3, 0.5, None, 0.7, 0.9], dtype=object),
            **{f"cut_{b}": [f"c/{b}/{k}.fits" for k in range(n)] for b in BANDS},
            **{f"p_{b}": [f"p/{b}/{k}.fits" for k in range(n)] for b in BANDS},
        }
    )
    df["z_phot"] = df["z_phot"].astype("float64")
    lsdb.from_dataframe(
        df, ra_column="ra_deg", dec_column="dec_deg", margin_threshold=None, catalog_name="renamed"
    ).write_catalog(root, as_collection=False, progress_bar=False)
    return df


def test_configured_column_names_are_read_under_the_engine_names(tmp_path):
    df = _renamed_catalog(tmp_path / "cat")
    cols = ColumnMap(
        object_id="objid",
        ra="ra_deg",
        dec="dec_deg",
        photoz="z_phot",
        photoz_err_min="z_lo",  # absent from the catalog: NaN
        photoz_err_max="z_hi",
        cutout_uri="cut_{band}",
        psf_uri="p_{band}",
    )
    cat = open_input_catalog(str(tmp_path / "cat"))
    t = pa.concat_tables(
        [read_partition(p, cols, BANDS, cat.healpix_column) for p in cat.partitions]
    )
    got = t.to_pandas().set_index(Col.OBJECT_ID).sort_index()
    assert t.schema.field(Col.OBJECT_ID).type == pa.int64()
    assert got.index.tolist() == df.objid.tolist()
    np.testing.assert_allclose(got[Col.RA], df.ra_deg)
    assert math.isnan(got.loc[12, Col.PHOTOZ]) and got.loc[13, Col.PHOTOZ] == 0.7
    assert got[INPUT_PHOTOZ_LO].isna().all() and got[INPUT_PHOTOZ_HI].isna().all()
    assert got.loc[11, cutout_column("r")] == "c/r/1.fits"
    assert got.loc[11, psf_column("i")] == "p/i/1.fits"
    np.testing.assert_array_equal(
        got[Col.HEALPIX], compute_spatial_index(df.ra_deg.to_numpy(), df.dec_deg.to_numpy())
    )
    with pytest.raises(ValueError, match=r"lacks configured columns \['photoz_best'\]"):
        read_partition(cat.partitions[0], ColumnMap(object_id="objid", ra="ra_deg", dec="dec_deg",
                                                    cutout_uri="cut_{band}", psf_uri="p_{band}"),
                       BANDS, cat.healpix_column)  # fmt: skip


def test_written_partitions_and_metadata_make_a_valid_hats_catalog(tmp_path):
    root = str(tmp_path / "out")
    rng = np.random.default_rng(0)
    ra, dec = 150.0 + rng.uniform(-1, 1, 40), 2.0 + rng.uniform(-1, 1, 40)
    hp = compute_spatial_index(ra, dec)
    table = pa.table(
        {
            Col.OBJECT_ID: np.arange(40),
            Col.RA: ra,
            Col.DEC: dec,
            Col.HEALPIX: hp,
            "value": rng.normal(size=40),
        }
    )
    order = 4
    pixels = sorted(set((hp >> (2 * (29 - order))).tolist()))
    assert len(pixels) >= 2
    for p in pixels:
        rows = table.filter(pa.array((hp >> (2 * (29 - order))) == p))
        write_partition(rows, root, order, p)
    total = write_catalog_metadata(root, [(order, p) for p in pixels], "test", {"d4a_note": "x"})
    assert total == 40
    assert is_valid_catalog(root, strict=True)
    cat = lsdb.open_catalog(root)
    assert [(p.order, p.pixel) for p in cat.get_healpix_pixels()] == [(order, p) for p in pixels]
    got = cat.compute().sort_values(Col.OBJECT_ID)
    np.testing.assert_allclose(got["value"], table["value"].to_numpy())
    props = (tmp_path / "out" / "hats.properties").read_text()
    assert "d4a_note=x" in props and "hats_nrows=40" in props
    # partition files are sorted by the spatial index
    part = pd.read_parquet(
        tmp_path / "out" / "dataset" / f"Norder={order}" / "Dir=0" / f"Npix={pixels[0]}.parquet"
    )
    assert part[Col.HEALPIX].is_monotonic_increasing
