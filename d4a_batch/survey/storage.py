"""URIs and filesystems: local paths and remote URLs (s3://, gs://, ...) through fsspec.

Cutout and PSF URIs in an input catalog are absolute (``/data/x.fits``,
``s3://bucket/x.fits``, ``file:///data/x.fits``) or relative to the catalog
root (``cutouts/i/123.fits``); ``resolve_uri`` turns the latter into the
former, so a whole survey folder can move (e.g. to S3) unchanged.
``storage_options`` (credentials, ``endpoint_url`` in ``client_kwargs``...)
are handed to fsspec as they are, plus, for s3:// URIs, botocore retry and
timeout defaults (``S3_RETRIES``, ``S3_CONNECT_TIMEOUT_S``) unless the options set
``config_kwargs["retries"]`` / ``["connect_timeout"]`` themselves: throttling (503
SlowDown) and dropped connections are retried with backoff (s3fs retries SlowDown
and dropped connections 5 more times on top), while a storage that cannot be
reached at all (no such endpoint, no credentials) fails in seconds, not minutes.
``safe_join`` builds output paths from catalog values without leaving the root;
``overlap`` says whether two locations are the same or one holds the other.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

import fsspec
from fsspec.core import url_to_fs

# botocore retries (standard mode: exponential backoff with jitter, capped at 20 s) on
# throttling, 5xx and connection errors; s3fs retries throttling (SlowDown) and dropped
# connections 5 more times on top, so 4 attempts here still make 20 for those. An endpoint
# that cannot be reached is retried by botocore alone: 4 attempts wait about 3.5 s in all
# (at most 7 s), where 10 waited 45-85 s (issue 28), and each waits at most
# S3_CONNECT_TIMEOUT_S for a connection (botocore's default: 60 s).
S3_RETRIES = {"max_attempts": 4, "mode": "standard"}
S3_CONNECT_TIMEOUT_S = 10
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
    """A copy of ``storage_options``; for s3:// URIs with ``S3_RETRIES`` and
    ``S3_CONNECT_TIMEOUT_S`` unless the options set them."""
    options = dict(storage_options or {})
    if str(uri).startswith(S3_PROTOCOLS):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", dict(S3_RETRIES))
        config.setdefault("connect_timeout", S3_CONNECT_TIMEOUT_S)
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
    unless ``anon`` / ``default_block_size`` are given. A local path gets none: the options
    are for the URLs of a run (e.g. S3 cutouts next to a local catalog), and hats' local
    paths warn about any.
    """
    if not has_scheme(str(uri)) or str(uri).startswith("file://"):
        return {}
    options = with_s3_retries(uri, storage_options)
    if str(uri).startswith(S3_PROTOCOLS):
        options.setdefault("anon", False)
        options.setdefault("default_block_size", 5 * 2**20)
    return options


def _location(uri: str) -> tuple[str, str]:
    """``(filesystem, path)`` that names the same place however ``uri`` spells it: local
    paths (and file:// URLs) resolved (symlinks, ``..``), s3a:// as s3://, no trailing ``/``."""
    uri = str(uri)
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme in ("file", "local"):
        return "file", os.path.realpath(rest if sep else uri)
    scheme = "s3" if scheme in ("s3", "s3a") else scheme
    return scheme, posixpath.normpath("/" + rest).rstrip("/") or "/"


def overlap(a: str, b: str) -> str | None:
    """How ``a`` and ``b`` overlap: ``"is"`` (the same location), ``"inside"`` (``a`` lies
    inside ``b``), ``"holds"`` (``b`` lies inside ``a``); None when apart."""
    (fa, pa), (fb, pb) = _location(a), _location(b)
    if fa != fb:
        return None
    if pa == pb:
        return "is"
    if pa.startswith(pb.rstrip("/") + "/"):
        return "inside"
    if pb.startswith(pa.rstrip("/") + "/"):
        return "holds"
    return None


def output_location_problem(output: str, catalog: str, prior: str) -> str | None:
    """Why ``output`` may not be written (None: it may): it is the input catalog or the
    prior, lies inside one, or holds one (``--overwrite`` would delete it; writing there
    would change it)."""
    for what, where in (("input catalog", catalog), ("prior", prior)):
        how = overlap(output, where)
        if how is not None:
            words = {"is": "is", "inside": "lies inside", "holds": "holds"}[how]
            return (
                f"--output {output} {words} the {what} {where}: the output must be a "
                f"folder of its own, apart from the {what} (nothing was touched)"
            )
    return None


def absolute_uri(uri: str) -> str:
    """A local path made absolute (URLs unchanged): Ray jobs run in a temporary working dir."""
    return str(uri) if has_scheme(str(uri)) else os.path.abspath(uri)
