"""Inputs on S3 (moto's server on 127.0.0.1): planned and read through URIs with endpoint options."""

from __future__ import annotations

import http.client
import http.server
import threading
from collections import Counter

import pyarrow.fs as pafs
import pytest

from recaption.config import InputConfig
from recaption.errors import InputError
from recaption.sources import fs
from recaption.sources.plan import plan_units
from recaption.sources.read import read_unit
from tests.data import make_image, write_webdataset_dir


def test_webdataset_on_s3(s3_endpoint):
    root = f"s3://bucket/data/wds?{s3_endpoint}"
    keys = write_webdataset_dir(root, 5, 3)
    cfg = InputConfig(path=root)
    units = plan_units(cfg)
    assert [(u.unit, u.source) for u in units] == [("00000", "00000.tar"), ("00001", "00001.tar")]
    assert units[1].uri == f"s3://bucket/data/wds/00001.tar?{s3_endpoint}"
    records = [r for u in units for r in read_unit(u, cfg)]
    assert [r.key for r in records] == keys and all(r.error is None for r in records)
    assert records[3].image == make_image(3) and records[3].alt_text == "caption 3"
    with pytest.raises(InputError, match="not found: s3://bucket/nope"):
        plan_units(InputConfig(path=f"s3://bucket/nope?{s3_endpoint}"))


class Throttling(http.server.BaseHTTPRequestHandler):
    """A proxy in front of the local S3 that answers `503 SlowDown` to the first `left[kind]` listings and object
    reads, then forwards every request as it is."""

    protocol_version = "HTTP/1.1"
    upstream = ""
    left: Counter = Counter()
    seen: Counter = Counter()

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.forward()

    def do_GET(self) -> None:
        self.forward()

    def forward(self) -> None:
        kind = "list" if "list-type" in self.path else "get" if self.command == "GET" else "other"
        self.seen[kind] += 1
        if self.left[kind] > 0:
            self.left[kind] -= 1
            body = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>Reduce your rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        conn.request(self.command, self.path, headers=dict(self.headers))
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for name, value in resp.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(name, value)
        self.send_header(
            "Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
        )
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()


def test_a_throttling_store_is_retried_and_every_row_comes_once(s3_endpoint, monkeypatch):
    monkeypatch.setattr(fs, "RETRY_BASE_S", 0.0)
    write_webdataset_dir(f"s3://bucket/busy?{s3_endpoint}", 6, 3)
    upstream = s3_endpoint.split("&")[0].removeprefix("endpoint_override=")
    handler = type("Handler", (Throttling,), {"upstream": upstream, "left": Counter(list=2, get=3), "seen": Counter()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # The S3 client's own retries (up to 10) would hide the 503s: a client with none shows what outlasts them.
    client = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{server.server_address[1]}",
        scheme="http",
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    monkeypatch.setattr(fs, "_bucket_filesystem", lambda *_: client)
    try:
        cfg = InputConfig(path="s3://bucket/busy")
        units = plan_units(cfg)
        records = [r for u in units for r in read_unit(u, cfg)]
    finally:
        server.shutdown()
    assert [r.key for r in records] == [f"{i:09d}" for i in range(6)], [r.error for r in records]
    assert all(r.error is None for r in records)
    assert handler.left == Counter(list=0, get=0) and handler.seen["get"] >= 3 + 2
