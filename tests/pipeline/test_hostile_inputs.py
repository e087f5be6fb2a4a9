"""Hostile inputs, as a survey sends them (issue 28): nothing lost, nothing corrupted.

The real commands in subprocesses, as a user runs them:

1. one job over a catalog with every kind of bad object (the 16 of
   ``tests/survey/test_staging.py::BAD_INPUTS``, a cutout in an S3 bucket that does not
   exist, a PSF behind a protocol fsspec does not know, a PSF summing to about 0, a cutout
   cut at an HDU boundary, an object_id repeated in another partition) next to clean
   objects, spread over the partitions. It is interrupted (SIGINT to its process group, as
   Ctrl-C) as soon as its run started: exit 130, Ray's processes gone, ``list_runs`` says
   what it committed; then the same command again does the rest. Every input row has
   exactly one output row, each bad object an error row naming the file and what is
   wrong, every clean object ``ok``;
2. job-level errors: exit 2 with a one-line reason, no traceback, nothing touched (the
   output is, lies in or holds the catalog even with ``--overwrite``; config values that
   mean something else; an unwritable output; a catalog whose storage cannot be reached;
   ids that do not fit int64; stamps that cannot hold the prior's footprint; an output
   that holds another catalog's results);
3. ``make_catalog --skip-broken`` with empty, fractional and too large ids next to
   17-digit HSC ids, which stay exact.

The in-process checks at the end bound how long an unreachable storage takes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hats.pixel_math import HealpixPixel

from d4a_batch.config import ColumnMap, PhysicsConfig, RunConfig, SamplerConfig, StagingConfig
from d4a_batch.mock.survey import build_mock_survey
from d4a_batch.pipeline.fingerprint import list_folder, listing_error, repeats_digest, repeats_of
from d4a_batch.pipeline.ledger import Ledger, pixel_name
from d4a_batch.pipeline.options import ExecutionOptions, JobError
from d4a_batch.pipeline.plan import check_job, plan_run
from d4a_batch.schema import LEASE_FILE, REPO_ROOT, Col, Flag, Status, flag_names
from d4a_batch.survey.fits_io import read_psf, write_psf
from d4a_batch.survey.hats_io import (
    ORDER,
    PIXEL,
    cutout_column,
    open_input_catalog,
    psf_column,
    read_partition,
)
from d4a_batch.survey.staging import Stager
from d4a_batch.testing import TINY_PRIOR, tiny_survey_config
from tests.faults import moto_s3
from tests.survey.test_staging import BAD_INPUTS, _rewrite_fits, break_object

JOB = [sys.executable, "jobs/deconvolve_survey.py"]
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
SMALL = ["--steps", "2", "--samples", "2", "--batch-size", "4", "--no-maps"]
INPUT_FLAGS = Flag.INPUT_ERROR | Flag.PSF_BAD | Flag.PHOTOZ_BAD
NO_BUCKET = "no-such-bucket-d4a"
N_CLEAN = 5

# the new kinds of bad object: (band, "cutout" | "psf", regex of the status message; {file}
# stands for the file as the catalog names it)
NEW_CASES = {
    "s3_no_such_bucket": (
        "g", "cutout", rf"cutout g: s3://{NO_BUCKET}/\S+: cannot open: file not found",
    ),
    "unknown_protocol": (
        "r", "psf",
        r"PSF r: nosuchproto://\S+: cannot reach its storage "
        r"\(ValueError: Protocol not known: nosuchproto\)",
    ),
    "psf_sums_to_zero": (
        "i", "psf",
        r"PSF i: {file}: PSF sums to \S+, about 0 against the \S+ of its absolute values: "
        r"its positive and negative pixels cancel .*",
    ),
    "cut_at_hdu_boundary": (
        "r", "cutout",
        r"cutout r: {file}: truncated at an HDU boundary: the file ends after HDU2 \(MASK\), "
        r"without VARIANCE \(image-only cutouts keep both HDUs, empty\)",
    ),
}  # fmt: skip
DUPLICATE = "object_id_in_two_partitions"


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root``: its SHA-256 (what "nothing touched" compares)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run(args: list[str], timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=REPO_ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout
    )


def _partitions(root: Path) -> list[tuple[object, list[dict]]]:
    """(partition, its rows under the engine's names), partitions in (order, pixel) order."""
    cat = open_input_catalog(str(root))
    parts = sorted(cat.partitions, key=lambda p: (p.order, p.pixel))
    return [
        (p, read_partition(p, ColumnMap(), TINY_PRIOR.bands, cat.healpix_column).to_pylist())
        for p in parts
    ]


def _set_cell(part, row: int, column: str, value) -> None:
    """Set one cell of a partition file (catalog column names)."""
    t = pq.read_table(part.uri)
    values = t[column].to_pylist()
    values[row] = value
    i = t.schema.get_field_index(column)
    pq.write_table(t.set_column(i, column, pa.array(values, t.schema.field(column).type)), part.uri)


def _break_new(root: Path, part, k: int, row: dict, case: str) -> None:
    band, kind, _ = NEW_CASES[case]
    engine_col = cutout_column(band) if kind == "cutout" else psf_column(band)
    catalog_col = (ColumnMap().cutout_uri if kind == "cutout" else ColumnMap().psf_uri).format(
        band=band
    )
    rel = row[engine_col]
    path = root / rel
    if case == "s3_no_such_bucket":
        _set_cell(part, k, catalog_col, f"s3://{NO_BUCKET}/{rel}")
    elif case == "unknown_protocol":
        _set_cell(part, k, catalog_col, f"nosuchproto://{rel}")
    elif case == "psf_sums_to_zero":  # a differenced image: positive and negative cancel
        psf = read_psf(str(path), size=None).array
        write_psf(str(path), psf - psf.mean() + 1e-4 / psf.size)
    elif case == "cut_at_hdu_boundary":  # a valid FITS file that ends after MASK
        _rewrite_fits(path, lambda hdul: hdul.pop(3))
    else:
        raise ValueError(case)


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.NoSuchProcess:
        return ""


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def s3():
    with moto_s3("hostile") as server:
        yield server


@pytest.fixture(scope="module")
def hostile(tiny_prior, s3, tmp_path_factory):
    """The catalog, the interrupted run and the resumed one (see the module docstring)."""
    tmp = tmp_path_factory.mktemp("hostile")
    root = tmp / "survey"
    n = len(BAD_INPUTS) + len(NEW_CASES) + 1 + N_CLEAN
    build_mock_survey(root, dataclasses.replace(tiny_survey_config(n), partition_rows=8))
    parts = _partitions(root)
    assert len(parts) >= 4
    # round robin over the partitions: bad objects in most of them, clean ones in some
    slots = [(p, k, rows[k]) for k in range(max(len(r) for _, r in parts))
             for p, rows in parts if k < len(rows)]  # fmt: skip
    cases: dict[int, str] = {}
    for (part, k, row), case in zip(slots, [*BAD_INPUTS, *NEW_CASES]):
        cases[row[Col.OBJECT_ID]] = case
        if case in BAD_INPUTS:
            break_object(root, row, case)
        else:
            _break_new(root, part, k, row, case)
    # the object_id of a clean row given to a clean row of a later partition
    free = [(n, part, i, row[Col.OBJECT_ID]) for n, (part, rows) in enumerate(parts)
            for i, row in enumerate(rows) if row[Col.OBJECT_ID] not in cases]  # fmt: skip
    _, first, j, dup_id = free[0]
    _, last, k, _ = next(f for f in reversed(free) if f[0] != free[0][0])
    _set_cell(last, k, ColumnMap().object_id, dup_id)
    duplicate = {"id": dup_id, "kept": (first, j), "repeat": (last, k)}
    inputs = [row for _, rows in _partitions(root) for row in rows]
    catalog_before = _tree(root)

    out = tmp / "out"
    so = json.dumps(s3.options())  # every URI through it: the S3 ones reach moto
    argv = [*JOB, "--catalog", str(root), "--output", str(out), "--prior", str(tiny_prior),
            *SMALL, "--num-cpus", "2", "--storage-options", so, "--max-error-fraction", "1"]  # fmt: skip
    started = time.monotonic()
    first_run = subprocess.Popen(
        argv, cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    runs = out / "_d4a_ledger" / "runs"
    while not (runs.is_dir() and any(runs.glob("*.json"))):  # the run has started: Ctrl-C
        assert first_run.poll() is None, first_run.communicate()
        assert time.monotonic() - started < 600, "the run did not start in 600 s"
        time.sleep(0.05)
    ray_procs = psutil.Process(first_run.pid).children(recursive=True)
    ray_names = [_name(p) for p in ray_procs]
    os.killpg(first_run.pid, signal.SIGINT)
    interrupted_at = time.monotonic()
    out1, err1 = first_run.communicate(timeout=300)
    stopped_s = time.monotonic() - interrupted_at
    gone_s = None
    while gone_s is None and time.monotonic() - interrupted_at < 60:
        gone_s = None if any(map(_alive, ray_procs)) else time.monotonic() - interrupted_at
        time.sleep(0.2)
    listing = _run([sys.executable, "jobs/list_runs.py", str(out)], timeout=300)
    records = Ledger(str(out)).partition_records()
    resumed = _run(argv, timeout=900)  # the same command again
    df = pd.read_parquet(out / "dataset")
    return dict(
        root=root, out=out, inputs=inputs, cases=cases, duplicate=duplicate, df=df,
        interrupted=(first_run.returncode, out1, err1, stopped_s, gone_s, ray_names),
        listing=listing, records_at_interrupt=records, resumed=resumed,
        catalog_before=catalog_before, prior=tiny_prior, argv=argv,
    )  # fmt: skip


# --------------------------------------------------------------------------- the job run
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_ctrl_c_stops_at_once_shuts_ray_down_and_the_listing_says_what_was_committed(hostile):
    code, _, err, stopped_s, gone_s, ray_names = hostile["interrupted"]
    assert code == 130, err
    assert "interrupted: the partitions committed so far are kept" in err
    assert "Traceback" not in err, err
    assert stopped_s < 60, stopped_s
    assert any("raylet" in n for n in ray_names) and any("gcs" in n for n in ray_names)
    assert gone_s is not None and gone_s < 60, "Ray processes outlived the interrupted job"
    assert not (hostile["out"] / LEASE_FILE).exists()  # released: the next run need not wait
    listing = hostile["listing"]
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    ok = [r for r in hostile["records_at_interrupt"] if r.status == "ok"]
    assert "interrupted (no end record)" in lines[0], lines
    rows = sum(r.rows for r in ok)
    assert f"{rows} objects committed in {len(ok)} of " in lines[0], lines
    assert not any(line.strip().startswith("processed") for line in lines[:3])
    if len(ok) < len(_partitions(hostile["root"])):
        assert any("planned, not committed (the next run does them):" in x for x in lines)


@pytest.mark.slow
@pytest.mark.ray
def test_the_resumed_run_has_one_row_per_input_row_and_changed_no_input(hostile):
    resumed, df = hostile["resumed"], hostile["df"]
    n_bad = (
        sum(1 for c in hostile["cases"].values() if c in NEW_CASES or BAD_INPUTS[c].message) + 1
    )  # + the repeated object_id
    assert resumed.returncode == 0, resumed.stderr  # (--max-error-fraction 1: bad input is data)
    assert "Traceback" not in resumed.stderr
    assert Counter(df[Col.OBJECT_ID]) == Counter(r[Col.OBJECT_ID] for r in hostile["inputs"])
    assert (df[Col.STATUS] == Status.ERROR).sum() == n_bad
    assert _tree(hostile["root"]) == hostile["catalog_before"]  # the input is as it was
    runs = Ledger(str(hostile["out"])).runs()
    assert [r.status for r in runs] == ["running", "ok"]  # the interrupted one, then this


@pytest.mark.slow
@pytest.mark.ray
def test_partitions_are_independent(hostile):
    """Each output partition holds its input rows; all-bad and mixed partitions both finish."""
    want: dict[tuple[int, int], list[int]] = {}
    for row in hostile["inputs"]:
        want.setdefault((row[ORDER], row[PIXEL]), []).append(row[Col.OBJECT_ID])
    got, statuses = {}, []
    for f in (hostile["out"] / "dataset").glob("Norder=*/Dir=*/Npix=*.parquet"):
        pix = (int(f.parent.parent.name.split("=")[1]), int(f.stem.split("=")[1]))
        t = pq.read_table(f, columns=[Col.OBJECT_ID, Col.STATUS])
        got[pix] = sorted(t[Col.OBJECT_ID].to_pylist())
        statuses.append(set(t[Col.STATUS].to_pylist()))
    assert got == {k: sorted(v) for k, v in want.items()}
    assert {Status.OK, Status.ERROR} in statuses  # bad objects next to good ones


def _row(hostile, oid: int) -> pd.Series:
    rows = hostile["df"][hostile["df"][Col.OBJECT_ID] == oid]
    assert len(rows) == 1, rows
    return rows.iloc[0]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("case", [*BAD_INPUTS, *NEW_CASES])
def test_each_bad_object_is_its_own_row_naming_the_file_and_what_is_wrong(hostile, case):
    (oid,) = [k for k, c in hostile["cases"].items() if c == case]
    row = _row(hostile, oid)
    (inp,) = [r for r in hostile["inputs"] if r[Col.OBJECT_ID] == oid]
    bits = int(row[Col.FLAGS])
    assert row[Col.FLAG_NAMES].split("|") == flag_names(bits)
    if case in NEW_CASES:
        band, kind, pattern = NEW_CASES[case]
        uri = inp[cutout_column(band) if kind == "cutout" else psf_column(band)]
        regex = pattern.replace("{file}", r"\S*" + re.escape(uri))
    else:
        spec = BAD_INPUTS[case]
        assert bits & INPUT_FLAGS == spec.flags, row[Col.FLAG_NAMES]
        if spec.message is None:  # PSF renormalised or off centre: sampled and flagged
            assert row[Col.STATUS] == Status.OK and pd.isna(row[Col.MESSAGE])
            assert re.search(spec.reason, row[Col.FLAG_REASONS]), row[Col.FLAG_REASONS]
            assert np.isfinite(row[Col.CHI2])
            return
        regex = spec.message_regex(inp)
    assert row[Col.STATUS] == Status.ERROR
    assert re.fullmatch(regex, row[Col.MESSAGE]), row[Col.MESSAGE]
    assert bits & Flag.INPUT_ERROR
    assert f"INPUT_ERROR: input error: {row[Col.MESSAGE]}" in row[Col.FLAG_REASONS]
    assert np.isnan(row[Col.CHI2])


@pytest.mark.slow
@pytest.mark.ray
def test_an_object_id_in_two_partitions_is_one_ok_row_and_one_error_row(hostile):
    dup = hostile["duplicate"]
    rows = hostile["df"][hostile["df"][Col.OBJECT_ID] == dup["id"]]
    assert sorted(rows[Col.STATUS]) == [Status.ERROR, Status.OK]
    (kept_part, j), (rep_part, k) = dup["kept"], dup["repeat"]
    (kept_file,) = (hostile["out"] / "dataset").glob(
        f"Norder={kept_part.order}/Dir=*/Npix={kept_part.pixel}.parquet"
    )
    kept = pq.read_table(kept_file, columns=[Col.OBJECT_ID, Col.STATUS]).to_pylist()
    assert {Col.OBJECT_ID: dup["id"], Col.STATUS: Status.OK} in kept  # the first one
    (message,) = rows[rows[Col.STATUS] == Status.ERROR][Col.MESSAGE]
    assert message == (
        f"duplicate object_id {dup['id']}: input row {k} of partition "
        f"{pixel_name(rep_part.healpix)} repeats row {j} of partition "
        f"{pixel_name(kept_part.healpix)}, which was processed; this row was not"
    )


@pytest.mark.slow
@pytest.mark.ray
def test_clean_objects_are_sampled_without_input_flags(hostile):
    df = hostile["df"]
    clean = df[~df[Col.OBJECT_ID].isin([*hostile["cases"], hostile["duplicate"]["id"]])]
    assert len(clean) == len(hostile["inputs"]) - len(hostile["cases"]) - 2
    assert (clean[Col.STATUS] == Status.OK).all() and clean[Col.MESSAGE].isna().all()
    assert ((clean[Col.FLAGS] & int(INPUT_FLAGS)) == 0).all()


@pytest.mark.slow
@pytest.mark.ray
def test_another_catalog_is_refused_and_the_output_kept(hostile, tmp_path):
    """Catalog B pointed at catalog A's output: exit 2 naming both, A's results untouched;
    ``--force`` would write there anyway (README)."""
    other = tmp_path / "other"
    shutil.copytree(hostile["root"], other)
    before = _tree(hostile["out"])
    argv = [a if a != str(hostile["root"]) else str(other) for a in hostile["argv"]]
    done = _run(argv, timeout=300)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"holds the results of catalog {hostile['root']}" in line
    assert f"not of catalog {other}" in line and "--force" in line
    assert _tree(hostile["out"]) == before


# --------------------------------------------------------------------------- exit 2
def _config(tmp: Path, doc) -> list[str]:
    path = tmp / "run.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return ["--config", str(path)]


JOB_ERRORS = {
    # name: (extra arguments (callable of tmp), words of the one line)
    "output_is_catalog": (
        lambda t, c: ["--output", str(c), "--overwrite"], "is the input catalog",
    ),
    "output_inside_catalog": (
        lambda t, c: ["--output", str(c / "dataset" / "out"), "--overwrite"],
        "lies inside the input catalog",
    ),
    "output_holds_catalog": (
        lambda t, c: ["--output", str(t), "--overwrite"], "holds the input catalog",
    ),
    "mask_planes_a_string": (
        lambda t, c: _config(t, {"staging": {"bad_mask_planes": "BAD"}}),
        "StagingConfig.bad_mask_planes must be a list of str (got 'BAD')",
    ),
    "psf_size_even": (
        lambda t, c: _config(t, {"staging": {"psf_size": 42}}),
        "StagingConfig.psf_size must be odd",
    ),
    "stamps_of_4_px": (
        lambda t, c: _config(t, {"staging": {"stamp_sizes": [4]}}),
        "StagingConfig.stamp_sizes must each exceed 2 x psf_margin",
    ),
    "stamps_smaller_than_the_footprint": (
        lambda t, c: _config(t, {"staging": {"stamp_sizes": [20]}}),
        "no object's model fits its stamp",
    ),
    "sampler_a_number": (
        lambda t, c: _config(t, {"sampler": 5}),
        "RunConfig.sampler must be an object of SamplerConfig fields (got 5)",
    ),
    "invalid_json": (lambda t, c: _config(t, '{"sampler": {'), "run.json: not valid JSON"),
    "columns_without_name": (
        lambda t, c: ["--columns", "photoz"],
        "argument --columns: expected key=name pairs, e.g. 'photoz=photoz_mizuki', got 'photoz'",
    ),
    "unwritable_output": (
        lambda t, c: ["--output", _unwritable(t)], "cannot write the output",
    ),
    "ids_beyond_int64": (
        lambda t, c: ["--catalog", str(_uint64_ids(t, c))],
        "object id column 'object_id' is uint64",
    ),
}  # fmt: skip


def _unwritable(tmp: Path) -> str:
    """A folder this process cannot write in (root writes through file modes: /sys)."""
    if os.geteuid() == 0:
        return "/sys/d4a-hostile-output"
    ro = tmp / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    return str(ro / "out")


def _uint64_ids(tmp: Path, survey: Path) -> Path:
    """A copy of the catalog whose ids are uint64, one of them 2**64 - 1."""
    root = tmp / "uint64"
    shutil.copytree(survey, root)
    for i, part in enumerate(open_input_catalog(str(root)).partitions):
        t = pq.read_table(part.uri)
        ids = t["object_id"].to_pylist()
        ids[0] = 2**64 - 1 if i == 0 else ids[0]
        col = pa.array(ids, pa.uint64())
        pq.write_table(t.set_column(t.schema.get_field_index("object_id"), "object_id", col),
                       part.uri)  # fmt: skip
    meta = root / "dataset" / "_common_metadata"
    schema = pq.read_schema(meta)
    i = schema.get_field_index("object_id")
    pq.write_metadata(schema.set(i, pa.field("object_id", pa.uint64())), meta)
    return root


@pytest.mark.parametrize("case", list(JOB_ERRORS))
def test_a_job_level_error_exits_2_with_one_line_touching_nothing(
    case, tiny_survey, tiny_prior, tmp_path
):
    catalog = tmp_path / "survey"
    shutil.copytree(tiny_survey, catalog)
    extra, words = JOB_ERRORS[case]
    extra = extra(tmp_path, catalog)
    out = tmp_path / "out"
    argv = [*JOB, "--catalog", str(catalog), "--output", str(out), "--prior", str(tiny_prior),
            *SMALL, *extra]  # fmt: skip
    before_catalog, before_prior = _tree(catalog), _tree(tiny_prior)
    before_all = sorted(str(p) for p in tmp_path.rglob("*"))
    done = _run(argv, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    reason = [x for x in done.stderr.splitlines() if not x.startswith(("usage:", " "))]
    assert len(reason) == 1, done.stderr  # one line (argparse: after its usage lines)
    assert _tree(catalog) == before_catalog and _tree(tiny_prior) == before_prior
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before_all  # nothing new, none gone


def test_a_catalog_on_storage_that_cannot_be_reached_exits_2_in_seconds(s3, tiny_prior, tmp_path):
    """No credentials for the catalog's bucket: one line, exit 2, no retries for minutes."""
    env = {k: v for k, v in ENV.items() if not k.startswith("AWS_")}
    env |= {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_CONFIG_FILE": str(tmp_path / "none")}  # fmt: skip
    options = {"client_kwargs": {"endpoint_url": s3.url}}  # no key, no secret
    argv = [*JOB, "--catalog", "s3://hostile/survey", "--output", str(tmp_path / "out"),
            "--prior", str(tiny_prior), *SMALL, "--storage-options", json.dumps(options)]  # fmt: skip
    started = time.monotonic()
    done = _run(argv, timeout=300, env=env)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "catalog s3://hostile/survey does not open" in line
    assert "credentials" in line.lower(), line
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- make_catalog
def test_make_catalog_keeps_17_digit_ids_exact_next_to_broken_ones(tiny_survey, tmp_path):
    """Issue 28: an empty or fractional id made pandas read the column as float and every
    17-digit HSC id was rounded; 2**64 - 1 was written as -2**63. Now each bad id is its
    row's problem and the others are written exactly."""
    cat = open_input_catalog(str(tiny_survey))
    rows = [r for p in cat.partitions
            for r in read_partition(p, ColumnMap(), TINY_PRIOR.bands, cat.healpix_column).to_pylist()]  # fmt: skip
    hsc = [43158176547848941 + 2 * k for k in range(len(rows))]  # odd: not a float's
    bad_ids = {1: "", 3: "1042.5", 5: str(2**64 - 1), 6: "x17"}
    table = []
    for k, r in enumerate(rows):
        row = {"object_id": bad_ids.get(k, str(hsc[k])), "ra": r[Col.RA], "dec": r[Col.DEC],
               "z": r[Col.PHOTOZ]}  # fmt: skip
        for b in TINY_PRIOR.bands:
            row[f"{b}_cutout"] = str(tiny_survey / r[cutout_column(b)])
            row[f"{b}_psf"] = str(tiny_survey / r[psf_column(b)])
        table.append(row)
    table[2]["g_cutout"] = "nosuchproto://cutouts/g/x.fits"  # a file that cannot be checked
    csv = tmp_path / "objects.csv"
    pd.DataFrame(table).to_csv(csv, index=False)
    out = tmp_path / "catalog"
    done = _run([sys.executable, "jobs/make_catalog.py", str(csv), "--output", str(out),
                 "--skip-broken"], timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert f"5 of {len(rows)} rows skipped:" in done.stderr
    assert "row 2: object_id is empty" in done.stderr
    assert "row 4: object_id '1042.5' is not an integer" in done.stderr
    assert f"row 6: object_id {2**64 - 1} does not fit a signed 64-bit integer" in done.stderr
    assert "row 7: object_id 'x17' is not an integer" in done.stderr
    assert (f"row 3 (object_id {hsc[2]}): g_cutout: cannot check nosuchproto://cutouts/g/x.fits"
            in done.stderr)  # fmt: skip
    written = pq.read_table(out / "dataset", columns=["object_id"])["object_id"]
    assert written.type == pa.int64()
    want = [hsc[k] for k in range(len(rows)) if k not in bad_ids and k != 2]
    assert sorted(written.to_pylist()) == sorted(want)  # rows in = rows written + skipped


# --------------------------------------------------------------------------- in process
@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    for key in [k for k in os.environ if k.startswith("AWS_") and k != "AWS_CA_BUNDLE"]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))


def test_an_unreachable_folder_is_its_objects_error_in_seconds(
    s3, no_aws_credentials, tiny_survey, tmp_path
):
    """No credentials, no endpoint: the listing says why (fingerprinting goes on), staging
    makes the object an error row with it, and neither waits for retries."""
    cases = {
        "no credentials": ({"client_kwargs": {"endpoint_url": s3.url}}, "credentials"),
        "no endpoint": (
            {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}},
            "Could not connect to the endpoint URL",
        ),
    }
    for name, (options, words) in cases.items():
        started = time.monotonic()
        listing = list_folder("s3://hostile/cutouts/g", options)
        why = listing_error(listing)
        assert listing.num_rows == 0 and why is not None and words in why, (name, why)
        assert time.monotonic() - started < 20, (name, time.monotonic() - started)
        # g and i as fingerprinting found them (not tried again); r as staging finds it
        unreachable = {"s3://hostile/psfs/g": why, "s3://hostile/psfs/i": why}
        stager = Stager(str(tmp_path), TINY_PRIOR, PhysicsConfig(), StagingConfig(), options,
                        unreachable)  # fmt: skip
        row = dict(_partitions(tiny_survey)[0][1][0])
        for b in TINY_PRIOR.bands:
            row[cutout_column(b)] = f"s3://hostile/cutouts/{b}/7.fits"
            row[psf_column(b)] = f"s3://hostile/psfs/{b}/7.fits"
        started = time.monotonic()
        g, r, i = stager.stage(row).error.split("; ")
        assert g == f"PSF g: s3://hostile/psfs/g/7.fits: cannot reach its storage ({why})"
        assert i == f"PSF i: s3://hostile/psfs/i/7.fits: cannot reach its storage ({why})"
        assert r.startswith("PSF r: s3://hostile/psfs/r/7.fits: cannot open (") and words in r
        assert time.monotonic() - started < 60, (name, time.monotonic() - started)


@pytest.mark.ray
def test_when_no_cutout_folder_can_be_reached_the_job_stops_before_any_work(
    ray_local, tiny_survey, tiny_prior, tmp_path
):
    """Every file behind a protocol fsspec does not know: one JobError, no partition run."""
    root = tmp_path / "survey"
    shutil.copytree(tiny_survey, root)
    for part in open_input_catalog(str(root)).partitions:
        t = pq.read_table(part.uri)
        for b in TINY_PRIOR.bands:
            for name in (ColumnMap().cutout_uri.format(band=b), ColumnMap().psf_uri.format(band=b)):
                col = pa.array([f"nosuchproto://{u}" for u in t[name].to_pylist()])
                t = t.set_column(t.schema.get_field_index(name), name, col)
        pq.write_table(t, part.uri)
    out = tmp_path / "out"
    config = RunConfig(sampler=SamplerConfig(steps=2, samples=2))
    job = check_job(str(root), str(out), str(tiny_prior), config, ExecutionOptions())
    with pytest.raises(JobError, match=r"none of the \d+ folders of the catalog's cutouts and "
                       r"PSFs can be reached \(e\.g\. nosuchproto://\S+: ValueError: Protocol not "
                       r"known: nosuchproto\)"):  # fmt: skip
        plan_run(job, Ledger(str(out)))
    assert not Ledger(str(out)).exists()


def test_repeats_across_partitions_change_the_fingerprint(tiny_survey, tmp_path):
    """The partition that holds the repeat is redone when the other partition changes (its
    result depends on it): the repeat is part of its fingerprint."""
    a, b = HealpixPixel(7, 1), HealpixPixel(7, 2)
    ids = {a: np.array([5, 6, 7]), b: np.array([8, 6, 6])}
    rep = repeats_of([ids], {a: 3, b: 3})
    assert list(rep) == [b] and sorted(rep[b]) == [1, 2]
    assert "input row 1 of partition 7/2 repeats row 1 of partition 7/1" in rep[b][1]
    assert repeats_of([ids], {a: 1, b: 3}) == {}  # row 1 of a is beyond the limit: b's first wins
    assert repeats_digest(rep[b]) != repeats_digest({1: rep[b][1]})
