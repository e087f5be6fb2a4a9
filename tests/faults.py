"""Fault injection for storage tests: a real S3 server (moto) behind a flaky HTTP proxy.

``FlakyS3Proxy`` is a threaded reverse proxy on 127.0.0.1 that forwards every request
unchanged to an upstream S3 endpoint, except that it answers some object reads and
writes with ``503 SlowDown`` (the S3 throttling error) or drops the connection
without answering. Injected requests never reach the upstream, so a retried request
is the only way the data gets there::

    with moto_s3("bucket") as upstream, FlakyS3Proxy(upstream.url, fail_every=3) as proxy:
        fs = s3fs.S3FileSystem(**upstream.options(proxy.url))
        ...
        assert proxy.injected > 0
"""

from __future__ import annotations

import contextlib
import http.client
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

SLOWDOWN_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    "<Message>Please reduce your request rate.</Message>"
    "<RequestId>{rid}</RequestId><HostId>flaky-proxy</HostId></Error>"
)
# headers that describe one connection, not the message (RFC 9110 section 7.6.1)
HOP_BY_HOP = frozenset(
    "connection keep-alive proxy-authenticate proxy-authorization te trailer "
    "transfer-encoding upgrade expect content-length".split()
)


class FlakyS3Proxy:
    """Loopback reverse proxy to ``upstream_url`` that fails some object GETs / PUTs.

    Eligible requests: a method in ``methods`` on an object key (``/bucket/key``, so
    bucket listings and creation pass). The n-th eligible request (n = 1, 2, ...) is
    dropped (connection closed, no answer) when ``drop_every`` divides n, answered
    ``503 SlowDown`` when n <= ``fail_first`` or ``fail_every`` divides n, and
    forwarded otherwise. Counters: ``eligible``, ``injected`` (503s), ``dropped``,
    ``forwarded`` (all requests that reached the upstream).
    """

    def __init__(
        self,
        upstream_url: str,
        fail_every: int = 3,
        methods: tuple[str, ...] = ("GET", "PUT"),
        fail_first: int = 0,
        drop_every: int = 0,
    ):
        up = urllib.parse.urlsplit(upstream_url)
        if up.scheme != "http" or not up.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream_url!r}")
        self.upstream = (up.hostname, up.port or 80)
        self.fail_every, self.fail_first, self.drop_every = fail_every, fail_first, drop_every
        self.methods = frozenset(m.upper() for m in methods)
        self.eligible = self.injected = self.dropped = self.forwarded = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("proxy not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        """Listen on a free loopback port; returns the proxy's URL."""
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="flaky-s3-proxy", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> FlakyS3Proxy:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def decide(self, method: str, path: str) -> str:
        """``"forward"``, ``"fail"`` or ``"drop"`` for a request (counts it)."""
        bucket_and_key = urllib.parse.urlsplit(path).path.lstrip("/").split("/", 1)
        with self._lock:
            if method not in self.methods or len(bucket_and_key) < 2 or not bucket_and_key[1]:
                action = "forward"
            else:
                self.eligible += 1
                n = self.eligible
                if self.drop_every and n % self.drop_every == 0:
                    action = "drop"
                elif n <= self.fail_first or (self.fail_every and n % self.fail_every == 0):
                    action = "fail"
                else:
                    action = "forward"
            if action == "fail":
                self.injected += 1
            elif action == "drop":
                self.dropped += 1
            else:
                self.forwarded += 1
            return action


class _ProxyHandler(BaseHTTPRequestHandler):
    owner: FlakyS3Proxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        body = self._body()
        action = self.owner.decide(self.command, self.path)
        if action == "drop":
            self.close_connection = True
            return
        if action == "fail":
            rid = uuid.uuid4().hex[:16].upper()
            err = SLOWDOWN_BODY.format(rid=rid).encode()
            headers = [
                ("Content-Type", "application/xml"),
                ("Content-Length", str(len(err))),
                ("x-amz-request-id", rid),
            ]
            self._reply(503, headers, err)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
            length = resp.getheader("Content-Length") if self.command == "HEAD" else None
            out.append(("Content-Length", length or str(len(data))))
            self._reply(resp.status, out, data)
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


@dataclass
class MotoS3:
    """A running moto S3 server with one bucket and the credentials to reach it."""

    url: str
    bucket: str
    key: str
    secret: str

    def options(self, endpoint_url: str | None = None) -> dict[str, Any]:
        """s3fs storage options for the server (or for a proxy in front of it)."""
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": endpoint_url or self.url},
        }


def reset_moto(url: str) -> None:
    """Empty moto's in-memory backends (moto's ``/moto-api/reset``).

    moto keeps its S3 state per *process*, not per server: a new server on another port
    still lists the buckets and objects an earlier test wrote (the multi-node test saw
    test_engine's committed ``s3://survey/out`` ledger as its own run's). Each test's
    server starts empty.
    """
    req = urllib.request.Request(f"{url}/moto-api/reset", method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200, r.status


@contextlib.contextmanager
def moto_s3(bucket: str, key: str = "testing", secret: str = "testing") -> Iterator[MotoS3]:
    """A ``moto.server.ThreadedMotoServer`` on a free loopback port with ``bucket`` created."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        reset_moto(url)
        client = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id=key,
            aws_secret_access_key=secret,
        )
        client.create_bucket(Bucket=bucket)
        yield MotoS3(url, bucket, key, secret)
    finally:
        server.stop()
