"""Reader of an image folder: one record per image file, alt-text from a sibling `<name>.txt`."""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Iterator

from recaption.config import InputConfig
from recaption.errors import InputError
from recaption.sources.fs import Unreachable, join, read_bytes
from recaption.sources.units import SourceRecord, WorkUnit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def folder_keys(paths: list[str]) -> list[str]:
    """The key of each image file (paths relative to the input root): the path without its extension, or the whole
    path where that stem is blank or not unique (`a.jpg` and `a.png` → keys `a.jpg`, `a.png`; a file `x.png.jpg`
    beside `x.png` keeps its whole path), so no two files of an input share a key, whichever units they fall in."""
    stems = [posixpath.splitext(p)[0] for p in paths]
    counts, whole = Counter(stems), set(paths)
    return [s if s.strip() and counts[s] == 1 and s not in whole else p for s, p in zip(stems, paths, strict=True)]


def iter_records(unit: WorkUnit, input_cfg: InputConfig) -> Iterator[SourceRecord]:
    """The unit's member files, in order, with the keys planned for them (see `folder_keys`)."""
    keys = unit.keys or folder_keys(list(unit.members))
    for rel, key in zip(unit.members, keys, strict=True):
        stem = posixpath.splitext(rel)[0]
        try:
            image, error = read_bytes(join(unit.uri, rel)), None
        except Unreachable:
            raise  # the store kept failing: the unit fails and a rerun retries it, no row is written off
        except InputError as e:  # deleted or unreadable since planning: a failed row, not a failed run
            image, error = None, str(e)
        yield SourceRecord(key=key, image=image, alt_text=_sibling_text(unit.uri, stem), error=error, source=rel)


def _sibling_text(root: str, stem: str) -> str | None:
    try:
        return read_bytes(join(root, stem + ".txt")).decode("utf-8", errors="replace").strip()
    except Unreachable:
        raise
    except InputError:
        return None
