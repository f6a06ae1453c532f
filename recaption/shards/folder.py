"""Reader of an image folder: one record per image file, alt-text from a sibling `<name>.txt`."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

from recaption.config import InputConfig
from recaption.errors import InputError
from recaption.shards import SourceRecord, WorkUnit
from recaption.shards.fs import join, read_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def iter_records(unit: WorkUnit, input_cfg: InputConfig) -> Iterator[SourceRecord]:
    """The unit's member files, in order; key = path relative to the input root without its extension."""
    for rel in unit.members:
        stem = posixpath.splitext(rel)[0]
        try:
            image, error = read_bytes(join(unit.uri, rel)), None
        except InputError as e:  # deleted or unreadable since planning: a failed row, not a failed run
            image, error = None, str(e)
        yield SourceRecord(key=stem, image=image, alt_text=_sibling_text(unit.uri, stem), error=error, source=rel)


def _sibling_text(root: str, stem: str) -> str | None:
    try:
        return read_bytes(join(root, stem + ".txt")).decode("utf-8", errors="replace").strip()
    except InputError:
        return None
