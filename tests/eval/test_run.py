"""`run_eval` end to end on a tiny random CLIP and generated data; the config's errors; the trainer's hook."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

from recaption.errors import ConfigError
from recaption.eval.run import load_eval_config, make_eval_hook, run_eval
from recaption.eval.synthetic import make_scene


def write_karpathy(root, n_images=4, per_image=2):
    """A Flickr-style Karpathy json over generated scenes: each image's short and long caption."""
    rows = []
    for i in range(n_images):
        scene = make_scene(100 + i, size=48)
        scene.image.save(root / f"{i}.jpg")
        sentences = [{"raw": scene.short_caption}, {"raw": scene.long_caption}][:per_image]
        rows.append({"filename": f"{i}.jpg", "split": "test", "sentences": sentences})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": rows}))


def write_colour_folder(root):
    for name, rgb in [("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255))]:
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), rgb).save(root / name / f"{i}.png")


def test_run_eval_end_to_end_on_a_tiny_clip(tiny_clip, tmp_path, capsys):
    write_karpathy(tmp_path)
    write_colour_folder(tmp_path / "colours")
    config = {
        "model": {"path": str(tiny_clip)},
        "sets": [
            {"format": "synthetic", "size": 6, "image_size": 60, "name": "syn-long"},
            {
                "format": "synthetic",
                "size": 6,
                "image_size": 48,
                "text": "short",
                "scene_text": False,
                "name": "syn-short",
            },
            {"format": "karpathy", "path": str(tmp_path / "dataset_flickr30k.json"), "images": str(tmp_path)},
            {"format": "image-folder", "path": str(tmp_path / "colours"), "templates": "simple7", "limit": 2},
        ],
        "batch_size": 4,
        "output": str(tmp_path / "out" / "eval.json"),
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    payload = run_eval(tmp_path / "eval.yaml", ["sets.0.size=5"])
    results = payload["results"]
    assert list(results) == ["syn-long", "syn-short", "flickr30k-test", "colours"]
    assert results["syn-long"]["n_images"] == 5 and results["syn-short"]["n_images"] == 6
    assert results["flickr30k-test"]["n_texts"] == 8
    assert results["colours"]["n_images"] == 6 and results["colours"]["n_classes"] == 3
    for name in ("syn-long", "syn-short", "flickr30k-test"):
        r = results[name]
        assert set(r) == {"i2t@1", "i2t@5", "i2t@10", "t2i@1", "t2i@5", "t2i@10", "n_images", "n_texts", "seconds"}
        assert all(0.0 <= r[k] <= 100.0 for k in ("i2t@1", "t2i@1"))
        assert r["i2t@10"] == r["t2i@10"] == 100.0  # fewer than 10 candidates: every item is in the top 10
    assert results["colours"]["top5"] == 100.0  # 3 classes
    assert json.loads((tmp_path / "out" / "eval.json").read_text()) == payload
    assert payload["config"]["sets"][0]["size"] == 5 and payload["model"]["path"] == str(tiny_clip)
    out = capsys.readouterr().out
    assert "syn-long" in out and "i2t@1" in out and "top1" in out and "eval.json" in out

    # The same model and data give the same numbers: nothing depends on batch composition or order.
    again = run_eval(config, ["batch_size=3", "sets.0.size=5", "output=null"])
    for name, r in results.items():
        assert {k: v for k, v in again["results"][name].items() if k != "seconds"} == pytest.approx(
            {k: v for k, v in r.items() if k != "seconds"}
        )


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"sets\.0\.synthetic\.sizee: unknown key"):
        load_eval_config(None, data={"sets": [{"format": "synthetic", "sizee": 3}]})
    with pytest.raises(ConfigError, match="format"):
        load_eval_config(None, data={"sets": [{"format": "laion", "path": "x"}]})
    with pytest.raises(ConfigError, match="same length"):
        load_eval_config(None, data={"sets": [{"format": "iiw", "path": ["a", "b"], "images": ["a"]}]})
    with pytest.raises(ConfigError, match="model: required"):
        run_eval({"sets": [{"format": "synthetic", "size": 2}]})
    with pytest.raises(ConfigError, match="distinct `name`"):
        make_eval_hook({"sets": [{"format": "synthetic", "size": 2}, {"format": "synthetic", "size": 3}]})
    with pytest.raises(ConfigError, match="config file not found"):
        run_eval(tmp_path / "missing.yaml")


class ColourModule(torch.nn.Module):
    """A trainer-like model: an nn.Module whose embeddings are the colour an image shows or a text names."""

    AXES = {"red": 0, "green": 1, "blue": 2}

    def __init__(self):
        super().__init__()
        self.modes = []

    def encode_images(self, images):
        self.modes.append(self.training)
        rgb = torch.tensor([img.resize((1, 1)).getpixel((0, 0)) for img in images], dtype=torch.float32)
        return torch.nn.functional.normalize(rgb + 1.0, dim=-1)

    def encode_texts(self, texts):
        rows = torch.full((len(texts), 3), 1.0)
        for row, text in zip(rows, texts, strict=True):
            for word, axis in self.AXES.items():
                if word in text:
                    row[axis] += 255.0
        return torch.nn.functional.normalize(rows, dim=-1)


def test_eval_hook_for_the_trainer(tmp_path):
    write_colour_folder(tmp_path / "colours")
    for stem, colour in [("r", "red"), ("g", "green"), ("b", "blue")]:
        (tmp_path / "urban" / "image").mkdir(parents=True, exist_ok=True)
        (tmp_path / "urban" / "caption").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}[colour]).save(
            tmp_path / "urban" / "image" / f"{stem}.jpg"
        )
        (tmp_path / "urban" / "caption" / f"{stem}.txt").write_text(f"A {colour} wall.")
    cfg = {
        "sets": [
            {"format": "urban1k", "path": str(tmp_path / "urban"), "name": "walls"},
            {"format": "image-folder", "path": str(tmp_path / "colours"), "templates": ["a {} thing"], "ks": [1]},
        ],
        "ks": [1],
        "output": str(tmp_path / "hook.jsonl"),
    }
    hook = make_eval_hook(cfg)
    model = ColourModule()
    assert model.training
    got = hook(model, 100)
    assert got == {"walls/i2t@1": 100.0, "walls/t2i@1": 100.0, "colours/top1": 100.0}
    assert model.training and model.modes and not any(model.modes)  # eval mode during the call, then restored
    hook(model, 200)
    lines = [json.loads(line) for line in (tmp_path / "hook.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [100, 200] and lines[0]["results"]["walls"]["n_images"] == 3


def test_recaption_eval_command(tiny_clip, tmp_path, capsys):
    from recaption.cli import main

    config = {
        "model": {"path": str(tiny_clip)},
        "sets": [{"format": "synthetic", "size": 4, "image_size": 60, "name": "syn"}],
        "output": str(tmp_path / "eval.json"),
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    assert main(["eval", str(tmp_path / "eval.yaml"), "--set", "batch_size=2"]) == 0
    assert "syn" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval.json").read_text())["results"]["syn"]["n_images"] == 4
    assert main(["eval", str(tmp_path / "eval.yaml"), "--set", "sets.0.sizee=3"]) == 2
    assert "sets.0" in capsys.readouterr().err


def share4v(path, entries, encoding="utf-8"):
    path.write_bytes(json.dumps(entries, ensure_ascii=False).encode(encoding))
    return {"format": "sharegpt4v", "path": str(path), "images": str(path.parent)}


def gpt(value) -> dict:
    return {"image": "0.jpg", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": value}]}


@pytest.mark.parametrize(
    "case",
    ["null caption", "int caption", "list for an object", "latin-1", "empty set", "no short_caption", "no {}"],
)
def test_each_malformed_benchmark_file_is_one_line(tiny_clip, tmp_path, capsys, case):
    from recaption.cli import main

    make_scene(0, size=48).image.save(tmp_path / "0.jpg")
    if case == "null caption":
        section = share4v(tmp_path / "s.json", [gpt(None)])
    elif case == "int caption":
        section = share4v(tmp_path / "s.json", [gpt(7)])
    elif case == "list for an object":
        section = share4v(tmp_path / "s.json", [[gpt("a caption.")]])
    elif case == "latin-1":
        section = share4v(tmp_path / "s.json", [gpt("a café.")], encoding="latin-1")
    elif case == "empty set":
        section = share4v(tmp_path / "s.json", [])
    elif case == "no short_caption":
        root = tmp_path / "dci" / "densely_captioned_images"
        (root / "annotations").mkdir(parents=True)
        (root / "photos").mkdir()
        (root / "splits.json").write_text(json.dumps({"test": ["a.json"]}))
        (root / "annotations" / "a.json").write_text(json.dumps({"image": "0.jpg", "extra_caption": "x."}))
        section = {"format": "dci", "path": str(tmp_path / "dci"), "text": "short"}
    else:
        write_colour_folder(tmp_path / "colours")
        section = {"format": "image-folder", "path": str(tmp_path / "colours"), "templates": ["a photo"]}
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(tiny_clip)}, "sets": [section]}))
    assert main(["eval", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert "sets[0]" in err[0] or str(tmp_path) in err[0]  # names the set or its file
