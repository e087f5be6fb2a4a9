"""Transient S3 errors (503 SlowDown, dropped connections) are retried through ``filesystem()``.

A real S3 server (moto) sits behind ``tests.faults.FlakyS3Proxy``, which fails object
reads and writes before they reach the server.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from d4a_batch.survey.fits_io import InputError, hsc_tan_wcs, read_hsc_cutout, write_hsc_cutout
from d4a_batch.survey.storage import filesystem
from tests.faults import FlakyS3Proxy, moto_s3

BUCKET = "faults"
SHAPE = (24, 20)


@pytest.fixture(scope="module")
def upstream():
    with moto_s3(BUCKET) as s3:
        yield s3


def _cutout(rng) -> dict[str, np.ndarray]:
    image = rng.normal(0, 1, SHAPE).astype(np.float32)
    mask = rng.integers(0, 4, SHAPE).astype(np.int32)
    return {"image": image, "mask": mask, "variance": np.abs(image) + 1}


@pytest.mark.parametrize(
    "faults", [{"fail_every": 2}, {"fail_every": 0, "drop_every": 2}], ids=["503", "drop"]
)
def test_fits_and_parquet_survive_transient_errors(upstream, faults, rng):
    root = f"s3://{BUCKET}/{'-'.join(map(str, faults.values()))}"
    c = _cutout(rng)
    table = pa.table({"object_id": np.arange(50, dtype=np.int64), "x": rng.normal(size=50)})
    with FlakyS3Proxy(upstream.url, **faults) as proxy:
        options = upstream.options(proxy.url)
        fs, path = filesystem(f"{root}/cutouts/1.fits", options)
        write_hsc_cutout(path, **c, wcs=hsc_tan_wcs(150.0, 2.0, SHAPE), fs=fs)
        got = read_hsc_cutout(path, fs)
        fs, ppath = filesystem(f"{root}/table.parquet", options)
        pq.write_table(table, ppath, filesystem=fs)
        assert pq.read_table(ppath, filesystem=fs).equals(table)
    for name in ("image", "mask", "variance"):
        np.testing.assert_array_equal(getattr(got, name), c[name])
    assert proxy.injected + proxy.dropped >= 2 and proxy.eligible > proxy.injected + proxy.dropped
    # what reached the server is whole (read back without the proxy)
    direct = s3fs.S3FileSystem(**upstream.options(), skip_instance_cache=True)
    np.testing.assert_array_equal(read_hsc_cutout(path, direct).image, c["image"])
    assert pq.read_table(ppath, filesystem=direct).equals(table)


def test_without_retries_the_injected_error_surfaces(upstream, rng):
    """The control: retries off (the user's choice is kept), one 503 fails the read."""
    c = _cutout(rng)
    path = f"{BUCKET}/control/1.fits"
    write_hsc_cutout(
        path,
        **c,
        wcs=hsc_tan_wcs(150.0, 2.0, SHAPE),
        fs=s3fs.S3FileSystem(**upstream.options(), skip_instance_cache=True),
    )
    no_retries = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}
    with FlakyS3Proxy(upstream.url, fail_every=0, fail_first=1) as proxy:
        fs, _ = filesystem(f"s3://{path}", upstream.options(proxy.url) | no_retries)
        fs.retries = 1  # s3fs's own retry loop (an attribute, not an option)
        with pytest.raises(InputError, match="reduce your request rate"):
            read_hsc_cutout(path, fs)
        assert proxy.injected == 1
        np.testing.assert_array_equal(read_hsc_cutout(path, fs).image, c["image"])
