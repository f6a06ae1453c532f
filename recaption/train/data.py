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
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps

from recaption.config import InputConfig
from recaption.errors import InputError
from recaption.job import METADATA_KEY, is_legacy_part, open_output
from recaption.sources import (
    FORMATS,
    basename,
    display,
    join,
    list_files,
    open_input,
    open_input_file,
    plan_units,
    read_samples,
    read_unit,
    to_rgb,
)
from recaption.train.config import TrainConfig
from recaption.train.sampling import TextSampler, example_rng
from recaption.train.tokenizer import encode

COLUMNS = ["key", "unit", "status", "alt_text", "captions", "image_sha256"]
# Why an image of a trainable row is not trained on (counted once per key, reported in summary.json).
IMAGE_SKIPS = ("missing from the source shards", "changed since captioning", "undecodable")
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
    """The tars of a `recaption export --to webdataset` directory when `path` is one (it has no part files); source
    image shards (whose samples carry no captions) are an InputError naming the path."""
    files = [f.path for f in list_files(path)]
    if any(is_legacy_part(f) for f in files):  # a pipeline output (any layout's part files)
        return []
    tars = [join(path, f) for f in files if f.endswith(".tar")]
    if tars:
        first = next(export_rows(tars[0], check=False), None)
        if first is None or not isinstance(first[0].get("captions"), list):
            raise InputError(
                f"data.path {display(path)} holds tar shards without captions (image shards, not a `recaption "
                f"export --to webdataset`): set data.path to the `recaption run` output (its output.path)"
            )
    return tars


def export_rows(shard: str, check: bool = True) -> Iterator[tuple[dict, bytes]]:
    """(row, image bytes) of an exported shard's samples: each `.json` member is the row with its captions."""
    with open_input(shard) as stream:
        for record in read_samples(stream, basename(shard)):
            if record.error is None and record.meta and record.image:
                if check:
                    check_row(record.meta, shard)
                yield record.meta, record.image


def check_row(row: dict, where: str) -> None:
    """A row's captions must be a list of caption structs (objects with a text), as the pipeline writes them."""
    captions = row.get("captions")
    if captions is None:
        return
    if not isinstance(captions, list) or any(not isinstance(c, dict) or "text" not in c for c in captions):
        raise InputError(
            f"{display(where)}: captions of {row.get('key')!r} are not a list of caption structs (model, prompt, "
            f"text, sub_captions, …): is data.path a `recaption run` output?"
        )


def read_rows(part: str, columns: list[str]) -> list[dict]:
    """The rows of one part file; a file without the pipeline's columns is an InputError naming it."""
    with open_input_file(part) as f:
        pfile = pq.ParquetFile(f)
        schema = pfile.schema_arrow
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise InputError(
                f"{display(part)} lacks the column(s) {', '.join(missing)}: data.path must be a `recaption run` output"
            )
        if "captions" in columns:
            kind = schema.field("captions").type
            if not (pa.types.is_list(kind) and pa.types.is_struct(kind.value_type)):
                raise InputError(
                    f"{display(part)}: captions are {kind}, not a list of caption structs (model, prompt, text, …): "
                    f"data.path must be a `recaption run` output"
                )
        return pfile.read(columns=columns).to_pylist()


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
        yield read_rows(part, ["alt_text", "captions"])


def row_report(path: str, sampler: TextSampler) -> dict:
    """What an epoch can hold, before training: rows, trainable rows and the skipped ones by reason."""
    rows = [r for group in _all_rows(path) for r in group]
    skipped: dict[str, int] = {}
    for row in rows:
        if row.get("status") != "ok":
            reason = f"{row.get('status') or 'no'} status"
        elif not sampler.trainable(row):
            reason = "no usable caption"
        else:
            continue
        skipped[reason] = skipped.get(reason, 0) + 1
    return {"rows": len(rows), "trainable": len(rows) - sum(skipped.values()), "skipped": skipped}


def _all_rows(path: str) -> Iterator[list[dict]]:
    shards = export_shards(path)
    if shards:
        yield from ([row for row, _ in export_rows(shard)] for shard in shards)
        return
    for part in output_parts(path):
        yield read_rows(part, ["key", "status", "captions"])


class ExampleStream:
    """One worker's examples, epoch after epoch: part files shuffled per epoch and split over workers, `open_parts`
    of them interleaved, then a shuffle buffer. Deterministic given (seed, epoch, rank, world)."""

    def __init__(self, cfg: TrainConfig, sampler: TextSampler, rank: int = 0, world: int = 1) -> None:
        self.cfg, self.sampler, self.rank, self.world = cfg.data, sampler, rank, world
        self.seed = cfg.run.seed
        self.skipped: dict[str, set[str]] = {}  # reason → keys of trainable rows whose image this worker skipped
        shards = export_shards(cfg.data.path)  # a webdataset export carries its images and rows
        self.exported = bool(shards)
        self.input_path = cfg.data.path
        if self.exported:
            self.parts = shards
        else:
            self.parts = output_parts(cfg.data.path)
            self.input_cfg = source_input(self.parts, cfg.data.input_path)
            self.input_path = self.input_cfg.path
            self.units = {u.unit: u for u in plan_units(self.input_cfg)}

    def epoch(self, epoch: int) -> Iterator[Example]:
        """Rows, not files, are split over workers: every worker reads each part and keeps every world-th of its
        trainable rows (from an offset that moves with the part's place), so failed rows gathered in some parts
        never leave a worker without data, and workers' shares differ by at most one row per part."""
        order = list(self.parts)
        example_rng(self.seed, epoch, "parts").shuffle(order)  # the same order on every worker
        parts = [self._part(p, (self.rank + i) % self.world) for i, p in enumerate(order)]
        stream = self._interleave(parts, example_rng(self.seed, epoch, f"interleave-{self.rank}"))
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

    def _part(self, part: str, offset: int = 0) -> Iterator[Example]:
        """This worker's trainable rows of one part file (every world-th from `offset`), joined by key with the
        images read from their source shard; an image that is missing or not the one captioned is skipped and
        counted."""
        if self.exported:
            trainable = (r for r in export_rows(part) if self.sampler.trainable(r[0]))
            for i, (row, image) in enumerate(trainable):
                if i % self.world == offset:
                    yield Example(row["key"], image, row)
            return
        rows = [r for r in read_rows(part, COLUMNS) if self.sampler.trainable(r)]
        by_unit: dict[str, dict[str, dict]] = {}
        for row in rows[offset :: self.world]:
            check_row(row, part)
            by_unit.setdefault(row["unit"], {})[row["key"]] = row
        for unit_id in sorted(by_unit):
            unit = self.units.get(unit_id)
            if unit is None:
                raise InputError(
                    f"unit {unit_id} of {display(part)} is not in the input {display(self.input_cfg.path)}"
                )
            wanted = by_unit[unit_id]
            for record in read_unit(unit, self.input_cfg):
                row = wanted.pop(record.key, None)
                if row is None:
                    continue
                if not record.image:
                    self.skip("missing from the source shards", record.key)
                elif row.get("image_sha256") and hashlib.sha256(record.image).hexdigest() != row["image_sha256"]:
                    self.skip("changed since captioning", record.key)
                else:
                    yield Example(record.key, record.image, row)
            for key in wanted:
                self.skip("missing from the source shards", key)

    def skip(self, reason: str, key: str) -> None:
        self.skipped.setdefault(reason, set()).add(key)


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
        self.epoch_size = 0  # examples of this worker's last whole epoch (0 until one ends)
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
                skipped = {r: len(k) for r, k in self.stream.skipped.items()}
                why = f" (images skipped: {', '.join(f'{n} {r}' for r, n in skipped.items())})" if skipped else ""
                raise InputError(
                    f"no usable image for worker {self.stream.rank} of {self.stream.world} in "
                    f"{display(self.cfg.data.path)}{why}"
                )
            self.epoch_size = drawn
            epoch, skip = epoch + 1, 0
            self.state = DataState(epoch, 0)

    def skipped(self) -> dict[str, int]:
        """This worker's skipped images by reason (`IMAGE_SKIPS`), each key once."""
        return {reason: len(self.stream.skipped.get(reason, ())) for reason in IMAGE_SKIPS}

    def __iter__(self) -> Iterator[dict]:
        examples = self._examples()
        size, b = self.cfg.model.image.image_size, self.cfg.run.batch_size
        failed_in_a_row = 0
        while True:
            picked: list[tuple[int, Example, np.ndarray]] = []
            while len(picked) < b:
                chunk = [next(examples) for _ in range(b - len(picked))]
                images = self.pool.map(lambda item: _try_load(item[1].image, size), chunk)
                for (e, ex), im in zip(chunk, images, strict=True):
                    if im is None:
                        self.stream.skip("undecodable", ex.key)
                        failed_in_a_row += 1
                    else:
                        picked.append((e, ex, im))
                        failed_in_a_row = 0
                # Two epochs' worth of draws in a row hold a whole epoch: not one image of this worker decodes.
                if self.epoch_size and failed_in_a_row >= 2 * self.epoch_size:
                    raise InputError(
                        f"none of the {self.epoch_size} images of worker {self.stream.rank} decodes "
                        f"({len(self.stream.skipped['undecodable'])} failed): the images in the source shards are "
                        f"not readable (data.input_path: {display(self.stream.input_path)})"
                    )
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
