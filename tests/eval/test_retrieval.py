"""Recall@k against similarity matrices worked out by hand (ties, several texts per image), chunking, output."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from recaption.eval import retrieval
from recaption.eval.datasets import EvalSet
from recaption.eval.retrieval import embed_eval_set, format_table, retrieval_metrics, write_json


def from_scores(scores: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings whose image·text products are exactly `scores` (images × texts): texts are one-hot."""
    s = torch.tensor(scores, dtype=torch.float32)
    return s, torch.eye(s.shape[1])


def reference(scores: torch.Tensor, owner: list[int], ks) -> dict[str, float]:
    """A slow, obvious version: sort each row with wrong items first among equals (pessimistic ties)."""
    out = {}
    n_img, n_txt = scores.shape
    i2t_ranks, t2i_ranks = [], []
    for i in range(n_img):
        own = [t for t in range(n_txt) if owner[t] == i]
        if not own:
            continue
        order = sorted(range(n_txt), key=lambda t: (-float(scores[i, t]), owner[t] == i))
        i2t_ranks.append(min(order.index(t) for t in own))
    for t in range(n_txt):
        order = sorted(range(n_img), key=lambda i: (-float(scores[i, t]), i == owner[t]))
        t2i_ranks.append(order.index(owner[t]))
    for k in ks:
        out[f"i2t@{k}"] = 100.0 * sum(r < k for r in i2t_ranks) / len(i2t_ranks)
    for k in ks:
        out[f"t2i@{k}"] = 100.0 * sum(r < k for r in t2i_ranks) / len(t2i_ranks)
    return out


# Images × texts; texts 0,1 describe image 0, texts 2,3 image 1, text 4 image 2.
SCORES = [
    [0.9, 0.1, 0.5, 0.2, 0.3],  # best own text 0.9, nothing else as high: rank 0
    [0.8, 0.6, 0.4, 0.7, 0.1],  # best own 0.7 (text 3); text 0 of image 0 beats it: rank 1
    [0.5, 0.5, 0.5, 0.2, 0.5],  # own 0.5 tied with three wrong texts: pessimistic rank 3
]
OWNER = [0, 0, 1, 1, 2]


def test_hand_computed_several_texts_per_image_and_ties():
    image_emb, text_emb = from_scores(SCORES)
    got = retrieval_metrics(image_emb, text_emb, OWNER, ks=(1, 2, 3, 4))
    # i2t ranks 0, 1, 3. t2i ranks (column by column): text0 0, text1 2, text2 2 (0.5 tie + 0.5 > 0.4), text3 0,
    # text4 0.
    assert got == pytest.approx(
        {
            "i2t@1": 100 / 3,
            "i2t@2": 200 / 3,
            "i2t@3": 200 / 3,
            "i2t@4": 100.0,
            "t2i@1": 60.0,
            "t2i@2": 60.0,
            "t2i@3": 100.0,
            "t2i@4": 100.0,
        }
    )
    assert list(got) == ["i2t@1", "i2t@2", "i2t@3", "i2t@4", "t2i@1", "t2i@2", "t2i@3", "t2i@4"]
    assert got == pytest.approx(reference(image_emb @ text_emb.T, OWNER, (1, 2, 3, 4)))


def test_a_tie_with_the_correct_item_counts_against_it():
    # Two identical images with one text each: whichever order, the correct one is never first.
    image_emb = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text_emb = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    got = retrieval_metrics(image_emb, text_emb, [0, 1], ks=(1, 2))
    assert got == {"i2t@1": 0.0, "i2t@2": 100.0, "t2i@1": 0.0, "t2i@2": 100.0}


def test_own_texts_tied_with_each_other_do_not_push_an_image_down():
    # Image 0's two texts score the same; only the other image's text can rank before them.
    image_emb, text_emb = from_scores([[0.5, 0.5, 0.25], [0.0, 0.0, 1.0]])
    assert retrieval_metrics(image_emb, text_emb, [0, 0, 1], ks=(1,))["i2t@1"] == 100.0


def test_images_without_text_are_distractors_only():
    image_emb, text_emb = from_scores([[1.0], [0.5], [2.0]])  # image 2 has no text but outscores image 0
    got = retrieval_metrics(image_emb, text_emb, [0], ks=(1, 2))
    assert got == {"i2t@1": 100.0, "i2t@2": 100.0, "t2i@1": 0.0, "t2i@2": 100.0}


def test_chunked_equals_reference_and_order_does_not_matter(monkeypatch):
    g = torch.Generator().manual_seed(0)
    # Coarse values make many exact ties; duplicated rows make tied images and texts.
    image_emb = torch.randint(-2, 3, (12, 4), generator=g).float()
    image_emb[5] = image_emb[2]
    owner = torch.randint(0, 12, (30,), generator=g).tolist()
    text_emb = torch.randint(-2, 3, (30, 4), generator=g).float()
    text_emb[7] = text_emb[3]
    ks = (1, 3, 5)
    expected = reference(image_emb @ text_emb.T, owner, ks)
    whole = retrieval_metrics(image_emb, text_emb, owner, ks)
    monkeypatch.setattr(retrieval, "SCORE_BUDGET", 7)  # one query per chunk
    chunked = retrieval_metrics(image_emb, text_emb, owner, ks)
    assert whole == pytest.approx(expected) and chunked == pytest.approx(expected)
    perm_i, perm_t = torch.randperm(12, generator=g), torch.randperm(30, generator=g)
    inverse = torch.argsort(perm_i)
    shuffled_owner = [int(inverse[owner[t]]) for t in perm_t.tolist()]
    assert retrieval_metrics(image_emb[perm_i], text_emb[perm_t], shuffled_owner, ks) == pytest.approx(expected)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="one per text"):
        retrieval_metrics(torch.eye(2), torch.eye(2), [0])
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(torch.eye(2), torch.eye(2), [0, 2])
    with pytest.raises(ValueError, match="text embeddings hold NaN"):
        retrieval_metrics(torch.eye(2), torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), [0, 1])


class ColourEncoder:
    """Image embedding = mean colour; text embedding = the colour the text names."""

    COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}

    def __init__(self):
        self.batches = []

    def encode_images(self, images):
        self.batches.append(len(images))
        rgb = torch.tensor([img.resize((1, 1)).getpixel((0, 0)) for img in images], dtype=torch.float32)
        return torch.nn.functional.normalize(rgb, dim=-1)

    def encode_texts(self, texts):
        return torch.nn.functional.normalize(torch.tensor([self.COLOURS[t.split()[-1]] for t in texts]), dim=-1)


def test_embed_eval_set_in_batches_with_lazy_images(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    images = [path, Image.new("RGB", (8, 8), (0, 255, 0)), lambda: Image.new("RGB", (8, 8), (0, 0, 255))]
    s = EvalSet("colours", images, ["a red", "pure red", "a green", "a blue"], [0, 0, 1, 2])
    enc = ColourEncoder()
    image_emb, text_emb = embed_eval_set(enc, s, batch_size=2)
    assert enc.batches == [2, 1] and image_emb.shape == (3, 3) and text_emb.shape == (4, 3)
    got = retrieval_metrics(image_emb, text_emb, s.text_to_image, ks=(1,))
    assert got == {"i2t@1": 100.0, "t2i@1": 100.0}


def test_table_and_json(tmp_path):
    results = {
        "coco": {"i2t@1": 50.0, "t2i@1": 25.5, "n_images": 2},
        "in1k": {"top1": 12.345, "top5": 40.0},
        "flickr": {"i2t@1": 100.0, "t2i@1": 0.0, "n_images": 1},
    }
    table = format_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["set", "i2t@1", "t2i@1"]
    assert lines[2].split() == ["coco", "50.00", "25.50"] and lines[3].split() == ["flickr", "100.00", "0.00"]
    assert "in1k" in table and "12.35" in table
    out = write_json(tmp_path / "sub" / "r.json", {"results": results})
    assert json.loads(out.read_text()) == {"results": results}
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]
