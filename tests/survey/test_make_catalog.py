"""make_catalog: a table of your own files -> a HATS catalog (through lsdb) the engine reads."""

from __future__ import annotations

import math
import os
from pathlib import Path

import hats
import lsdb
import numpy as np
import pandas as pd
import pytest
from astropy.table import Table

from d4a_batch.config import ColumnMap, PhysicsConfig, StagingConfig
from d4a_batch.schema import Col
from d4a_batch.survey.hats_io import (
    INPUT_PHOTOZ_HI,
    INPUT_PHOTOZ_LO,
    cutout_column,
    open_input_catalog,
    psf_column,
    read_partition,
)
from d4a_batch.survey.make_catalog import (
    EXIT_BROKEN,
    EXIT_OK,
    EXIT_TABLE,
    InputColumns,
    TableError,
    main,
    make_catalog,
)
from d4a_batch.survey.staging import Stager
from d4a_batch.testing import TINY_PRIOR

BANDS = TINY_PRIOR.bands


def _survey_rows(root: Path) -> list[dict]:
    cat = open_input_catalog(str(root))
    rows = []
    for part in cat.partitions:
        rows += read_partition(part, ColumnMap(), BANDS, cat.healpix_column).to_pylist()
    return sorted(rows, key=lambda r: r[Col.OBJECT_ID])


def user_table(survey: Path, folder: Path) -> pd.DataFrame:
    """A user's table of the mock survey's files: relative paths (from ``folder``) for even
    rows, absolute ones for odd rows; z under the name ``photoz``."""
    out = []
    for k, r in enumerate(_survey_rows(survey)):
        row = {
            "object_id": r[Col.OBJECT_ID],
            "ra": r[Col.RA],
            "dec": r[Col.DEC],
            "photoz": r[Col.PHOTOZ],
            "photoz_err68_min": r[INPUT_PHOTOZ_LO],
            "photoz_err68_max": r[INPUT_PHOTOZ_HI],
        }
        for b in BANDS:
            for name, col in ((f"{b}_cutout", cutout_column(b)), (f"{b}_psf", psf_column(b))):
                path = (survey / r[col]).resolve()
                row[name] = os.path.relpath(path, folder) if k % 2 == 0 else str(path)
        out.append(row)
    return pd.DataFrame(out)


def write_table(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        Table.from_pandas(df).write(path)
    return path


@pytest.mark.parametrize("ext", [".csv", ".parquet", ".fits"])
def test_good_table_makes_a_catalog_the_engine_reads(ext, tiny_survey, tmp_path, capsys):
    df = user_table(tiny_survey, tmp_path / "tables")
    table = write_table(df, tmp_path / "tables" / f"objects{ext}")
    out = tmp_path / "catalog"
    assert main([str(table), "--output", str(out), "--partition-rows", "3"]) == EXIT_OK
    assert f"wrote {len(df)} objects" in capsys.readouterr().out
    # hats and lsdb open it
    cat = hats.read_hats(out)
    assert cat.catalog_info.total_rows == len(df)
    assert len(cat.get_healpix_pixels()) >= 2
    got = lsdb.open_catalog(out).compute()
    assert sorted(got["object_id"]) == sorted(df["object_id"])
    # the engine's reader, default ColumnMap: every row, files resolved to absolute paths
    rows = _survey_rows_from(out)
    assert sorted(r[Col.OBJECT_ID] for r in rows) == sorted(df["object_id"])
    want = df.set_index("object_id")
    for r in rows:
        w = want.loc[r[Col.OBJECT_ID]]
        assert r[Col.PHOTOZ] == pytest.approx(w["photoz"])
        assert (r[INPUT_PHOTOZ_LO], r[INPUT_PHOTOZ_HI]) == pytest.approx(
            (w["photoz_err68_min"], w["photoz_err68_max"])
        )
        for b in BANDS:
            assert os.path.isabs(r[cutout_column(b)]) and os.path.isfile(r[cutout_column(b)])
            assert os.path.isfile(r[psf_column(b)])
    # and stages them
    stager = Stager(str(out), TINY_PRIOR, PhysicsConfig(), StagingConfig())
    objs = stager.stage_rows(rows[:3], threads=1)
    assert [o.error for o in objs] == [None, None, None]


def _survey_rows_from(root: Path) -> list[dict]:
    cat = open_input_catalog(str(root))
    assert cat.healpix_column == "_healpix_29"
    rows = []
    for part in cat.partitions:
        rows += read_partition(part, ColumnMap(), BANDS, cat.healpix_column).to_pylist()
    return rows


def test_optional_bounds_other_names_and_urls(tiny_survey, tmp_path):
    """Column names mapped by options, no photo-z bounds (NaN in the catalog), files by URL."""
    import fsspec

    df = user_table(tiny_survey, tmp_path).head(3)
    mem = fsspec.filesystem("memory")
    first = df.iloc[0]
    url = f"memory://make_catalog_test/{first['object_id']}_g.fits"
    mem.pipe(url.removeprefix("memory://"), (tmp_path / first["g_cutout"]).read_bytes())
    df.loc[0, "g_cutout"] = url
    df = df.drop(columns=["photoz_err68_min", "photoz_err68_max"])
    df = df.rename(columns={"object_id": "id", "photoz": "zphot"})
    df = df.rename(columns={f"{b}_cutout": f"cutout_{b}" for b in BANDS})
    df = df.rename(columns={f"{b}_psf": f"psf_{b}" for b in BANDS})
    table = write_table(df, tmp_path / "t.csv")
    report = make_catalog(
        str(table),
        str(tmp_path / "cat"),
        cols=InputColumns(object_id="id", z="zphot", cutout="cutout_{band}", psf="psf_{band}"),
        bands=BANDS,
    )
    assert report.problems == {} and report.n_written == 3
    rows = _survey_rows_from(tmp_path / "cat")
    assert all(math.isnan(r[INPUT_PHOTOZ_LO]) and math.isnan(r[INPUT_PHOTOZ_HI]) for r in rows)
    assert url in [r[cutout_column("g")] for r in rows]


def test_broken_table_reports_every_problem_and_writes_nothing(tiny_survey, tmp_path, capsys):
    df = user_table(tiny_survey, tmp_path)
    gone = tmp_path / "gone.fits"
    df.loc[1, "r_cutout"] = str(gone)  # missing file
    df.loc[1, "i_psf"] = "nowhere/psf.fits"  # and another one on the same row
    df.loc[2, "object_id"] = df.loc[4, "object_id"]  # duplicate id
    df.loc[3, "ra"] = np.nan  # NaN coordinates
    df.loc[5, "dec"] = 97.0
    z = df.loc[6, "photoz"]
    df.loc[6, ["photoz_err68_min", "photoz_err68_max"]] = (0.05, 0.07)  # widths, not bounds
    df.loc[7, "photoz"] = np.nan
    table = write_table(df, tmp_path / "broken.parquet")
    out = tmp_path / "cat"
    assert main([str(table), "--output", str(out)]) == EXIT_BROKEN
    err = capsys.readouterr().err
    assert not out.exists()
    ids = df["object_id"].tolist()
    assert f"7 of {len(df)} rows broken:" in err
    assert f"row 2 (object_id {ids[1]}): r_cutout: {gone} not found; i_psf: " in err
    assert "nowhere/psf.fits not found" in err
    assert f"row 3 (object_id {ids[2]}): duplicate object_id {ids[2]} (also row 5)" in err
    assert f"row 5 (object_id {ids[4]}): duplicate object_id {ids[4]} (also row 3)" in err
    assert "row 4 (object_id" in err and "ra nan is not a finite angle" in err
    assert "dec 97 is not in [-90, 90] degrees" in err
    assert f"(0.05, 0.07) do not bracket photoz {z:g}" in err and "not widths" in err
    assert "row 8 (object_id" in err and "photoz nan is not a positive redshift" in err
    assert "nothing written (fix the rows above, or pass --skip-broken)" in err
    # --skip-broken writes the good rows
    assert main([str(table), "--output", str(out), "--skip-broken"]) == EXIT_OK
    assert "7 of 8 rows skipped" in capsys.readouterr().err
    assert len(_survey_rows_from(out)) == len(df) - 7


def test_missing_columns_are_all_named(tiny_survey, tmp_path, capsys):
    df = user_table(tiny_survey, tmp_path).drop(columns=["ra", "g_psf", "photoz"])
    df = df.drop(columns=["photoz_err68_min"])
    table = write_table(df, tmp_path / "t.csv")
    assert main([str(table), "--output", str(tmp_path / "cat")]) == EXIT_TABLE
    err = capsys.readouterr().err
    assert "the table lacks columns ra, g_psf, photoz or z or photoz_best" in err
    assert "--z-column" in err
    with pytest.raises(TableError, match="unknown table format"):
        make_catalog(str(tmp_path / "t.txt"), str(tmp_path / "cat"))
    assert main([str(tmp_path / "absent.csv"), "--output", str(tmp_path / "c")]) == EXIT_TABLE
    assert "table not found" in capsys.readouterr().err
