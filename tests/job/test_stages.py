"""The unit payload between stages: values of binary columns are read in place, never copied per unit."""

from __future__ import annotations

import psutil
import pyarrow as pa
import pytest

from recaption.job.stages import binary_cell, rows_table, unit_row, unit_rows


@pytest.mark.parametrize("kind", [pa.binary(), pa.large_binary()])
def test_binary_cell_reads_every_value_of_chunked_sliced_columns_with_nulls(kind):
    values = [b"a", b"", None, b"xyz" * 5, b"q", None, b"last"]
    whole = pa.array(values, kind)
    chunked = pa.chunked_array([whole.slice(0, 3), whole.slice(3, 2), pa.array([], kind), whole.slice(5)])
    for column in (whole, chunked, whole.slice(1), pa.chunked_array([whole.slice(2, 4)])):
        expected = column.to_pylist()
        got = [None if (b := binary_cell(column, i)) is None else b.to_pybytes() for i in range(len(column))]
        assert got == expected
    with pytest.raises(IndexError):
        binary_cell(chunked, len(values))


def test_a_units_payload_is_read_in_place_not_copied():
    """A 64 MB unit: its payload Buffer points into the batch's own memory, and reading it costs no 64 MB."""
    table = pa.table({"image": pa.array([b"\x01" * (64 << 20)], pa.large_binary())})
    batch = rows_table([unit_row("u", 0.0, table)])
    proc = psutil.Process()
    before = proc.memory_full_info().uss
    (row,) = unit_rows(batch)
    assert proc.memory_full_info().uss - before < 16 << 20
    data = batch.column("payload").chunk(0).buffers()[2]
    assert data.address <= row["payload"].address < data.address + data.size
    assert row["unit"] == "u" and row["payload"].size > 64 << 20


def test_a_unit_row_holds_its_payload_without_a_copy():
    """The read stage's block is built over the IPC stream's own Buffer: a 64 MB unit is not copied again."""
    from recaption.job.stages import from_ipc

    table = pa.table({"image": pa.array([b"\x02" * (64 << 20)], pa.large_binary())})
    row = unit_row("u", 0.0, table)
    proc = psutil.Process()
    before = proc.memory_full_info().uss
    batch = rows_table([row, unit_row("empty", 1.0, None, error="unreadable")])
    assert proc.memory_full_info().uss - before < 16 << 20
    assert batch.column("payload").chunk(0).buffers()[2].address == row["payload"].address
    first, second = unit_rows(batch)
    assert from_ipc(first["payload"]).equals(table)
    assert (second["unit"], second["error"], bytes(second["payload"])) == ("empty", "unreadable", b"")
