"""Contrastive losses over the global batch: per-slot InfoNCE (LoTLIP), multi-positive and grouping (DreamLIP),
multi-to-multi (Holistic CLIP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recaption.train.config import LossConfig


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the summed gradient of its own rows (every rank
    computes the same global loss, so the sum over ranks is what reaches a rank's embeddings)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        # A copy: autograd may hand the same tensor to other consumers, and all_reduce works in place.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad.chunk(ctx.world, dim=0)[ctx.rank]


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` along dim 0 from every worker (same shape on each), keeping gradients; identity in a single
    process. Each rank's gradient of the global loss, summed over ranks, then averaged by DDP, is the exact one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """`gather` for integer text ids, which carry no gradient."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ids
    parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, ids.contiguous())
    return torch.cat(parts, dim=0)


def same_text_mask(ids: torch.Tensor | None) -> torch.Tensor | None:
    """(N, N) True where two different rows hold the same text: such a pair is no negative. None without ids."""
    if ids is None:
        return None
    ids = gather_ids(ids)
    same = ids[:, None] == ids[None, :]
    return same & ~torch.eye(len(ids), dtype=torch.bool, device=ids.device)


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of matching rows of two (N, D) normalised batches (CLIP's loss), over the global batch.

    `ids` (N,) names each row's text: rows whose texts are identical are left out of each other's denominators
    (both directions), so a batch holding one short caption twice does not push either image from its own text."""
    a, b = gather(a), gather(b)
    logits = scale * a @ b.T
    same = same_text_mask(ids)
    if same is not None:
        logits = logits.masked_fill(same, torch.finfo(logits.dtype).min)
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def slot_loss(
    image: torch.Tensor, slots: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """The mean over S text slots (N, S, D) of each slot's own InfoNCE against the image (N, D), the B texts of that
    slot as the denominator; `ids` (N,) or (N, S) name the texts (see `info_nce`).

    LoTLIP (`open_clip/loss.py`, `ClipLoss.forward`, 3-D text features): one symmetric InfoNCE per text slot, each
    divided by 2·number_text. DreamLIP's released multi-positive form is the same code (`open_clip/loss.py` of its
    repository, `CLIP_loss` + `(De)CLIP_loss`), with the slots being the raw caption and the K sampled sub-captions."""
    if ids is not None and ids.ndim == 1:
        ids = ids[:, None].expand(-1, slots.shape[1])
    per_slot = [info_nce(image, slots[:, s], scale, None if ids is None else ids[:, s]) for s in range(slots.shape[1])]
    return torch.stack(per_slot).mean()


def multi_positive_loss(
    image: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """DreamLIP's multi-positive loss as released (`open_clip/loss.py`, `use_declip_loss`): each of an image's K
    sub-captions (N, K, D) gets its own symmetric InfoNCE against the N images, with the N sub-captions drawn for
    that slot as the denominator; the mean over K. (Its paper writes one softmax over all N·K texts, a form whose
    value cannot fall below log K / 2 even with perfect embeddings; the released code does not use it.)"""
    return slot_loss(image, texts, scale, ids)


def grouping_weights(texts: torch.Tensor, patches: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per sub-caption weights over patches (N, K, P): similarity, min-max normalised over the patches, values
    below `threshold` zeroed, renormalised to sum 1 (DreamLIP's sub-caption-specific grouping, `open_clip/loss.py`,
    `use_finegrained_loss`; its `sgl_delta`, default 0.0 in `training/params.py`, is the threshold)."""
    sim = torch.einsum("nkd,npd->nkp", texts, patches)
    low, high = sim.amin(dim=-1, keepdim=True), sim.amax(dim=-1, keepdim=True)
    weights = (sim - low) / (high - low).clamp_min(1e-6)
    weights = torch.where(weights >= threshold, weights, torch.zeros_like(weights))
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-6)


def grouping_loss(
    texts: torch.Tensor,
    patches: torch.Tensor,
    scale: torch.Tensor,
    threshold: float = 0.0,
    scope: str = "batch",
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """DreamLIP's grouping loss: each sub-caption (N, K, D) against the patch tokens (N, P, D) of its image pooled by
    its own weights; InfoNCE over all B·K pairs of the global batch (`batch`, the released code's
    `pairwise_contrastive_loss`, which also holds the image's own other sub-captions as negatives), or over one
    image's K only (`image`). `ids` (N, K) name the sub-captions: identical ones are not each other's negatives."""
    weights = grouping_weights(texts, patches, threshold)
    pooled = F.normalize(torch.einsum("nkp,npd->nkd", weights, patches), dim=-1)
    if scope == "image":
        logits = scale * pooled @ texts.transpose(1, 2)  # (N, K pooled, K texts)
        if ids is not None:
            same = (ids[:, :, None] == ids[:, None, :]) & ~torch.eye(ids.shape[1], dtype=torch.bool, device=ids.device)
            logits = logits.masked_fill(same, torch.finfo(logits.dtype).min)
        labels = torch.arange(texts.shape[1], device=texts.device).expand(texts.shape[0], -1)
        return (F.cross_entropy(logits.transpose(1, 2), labels) + F.cross_entropy(logits, labels)) / 2
    return info_nce(pooled.flatten(0, 1), texts.flatten(0, 1), scale, None if ids is None else ids.flatten())


def multi_branch_loss(
    branches: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Holistic CLIP's multi-to-multi loss: image branch i (N, M, D) against text i (N, M, D), averaged over M.

    The paper's one-to-one pairing of branches and perspectives; the released code also adds the other
    perspectives' texts as extra negatives and, with fewer texts than branches, matches each text to its best
    branch, neither of which the paper's equation has."""
    per_branch = [
        info_nce(branches[:, m], texts[:, m], scale, None if ids is None else ids[:, m])
        for m in range(branches.shape[1])
    ]
    return torch.stack(per_branch).mean()


def split_texts(embeddings: torch.Tensor, layout: list[tuple[str, int]], batch_size: int) -> dict[str, torch.Tensor]:
    """The short-text forward's (Σ B·n, D) output cut back into its groups: name → (B, n, D), image-major."""
    out, start = {}, 0
    for name, per_image in layout:
        stop = start + batch_size * per_image
        out[name] = embeddings[start:stop].reshape(batch_size, per_image, -1)
        start = stop
    return out


def compute_losses(
    out: dict[str, torch.Tensor], cfg: LossConfig, text_ids: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Every switched-on loss of one micro-batch and their weighted sum under `loss`.

    `text_ids` {group: ids} name each text (`short` (N,), `long` (N,), `subs` (N, K), `holistic` (N, M)) so that
    identical texts in the global batch are not each other's negatives.

    The text-slot losses (short, every long slot, every sub-caption) are combined as `loss.slot_weighting` says.
    `per_slot` (default) is the released code of LoTLIP and DreamLIP (`open_clip/loss.py` of both,
    `ClipLoss.forward`): every text slot of a step is one InfoNCE divided by the number of slots, times its group's
    weight here, so short : long-CLS stays 1 : 1 whatever the number of corners. `per_loss` gives each group (its
    mean over its slots) its weight, so more long slots dilute the long CLS. Grouping and holistic add with their
    weights either way."""
    ids = text_ids or {}
    image, scale = out["branches"][:, 0], out["scale"]
    losses: dict[str, torch.Tensor] = {}
    slots: list[tuple[str, float, int]] = []  # (loss, weight, text slots it averages over)
    if cfg.long:
        long = out["long"] if cfg.long_slots == "all" else out["long"][:, :1]
        losses["long"] = slot_loss(image, long, scale, ids.get("long"))
        slots.append(("long", cfg.long, long.shape[1]))
    if cfg.short:
        losses["short"] = info_nce(image, out["short"][:, 0], scale, ids.get("short"))
        slots.append(("short", cfg.short, 1))
    if cfg.multi_positive:
        losses["multi_positive"] = multi_positive_loss(image, out["subs"], scale, ids.get("subs"))
        slots.append(("multi_positive", cfg.multi_positive, out["subs"].shape[1]))
    if cfg.grouping:
        losses["grouping"] = grouping_loss(
            out["subs"], out["patches"], out["group_scale"], cfg.grouping_threshold, cfg.grouping_scope, ids.get("subs")
        )
    if cfg.holistic:
        losses["holistic"] = multi_branch_loss(out["branches"], out["holistic"], scale, ids.get("holistic"))
    if cfg.slot_weighting == "per_slot" and slots:
        total = sum(weight * n * losses[name] for name, weight, n in slots) / sum(n for _, _, n in slots)
    else:
        total = sum(weight * losses[name] for name, weight, _ in slots)
    others = [getattr(cfg, name) * losses[name] for name in ("grouping", "holistic") if name in losses]
    losses["loss"] = total + sum(others) if others else total
    return losses
