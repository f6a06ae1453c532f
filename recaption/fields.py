"""Source fields kept in the output (`input.keep_columns`): which fields of an input row come through, under which
output column, with which Arrow type, so that every part file of an output has the same schema."""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from recaption.errors import ConfigError

TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "json": pa.string(),  # any value, stored as its JSON text (lists, objects: exif, face boxes …)
}

# What img2dataset writes beside each image (its `.json` member or its Parquet columns), with the columns of the
# usual inputs it passes through (`save_additional_columns`: LAION's similarity/punsafe/pwatermark/LICENSE/NSFW,
# DataComp's uid and CLIP scores). `keep_columns: auto` keeps these for img2dataset-style inputs.
IMG2DATASET_FIELDS: dict[str, str] = {
    "original_width": "int64",
    "original_height": "int64",
    "sha256": "string",
    "exif": "json",
    "similarity": "float64",
    "punsafe": "float64",
    "pwatermark": "float64",
    "LICENSE": "string",
    "NSFW": "string",
    "uid": "string",
    "clip_b32_similarity_score": "float64",
    "clip_l14_similarity_score": "float64",
}
AUTO_FORMATS = ("webdataset", "img2dataset-parquet")


@dataclass(frozen=True)
class KeptField:
    """One source field and the output column it becomes."""

    source: str  # the field's name in the input (a `.json` key or a column)
    column: str  # its output column (`source_<name>` where the name is one of the output's own columns)
    type: str  # a key of TYPES

    @property
    def arrow_field(self) -> pa.Field:
        return pa.field(self.column, TYPES[self.type])

    def value(self, meta: Mapping[str, Any] | None) -> Any:
        """The field's value of one row converted to its type; None where it is missing or does not convert."""
        if not meta or self.source not in meta:
            return None
        return convert(meta[self.source], self.type)


def convert(value: Any, type_name: str) -> Any:
    if value is None:
        return None
    if type_name == "json":
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    try:
        if type_name == "string":
            return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        if type_name == "int64":
            if isinstance(value, bool):
                return int(value)
            number = float(value)
            return int(number) if math.isfinite(number) and number == int(number) else None
        if type_name == "float64":
            return float(value)
        if type_name == "bool":
            if isinstance(value, str):
                return {"true": True, "false": False, "1": True, "0": False}.get(value.strip().lower())
            return bool(value)
    except (TypeError, ValueError, OverflowError):
        return None
    raise ConfigError(f"unknown field type {type_name!r}")


def kept_fields(
    keep: str | list[str], fmt: str, reserved: list[str], present: Collection[str] | None = None
) -> tuple[KeptField, ...]:
    """The fields `input.keep_columns` asks for: `auto` (those of img2dataset's fields that are `present` in the
    input's first row, for img2dataset-style inputs; nothing for the others) or a list of names, each optionally with
    a type (`similarity:float64`; default string). A name that is one of the output's own columns (`reserved`) comes
    out as `source_<name>`."""
    if keep == "auto":
        if fmt not in AUTO_FORMATS:
            return ()
        specs = [(n, t) for n, t in IMG2DATASET_FIELDS.items() if present is None or n in present]
    else:
        specs = [_parse(item) for item in keep]
    fields, columns = [], {}
    for name, type_name in specs:
        column = f"source_{name}" if name in reserved or name == "image" else name
        if column in columns:
            raise ConfigError(f"input.keep_columns: {name!r} and {columns[column]!r} would both be column {column!r}")
        columns[column] = name
        fields.append(KeptField(name, column, type_name))
    return tuple(fields)


def _parse(item: str) -> tuple[str, str]:
    name, _, type_name = item.rpartition(":") if ":" in item else (item, "", "string")
    name, type_name = name.strip(), type_name.strip() or "string"
    if not name:
        raise ConfigError(f"input.keep_columns: {item!r} has no field name (write `name` or `name:type`)")
    if type_name not in TYPES:
        raise ConfigError(f"input.keep_columns: {item!r} has unknown type {type_name!r}; types are {', '.join(TYPES)}")
    return name, type_name
