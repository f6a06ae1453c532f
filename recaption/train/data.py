"""Output Parquet + images read from the source shards it names (or a webdataset export) → shuffled, resumable
batches of pixels and tokens."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import queue
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps

from recaption.config import InputConfig
from recaption.errors import InputError
from recaption.images import FORMATS, to_rgb
from recaption.shards.fs import basename, display, join, list_files, open_input, open_input_file
from recaption.shards.plan import plan_units
from recaption.shards.read import read_unit
from recaption.shards.tar import read_samples
from recaption.train.config import TrainConfig
from recaption.train.sampling import TextSampler, example_rng
from recaption.train.tokenizer import encode
from recaption.writer import METADATA_KEY, is_legacy_part, open_output

COLUMNS = ["key", "unit", "status", "alt_text", "captions"]
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass
class DataState:
    """Where a worker's stream stands: its epoch and how many examples of that epoch it has drawn."""

    epoch: int = 0
    consumed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Example:
    key: str
    image: bytes
    row: dict


def output_parts(path: str) -> list[str]:
    """The part files of a pipeline output, sorted; InputError when there are none."""
    try:
        names = [p.rsplit("/", 1)[-1] for p in open_output(path).part_paths()]
    except InputError:
        raise InputError(f"no part files in {display(path)}: is data.path a `recaption run` output?") from None
    return [join(path, name) for name in names]


def export_shards(path: str) -> list[str]:
    """The tars of a `recaption export --to webdataset` directory when `path` is one (it has no part files)."""
    files = [f.path for f in list_files(path)]
    if any(is_legacy_part(f) for f in files):  # a pipeline output (any layout's part files)
        return []
    return [join(path, f) for f in files if f.endswith(".tar")]


def export_rows(shard: str) -> Iterator[tuple[dict, bytes]]:
    """(row, image bytes) of an exported shard's samples: each `.json` member is the row with its captions."""
    with open_input(shard) as stream:
        for record in read_samples(stream, basename(shard)):
            if record.error is None and record.meta and record.image:
                yield record.meta, record.image


def source_input(parts: list[str], input_path: str | None) -> InputConfig:
    """The input section of the run that wrote `parts`, pointed at `input_path` when the shards have moved."""
    with open_input_file(parts[0]) as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    if METADATA_KEY not in meta:
        raise InputError(f"{display(parts[0])} has no recaption run metadata: cannot find its source images")
    data = json.loads(meta[METADATA_KEY])["config"]["input"]
    return InputConfig(**{**data, "path": input_path or data["path"], "max_units": None})


def caption_texts(path: str, limit: int = 50_000) -> Iterator[str]:
    """Alt texts and captions of the first part files (or exported shards), for training a tokenizer on them."""
    n = 0
    for rows in _row_groups(path):
        for row in rows:
            for text in [row["alt_text"], *(c["text"] for c in row["captions"] or [])]:
                if text:
                    yield text
                    n += 1
            if n >= limit:
                return


def _row_groups(path: str) -> Iterator[list[dict]]:
    shards = export_shards(path)
    if shards:
        yield from ([row for row, _ in export_rows(shard)] for shard in shards)
        return
    for part in output_parts(path):
        with open_input_file(part) as f:
            yield pq.read_table(f, columns=["alt_text", "captions"]).to_pylist()


class ExampleStream:
    """One worker's examples, epoch after epoch: part files shuffled per epoch and split over workers, `open_parts`
    of them interleaved, then a shuffle buffer. Deterministic given (seed, epoch, rank, world)."""

    def __init__(self, cfg: TrainConfig, sampler: TextSampler, rank: int = 0, world: int = 1) -> None:
        self.cfg, self.sampler, self.rank, self.world = cfg.data, sampler, rank, world
        self.seed = cfg.run.seed
        shards = export_shards(cfg.data.path)  # a webdataset export carries its images and rows
        self.exported = bool(shards)
        if self.exported:
            self.parts = shards
        else:
            self.parts = output_parts(cfg.data.path)
            self.input_cfg = source_input(self.parts, cfg.data.input_path)
            self.units = {u.unit: u for u in plan_units(self.input_cfg)}

    def epoch(self, epoch: int) -> Iterator[Example]:
        order = list(self.parts)
        example_rng(self.seed, epoch, "parts").shuffle(order)  # the same order on every worker
        split = len(order) >= self.world
        mine = order[self.rank :: self.world] if split else order
        # Interleaving draws are the same on every worker, so that striding below splits one common sequence.
        stream = self._interleave([self._part(p) for p in mine], example_rng(self.seed, epoch, "interleave"))
        if not split:  # fewer parts than workers: every worker reads all, keeps every world-th example
            stream = (ex for i, ex in enumerate(stream) if i % self.world == self.rank)
        yield from self._shuffle(stream, example_rng(self.seed, epoch, f"shuffle-{self.rank}"))

    def _interleave(self, parts: list[Iterator[Example]], rng: random.Random) -> Iterator[Example]:
        pending, active = list(parts), []
        while pending or active:
            while pending and len(active) < self.cfg.open_parts:
                active.append(pending.pop(0))
            i = rng.randrange(len(active))
            try:
                yield next(active[i])
            except StopIteration:
                active.pop(i)

    def _shuffle(self, stream: Iterator[Example], rng: random.Random) -> Iterator[Example]:
        size, buffer = self.cfg.shuffle_buffer, []
        for ex in stream:
            if len(buffer) < size:
                buffer.append(ex)
                continue
            i = rng.randrange(size)
            yield buffer[i]
            buffer[i] = ex
        rng.shuffle(buffer)
        yield from buffer

    def _part(self, part: str) -> Iterator[Example]:
        """The trainable rows of one part file, joined by key with the images read from their source shard."""
        if self.exported:
            yield from (
                Example(row["key"], image, row) for row, image in export_rows(part) if self.sampler.trainable(row)
            )
            return
        with open_input_file(part) as f:
            rows = pq.read_table(f, columns=COLUMNS).to_pylist()
        by_unit: dict[str, dict[str, dict]] = {}
        for row in rows:
            if self.sampler.trainable(row):
                by_unit.setdefault(row["unit"], {})[row["key"]] = row
        for unit_id in sorted(by_unit):
            unit = self.units.get(unit_id)
            if unit is None:
                raise InputError(
                    f"unit {unit_id} of {display(part)} is not in the input {display(self.input_cfg.path)}"
                )
            wanted = by_unit[unit_id]
            for record in read_unit(unit, self.input_cfg):
                row = wanted.get(record.key)
                if row is not None and record.image:
                    yield Example(record.key, record.image, row)


def load_image(data: bytes, size: int) -> np.ndarray:
    """Decode, orient, resize the shorter side to `size`, centre-crop, CLIP-normalise → (3, size, size) float32."""
    im = Image.open(io.BytesIO(data), formats=FORMATS)
    im.draft("RGB", (size, size))  # JPEG: decode at the smallest DCT scale that still covers `size`
    with contextlib.suppress(Exception):  # a broken EXIF block: keep the image as stored, as the pipeline did
        im = ImageOps.exif_transpose(im)
    im = to_rgb(im)
    scale = size / min(im.size)
    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    im = im.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return ((arr - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


class Batches:
    """Batches for the loop; each carries the `DataState` after it, which a checkpoint stores for exact resume."""

    def __init__(
        self, cfg: TrainConfig, tokenizer, rank: int = 0, world: int = 1, state: DataState | None = None
    ) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.sampler = TextSampler(cfg.sampling, cfg.run.seed)
        self.stream = ExampleStream(cfg, self.sampler, rank, world)
        self.state = state or DataState()
        loss, corners = cfg.loss, cfg.model.text.num_corners
        self.layout = [
            (name, n)
            for name, n, on in [
                ("short", 1, loss.short),
                ("subs", cfg.sampling.num_sub_captions, loss.multi_positive or loss.grouping),
                ("holistic", len(cfg.sampling.holistic), loss.holistic),
            ]
            if on
        ]
        self.long_tokens = cfg.model.text.context_length - corners
        self.short_tokens = cfg.model.text.short_context_length - corners
        self.pool = ThreadPoolExecutor(cfg.data.decode_threads, thread_name_prefix="decode")

    def _examples(self) -> Iterator[tuple[int, Example]]:
        epoch, skip = self.state.epoch, self.state.consumed
        while True:
            drawn = 0
            for i, ex in enumerate(self.stream.epoch(epoch)):
                drawn += 1
                if i < skip:  # resuming: draw again what the interrupted run drew, without decoding it
                    continue
                self.state = DataState(epoch, i + 1)
                yield epoch, ex
            if drawn == 0:
                raise InputError(f"no trainable rows for worker {self.stream.rank} in {display(self.cfg.data.path)}")
            epoch, skip = epoch + 1, 0
            self.state = DataState(epoch, 0)

    def __iter__(self) -> Iterator[dict]:
        examples = self._examples()
        size, b = self.cfg.model.image.image_size, self.cfg.run.batch_size
        while True:
            picked: list[tuple[int, Example, np.ndarray]] = []
            while len(picked) < b:
                chunk = [next(examples) for _ in range(b - len(picked))]
                images = self.pool.map(lambda item: _try_load(item[1].image, size), chunk)
                picked += [(e, ex, im) for (e, ex), im in zip(chunk, images, strict=True) if im is not None]
            yield self._collate(picked)

    def _collate(self, picked: list[tuple[int, Example, np.ndarray]]) -> dict:
        texts = [self.sampler.sample(ex.row, epoch) for epoch, ex, _ in picked]
        batch = {
            "pixel_values": torch.from_numpy(np.stack([im for _, _, im in picked])),
            "keys": [ex.key for _, ex, _ in picked],
            "layout": self.layout,
            "state": DataState(self.state.epoch, self.state.consumed),
        }
        batch["text_ids"] = {}
        if self.cfg.loss.long:
            batch["long_ids"], batch["long_mask"] = encode(self.tokenizer, [t.long for t in texts], self.long_tokens)
            batch["text_ids"]["long"] = text_ids([[t.long] for t in texts])[:, 0]
        short = []
        for name, _ in self.layout:
            group = [[t.short] if name == "short" else t.subs if name == "subs" else t.holistic for t in texts]
            short += [text for per_image in group for text in per_image]
            ids = text_ids(group)
            batch["text_ids"][name] = ids[:, 0] if name == "short" else ids
        if short:
            batch["short_ids"], batch["short_mask"] = encode(self.tokenizer, short, self.short_tokens)
        return batch

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def text_ids(texts: list[list[str]]) -> torch.Tensor:
    """(N, n) int64 ids, equal exactly for equal texts in any worker (a hash of the text), so that the loss can tell
    identical texts of the global batch apart from negatives."""
    return torch.tensor(
        [
            [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "big", signed=True) for t in row]
            for row in texts
        ],
        dtype=torch.int64,
    )


def _try_load(data: bytes, size: int) -> np.ndarray | None:
    try:
        return load_image(data, size)
    except Exception:  # the pipeline decoded it once; a failure now only drops this example from the step
        return None


def prefetch(batches: Iterator[dict], depth: int = 2) -> Iterator[dict]:
    """Make the next batches in a background thread while the model trains on this one (same order, same batches)."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        ready.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, raised there
            ready.put((None, e))

    thread = threading.Thread(target=produce, name="batches", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            yield item
    finally:
        stop.set()
