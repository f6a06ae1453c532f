"""The done manifest: markers stay the truth (an entry without its marker, a marker the manifest lacks or holds an
older version of), each marker is read once, the running driver keeps it current, and a plan + resume over 2 000
units on S3 reads only what changed."""

from __future__ import annotations

import io
import json
import tarfile
import time

import pytest

from recaption.config import InputConfig
from recaption.job.manifest import DoneManifest
from recaption.job.writer import DONE_MANIFEST, OutputDir, open_output
from recaption.sources.plan import plan_units


def marker(unit: str, failed: int = 0, **extra) -> dict:
    stats = {"rows": 3, "ok": 3 - failed, "failed": failed, "skipped": 0, "tokens": 9, "seconds": 0.5}
    return {**stats, "config_hash": "h1", "unit": unit, "committed_at": 1.0, **extra}


def commit(out: OutputDir, unit: str, **kw) -> dict:
    m = marker(unit, **kw)
    out.write_json(out.marker_path(unit), m)
    return m


def test_each_marker_is_read_once_and_the_markers_stay_the_truth(tmp_path, caplog):
    out = open_output(str(tmp_path / "out"))
    out.claim()
    expected = {u: commit(out, u) for u in (f"u{i:03d}" for i in range(20))}
    first = DoneManifest(out)
    assert first.refresh() == expected and first.markers_read == 20
    assert (tmp_path / "out" / DONE_MANIFEST).is_file()

    (tmp_path / "out" / "_done" / "u003.recaption.json").unlink()  # an entry without its marker: not done
    del expected["u003"]
    expected["u100"] = commit(out, "u100")  # a marker the manifest lacks
    time.sleep(0.01)
    expected["u005"] = commit(out, "u005", failed=1, retried_rows=1, retried_at=2.0)  # rewritten (--retry-failed)
    again = DoneManifest(out)
    assert again.refresh() == expected and again.markers_read == 2
    assert DoneManifest(out).refresh() == expected  # the manifest was rewritten: nothing left to read
    third = DoneManifest(out)
    assert third.refresh() == expected and third.markers_read == 0

    (tmp_path / "out" / DONE_MANIFEST).write_bytes(b"not gzip")  # a damaged manifest costs reads, never a unit
    fourth = DoneManifest(out)
    assert fourth.refresh() == expected and fourth.markers_read == len(expected)
    assert "every marker is read again" in caplog.text

    out.clear()  # --overwrite: the manifest goes first, with the markers
    assert not (tmp_path / "out" / DONE_MANIFEST).exists() and DoneManifest(out).refresh() == {}


def test_the_running_driver_keeps_the_manifest_current(tmp_path):
    out = open_output(str(tmp_path / "out"))
    out.claim()
    manifest = DoneManifest(out)
    with manifest.kept_current(every_s=0.05):
        manifest.refresh()  # the plan's refresh: nothing done yet
        for i in range(5):
            commit(out, f"u{i}")
            time.sleep(0.03)
    # A killed run's successor reads nothing: the keeper folded every marker in (the last one at the block's end).
    after = DoneManifest(out)
    assert sorted(after.refresh()) == [f"u{i}" for i in range(5)] and after.markers_read == 0


def tiny_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("0.jpg", b"\xff\xd8 not decoded at planning"), ("0.txt", b"alt")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_plan_and_resume_of_2000_units_on_s3_reads_only_what_changed(s3_endpoint):
    """What `recaption run` does before any image: plan, the done units, prepare; tars and markers are written
    straight into the local S3 server's store (as the plan benchmark does at 100 000 units)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    store = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    n = 2000
    data = tiny_tar()
    for i in range(n):
        store.put_object("bucket", f"scale/in/{i:06d}.tar", data)
    out = open_output(f"s3://bucket/scale/out?{s3_endpoint}")
    out.claim()
    done = {f"{i:06d}": marker(f"{i:06d}") for i in range(0, n, 2)}  # half done, written by an earlier run
    for unit, m in done.items():
        store.put_object("bucket", f"scale/out/_done/{unit}.recaption.json", json.dumps(m).encode())
    DoneManifest(out).refresh()  # what the earlier run's keeper left: every marker so far
    # Then, before it was killed: 100 more commits, 1 marker rewritten by --retry-failed, 10 markers deleted by hand.
    for i in range(1, 201, 2):
        done[f"{i:06d}"] = marker(f"{i:06d}")
        store.put_object("bucket", f"scale/out/_done/{i:06d}.recaption.json", json.dumps(done[f"{i:06d}"]).encode())
    done["000004"] = marker("000004", failed=1, retried_rows=1)
    store.put_object("bucket", "scale/out/_done/000004.recaption.json", json.dumps(done["000004"]).encode())
    for i in range(1000, 1020, 2):
        del done[f"{i:06d}"]
        store.delete_object("bucket", f"scale/out/_done/{i:06d}.recaption.json")

    units = plan_units(InputConfig(path=f"s3://bucket/scale/in?{s3_endpoint}"), f"s3://bucket/scale/out?{s3_endpoint}")
    manifest = DoneManifest(out)
    found = manifest.refresh()
    out.prepare(found)
    assert len(units) == n and found == done
    assert manifest.markers_read == 100 + 1  # the new ones and the rewritten one, nothing else
    assert sorted(u.unit for u in units if u.unit not in found) == sorted(
        f"{i:06d}" for i in range(n) if f"{i:06d}" not in done
    )
    again = DoneManifest(out)
    assert again.refresh() == done and again.markers_read == 0


@pytest.mark.parametrize("missing", ["manifest", "nothing"])
def test_done_units_of_an_output_without_a_manifest(tmp_path, missing):
    out = open_output(str(tmp_path / "out"))
    out.claim()
    expected = {u: commit(out, u) for u in ("a", "b")}
    if missing == "nothing":
        DoneManifest(out).refresh()
    assert DoneManifest(out).refresh() == expected
