"""Partition fingerprints from one read per partition and one listing per folder."""

from __future__ import annotations

import shutil
import threading
import time

import pyarrow.parquet as pq
import pytest

from d4a_batch.config import ColumnMap
from d4a_batch.pipeline.fingerprint import (
    fingerprint_partitions,
    fingerprint_partitions_local,
    list_folder,
)
from d4a_batch.pipeline.ledger import partition_fingerprint
from d4a_batch.survey.hats_io import open_input_catalog

BANDS = ("g", "r", "i")
COLUMNS = ColumnMap()


class CountingMotoServer:
    """moto's S3 server on a free loopback port, counting the HTTP requests it answers."""

    def __init__(self):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self.requests = 0
        self.methods: dict[str, int] = {}
        lock = threading.Lock()

        def counting(environ, start_response):
            with lock:
                self.requests += 1
                m = environ["REQUEST_METHOD"]
                self.methods[m] = self.methods.get(m, 0) + 1
            return app(environ, start_response)

        self._server = make_server("127.0.0.1", 0, counting, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self.options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.url, "region_name": "us-east-1"},
        }

    def reset(self) -> None:
        self.requests, self.methods = 0, {}

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()


@pytest.fixture
def counting_s3():
    boto3 = pytest.importorskip("boto3")
    server = CountingMotoServer()
    boto3.client(
        "s3",
        endpoint_url=server.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket="survey")
    yield server
    server.stop()


def _old(cat, storage_options=None) -> dict:
    """The per-file (HEAD / stat) fingerprints of every partition."""
    return {
        p.healpix: partition_fingerprint(p, COLUMNS, BANDS, cat.root, -1, storage_options)
        for p in cat.partitions
    }


def test_local_fingerprints_equal_the_per_file_ones_and_follow_changes(tiny_survey, tmp_path):
    root = tmp_path / "survey"
    shutil.copytree(tiny_survey, root)
    cat = open_input_catalog(str(root))
    new = fingerprint_partitions_local(cat.partitions, COLUMNS, BANDS, cat.root)
    old = _old(cat)
    # the same digests: ledgers written with the per-file fingerprint keep planning right
    assert new.fingerprints == {k: fp for k, (fp, _) in old.items()}
    assert new.rows == {k: n for k, (_, n) in old.items()} and not new.failed
    assert new.files_read == len(cat.partitions)
    assert new.listings == 6  # g/r/i cutouts and PSFs: one folder each

    # a rewritten cutout changes exactly the partition that names it
    part = cat.partitions[0]
    uri = pq.read_table(part.uri)["r_cutout_uri"][0].as_py()
    time.sleep(0.01)
    (root / uri).write_bytes((root / uri).read_bytes() + b"\0" * 2880)
    a = fingerprint_partitions_local(cat.partitions, COLUMNS, BANDS, cat.root)
    changed = {k for k in a.fingerprints if a.fingerprints[k] != new.fingerprints[k]}
    assert changed == {part.healpix}
    # a deleted PSF too, and the result still equals the per-file fingerprint
    psf = pq.read_table(part.uri)["i_psf_uri"][0].as_py()
    (root / psf).unlink()
    b = fingerprint_partitions_local(cat.partitions, COLUMNS, BANDS, cat.root)
    assert b.fingerprints[part.healpix] != a.fingerprints[part.healpix]
    assert b.fingerprints == {k: fp for k, (fp, _) in _old(cat).items()}


def test_an_unreadable_partition_fails_alone(tiny_survey, tmp_path):
    root = tmp_path / "survey"
    shutil.copytree(tiny_survey, root)
    cat = open_input_catalog(str(root))
    bad = cat.partitions[1]
    with open(bad.uri, "wb") as f:
        f.write(b"PAR1 not parquet")
    res = fingerprint_partitions_local(cat.partitions, COLUMNS, BANDS, cat.root)
    assert set(res.failed) == {bad.healpix}
    assert "cannot read partition" in res.failed[bad.healpix]
    assert len(res.fingerprints) == len(cat.partitions) - 1


def test_missing_folder_lists_empty(tmp_path):
    assert list_folder(str(tmp_path / "nope")).num_rows == 0


def test_on_s3_the_same_digests_with_one_get_per_partition(tiny_survey, counting_s3):
    import s3fs

    so = counting_s3.options
    s3fs.S3FileSystem(**so).put(str(tiny_survey), "survey/in", recursive=True)
    cat = open_input_catalog("s3://survey/in", so)
    old = _old(cat, so)
    counting_s3.reset()
    s3fs.S3FileSystem.clear_instance_cache()
    new = fingerprint_partitions_local(cat.partitions, COLUMNS, BANDS, cat.root, "", so)
    assert new.fingerprints == {k: fp for k, (fp, _) in old.items()}
    # one GET per partition file, one listing (a GET) per folder; no HEAD per file
    assert counting_s3.methods == {"GET": len(cat.partitions) + 6}, counting_s3.methods


@pytest.mark.ray
def test_ray_tasks_give_the_same_result(ray_local, tiny_survey):
    cat = open_input_catalog(str(tiny_survey))
    local = fingerprint_partitions_local(cat.partitions, COLUMNS, BANDS, cat.root)
    # groups of 2 partitions per task: several groups, the last one short
    remote = fingerprint_partitions(cat.partitions, COLUMNS, BANDS, cat.root, group_size=2)
    assert len(cat.partitions) > 2
    assert remote.fingerprints == local.fingerprints and remote.rows == local.rows
    assert (remote.files_read, remote.listings) == (local.files_read, local.listings)
