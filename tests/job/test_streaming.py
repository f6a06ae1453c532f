"""The streaming caption actor: several units in flight in one actor share the engine's batches, yet every caption
lands on its own image and every unit's rows in its own part file, in source order; decoded images in flight are
bounded whatever the unit size; an elastic pool grows with the work."""

from __future__ import annotations

import asyncio
import io
import random

import pyarrow.dataset as pads
import pytest
from PIL import Image

from recaption.captioners.engines.fake import fake_caption
from recaption.config import ImageConfig, load_config
from recaption.job import captioning
from recaption.job.pipeline import run_pipeline
from recaption.sources.images import decode_image
from recaption.sources.tar import write_webdataset
from tests.data import make_image
from tests.job.test_captioning import stage, unit_table

FAKE = {"path": "fake", "engine": "fake", "prompts": ["short", "objects"], "num_cpus": 0.25}


def test_units_in_flight_share_batches_and_each_gets_its_own_captions(tmp_path, monkeypatch):
    s = stage(tmp_path, batch_size=5, fake={"delay_s": 0.05})  # an engine busy enough for the next batch to form
    batches: list[list[int]] = []
    real = s.captioner.caption

    def recording(images, prompts, gen=None):
        batches.append([im.width for im in images])
        return real(images, prompts, gen)

    monkeypatch.setattr(s.captioner, "caption", recording)

    async def two_units():
        return await asyncio.gather(
            s.caption_unit_async("a", unit_table([50, 51, 52])), s.caption_unit_async("b", unit_table([60, 61, 62]))
        )

    a, b = asyncio.run(two_units())
    assert any({w // 10 for w in batch} == {5, 6} for batch in batches), batches  # a batch held both units
    for table, widths in ((a, [50, 51, 52]), (b, [60, 61, 62])):
        for row, width in zip(table.to_pylist(), widths, strict=True):
            assert row["width"] == width and row["status"] == "ok"
            image = Image.new("RGB", (width, 40), (width % 256, 80, 160))
            for cap, prompt in zip(row["captions"], ["short", "detailed"], strict=True):
                assert cap["text"].startswith(fake_caption(image, s.prompt_texts[prompt]).split(".")[0])


def test_rows_waiting_for_a_decode_slot_hold_no_task_and_units_finish_in_arrival_order(tmp_path, monkeypatch):
    """Two units of 40 rows on an actor with 4 decode slots, in chunks of 8: never more row tasks than slots, and a
    few chunk tasks, where a task per row made the actor's memory follow the unit size; a unit that arrives while
    another admits its rows is done after it, its rows entering as the first one's last ones drain."""
    monkeypatch.setattr(captioning, "CHUNK_ROWS", 8)
    s = stage(tmp_path, batch_size=2, fake={"delay_s": 0.002})
    s.in_flight_images = 4
    widths = {"a": [50 + i for i in range(40)], "b": [100 + i for i in range(40)]}
    done, most = [], {"caption_row": 0, "finish_chunk": 0, "all": 0}

    async def unit(name: str):
        table = await s.caption_unit_async(name, unit_table(widths[name]))
        done.append(name)
        return table

    async def watch(stop: asyncio.Event):
        while not stop.is_set():
            tasks = [t.get_coro().__qualname__.rsplit(".", 1)[-1] for t in asyncio.all_tasks()]
            for kind in most:
                most[kind] = max(most[kind], len(tasks) if kind == "all" else tasks.count(kind))
            await asyncio.sleep(0)

    original, a_admitting = s.caption_row, asyncio.Event()

    async def caption_row(*args):  # the watcher counts tasks by this name
        a_admitting.set()
        return await original(*args)

    s.caption_row = caption_row

    async def second(name: str):  # arrives while the first admits its rows (both at once race for the admission)
        await a_admitting.wait()
        return await unit(name)

    async def run():
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        tables = await asyncio.gather(unit("a"), second("b"))
        stop.set()
        await watcher
        return tables

    a, b = asyncio.run(run())
    assert most["caption_row"] <= s.in_flight_images, most
    # A chunk ends once its rows are done; the next one's rows may be admitted by then (8 rows, 4 in flight at most).
    assert most["finish_chunk"] <= 3, most
    assert most["all"] <= s.in_flight_images + 3 + 4, most  # also the two units, the watcher, the main task
    assert done == ["a", "b"]
    assert [r["width"] for r in a.to_pylist()] == widths["a"] and [r["width"] for r in b.to_pylist()] == widths["b"]
    assert all(r["status"] == "ok" and len(r["captions"]) == 2 for t in (a, b) for r in t.to_pylist())


def test_a_chunk_of_rows_goes_back_to_arrow_as_soon_as_it_is_done(tmp_path, monkeypatch):
    """A unit's rows are Python objects only while their chunk is captioned: the first chunk is a record batch
    before the unit's later rows are admitted (a unit held as dicts to its end made memory follow the unit size)."""
    monkeypatch.setattr(captioning, "CHUNK_ROWS", 8)
    s = stage(tmp_path, batch_size=2, fake={"delay_s": 0.002})
    s.in_flight_images = 4
    events = []
    caption_row, finish_chunk = s.caption_row, s.finish_chunk

    async def row(unit, i, *args):
        events.append(("row", i))
        return await caption_row(unit, i, *args)

    async def chunk(unit, start, *args):
        batch = await finish_chunk(unit, start, *args)
        events.append(("chunk", start))
        return batch

    s.caption_row, s.finish_chunk = row, chunk
    widths = [50 + i % 30 for i in range(40)]
    table = s.caption_unit("u", unit_table(widths))
    assert [r["width"] for r in table.to_pylist()] == widths
    assert sorted(e for e in events if e[0] == "chunk") == [("chunk", k) for k in range(0, 40, 8)]
    assert events.index(("chunk", 0)) < events.index(("row", 8 + s.in_flight_images + 1))


def test_every_unit_file_holds_its_own_rows_in_source_order(tmp_path, ray_session):
    sizes = [1, 7, 2, 9, 3, 5, 4, 8]  # units of different sizes: they finish out of order
    for shard, n in enumerate(sizes):
        group = [{"key": f"{shard:02d}-{i:02d}", "jpg": make_image(100 * shard + i)} for i in range(n)]
        write_webdataset(str(tmp_path / "in"), group, shard_size=n, prefix=f"s{shard}-")
    data = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}, "models": [FAKE]}
    cfg = load_config(None, ["models.0.batch_size=4", "models.0.units_in_flight=3"], data=data)
    assert run_pipeline(cfg, progress=False).ok == sum(sizes)
    for part in sorted((tmp_path / "out").glob("part-*.recaption.parquet")):
        rows = pads.dataset(str(part), format="parquet").to_table().to_pylist()
        unit = part.name.removeprefix("part-").removesuffix(".recaption.parquet")
        assert {r["unit"] for r in rows} == {unit}
        keys = [r["key"] for r in rows]
        assert keys == sorted(keys) and len({k.split("-")[0] for k in keys}) == 1  # one shard, in its order
        for row in rows:
            shard, i = (int(x) for x in row["key"].split("-"))
            image = decode_image(make_image(100 * shard + i), ImageConfig()).image
            texts = [fake_caption(image, cap["prompt_text"]) for cap in row["captions"]]
            assert [c["text"] for c in row["captions"]] == texts  # its own image's captions, both prompts


def test_decoded_images_in_flight_are_bounded_whatever_the_unit_size(tmp_path, ray_session):
    """20 units from 4 to 232 large images: the caption actor's own memory stays flat (the whole unit
    decoded at once, as before, would hold up to 232 × 3 MB)."""
    buf = io.BytesIO()
    Image.new("RGB", (1024, 1024), (90, 120, 30)).save(buf, format="JPEG", quality=50)
    seen = run_units_of_growing_size(tmp_path, buf.getvalue(), [4 + unit * 12 for unit in range(20)])
    early, late = max(seen[2:6]), max(seen[-5:])  # after the first units (imports, warm-up); the largest units
    # 232 decoded images at once would be 700 MB more; what is left is the allocator keeping freed decode buffers
    assert late <= 1.1 * early + 48, seen


def test_a_units_bytes_never_pass_through_the_caption_actors_own_memory(tmp_path, ray_session):
    """Units from 4 to 92 incompressible images (0.3 MB each, up to 28 MB a unit), the caption actor reserving what a
    read task reserves: Ray Data would fuse the read into the actor, and each unit's bytes would be built there (its
    own memory grew 120 → 260 MiB); kept apart, a unit reaches the actor in Ray's shared memory and is read in place."""
    noise = Image.frombytes("RGB", (512, 512), random.Random(0).randbytes(512 * 512 * 3))
    buf = io.BytesIO()
    noise.save(buf, format="JPEG", quality=95)
    assert len(buf.getvalue()) > 250_000, len(buf.getvalue())
    seen = run_units_of_growing_size(tmp_path, buf.getvalue(), [4 + unit * 11 for unit in range(9)])
    early, late = max(seen[1:3]), max(seen[-3:])
    assert late <= 1.1 * early, seen  # fused: 120 MiB at the first units, 260 at the last


def test_an_actors_memory_does_not_follow_the_rows_of_a_unit(tmp_path, ray_session):
    """Units from 250 to 4000 small images, one at a time: the caption actor's own memory grows by little more than
    the unit's output (its captions as Arrow and as the payload passed on, about 1 KiB a row here: 10 MiB more at 4000
    rows). Each row held as Python objects to its unit's end, and the unit's tables in Arrow's mimalloc pool, made it
    grow by 26 MiB."""
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (90, 120, 30)).save(buf, format="JPEG", quality=50)
    seen = run_units_of_growing_size(tmp_path, buf.getvalue(), [250, 250, 500, 1000, 2000, 4000])
    assert max(seen[-2:]) <= max(seen[:2]) + 16, seen


def test_a_caption_actor_allocates_arrow_memory_from_malloc_unless_told_otherwise(tmp_path, monkeypatch):
    import pyarrow as pa

    default = pa.default_memory_pool()
    try:
        monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", default.backend_name)
        stage(tmp_path)
        assert pa.default_memory_pool().backend_name == default.backend_name
        monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL")
        stage(tmp_path)
        assert pa.default_memory_pool().backend_name == "system"
    finally:
        pa.set_memory_pool(default)


def run_units_of_growing_size(tmp_path, image: bytes, sizes: list[int]) -> list[float]:
    """Runs one fake-engine actor over units of `sizes` copies of `image` (read tasks and the actor reserving the same
    CPUs); the actor's own memory (MiB, shared pages aside) reported with each unit, in commit order."""
    import json

    for unit, n in enumerate(sizes):
        group = [{"key": f"{unit:02d}-{i:03d}", "jpg": image} for i in range(n)]
        write_webdataset(str(tmp_path / "in"), group, shard_size=n, prefix=f"u{unit:02d}-", sidecars=False)
    data = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}}
    model = {**FAKE, "prompts": ["short"], "batch_size": 4, "units_in_flight": 1}
    cfg = load_config(
        None, ["images.max_side=1024", f"ray.read_num_cpus={FAKE['num_cpus']}"], data={**data, "models": [model]}
    )
    seen: list[float] = []
    run_pipeline(cfg, progress=False, on_unit=lambda row: seen.append(json.loads(row["metrics"])["fake"]["own_mib"]))
    assert len(seen) == len(sizes)
    return seen


@pytest.mark.parametrize("bounds", [[1, 3]])
def test_an_elastic_pool_grows_from_min_to_max(tmp_path, ray_session, bounds):
    for unit in range(12):
        group = [{"key": f"{unit:02d}-{i}", "jpg": make_image(unit * 10 + i)} for i in range(2)]
        write_webdataset(str(tmp_path / "in"), group, shard_size=2, prefix=f"u{unit:02d}-", sidecars=False)
    model = {**FAKE, "prompts": ["short"], "concurrency": bounds, "num_cpus": 0.1, "fake": {"delay_s": 0.4}}
    data = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}, "models": [model]}
    actors: set[int] = set()

    def on_unit(row):
        import json

        actors.add(json.loads(row["metrics"])["fake"]["actor"])

    assert run_pipeline(load_config(None, data=data), progress=False, on_unit=on_unit).ok == 24
    assert len(actors) > bounds[0], actors
    assert len(actors) <= bounds[1]
