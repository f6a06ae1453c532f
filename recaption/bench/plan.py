"""`recaption bench plan`: what a start costs before the first image (plan the input, find the done units, prepare
the output) over 10 000 and 100 000 units on a local S3 server (moto, in a process of its own), cold and resumed.

Tars (one tiny sample each) and done markers are written straight into the server's store, as a run would have left
them; a resumed output also has the done manifest a killed run's driver leaves (current but for the last 1 % of its
commits). The old way (every marker read one GET at a time, twice) is timed at the smaller size for comparison.

Stock moto answers each 1000-key page of a listing by scanning and sorting the whole bucket (O(N²) in the listing's
size: about a minute per 100 000-key listing on a loaded 2-core machine), which measures moto, not the planner; so
the server answers listings from a sorted index of key names (same keys and pages as S3 gives), and one row shows
the stock listing at the smaller size.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import socket
import tarfile
import time
from pathlib import Path

from recaption.bench.result import BenchResult, Measurement

log = logging.getLogger(__name__)

TARGET_S = 60.0  # issue 16: planning + resuming over 100 000 units on a local S3 server in under a minute
CALL_TIMEOUT_S = 900.0  # filling a bucket with 100 000 objects, on a loaded machine
MARKER = {"rows": 1, "ok": 1, "failed": 0, "skipped": 0, "tokens": 42, "seconds": 1.25, "config_hash": "bench"}


def bench_plan(result: BenchResult, work: Path, quick: bool) -> None:
    """Adds the plan measurements to `result` (skipped, with a line, where moto[server] is not installed)."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        print("bench: plan skipped: it needs a local S3 server (pip install 'moto[server]')", flush=True)
        return
    sizes = (300, 1500) if quick else (10_000, 100_000)
    with S3Server() as server:
        per_unit: dict[tuple[int, float], float] = {}
        for n in sizes:
            tars = server.tars(n)
            for done in (0.0, 0.5, 1.0):
                seconds, report = time_start(server, tars, server.output(n, done, manifest=done > 0))
                per_unit[n, done] = seconds / n
                growth = ""
                if n != sizes[0]:
                    growth = f", {per_unit[n, done] / per_unit[sizes[0], done]:.2f}x the per-unit cost at {sizes[0]}"
                name = f"plan: {n} units, " + ("cold, nothing done" if done == 0 else f"resume, {done:.0%} done")
                result.add(
                    Measurement(
                        name, seconds, "s", TARGET_S, seconds / TARGET_S, "<= 1.0" if n == sizes[-1] else None,
                        note=f"{seconds / n * 1e6:.0f} us/unit{growth}; {report}; ratio = seconds / {TARGET_S:.0f} s",
                    )
                )  # fmt: skip
        n = sizes[0]
        tars = server.tars(n)
        out = server.output(n, 0.5, manifest=False)
        seconds, report = time_start(server, tars, out)
        legacy_out = server.output(n, 0.5, manifest=False)
        legacy = time_legacy(server, tars, legacy_out)
        result.add(
            Measurement(
                f"plan: {n} units, resume, 50% done, no manifest", seconds, "s", legacy, seconds / legacy, "<= 0.5",
                note=f"{report}; baseline = the old way (every marker read one GET at a time, twice): {legacy:.1f} s",
            )
        )  # fmt: skip
        out = server.output(n, 1.0, manifest=True)
        server.listing("stock")
        seconds, report = time_start(server, tars, out)
        server.listing("indexed")
        result.add(
            Measurement(
                f"plan: {n} units, resume, 100% done, stock moto listing", seconds, "s", TARGET_S, seconds / TARGET_S,
                note=f"{report}; moto scans the bucket for every page of a listing: O(N^2), not the planner's cost",
            )
        )  # fmt: skip


def time_start(server: S3Server, tars: str, out: str) -> tuple[float, str]:
    """What `recaption run` does before Ray starts: plan, the done units, prepare (the same calls, in its order)."""
    from recaption.config import InputConfig
    from recaption.job import DoneManifest, open_output
    from recaption.sources import plan_units

    output = open_output(out)
    requests = server.requests()
    t0 = time.perf_counter()
    units = plan_units(InputConfig(path=tars), out)
    t_plan = time.perf_counter() - t0
    manifest = DoneManifest(output)
    done = manifest.refresh()
    output.prepare(done)
    todo = [u for u in units if u.unit not in done]
    seconds = time.perf_counter() - t0
    requests = {k: v - requests.get(k, 0) for k, v in server.requests().items() if v - requests.get(k, 0)}
    report = (
        f"{len(todo)} to do; plan {t_plan:.1f} s, done units {manifest.last_refresh_s:.1f} s; "
        f"{manifest.markers_read} markers read; requests {', '.join(f'{k} {v}' for k, v in sorted(requests.items()))}"
    )
    return seconds, report


def time_legacy(server: S3Server, tars: str, out: str) -> float:
    """The start before the manifest: plan, then every marker read one GET at a time, twice (prepare's and the
    run's look at the done units)."""
    import pyarrow.fs as pafs

    from recaption.config import InputConfig
    from recaption.job import DONE_DIR, open_output, unit_of_marker
    from recaption.sources import plan_units

    output = open_output(out)
    t0 = time.perf_counter()
    units = plan_units(InputConfig(path=tars))
    for _ in range(2):
        done = {}
        for info in output.fs.get_file_info(pafs.FileSelector(output.path(DONE_DIR), allow_not_found=True)):
            unit = unit_of_marker(info.base_name)
            if info.is_file and unit is not None:
                done[unit] = json.loads(output.read_bytes(info.path))
    assert [u for u in units if u.unit not in done]
    return time.perf_counter() - t0


def tiny_tar() -> bytes:
    """One sample: an image member (never decoded at planning) and its caption."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("000000000.jpg", b"\xff\xd8\xff" + bytes(200)), ("000000000.txt", b"a tiny sample")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class S3Server:
    """moto's S3 server in a process of its own (so the planner and the server do not share one interpreter lock),
    with buckets filled straight into its store."""

    def __init__(self) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_serve, args=(child,), daemon=True)
        self.endpoint = ""
        self.made: set[str] = set()

    def __enter__(self) -> S3Server:
        self.proc.start()
        port = self.call("port")
        self.endpoint = f"endpoint_override=127.0.0.1:{port}&scheme=http"
        for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench")):
            os.environ.setdefault(name, value)
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call("stop")
        finally:
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()

    def call(self, *args: object):
        self.conn.send(args)
        if not self.conn.poll(CALL_TIMEOUT_S):
            raise RuntimeError(f"bench S3 server: no answer to {args[0]} in {CALL_TIMEOUT_S:.0f} s")
        ok, value = self.conn.recv()
        if not ok:
            raise RuntimeError(f"bench S3 server: {value}")
        return value

    def tars(self, n: int) -> str:
        bucket = f"tars-{n}"
        if bucket not in self.made:
            self.call("tars", bucket, n, tiny_tar())
            self.made.add(bucket)
        return f"s3://{bucket}/shards?{self.endpoint}"

    def output(self, n: int, done: float, manifest: bool) -> str:
        """A new output bucket holding what runs left: the owner record, markers of the first `done` of the units,
        and (with `manifest`) the done manifest as a killed run's keeper leaves it (all but its last 1 % of commits)."""
        from recaption.job import DoneManifest, open_output

        bucket = f"out-{n}-{int(done * 100)}-{len(self.made)}"
        self.made.add(bucket)
        units = [f"{i:06d}" for i in range(int(n * done))]
        self.call("output", bucket, units, MARKER)
        uri = f"s3://{bucket}/captions?{self.endpoint}"
        if manifest and units:
            out = open_output(uri)
            listed = out.marker_infos()
            known = units[: len(units) - len(units) // 100]
            entries = {u: (listed[u].size, listed[u].mtime_ns, {**MARKER, "unit": u}) for u in known}
            DoneManifest(out)._save(entries)
        return uri

    def listing(self, how: str) -> None:
        self.call("listing", how)

    def requests(self) -> dict[str, int]:
        return self.call("requests")


def _serve(conn) -> None:  # pragma: no cover - runs in the server's process
    """The server process: moto's threaded server, and commands from the bench over `conn`."""
    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench")):
        os.environ.setdefault(name, value)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    counts = _count_requests()
    stock = _indexed_listing()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    store = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "port":
                value = port
            elif cmd == "tars":
                bucket, n, data = args
                store.create_bucket(bucket, "us-east-1")
                for i in range(n):
                    store.put_object(bucket, f"shards/{i:06d}.tar", data)
                value = n
            elif cmd == "output":
                bucket, units, marker = args
                store.create_bucket(bucket, "us-east-1")
                owner = {"tool": "recaption", "kind": "captions", "layout": 2, "created_at": time.time()}
                store.put_object(bucket, "captions/_recaption.json", json.dumps(owner).encode())
                for unit in units:
                    body = json.dumps({**marker, "unit": unit, "committed_at": time.time()}, indent=2).encode()
                    store.put_object(bucket, f"captions/_done/{unit}.recaption.json", body)
                value = len(units)
            elif cmd == "listing":
                stock(args[0] == "stock")
                value = args[0]
            elif cmd == "requests":
                value = dict(counts)
            elif cmd == "stop":
                server.stop()
                conn.send((True, None))
                return
            else:
                raise ValueError(f"unknown command {cmd!r}")
            conn.send((True, value))
        except Exception as e:  # noqa: BLE001 - reported to the bench, which raises it
            conn.send((False, f"{type(e).__name__}: {e}"))


def _count_requests() -> dict[str, int]:  # pragma: no cover - server process
    """Counts the S3 requests the server answers, by kind (LIST, GET, HEAD, PUT…)."""
    from collections import Counter

    from moto.s3.responses import S3Response

    counts: Counter = Counter()
    original = S3Response._bucket_response_get, S3Response._key_response

    def bucket_get(self, bucket_name, querystring):
        counts["LIST" if "list-type" in querystring or "prefix" in querystring else "GET bucket"] += 1
        return original[0](self, bucket_name, querystring)

    def key_response(self, request, full_url):
        counts[request.method] += 1
        return original[1](self, request, full_url)

    S3Response._bucket_response_get = bucket_get
    S3Response._key_response = key_response
    return counts


def _indexed_listing():  # pragma: no cover - server process
    """Serves ListObjectsV2 pages from a sorted index of each bucket's key names (rebuilt after a write) and writes
    them from a template: one page costs O(page), as on S3. Returns a switch back to moto's own listing."""
    import bisect
    import hashlib
    from xml.sax.saxutils import escape

    from moto.s3.models import FakeKey, S3Backend
    from moto.s3.responses import S3Response
    from moto.s3.utils import _VersionedKeyStore

    state = {"writes": 0, "stock": False}
    names: dict[int, tuple[int, list[str]]] = {}
    for method in ("__setitem__", "setlist", "pop", "__delitem__"):
        original = getattr(_VersionedKeyStore, method)

        def counted(self, *a, _original=original, **kw):
            state["writes"] += 1
            return _original(self, *a, **kw)

        setattr(_VersionedKeyStore, method, counted)
    stock_listing = S3Backend.list_objects_v2

    def list_objects_v2(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys):
        if state["stock"]:
            return stock_listing(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys)
        cached = names.get(id(bucket.keys))
        if cached is None or cached[0] != state["writes"]:
            cached = (state["writes"], sorted(dict.keys(bucket.keys)))
            names[id(bucket.keys)] = cached
        keys, prefix = cached[1], prefix or ""
        after = self._pagination_tokens.get(continuation_token) if continuation_token else start_after
        i = bisect.bisect_left(keys, prefix)
        if after:
            i = max(i, bisect.bisect_right(keys, after))
            if delimiter and after.endswith(delimiter):
                i = max(i, bisect.bisect_left(keys, after + "\U0010ffff"))
        page, last = [], None
        while i < len(keys) and len(page) < max_keys and keys[i].startswith(prefix):
            rest = keys[i][len(prefix) :]
            if delimiter and delimiter in rest:
                last = prefix + rest.split(delimiter)[0] + delimiter
                page.append(last)
                i = bisect.bisect_left(keys, last + "\U0010ffff")
                continue
            key = bucket.keys.get(keys[i])
            if isinstance(key, FakeKey):
                page.append(key)
                last = keys[i]
            i += 1
        truncated = i < len(keys) and keys[i].startswith(prefix) and last is not None
        token = None
        if truncated:
            token = hashlib.md5(last.encode()).hexdigest()
            self._pagination_tokens[token] = last
        return page, truncated, token

    S3Backend.list_objects_v2 = list_objects_v2
    stock_response = S3Response.list_objects_v2

    def list_response(self):
        """The ListObjectsV2 page as S3 writes it, from a string template: moto's generic serializer spends about a
        millisecond per key (most of a listing's time), which S3 does not."""
        if state["stock"]:
            return stock_response(self)
        bucket = self.backend.get_bucket(self.bucket_name)
        query = self._get_querystring(self.request, self.uri)
        arg = lambda name: (query.get(name) or [None])[0]  # noqa: E731
        prefix, delimiter, token = arg("prefix") or "", arg("delimiter"), arg("continuation-token")
        max_keys = int(arg("max-keys") or 1000)
        page, truncated, next_token = self.backend.list_objects_v2(
            bucket, prefix, delimiter, token, arg("start-after"), max_keys
        )
        parts = [
            '<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
            f"<Name>{escape(bucket.name)}</Name><Prefix>{escape(prefix)}</Prefix><MaxKeys>{max_keys}</MaxKeys>",
            f"<KeyCount>{len(page)}</KeyCount><IsTruncated>{str(truncated).lower()}</IsTruncated>",
        ]
        if delimiter:
            parts.append(f"<Delimiter>{escape(delimiter)}</Delimiter>")
        for item in page:
            if isinstance(item, FakeKey):
                parts.append(
                    f"<Contents><Key>{escape(item.name)}</Key><LastModified>{item.last_modified_ISO8601}</LastModified>"
                    f"<ETag>{escape(item.etag)}</ETag><Size>{item.size}</Size><StorageClass>STANDARD</StorageClass>"
                    "</Contents>"
                )
            else:
                parts.append(f"<CommonPrefixes><Prefix>{escape(item)}</Prefix></CommonPrefixes>")
        if next_token:
            parts.append(f"<NextContinuationToken>{next_token}</NextContinuationToken>")
        parts.append("</ListBucketResult>")
        return 200, {**self.response_headers, "Content-Type": "application/xml"}, "".join(parts)

    S3Response.list_objects_v2 = list_response
    return lambda on: state.update(stock=on)
