"""Each benchmark loader on tiny files written in that benchmark's on-disk format."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from recaption.errors import InputError
from recaption.eval.datasets import (
    EvalSet,
    concat_eval_sets,
    load_dci,
    load_iiw,
    load_karpathy,
    load_sharegpt4v,
    load_synthetic,
    load_urban1k,
    long_caption,
    open_image,
)


def jpg(path, colour=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format="JPEG")
    return path


def test_long_caption_is_lotlip_cleaning():
    assert long_caption("A dog.\nIt runs fast.</s> Grass.  ") == "A dog. It runs fast. Grass"
    assert long_caption("one line without stop") == "one line without stop"


def test_sharegpt4v(tmp_path):
    entries = []
    for i in range(3):
        jpg(tmp_path / "data" / "sam" / "images" / f"sa_{i}.jpg")
        entries.append(
            {
                "id": f"sa_{i}",
                "image": f"sam/images/sa_{i}.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is in this image?"},
                    {"from": "gpt", "value": f"Picture {i} shows a cat.\n\nThe cat is grey."},
                ],
            }
        )
    (tmp_path / "share.json").write_text(json.dumps(entries))
    s = load_sharegpt4v(tmp_path / "share.json", tmp_path / "data", limit=2)
    assert s.name == "sharegpt4v-2" and s.images == [
        tmp_path / "data/sam/images/sa_0.jpg",
        tmp_path / "data/sam/images/sa_1.jpg",
    ]
    assert s.texts == ["Picture 0 shows a cat. The cat is grey", "Picture 1 shows a cat. The cat is grey"]
    assert s.text_to_image == [0, 1]
    raw = load_sharegpt4v(tmp_path / "share.json", tmp_path / "data", limit=None, normalize=False)
    assert len(raw.images) == 3 and raw.texts[2] == "Picture 2 shows a cat.  The cat is grey."
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "x.jpg", "conversations": [{"from": "human"}]}]))
    with pytest.raises(InputError, match="entry 0"):
        load_sharegpt4v(tmp_path / "bad.json", tmp_path)


def test_dci(tmp_path):
    base = tmp_path / "dci" / "densely_captioned_images"
    anno = {
        "a.json": {
            "image": "sa_1.jpg",
            "short_caption": "A pump.",
            "extra_caption": "It is red.\nIt is old.",
            "summaries": {"base": ["A red pump.", "An old pump."], "m1": ["x"]},
            "mask_data": {},
        },
        "b.json": {
            "image": "sa_2.jpg",
            "short_caption": "A tree",
            "extra_caption": "Green leaves.",
            "summaries": {"base": ["A tree."]},
            "mask_data": {},
        },
    }
    for f, a in anno.items():
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / f).write_text(json.dumps(a))
        jpg(base / "photos" / a["image"])
    (base / "splits.json").write_text(json.dumps({"train": ["a.json"], "test": ["b.json"]}))
    long = load_dci(tmp_path / "dci")
    assert long.name == "dci-long" and long.texts == ["A pump. It is red. It is old", "A tree. Green leaves"]
    assert long.images == [base / "photos/sa_1.jpg", base / "photos/sa_2.jpg"] and long.text_to_image == [0, 1]
    assert load_dci(base, text="short").texts == ["A pump.", "A tree"]  # the inner folder works too
    summary = load_dci(base, text="summary")
    assert summary.texts == ["A red pump.", "An old pump.", "A tree."] and summary.text_to_image == [0, 0, 1]
    assert load_dci(base, splits=["test"]).texts == ["A tree. Green leaves"]
    with pytest.raises(ValueError, match="long, short or summary"):
        load_dci(base, text="masks")


def test_iiw(tmp_path):
    rows = [
        {"IIW": "A flower.\n\nIt is blue.", "IIW-P5B": "model text", "image/key": "aar_test_04600"},
        {"IIW": "A wall.", "DOCCI": "other", "image": "test_00731.jpg"},
    ]
    (tmp_path / "IIW-400").mkdir()
    (tmp_path / "IIW-400" / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    jpg(tmp_path / "imgs" / "aar_test_04600.jpg")
    jpg(tmp_path / "imgs" / "test_00731.jpg")
    s = load_iiw(tmp_path / "IIW-400" / "data.jsonl", tmp_path / "imgs")
    assert s.name == "iiw-IIW-400" and s.texts == ["A flower. It is blue", "A wall"]
    assert [p.name for p in s.images] == ["aar_test_04600.jpg", "test_00731.jpg"]
    (tmp_path / "broken.jsonl").write_text('{"IIW": "x"}\n')
    with pytest.raises(InputError, match="broken.jsonl:1"):
        load_iiw(tmp_path / "broken.jsonl", tmp_path / "imgs")


def test_iiw_appends_jpg_only_to_a_name_without_an_image_suffix(tmp_path):
    # The suffix decides, not ".jpg" anywhere in the name: a PNG keeps its name, "x.jpg_2" is no .jpg file.
    rows = [{"IIW": "A.", "image": "photo.PNG"}, {"IIW": "B.", "image": "shot.jpg_2"}, {"IIW": "C.", "image": "d.jpeg"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("photo.PNG", "shot.jpg_2.jpg", "d.jpeg"):
        jpg(tmp_path / "imgs" / name)
    s = load_iiw(tmp_path / "data.jsonl", tmp_path / "imgs")
    assert [p.name for p in s.images] == ["photo.PNG", "shot.jpg_2.jpg", "d.jpeg"]
    (tmp_path / "bad.jsonl").write_text('{"IIW": "x", "image": 7}\n')
    with pytest.raises(InputError, match="bad.jsonl:1"):
        load_iiw(tmp_path / "bad.jsonl", tmp_path / "imgs")


def test_urban1k(tmp_path):
    for stem, caption in [("2", "Second street.\nignored line"), ("1", "A busy road. Cars.")]:
        jpg(tmp_path / "Urban1k" / "image" / f"{stem}.jpg")
        (tmp_path / "Urban1k" / "caption").mkdir(parents=True, exist_ok=True)
        (tmp_path / "Urban1k" / "caption" / f"{stem}.txt").write_text(caption)
    s = load_urban1k(tmp_path / "Urban1k")
    assert s.texts == ["A busy road. Cars", "Second street"] and [p.name for p in s.images] == ["1.jpg", "2.jpg"]
    with pytest.raises(InputError, match="Urban1k layout"):
        load_urban1k(tmp_path)


def test_karpathy_coco_and_flickr(tmp_path):
    def sentences(n, tag):
        return [{"raw": f" {tag} caption {k} ", "tokens": [tag, "caption"]} for k in range(n)]

    coco = {
        "dataset": "coco",
        "images": [
            {"filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": sentences(5, "a")},
            {"filepath": "train2014", "filename": "b.jpg", "split": "restval", "sentences": sentences(5, "b")},
            {"filepath": "val2014", "filename": "c.jpg", "split": "test", "sentences": sentences(6, "c")},
        ],
    }
    for r in coco["images"]:
        jpg(tmp_path / "coco" / r["filepath"] / r["filename"])
    (tmp_path / "dataset_coco.json").write_text(json.dumps(coco))
    s = load_karpathy(tmp_path / "dataset_coco.json", tmp_path / "coco")
    assert s.name == "coco-test" and s.images == [tmp_path / "coco/val2014/a.jpg", tmp_path / "coco/val2014/c.jpg"]
    assert len(s.texts) == 11 and s.texts[0] == "a caption 0" and s.text_to_image == [0] * 5 + [1] * 6

    flickr = {
        "dataset": "flickr30k",
        "images": [{"filename": "1.jpg", "split": "test", "sentences": sentences(5, "f")}],
    }
    jpg(tmp_path / "flickr" / "1.jpg")
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(flickr))
    f = load_karpathy(tmp_path / "dataset_flickr30k.json", tmp_path / "flickr")
    assert f.name == "flickr30k-test" and f.images == [tmp_path / "flickr/1.jpg"] and len(f.texts) == 5
    with pytest.raises(InputError, match="no images with split 'val'"):
        load_karpathy(tmp_path / "dataset_flickr30k.json", tmp_path / "flickr", split="val")
    (tmp_path / "flickr" / "1.jpg").unlink()
    with pytest.raises(InputError, match="1 of 1 image files are missing"):
        load_karpathy(tmp_path / "dataset_flickr30k.json", tmp_path / "flickr")


def test_karpathy_entry_without_sentences_or_filename_is_named(tmp_path):
    images = [
        {"filename": "ok.jpg", "split": "test", "sentences": [{"raw": "fine"}]},
        {"filename": "bare.jpg", "split": "test"},
    ]
    (tmp_path / "k.json").write_text(json.dumps({"images": images}))
    with pytest.raises(InputError, match=r"images\[1\] \(bare\.jpg\) has no 'sentences'"):
        load_karpathy(tmp_path / "k.json", tmp_path)
    images[1] = {"split": "test", "sentences": [{"raw": "x"}]}
    (tmp_path / "k.json").write_text(json.dumps({"images": images}))
    with pytest.raises(InputError, match=r"images\[1\] \(no filename\) has no 'filename'"):
        load_karpathy(tmp_path / "k.json", tmp_path)
    images[1] = {"filename": "s.jpg", "split": "test", "sentences": [{"tokens": ["x"]}]}
    (tmp_path / "k.json").write_text(json.dumps({"images": images}))
    with pytest.raises(InputError, match=r"images\[1\] \(s\.jpg\) has no 'sentences' list"):
        load_karpathy(tmp_path / "k.json", tmp_path)


def test_synthetic_head_concat_and_open(tmp_path):
    long = load_synthetic(4, seed=7)
    short = load_synthetic(4, seed=7, text="short")
    assert long.name == "synthetic-long" and long.text_to_image == [0, 1, 2, 3]
    assert all(lt.startswith("The background is") for lt in long.texts) and short.texts[0].startswith("a ")
    first = open_image(long.images[0])
    assert first.size == (96, 96) and first.tobytes() == open_image(short.images[0]).tobytes()

    s = EvalSet("x", ["i0", "i1", "i2"], ["a", "b", "c", "d"], [0, 2, 1, 2])
    assert s.head(2) == EvalSet("x", ["i0", "i1"], ["a", "c"], [0, 1])
    both = concat_eval_sets("both", [s, EvalSet("y", ["j0"], ["e"], [0])])
    assert both.images == ["i0", "i1", "i2", "j0"] and both.text_to_image == [0, 2, 1, 2, 3]
    with pytest.raises(ValueError, match="outside"):
        EvalSet("bad", ["i0"], ["a"], [1])
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(InputError, match="broken.jpg"):
        open_image(tmp_path / "broken.jpg")
