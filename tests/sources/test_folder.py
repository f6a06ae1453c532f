"""Image folders: keys from relative paths, alt-text from sibling .txt files, vanished files as error rows."""

from __future__ import annotations

from recaption.config import InputConfig
from recaption.sources.plan import plan_units
from recaption.sources.read import read_unit
from tests.data import make_image, write_image_folder


def test_folder_records(tmp_path):
    keys = write_image_folder(tmp_path, 5)
    (tmp_path / "notes.md").write_text("not an image")
    cfg = InputConfig(path=str(tmp_path), unit_size=2)
    records = [r for u in plan_units(cfg) for r in read_unit(u, cfg)]
    assert [r.key for r in records] == keys == ["a/img_0000", "a/img_0002", "a/img_0004", "b/img_0001", "b/img_0003"]
    assert records[0].image == make_image(0, fmt="PNG") and records[0].source == "a/img_0000.png"
    assert [r.alt_text for r in records] == ["caption 0", "caption 2", "caption 4", None, None]


def test_file_gone_after_planning(tmp_path):
    write_image_folder(tmp_path, 2)
    cfg = InputConfig(path=str(tmp_path))
    [unit] = plan_units(cfg)
    (tmp_path / "b" / "img_0001.jpg").unlink()
    records = list(read_unit(unit, cfg))
    assert records[0].error is None
    assert records[1].image is None and "not found" in records[1].error and "img_0001.jpg" in records[1].error


def test_single_image_file(tmp_path):
    write_image_folder(tmp_path, 1)
    cfg = InputConfig(path=str(tmp_path / "a" / "img_0000.png"))
    [unit] = plan_units(cfg)
    [rec] = read_unit(unit, cfg)
    assert (rec.key, rec.alt_text) == ("img_0000", "caption 0")


def test_keys_are_unique_across_units_when_stems_repeat(tmp_path):
    # `a.jpg` and `a.png` fall in different units (unit_size 1); `x.png.jpg`'s stem is the file `x.png`; ` .jpg`'s
    # stem is blank. Each keeps its whole path as key, the others their stem.
    names = [" .jpg", "a.jpg", "a.png", "b.jpg", "x.png", "x.png.jpg"]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(make_image(i, fmt="PNG" if name.endswith(".png") else "JPEG"))
    (tmp_path / "a.txt").write_text("alt of a")
    cfg = InputConfig(path=str(tmp_path), unit_size=1)
    units = plan_units(cfg)
    records = [r for u in units for r in read_unit(u, cfg)]
    assert len(units) == 6 and [r.key for r in records] == [" .jpg", "a.jpg", "a.png", "b", "x", "x.png.jpg"]
    assert [r.source for r in records] == names and all(r.error is None for r in records)
    assert records[1].alt_text == records[2].alt_text == "alt of a"
    assert [r.image for r in records] == [make_image(i, fmt="PNG" if n.endswith(".png") else "JPEG")
                                          for i, n in enumerate(names)]  # fmt: skip
