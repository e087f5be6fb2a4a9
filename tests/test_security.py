"""Security: no unpickling of untrusted weights, no credentials in outputs or logs, no path escapes."""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from hats.pixel_math import HealpixPixel

from d4a_batch.config import ColumnMap, RunConfig, SamplerConfig
from d4a_batch.prior.artifact import PriorFormatError, load_prior
from d4a_batch.schema import PRIOR_CONFIG, PRIOR_WEIGHTS
from d4a_batch.survey.hats_io import Partition, read_partition
from d4a_batch.survey.output import fits_maps_uri
from d4a_batch.survey.storage import safe_join
from d4a_batch.testing import TINY_PRIOR
from d4a_batch.training.loop import CONFIG_FILE, STATE_FILE, load_checkpoint_dir
from tests.faults import FlakyS3Proxy, moto_s3
from tests.survey.conftest import tiny_prior, tiny_survey

__all__ = ["tiny_prior", "tiny_survey"]  # session fixtures used below

ACCESS_KEY = "AKIDTESTSECRET123"
SECRET_KEY = "sEcReT/value+xyz"


class Touch:
    """Unpickling this creates the file ``marker`` (stands for any code a pickle can run)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _evil(path: pathlib.Path, marker: pathlib.Path, how: str) -> None:
    """Write a pickle of a state dict that holds a ``Touch`` (torch's zip format or plain)."""
    state = {"time_embed.0.weight": torch.zeros(2), "x": Touch(marker)}
    if how == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dumps"])
def test_the_payload_is_live(tmp_path, how):
    """The control: loaded without restrictions, the payload does create its marker."""
    marker = tmp_path / "ran"
    _evil(tmp_path / "x.pt", marker, how)
    if how == "torch.save":
        torch.load(tmp_path / "x.pt", weights_only=False)
    else:
        pickle.loads((tmp_path / "x.pt").read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle.dumps"])
def test_prior_weights_are_never_unpickled(tmp_path, tiny_prior, how):
    marker = tmp_path / "ran"
    # a prior folder whose weights were swapped, its recorded sha256 updated to match
    folder = tmp_path / "prior"
    folder.mkdir()
    for f in tiny_prior.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    _evil(folder / PRIOR_WEIGHTS, marker, how)
    doc = json.loads((folder / PRIOR_CONFIG).read_text())
    doc["metadata"]["weights_sha256"] = hashlib.sha256(
        (folder / PRIOR_WEIGHTS).read_bytes()
    ).hexdigest()
    (folder / PRIOR_CONFIG).write_text(json.dumps(doc))
    with pytest.raises(PriorFormatError, match="not a safetensors file"):
        load_prior(folder)
    # an improved-diffusion checkpoint file
    _evil(tmp_path / "ckpt.pt", marker, how)
    with pytest.raises(PriorFormatError, match="refusing to load"):
        load_prior(tmp_path / "ckpt.pt", flags=TINY_PRIOR)
    assert not marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle.dumps"])
def test_training_checkpoints_are_never_unpickled(tmp_path, how):
    marker = tmp_path / "ran"
    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text("{}")
    _evil(folder / STATE_FILE, marker, how)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_checkpoint_dir(folder)
    assert not marker.exists()


# --------------------------------------------------------------------------- paths from the catalog
def _partition_file(path: pathlib.Path, object_ids: pa.Array) -> Partition:
    n = len(object_ids)
    cols = {"object_id": object_ids, "ra": np.full(n, 150.0), "dec": np.full(n, 2.0)}
    cols["photoz_best"] = np.full(n, 0.5)
    for b in "gri":
        cols[f"{b}_cutout_uri"] = [f"cutouts/{b}/{i}.fits" for i in range(n)]
        cols[f"{b}_psf_uri"] = [f"psfs/{b}/{i}.fits" for i in range(n)]
    pq.write_table(pa.table(cols), path)
    return Partition(order=0, pixel=4, uri=str(path))


def test_object_ids_are_integers_by_schema(tmp_path):
    """``read_partition`` takes integer object ids only: a path-like id cannot reach a file name
    (a string id column is refused whole, issue 28: ids never pass through a cast)."""
    evil = _partition_file(tmp_path / "evil.parquet", pa.array(["12", "../../x"]))
    with pytest.raises(ValueError, match="not an integer type"):
        read_partition(evil, ColumnMap(), ("g", "r", "i"))
    digits = _partition_file(tmp_path / "digits.parquet", pa.array(["12", "-7"]))
    with pytest.raises(ValueError, match="not an integer type"):  # digits as text: refused too
        read_partition(digits, ColumnMap(), ("g", "r", "i"))
    ints = _partition_file(tmp_path / "ints.parquet", pa.array([12, -7], pa.int64()))
    table = read_partition(ints, ColumnMap(), ("g", "r", "i"))
    assert table.schema.field("object_id").type == pa.int64()
    assert table["object_id"].to_pylist() == [12, -7]
    root = "s3://bkt/out"
    for oid in table["object_id"].to_pylist():
        uri = fits_maps_uri(root, HealpixPixel(0, 4), oid)
        assert uri == safe_join(root, "fits", "0_4", f"{oid}.fits")
    with pytest.raises(ValueError):
        fits_maps_uri(root, HealpixPixel(0, 4), "../../x")


# --------------------------------------------------------------------------- credentials
def _leaks(data: bytes | str, where: str) -> list[str]:
    data = data.encode() if isinstance(data, str) else data
    return [f"{s!r} in {where}" for s in (ACCESS_KEY, SECRET_KEY) if s.encode() in data]


def _parquet_cells(data: bytes) -> bytes:
    """Every value and metadata of a Parquet file as text (pages may be compressed)."""
    pf = pq.ParquetFile(pa.BufferReader(data))
    table = pf.read()
    return repr((table.schema.metadata, pf.metadata.metadata, table.to_pylist())).encode()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_credentials_never_reach_outputs_or_logs(ray_local, tiny_survey, tiny_prior, caplog):
    import ray

    from d4a_batch.pipeline.engine import ExecutionOptions, run_survey

    caplog.set_level(logging.DEBUG)
    config = RunConfig(sampler=SamplerConfig(steps=2, samples=1, seed=3), fits_maps=True)
    with (
        moto_s3("survey", key=ACCESS_KEY, secret=SECRET_KEY) as s3,
        FlakyS3Proxy(s3.url, fail_every=4) as proxy,  # retries and their logs too
    ):
        direct = s3fs.S3FileSystem(**s3.options(), skip_instance_cache=True)
        direct.put(str(tiny_survey), "survey/in", recursive=True)
        options = ExecutionOptions(batch_size=4, storage_options=s3.options(proxy.url))
        summary = run_survey(
            "s3://survey/in", "s3://survey/out-security", str(tiny_prior), config, options
        )
        files = direct.find("survey/out-security")
        outputs = {f: direct.cat_file(f) for f in files}
    assert summary.failed == 0 and proxy.injected > 0
    assert any(f.endswith("hats.properties") for f in outputs)
    assert any(f.endswith(".parquet") for f in outputs) and any(f.endswith(".fits") for f in files)
    leaks = _leaks(repr(summary), "the run summary")
    for f, data in outputs.items():
        leaks += _leaks(data, f)
        if f.endswith(".parquet"):  # footers (and _metadata) are plain, pages compressed
            leaks += _leaks(_parquet_cells(data), f"{f} (decoded)")
    # our loggers, at DEBUG
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("d4a_batch"))
    leaks += _leaks(ours, "d4a_batch log records")
    # every library in this process, at DEBUG: the secret key never; the access key id
    # only in botocore's DEBUG dump of a signed request (SigV4's "Credential=<key id>/...")
    for r in caplog.records:
        text = r.getMessage()
        signed = r.name.startswith("botocore") and f"Credential={ACCESS_KEY}/" in text
        leaks += _leaks(text.replace(ACCESS_KEY, "") if signed else text, f"{r.name} log")
    logs = pathlib.Path(ray._private.worker._global_node.get_logs_dir_path())
    ray_logs = sorted(p for p in logs.rglob("*") if p.is_file())
    assert ray_logs, f"no Ray logs under {logs}"
    for f in ray_logs:
        leaks += _leaks(f.read_bytes(), f"Ray log {f.name}")
    assert not leaks, leaks
