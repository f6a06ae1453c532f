"""Where a training run keeps its files: a local directory, or object storage (`run.output: s3://…`, `gs://…`)
mirrored through a local staging directory.

The trainer always works in a local directory (checkpoints are written with renames, the tokenizer is read by path).
For an output on object storage that directory is a staging copy under the cache, named after the output, and this
module carries files both ways with pyarrow.fs: before training, what a resume needs (the config, the tokenizer, the
metrics so far and the latest checkpoint: the step it names, then nothing else) comes down; after every checkpoint
its files go up first and the `latest` pointer last, so a reader or a resume elsewhere sees the previous checkpoint
until the new one is whole; rotation deletes the remote step directories the local rotation removed (ours only:
`step-<8 digits>`); at the end the summary and the exported model go up. Credentials come from the environment,
never from the URI stored anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pyarrow.fs as pafs

from recaption.redact import strip_credentials
from recaption.sources import is_uri, resolve

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-\d{8}$")  # the checkpoint directories a run writes (and may rotate away)
CHECKPOINTS, LATEST = "checkpoints", "latest"
OWNER_FILE = "_recaption.json"


def is_remote(output: str) -> bool:
    return is_uri(output) and not output.startswith("file://")


def staging_dir(output: str) -> Path:
    """The local working copy of a run whose output is on object storage."""
    cache = Path(os.environ.get("RECAPTION_CACHE") or Path.home() / ".cache" / "recaption")
    place = strip_credentials(output).split("?", 1)[0].rstrip("/")
    return cache / "train-runs" / hashlib.sha256(place.encode()).hexdigest()[:16]


class RunStore:
    """A run's output: `local` is where the trainer writes; `remote` (an output on object storage) gets a copy."""

    def __init__(self, output: str, local: str | Path | None = None) -> None:
        self.output = output
        self.shown = strip_credentials(output)
        self.remote = is_remote(output)
        if self.remote:
            self.fs, self.root = resolve(output)
            self.root = self.root.rstrip("/")
            self.local = Path(local) if local is not None else staging_dir(output)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(output).resolve())
            self.local = Path(self.root)

    # -- object storage → local -------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The entries at the top of the output (on object storage; locally, the directory's)."""
        if not self.remote:
            return sorted(p.name for p in self.local.iterdir()) if self.local.is_dir() else []
        info = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in info)

    def pull(self) -> None:
        """Brings down what a resume needs; a local staging copy is brought up to date with the remote one (the
        remote is the truth: a staging copy from another machine's run may be older)."""
        if not self.remote:
            return
        remote_files = self._list("")
        if not remote_files and self.local.exists():
            shutil.rmtree(self.local)  # our own cache copy of a run that is no longer there: start clean
        self.local.mkdir(parents=True, exist_ok=True)
        for info in remote_files:
            rel = info.path[len(self.root) + 1 :]
            if rel.startswith(CHECKPOINTS + "/"):
                continue  # only the latest checkpoint, below
            self._download(rel, info)
        latest = self._read_text(f"{CHECKPOINTS}/{LATEST}")
        if latest and STEP_DIR.match(latest):
            for info in self._list(f"{CHECKPOINTS}/{latest}"):
                self._download(info.path[len(self.root) + 1 :], info)
            self._write_local(f"{CHECKPOINTS}/{LATEST}", latest.encode())
            log.info("training output %s: latest checkpoint %s brought to %s", self.shown, latest, self.local)
        else:  # no checkpoint there: none of the staging copy's may be resumed from
            (self.local / CHECKPOINTS / LATEST).unlink(missing_ok=True)

    def read_owner(self) -> dict | None:
        """The output's ownership record (`_recaption.json`), {} when unreadable, None when it has none."""
        text = self._read_text(OWNER_FILE) if self.remote else None
        if not self.remote:
            path = self.local / OWNER_FILE
            text = path.read_text() if path.is_file() else None
        if text is None:
            return None
        try:
            owner = json.loads(text)
        except ValueError:
            return {}
        return owner if isinstance(owner, dict) else {}

    # -- local → object storage -------------------------------------------------------------------------------------

    def push(self, *rels: str) -> None:
        """Uploads these files or directories (relative to the run) as they are locally."""
        if not self.remote:
            return
        for rel in rels:
            path = self.local / rel
            if path.is_dir():
                for f in sorted(p for p in path.rglob("*") if p.is_file()):
                    self._upload(f.relative_to(self.local).as_posix())
            elif path.is_file():
                self._upload(rel)

    def push_checkpoint(self, step_dir: Path) -> None:
        """A new checkpoint: its files, then `latest`, then the remote step directories rotated away locally."""
        if not self.remote:
            return
        name = step_dir.name
        self.push(f"{CHECKPOINTS}/{name}")
        self._upload(f"{CHECKPOINTS}/{LATEST}")
        kept = {p.name for p in (self.local / CHECKPOINTS).glob("step-*")}
        for info in self.fs.get_file_info(pafs.FileSelector(f"{self.root}/{CHECKPOINTS}", allow_not_found=True)):
            if info.type == pafs.FileType.Directory and STEP_DIR.match(info.base_name) and info.base_name not in kept:
                self.fs.delete_dir(info.path)

    # -- helpers ----------------------------------------------------------------------------------------------------

    def _list(self, rel: str) -> list[pafs.FileInfo]:
        base = f"{self.root}/{rel}".rstrip("/")
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        return [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]

    def _read_text(self, rel: str) -> str | None:
        path = f"{self.root}/{rel}"
        if not self.fs.get_file_info(path).is_file:
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read().decode().strip()

    def _download(self, rel: str, info: pafs.FileInfo) -> None:
        target = self.local / rel
        unchanging = rel.startswith(CHECKPOINTS + "/step-") or rel.startswith(
            "tokenizer/"
        )  # written once, never changed
        if unchanging and target.is_file() and target.stat().st_size == info.size:
            return
        with self.fs.open_input_stream(info.path) as f:
            self._write_local(rel, f.read())

    def _write_local(self, rel: str, data: bytes) -> None:
        target = self.local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".recaption-tmp-{target.name}")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def _upload(self, rel: str) -> None:
        source = self.local / rel
        dest = f"{self.root}/{rel}"
        self.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        with source.open("rb") as src, self.fs.open_output_stream(dest) as out:  # one PUT: whole or absent
            while chunk := src.read(8 << 20):
                out.write(chunk)
