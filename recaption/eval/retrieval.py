"""Image↔text retrieval: batched embedding of an eval set and exact Recall@k in both directions."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from recaption.eval.datasets import EvalSet, ImageRef
    from recaption.eval.encoders import Encoder

log = logging.getLogger(__name__)

# At most this many similarity scores exist at once (64 MiB of float32), whatever the eval set's size.
SCORE_BUDGET = 1 << 24


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k in percent, keys `i2t@k` and `t2i@k` for each k, from L2-normalised embeddings (cosine scores).

    `text_to_image[t]` is the index of the image that text t describes; an image may have several texts.

    - t2i: text t is a hit at k when its image ranks within the first k of all images.
    - i2t: image i is a hit at k when ANY of its texts ranks within the first k of all texts (COCO protocol).
      Images without any text are candidates for t2i but are left out of the i2t average.

    Ties are broken pessimistically, so the result does not depend on the order of the data: a wrong item
    whose score equals the correct one ranks before it. The rank of the correct image for text t is the number
    of other images scoring >= it; for image i it is the number of texts of OTHER images scoring >= the best
    of i's own texts (its own texts tied with that one do not push it down: any of them is a hit). A hit at k
    is rank < k. Counting ranks is exact top-k without sorting; queries go in chunks, so a 100k × 100k score
    matrix never exists at once (see SCORE_BUDGET).
    """
    image_emb, text_emb = image_emb.float(), text_emb.float()
    owner = torch.as_tensor(text_to_image, dtype=torch.long, device=text_emb.device)
    n_images, n_texts = image_emb.shape[0], text_emb.shape[0]
    if owner.shape != (n_texts,):
        raise ValueError(f"text_to_image has shape {tuple(owner.shape)}; expected ({n_texts},), one per text")
    if n_texts == 0 or n_images == 0:
        raise ValueError("retrieval needs at least one image and one text")
    if int(owner.min()) < 0 or int(owner.max()) >= n_images:
        raise ValueError(f"text_to_image holds indices outside [0, {n_images}) of the {n_images} images")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"image and text embeddings differ in width: {image_emb.shape[1]} vs {text_emb.shape[1]}")
    for what, emb in (("image", image_emb), ("text", text_emb)):
        if not torch.isfinite(emb).all():
            raise ValueError(f"{what} embeddings hold NaN or inf: the model's output is broken, no rank means anything")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")

    t2i_rank = _text_to_image_ranks(image_emb, text_emb, owner)
    i2t_rank = _image_to_text_ranks(image_emb, text_emb, owner)
    has_text = torch.zeros(n_images, dtype=torch.bool, device=owner.device)
    has_text[owner] = True
    i2t_rank = i2t_rank[has_text.to(i2t_rank.device)]

    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t@{k}"] = 100.0 * int((i2t_rank < k).sum()) / i2t_rank.numel()
    for k in ks:
        out[f"t2i@{k}"] = 100.0 * int((t2i_rank < k).sum()) / t2i_rank.numel()
    return out


def _chunk(n_keys: int) -> int:
    return max(1, SCORE_BUDGET // max(1, n_keys))


def _text_to_image_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """For each text: how many images other than its own score at least as high as its own."""
    step = _chunk(image_emb.shape[0])
    ranks = []
    for start in range(0, text_emb.shape[0], step):
        scores = text_emb[start : start + step] @ image_emb.T  # (B, images)
        rows = torch.arange(scores.shape[0], device=scores.device)
        # The correct score is read from the same product it is compared with, so equal really means equal.
        correct = scores[rows, owner[start : start + step]]
        ranks.append((scores >= correct[:, None]).sum(1) - 1)  # minus the correct image itself
    return torch.cat(ranks)


def _image_to_text_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """For each image: how many texts of other images score at least as high as its best own text."""
    step = _chunk(text_emb.shape[0])
    ranks = []
    for start in range(0, image_emb.shape[0], step):
        scores = image_emb[start : start + step] @ text_emb.T  # (B, texts)
        n = scores.shape[0]
        # The chunk's own (image, text) pairs, read from the same product: no (B, texts) mask is needed.
        own_texts = ((owner >= start) & (owner < start + n)).nonzero().squeeze(1)
        row = owner[own_texts] - start
        own_scores = scores[row, own_texts]
        best_own = torch.full((n,), float("-inf"), device=scores.device)
        best_own = best_own.scatter_reduce(0, row, own_scores, "amax")
        # Everything at or above the best own score, minus the own texts tied with it (any of them is a hit).
        own_tied = torch.zeros(n, dtype=torch.long, device=scores.device)
        own_tied = own_tied.index_add(0, row, (own_scores >= best_own[row]).long())
        ranks.append((scores >= best_own[:, None]).sum(1) - own_tied)
    return torch.cat(ranks)


def embed_images(encoder: Encoder, images: Sequence[ImageRef], batch_size: int = 64) -> torch.Tensor:
    """Embed images in batches, opening each batch's files only when it is its turn (memory stays flat)."""
    from recaption.eval.datasets import open_image

    out = []
    for start in range(0, len(images), batch_size):
        batch = [open_image(ref) for ref in images[start : start + batch_size]]
        out.append(_checked(encoder.encode_images(batch), len(batch), "encode_images"))
        log.info("embedded %d/%d images", min(start + batch_size, len(images)), len(images))
    return _normalised(out)


def embed_texts(encoder: Encoder, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Embed texts in batches."""
    out = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        out.append(_checked(encoder.encode_texts(batch), len(batch), "encode_texts"))
    return _normalised(out)


def embed_eval_set(encoder: Encoder, eval_set: EvalSet, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_emb, text_emb) of an eval set, L2-normalised, on the CPU, in the eval set's order."""
    with torch.no_grad():
        return embed_images(encoder, eval_set.images, batch_size), embed_texts(encoder, eval_set.texts, batch_size)


def evaluate_retrieval(
    encoder: Encoder,
    eval_set: EvalSet,
    batch_size: int = 64,
    ks: Sequence[int] = (1, 5, 10),
    device: str = "cpu",
) -> dict[str, float]:
    """Embed an eval set and return its Recall@k (see `retrieval_metrics`), scoring on `device` (a GPU makes
    100k × 100k take seconds instead of minutes)."""
    image_emb, text_emb = embed_eval_set(encoder, eval_set, batch_size)
    return retrieval_metrics(image_emb.to(device), text_emb.to(device), eval_set.text_to_image, ks)


def _checked(emb: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != n:
        shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise ValueError(f"encoder.{what} returned {shape} for a batch of {n}; expected a tensor ({n}, D)")
    return emb.detach().float().cpu()


def _normalised(parts: list[torch.Tensor]) -> torch.Tensor:
    # The protocol asks encoders for unit vectors; normalising again costs little and makes scores cosines
    # even for an encoder that forgot.
    emb = torch.cat(parts) if parts else torch.empty(0, 0)
    return torch.nn.functional.normalize(emb, dim=-1) if emb.numel() else emb


def metric_keys(result: dict[str, Any]) -> list[str]:
    """The metrics of one set's result (percentages), leaving out counts and timing."""
    return [k for k, v in result.items() if isinstance(v, float) and k != "seconds"]


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Results {set: {metric: value}} as aligned text tables, one per kind of set (same metric columns)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, metrics in results.items():
        groups.setdefault(tuple(metric_keys(metrics)), []).append(name)
    blocks = []
    for cols, names in groups.items():
        rows = [["set", *cols]] + [[n, *(f"{results[n][c]:.2f}" for c in cols)] for n in names]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write results as indented JSON atomically (a reader never sees half a file); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, out)
    return out
