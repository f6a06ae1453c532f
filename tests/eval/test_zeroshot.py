"""Zero-shot classification with an encoder whose embeddings make the right answer known in advance."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from recaption.eval.datasets import load_image_folder
from recaption.eval.zeroshot import (
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
    build_classifier,
    evaluate_zeroshot,
    resolve_templates,
    zeroshot_metrics,
)

CLASS_AXIS = {"red": 0, "green": 1, "blue": 2}
TEMPLATES = ("a photo of a {}.", "art of the {}.")


class AxisEncoder:
    """Images: their mean RGB in dims 0-2. Texts: the named colour's axis plus a template direction (dim 3)
    that is +1 for one template and -1 for the other, so only the template average points at the class."""

    def __init__(self):
        self.texts = []

    def encode_images(self, images):
        rgb = torch.tensor([img.resize((1, 1)).getpixel((0, 0)) for img in images], dtype=torch.float32)
        return torch.nn.functional.normalize(torch.cat([rgb, torch.zeros(len(images), 1)], 1), dim=-1)

    def encode_texts(self, texts):
        self.texts += texts
        rows = []
        for t in texts:
            v = torch.zeros(4)
            v[next(a for c, a in CLASS_AXIS.items() if c in t.split(" ")[-1])] = 1.0
            v[3] = 1.0 if t.startswith("a photo") else -1.0
            rows.append(v)
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def make_folder(root, layout):
    for cls, colours in layout.items():
        (root / cls).mkdir(parents=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (6, 6), colour).save(root / cls / f"{i}.png")


def test_known_answers_with_template_ensemble_and_pessimistic_ties(tmp_path):
    make_folder(
        tmp_path / "colours",
        {
            "red": [(255, 0, 0)],
            "green": [(0, 255, 0), (255, 230, 0)],  # the second looks more red than green: a top-1 miss
            "blue": [(0, 0, 255), (255, 0, 255)],  # the second ties red and blue: counted as a miss at top-1
        },
    )
    ds = load_image_folder(tmp_path / "colours")
    assert ds.class_names == ["blue", "green", "red"] and ds.labels == [0, 0, 1, 1, 2]
    enc = AxisEncoder()
    classifier = build_classifier(enc, ds.class_names, TEMPLATES, batch_size=4)
    # The ±template directions cancel in the mean: each class is exactly its colour axis.
    assert torch.allclose(classifier, torch.eye(4)[[2, 1, 0]], atol=1e-6)
    assert enc.texts[:2] == ["a photo of a blue.", "art of the blue."]
    got = evaluate_zeroshot(enc, ds, TEMPLATES, batch_size=2, ks=(1, 2, 5))
    assert got == pytest.approx({"top1": 60.0, "top2": 100.0, "top5": 100.0})


def test_metrics_by_hand():
    classifier = torch.eye(3)
    image_emb = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.4], [0.0, 1.0, 0.0]])
    # ranks: 0 (class 0 best); 1 (tie with class 0 counts against class 1); 2 (class 0 lowest); 0
    got = zeroshot_metrics(image_emb, classifier, [0, 1, 0, 1], ks=(1, 2, 3))
    assert got == pytest.approx({"top1": 50.0, "top2": 75.0, "top3": 100.0})
    with pytest.raises(ValueError, match="labels"):
        zeroshot_metrics(image_emb, classifier, [0, 1, 0])


def test_class_names_files_and_underscores(tmp_path):
    make_folder(tmp_path / "in", {"n01": [(1, 2, 3)], "n02": [(3, 2, 1)]})
    (tmp_path / "map.json").write_text(json.dumps({"n01": "tench", "n02": "goldfish"}))
    assert load_image_folder(tmp_path / "in", tmp_path / "map.json").class_names == ["tench", "goldfish"]
    (tmp_path / "names.txt").write_text("great white shark\ntiger shark\n")
    assert load_image_folder(tmp_path / "in", tmp_path / "names.txt").class_names[1] == "tiger shark"
    make_folder(tmp_path / "u", {"sea_lion": [(0, 0, 0)]})
    assert load_image_folder(tmp_path / "u").class_names == ["sea lion"]


def test_templates():
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 and len(set(OPENAI_IMAGENET_TEMPLATES)) == 80
    assert set(SIMPLE_IMAGENET_TEMPLATES) <= set(OPENAI_IMAGENET_TEMPLATES)
    assert resolve_templates("simple7") == SIMPLE_IMAGENET_TEMPLATES
    assert resolve_templates(["a {}"]) == ("a {}",)
    with pytest.raises(ValueError, match="known"):
        resolve_templates("imagenet")
    with pytest.raises(ValueError, match="exactly one"):
        build_classifier(AxisEncoder(), ["red"], ["no slot"])
