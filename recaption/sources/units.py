"""Work units and source records."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class WorkUnit:
    """One input shard, or the rows [start, stop) of a large one: the grain of scheduling, output and resume."""

    unit: str  # file-name-safe id, e.g. "00042" or "00042-s0003"
    source: str  # shard path relative to the input root ("" when the input is one file: its name)
    uri: str  # the shard as `pyarrow.fs.FileSystem.from_uri` resolves it (for folders: the folder)
    format: str  # webdataset | img2dataset-parquet | parquet | hf | folder
    start: int = 0
    stop: int | None = None  # None: to the end of the shard
    members: tuple[str, ...] = ()  # folder inputs: the image files (relative to the input root) of this unit
    keys: tuple[str, ...] = ()  # folder inputs: each member's key, chosen at planning so keys are input-wide unique
    retry: bool = False  # a done unit whose failed rows are captioned again (`recaption run --retry-failed`)
    index: str = ""  # split tars: where the tar's member index is cached (`<output>/_index/<id>.recaption.json`)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["members"], d["keys"] = list(self.members), list(self.keys)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WorkUnit:
        return cls(**{**d, "members": tuple(d.get("members") or ()), "keys": tuple(d.get("keys") or ())})


@dataclass
class SourceRecord:
    """One input row as a reader yields it, before decoding."""

    key: str
    image: bytes | None
    url: str | None = None
    alt_text: str | None = None
    error: str | None = None  # set when the reader already knows the row cannot be used (null image, bad member)
    source: str | None = None  # the row's own file relative to the input root where it is not the unit's (folders)
    meta: dict | None = None  # a webdataset sample's parsed `.json` member (e.g. a row of `recaption export`)
