"""The survey run on a local Ray cluster: local files and S3 (moto); `ray job submit` of the
README's entrypoint on a started cluster is in test_multinode.py."""

from __future__ import annotations

import json
import shutil

import lsdb
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from hats.io.validation import is_valid_catalog
from upath import UPath

from d4a_batch.config import RunConfig, SamplerConfig, config_hash, from_dict
from d4a_batch.pipeline.engine import ExecutionOptions, run_survey
from d4a_batch.pipeline.figures import write_object_figures, write_run_report
from d4a_batch.prior.artifact import read_prior_config
from d4a_batch.schema import FIGURES_DIR, RUN_CONFIG_FILE, Col, Flag, Status
from d4a_batch.survey.hats_io import open_input_catalog
from tests.faults import reset_moto

CONFIG = RunConfig(sampler=SamplerConfig(steps=2, samples=2, seed=7), fits_maps=True)
OPTIONS = ExecutionOptions(batch_size=4, progress_interval_s=0.0)
MAPS = (Col.MEAN_X, Col.STD_X, Col.MEAN_FLUX, Col.STD_FLUX, Col.VARIANCE_RATIO)


def _input(root, storage_options=None) -> pd.DataFrame:
    return lsdb.open_catalog(root, storage_options=storage_options).compute()


def _break(root) -> dict[str, int]:
    """Break four objects of a survey copy; returns {what: object_id}."""
    df = _input(root).sort_values("object_id")
    ids = df.object_id.tolist()
    (root / df.iloc[0].g_cutout_uri).unlink()
    (root / df.iloc[1].r_cutout_uri).write_bytes(b"not a FITS file at all" * 200)
    (root / df.iloc[2].i_psf_uri).unlink()
    cat = open_input_catalog(str(root))
    for part in cat.partitions:  # photo-z NaN in the partition file itself
        t = pq.read_table(part.uri)
        hit = pc.equal(t["object_id"], ids[3])
        if pc.any(hit).as_py():
            z = pc.if_else(hit, float("nan"), t["photoz_best"])
            pq.write_table(
                t.set_column(t.schema.get_field_index("photoz_best"), "photoz_best", z), part.uri
            )
    return {"cutout": ids[0], "fits": ids[1], "psf": ids[2], "photoz": ids[3]}


@pytest.fixture(scope="module")
def local_run(ray_local, tiny_survey, tiny_prior, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken") / "survey"
    shutil.copytree(tiny_survey, root)
    broken = _break(root)
    out = tmp_path_factory.mktemp("out") / "posteriors"
    summary = run_survey(str(root), str(out), str(tiny_prior), CONFIG, OPTIONS)
    return root, out, broken, summary


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_input_object_has_exactly_one_output_row(local_run):
    root, out, _, summary = local_run
    inp = _input(root)
    df = pd.read_parquet(out / "dataset")
    assert sorted(df.object_id) == sorted(inp.object_id) and df.object_id.is_unique
    assert summary.objects == len(inp) == summary.ok + summary.failed and summary.failed == 4
    assert is_valid_catalog(out, strict=True)
    # same partitioning as the input
    pixels = lambda r: sorted((p.order, p.pixel) for p in open_input_catalog(str(r)).partitions)  # noqa: E731
    assert pixels(out) == pixels(root)
    cat = lsdb.open_catalog(out)
    assert len(cat.compute()) == len(inp)
    assert not (out / "_d4a_work").exists()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_broken_inputs_become_error_rows_and_flags_filter(local_run):
    _, out, broken, _ = local_run
    df = pd.read_parquet(out / "dataset").set_index("object_id")
    errors = df[df.status == Status.ERROR]
    assert sorted(errors.index) == sorted(broken.values())
    assert "cannot open" in df.loc[broken["cutout"], Col.MESSAGE]
    assert "FITS" in df.loc[broken["fits"], Col.MESSAGE]
    assert df.loc[broken["psf"], Col.MESSAGE].startswith("PSF i:")
    assert df.loc[broken["psf"], Col.FLAGS] & Flag.PSF_BAD
    assert df.loc[broken["photoz"], Col.FLAGS] & Flag.PHOTOZ_BAD
    assert "PHOTOZ_BAD" in df.loc[broken["photoz"], Col.FLAG_NAMES]
    # the flag filter an astronomer would write
    failed = df[(df[Col.FLAGS] & int(Flag.INPUT_ERROR)) != 0]
    assert sorted(failed.index) == sorted(broken.values())
    ok = df[df.status == Status.OK]
    assert ok[Col.MESSAGE].isna().all() and np.isfinite(ok[Col.CHI2]).all()
    assert errors[Col.HALLUCINATION].isna().all()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_maps_reshape_and_provenance_is_recorded(local_run, tiny_prior):
    _, out, _, summary = local_run
    schema = pq.read_schema(out / "dataset" / "_common_metadata")
    df = pd.read_parquet(out / "dataset")
    for name in MAPS:
        shape = schema.field(name).type.shape
        maps = np.stack(df[name]).reshape(-1, *shape)
        assert maps.shape == (len(df), *shape)
        ok = (df.status == Status.OK).to_numpy()
        assert np.isfinite(maps[ok]).all() and np.isnan(maps[~ok]).all()
    mean_flux = np.stack(df[Col.MEAN_FLUX]).reshape(-1, 3, 16, 16)
    np.testing.assert_allclose(df["flux_i"], mean_flux[:, 2].sum((1, 2)), rtol=1e-4, atol=1e-6)
    _, meta = read_prior_config(tiny_prior)
    assert set(df[Col.PRIOR_HASH]) == {meta["weights_sha256"]}
    assert set(df[Col.CONFIG_HASH]) == {config_hash(CONFIG)}
    assert set(df[Col.RUN_ID]) == {summary.run_id}
    assert set(df[Col.STEPS]) == {2} and set(df[Col.SAMPLES]) == {2} and set(df[Col.SEED]) == {7}
    saved = from_dict(RunConfig, json.loads((out / RUN_CONFIG_FILE).read_text()))
    assert saved == CONFIG
    props = (out / "hats.properties").read_text()
    assert f"d4a_run_id={summary.run_id}" in props and "d4a_prior_id=tiny-test" in props
    assert "d4a_created_utc=" in props and f"d4a_config_hash={config_hash(CONFIG)}" in props


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fits_maps_for_sampled_objects(local_run):
    _, out, _, _ = local_run
    df = pd.read_parquet(out / "dataset")
    ok = df[df.status == Status.OK]
    files = sorted((out / "fits").glob("*/*.fits"))
    assert sorted(int(f.stem) for f in files) == sorted(ok.object_id)
    row = ok.iloc[0]
    (path,) = (out / "fits").glob(f"*/{row.object_id}.fits")
    with fits.open(path) as hdul:
        flux = np.stack(row[Col.MEAN_FLUX]).reshape(3, 16, 16)
        np.testing.assert_array_equal(hdul["MEAN_FLUX_G"].data, flux[0])
        wcs = WCS(hdul["MEAN_FLUX_G"].header)
        assert wcs.pixel_to_world_values(7.5, 7.5) == pytest.approx((row.ra, row.dec), abs=1e-10)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_figures_for_chosen_objects_and_the_run_report(local_run, tiny_prior):
    import matplotlib.image as mpimg

    root, out, broken, _ = local_run
    df = pd.read_parquet(out / "dataset", columns=["object_id", "status"])
    ok = sorted(df[df.status == Status.OK].object_id)[:2]
    wanted = [*ok, broken["psf"], 999_999_999]
    got = write_object_figures(str(out), str(root), str(tiny_prior), wanted)
    assert set(got) == set(wanted)
    for oid in ok:
        assert got[oid] == str(out / FIGURES_DIR / f"{oid}.png")
        img = mpimg.imread(got[oid])
        assert img.ndim == 3 and img.shape[0] > 500 and img.shape[1] > 800
    assert got[broken["psf"]].startswith("status error: PSF i:")
    assert got[999_999_999] == "not in the output catalog"
    report = write_run_report(str(out))
    assert report == str(out / FIGURES_DIR / "report.png") and mpimg.imread(report).ndim == 3
    # the figures folder does not disturb the catalog
    assert is_valid_catalog(out, strict=True)


# --------------------------------------------------------------------------- S3 (moto)
@pytest.fixture
def s3(tmp_path):
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    reset_moto(url)  # moto's state is per process: start from an empty store
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", **creds).create_bucket(
        Bucket="survey"
    )
    yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": url}}
    server.stop()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_inputs_and_outputs_on_s3(ray_local, tiny_survey, tiny_prior, s3):
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    fs.put(str(tiny_survey), "survey/in", recursive=True)
    options = ExecutionOptions(batch_size=4, storage_options=s3)
    summary = run_survey("s3://survey/in", "s3://survey/out", str(tiny_prior), CONFIG, options)
    assert summary.failed == 0 and summary.objects == 8
    signed = s3 | {"anon": False}  # hats and lsdb read s3:// anonymously by default
    assert is_valid_catalog(UPath("s3://survey/out", **signed), strict=True)
    out = lsdb.open_catalog("s3://survey/out", storage_options=signed).compute()
    assert sorted(out.object_id) == sorted(_input("s3://survey/in", signed).object_id)
    assert fs.exists(f"survey/out/{RUN_CONFIG_FILE}") and not fs.exists("survey/out/_d4a_work")
    assert len(fs.glob("survey/out/fits/*/*.fits")) == 8


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_row_limit_and_staged_packs_reproduce_the_same_rows(
    ray_local, tiny_survey, tiny_prior, tmp_path
):
    expect, parts = [], 0
    for part in open_input_catalog(str(tiny_survey)).partitions:  # partition order
        if len(expect) < 3:
            expect += pq.read_table(part.uri)["object_id"].to_pylist()[: 3 - len(expect)]
            parts += 1
    staged = tmp_path / "staged"
    a = run_survey(str(tiny_survey), str(tmp_path / "a"), str(tiny_prior), CONFIG,
                   ExecutionOptions(batch_size=4, limit=3, write_staged=str(staged)))  # fmt: skip
    b = run_survey(str(tiny_survey), str(tmp_path / "b"), str(tiny_prior), CONFIG,
                   ExecutionOptions(batch_size=2, read_staged=str(staged)))  # fmt: skip
    assert a.objects == b.objects == 3 and a.partitions == b.partitions == parts
    da = pd.read_parquet(tmp_path / "a" / "dataset").sort_values("object_id")
    db = pd.read_parquet(tmp_path / "b" / "dataset").sort_values("object_id")
    assert sorted(da.object_id) == sorted(expect)
    # per-object seeds: the same samples whatever the batching (to float tolerance)
    for col in (Col.CHI2, "flux_i", Col.HALLUCINATION):
        np.testing.assert_allclose(da[col].to_numpy(), db[col].to_numpy(), rtol=1e-4)
