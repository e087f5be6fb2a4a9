"""URIs and filesystems: local paths and remote URLs (s3://, gs://, ...) through fsspec.

Cutout and PSF URIs in an input catalog are absolute (``/data/x.fits``,
``s3://bucket/x.fits``, ``file:///data/x.fits``) or relative to the catalog
root (``cutouts/i/123.fits``); ``resolve_uri`` turns the latter into the
former, so a whole survey folder can move (e.g. to S3) unchanged.
``storage_options`` (credentials, ``endpoint_url`` in ``client_kwargs``...)
are handed to fsspec as they are, plus, for s3:// URIs, botocore retry defaults
(``S3_RETRIES``) unless the options set ``config_kwargs["retries"]`` themselves:
throttling (503 SlowDown) and dropped connections are retried with backoff.
``safe_join`` builds output paths from catalog values without leaving the root.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

import fsspec
from fsspec.core import url_to_fs

# botocore retries (standard mode: exponential backoff with jitter, capped at 20 s) on
# throttling, 5xx and connection errors; s3fs retries each failed call 5 more times.
S3_RETRIES = {"max_attempts": 10, "mode": "standard"}
S3_PROTOCOLS = ("s3://", "s3a://")


def has_scheme(uri: str) -> bool:
    """True for URLs with a protocol (``s3://...``, ``file://...``)."""
    return "://" in uri


def is_absolute(uri: str) -> bool:
    """True for URLs and absolute local paths."""
    return has_scheme(uri) or os.path.isabs(uri)


def join_uri(root: str, *parts: str) -> str:
    """``root/part/...`` for local paths and URLs alike (forward slashes)."""
    root = str(root)
    if has_scheme(root):
        return posixpath.join(root.rstrip("/"), *parts)
    return os.path.join(root, *parts)


def safe_join(root: str, *parts: str | int) -> str:
    """``join_uri(root, *parts)`` that stays under ``root``, for paths built from data.

    Raises ValueError for a part that is absolute, carries a scheme (``s3://``,
    ``file://``) or a NUL byte, or whose ``..`` segments climb out of ``root``.
    """
    rel = []
    for part in map(str, parts):
        if has_scheme(part) or part.startswith("/") or os.path.isabs(part) or "\0" in part:
            raise ValueError(f"path part {part!r} is absolute or a URL; expected a relative name")
        rel.append(part)
    joined = posixpath.normpath(posixpath.join(*rel)) if rel else "."
    if joined == ".." or joined.startswith("../"):
        raise ValueError(f"path {'/'.join(rel)!r} escapes the root {root!r}")
    return str(root) if joined == "." else join_uri(root, joined)


def resolve_uri(uri: str, root: str) -> str:
    """An absolute URI or path as is; a relative one joined to ``root`` (the catalog root)."""
    return uri if is_absolute(uri) else join_uri(root, uri)


def with_s3_retries(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``storage_options``; for s3:// URIs with ``S3_RETRIES`` unless retries are set."""
    options = dict(storage_options or {})
    if str(uri).startswith(S3_PROTOCOLS):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", dict(S3_RETRIES))
        options["config_kwargs"] = config
    return options


def filesystem(
    uri: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for ``uri``: the fsspec filesystem and the path within it."""
    return url_to_fs(str(uri), **with_s3_retries(uri, storage_options))


def hats_storage_options(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Storage options for hats calls, with s3fs's own defaults.

    For s3:// hats defaults to anonymous reads and a small block size (too small to
    write: S3 parts are >= 5 MiB); here hats signs requests and writes like s3fs does
    unless ``anon`` / ``default_block_size`` are given.
    """
    options = with_s3_retries(uri, storage_options)
    if str(uri).startswith(S3_PROTOCOLS):
        options.setdefault("anon", False)
        options.setdefault("default_block_size", 5 * 2**20)
    return options


def absolute_uri(uri: str) -> str:
    """A local path made absolute (URLs unchanged): Ray jobs run in a temporary working dir."""
    return str(uri) if has_scheme(str(uri)) else os.path.abspath(uri)
