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


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of matching rows of two (N, D) normalised batches (CLIP's loss), over the global batch."""
    a, b = gather(a), gather(b)
    logits = scale * a @ b.T
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def slot_loss(image: torch.Tensor, slots: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LoTLIP: the mean over the K+1 text slots (N, S, D) of each slot's InfoNCE against the image (N, D)."""
    return torch.stack([info_nce(image, slots[:, s], scale) for s in range(slots.shape[1])]).mean()


def multi_positive_loss(image: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DreamLIP's multi-positive InfoNCE: each image (N, D) has its K sub-captions (N, K, D) as positives.

    Text→image: each sub-caption is classified among the N images. Image→text: each of an image's K positives is
    classified among all N·K texts (its other K-1 positives sit in the denominator, as in the paper's equation).
    The paper sums over pairs; we average, so weights do not depend on batch size or K. With K=1 this is `info_nce`.
    DreamLIP's training code is not released (its README lists it as to do): this follows the paper's equation.
    """
    image, texts = gather(image), gather(texts)
    n, k, d = texts.shape
    flat = texts.reshape(n * k, d)
    logits = scale * image @ flat.T  # (N, N·K)
    owner = torch.arange(n, device=image.device).repeat_interleave(k)
    text_to_image = F.cross_entropy(logits.T, owner)
    image_to_text = -F.log_softmax(logits, dim=1)[owner, torch.arange(n * k, device=image.device)].mean()
    return (text_to_image + image_to_text) / 2


def grouping_weights(texts: torch.Tensor, patches: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per sub-caption weights over patches (N, K, P): similarity, min-max normalised over the patches, values
    below `threshold` zeroed, renormalised to sum 1 (DreamLIP's sub-caption-specific grouping)."""
    sim = torch.einsum("nkd,npd->nkp", texts, patches)
    low, high = sim.amin(dim=-1, keepdim=True), sim.amax(dim=-1, keepdim=True)
    weights = (sim - low) / (high - low).clamp_min(1e-6)
    weights = torch.where(weights >= threshold, weights, torch.zeros_like(weights))
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-6)


def grouping_loss(
    texts: torch.Tensor, patches: torch.Tensor, scale: torch.Tensor, threshold: float = 0.5, scope: str = "batch"
) -> torch.Tensor:
    """DreamLIP's grouping loss: each sub-caption (N, K, D) against the patch tokens (N, P, D) of its image pooled by
    its own weights; InfoNCE over all B·K pairs of the global batch (`batch`, our default, which also holds the
    image's own other sub-captions as negatives), or over one image's K only (`image`, the denominator the paper's
    equation writes)."""
    weights = grouping_weights(texts, patches, threshold)
    pooled = F.normalize(torch.einsum("nkp,npd->nkd", weights, patches), dim=-1)
    if scope == "image":
        logits = scale * pooled @ texts.transpose(1, 2)  # (N, K pooled, K texts)
        labels = torch.arange(texts.shape[1], device=texts.device).expand(texts.shape[0], -1)
        return (F.cross_entropy(logits.transpose(1, 2), labels) + F.cross_entropy(logits, labels)) / 2
    return info_nce(pooled.flatten(0, 1), texts.flatten(0, 1), scale)


def multi_branch_loss(branches: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Holistic CLIP's multi-to-multi loss: image branch i (N, M, D) against text i (N, M, D), averaged over M.

    The paper's one-to-one pairing of branches and perspectives; the released code also adds the other
    perspectives' texts as extra negatives and, with fewer texts than branches, matches each text to its best
    branch, neither of which the paper's equation has."""
    return torch.stack([info_nce(branches[:, m], texts[:, m], scale) for m in range(branches.shape[1])]).mean()


def split_texts(embeddings: torch.Tensor, layout: list[tuple[str, int]], batch_size: int) -> dict[str, torch.Tensor]:
    """The short-text forward's (Σ B·n, D) output cut back into its groups: name → (B, n, D), image-major."""
    out, start = {}, 0
    for name, per_image in layout:
        stop = start + batch_size * per_image
        out[name] = embeddings[start:stop].reshape(batch_size, per_image, -1)
        start = stop
    return out


def compute_losses(out: dict[str, torch.Tensor], cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Every switched-on loss of one micro-batch and their weighted sum under `loss`."""
    image, scale = out["branches"][:, 0], out["scale"]
    losses: dict[str, torch.Tensor] = {}
    if cfg.long:
        slots = out["long"] if cfg.long_slots == "all" else out["long"][:, :1]
        losses["long"] = slot_loss(image, slots, scale)
    if cfg.short:
        losses["short"] = info_nce(image, out["short"][:, 0], scale)
    if cfg.multi_positive:
        losses["multi_positive"] = multi_positive_loss(image, out["subs"], scale)
    if cfg.grouping:
        losses["grouping"] = grouping_loss(
            out["subs"], out["patches"], out["group_scale"], cfg.grouping_threshold, cfg.grouping_scope
        )
    if cfg.holistic:
        losses["holistic"] = multi_branch_loss(out["branches"], out["holistic"], scale)
    losses["loss"] = sum(getattr(cfg, name) * value for name, value in losses.items())
    return losses
