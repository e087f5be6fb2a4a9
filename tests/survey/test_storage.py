"""URIs, S3 retry defaults and safe joins (no network)."""

from __future__ import annotations

import pytest

from d4a_batch.survey.storage import (
    S3_CONNECT_TIMEOUT_S,
    S3_RETRIES,
    filesystem,
    hats_storage_options,
    join_uri,
    overlap,
    resolve_uri,
    safe_join,
    with_s3_retries,
)


def test_relative_uris_resolve_against_the_catalog_root():
    assert resolve_uri("cutouts/g/1.fits", "s3://b/cat") == "s3://b/cat/cutouts/g/1.fits"
    assert resolve_uri("cutouts/g/1.fits", "/data/cat") == "/data/cat/cutouts/g/1.fits"
    assert resolve_uri("/abs/1.fits", "s3://b/cat") == "/abs/1.fits"
    assert resolve_uri("s3://x/1.fits", "/data/cat") == "s3://x/1.fits"
    assert join_uri("s3://b/cat/", "a", "b") == "s3://b/cat/a/b"


def test_s3_retry_defaults_are_added_without_overriding_the_user():
    user = {"key": "k", "config_kwargs": {"connect_timeout": 3}}
    got = with_s3_retries("s3://b/x", user)
    assert got["config_kwargs"] == {"connect_timeout": 3, "retries": S3_RETRIES}
    assert user == {"key": "k", "config_kwargs": {"connect_timeout": 3}}  # not mutated
    mine = {"config_kwargs": {"retries": {"total_max_attempts": 1}, "connect_timeout": 1}}
    assert with_s3_retries("s3a://b/x", mine) == mine
    timeout = with_s3_retries("s3://b/x", {"config_kwargs": {"retries": {"total_max_attempts": 1}}})
    assert timeout["config_kwargs"]["connect_timeout"] == S3_CONNECT_TIMEOUT_S
    assert with_s3_retries("/local/x", None) == {}
    assert with_s3_retries("gs://b/x", {"token": "anon"}) == {"token": "anon"}


def test_s3_filesystems_get_the_retry_config():
    opts = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    fs, path = filesystem("s3://bkt/a/b.fits", opts)
    assert path == "bkt/a/b.fits"
    # fsspec caches the instance and botocore rewrites its retries dict when it connects
    # (max_attempts 4 -> total_max_attempts 5), so compare the client's effective config below
    assert fs.config_kwargs["retries"]["mode"] == S3_RETRIES["mode"]
    fs.connect()  # builds the botocore client (no request is sent)
    retries = fs.s3.meta.config.retries
    assert retries["mode"] == "standard" and retries["total_max_attempts"] == 5
    assert fs.s3.meta.config.connect_timeout == S3_CONNECT_TIMEOUT_S
    hats = hats_storage_options("s3://bkt/cat", opts)
    assert hats["config_kwargs"]["retries"] == S3_RETRIES and hats["anon"] is False
    assert hats_storage_options("/local/cat", opts) == {}  # options are for URLs


@pytest.mark.parametrize("root", ["s3://bkt/out", "/data/out", "file:///data/out"])
def test_safe_join_stays_under_the_root(root):
    assert safe_join(root, "fits", "0_11", "123.fits") == join_uri(root, "fits/0_11/123.fits")
    assert safe_join(root, "Norder=0", 5, "-7.fits") == join_uri(root, "Norder=0/5/-7.fits")
    assert safe_join(root, "a/../b") == join_uri(root, "b")
    assert safe_join(root, "a/..") == root
    assert safe_join(root, "..x", "y..") == join_uri(root, "..x/y..")


@pytest.mark.parametrize(
    "parts",
    [
        ("..",),
        ("../x",),
        ("fits", "../../x"),
        ("a/../../x",),
        ("/etc/passwd",),
        ("fits", "/x.fits"),
        ("s3://other-bucket/x",),
        ("fits", "file:///etc/x"),
        ("a\0b",),
    ],
)
@pytest.mark.parametrize("root", ["s3://bkt/out", "/data/out"])
def test_safe_join_refuses_escapes(root, parts):
    with pytest.raises(ValueError):
        safe_join(root, *parts)


def test_overlap_sees_through_spellings(tmp_path):
    """The output may not be the input catalog, inside it or hold it (issue 28): ``overlap``
    compares locations, not strings (relative paths, ``..``, symlinks, file://, s3a://)."""
    cat = tmp_path / "cat"
    (cat / "sub").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(cat)
    assert overlap(str(cat), str(cat)) == "is"
    assert overlap(f"{cat}/", f"file://{cat}") == "is"
    assert overlap(str(link), str(cat)) == "is"
    assert overlap(str(tmp_path / "x" / ".." / "cat"), str(cat)) == "is"
    assert overlap(str(link / "sub" / "out"), str(cat)) == "inside"
    assert overlap(str(tmp_path), str(cat)) == "holds"
    assert overlap(str(tmp_path / "cat2"), str(cat)) is None  # a shared prefix is not a folder
    assert overlap("s3a://b/cat/out", "s3://b/cat/") == "inside"
    assert overlap("s3://b/cat", "s3://c/cat") is None
    assert overlap("s3://b/cat", str(cat)) is None
