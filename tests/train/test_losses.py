"""Each loss against a small case worked out by hand, finite gradients, and the global batch across 2 processes."""

from __future__ import annotations

import math

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from recaption.train.config import LossConfig
from recaption.train.losses import (
    compute_losses,
    grouping_loss,
    grouping_weights,
    info_nce,
    multi_branch_loss,
    multi_positive_loss,
    slot_loss,
)

ONE = torch.tensor(1.0)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_info_nce_by_hand():
    a = t([1, 0], [0, 1])
    b = t([1, 0], [0.6, 0.8])
    # logits [[1, .6], [0, .8]]: rows (image→text) and columns (text→image), each a 2-way softmax.
    rows = softplus(-0.4) + softplus(-0.8)
    cols = softplus(-1.0) + softplus(-0.2)
    assert math.isclose(info_nce(a, b, ONE).item(), (rows + cols) / 4, rel_tol=1e-6)
    assert math.isclose(info_nce(a, a, ONE).item(), softplus(-1.0), rel_tol=1e-6)
    # The scale multiplies the logits.
    assert math.isclose(info_nce(a, a, torch.tensor(3.0)).item(), softplus(-3.0), rel_tol=1e-6)


def test_slot_loss_is_the_mean_over_slots():
    image = t([1, 0], [0, 1])
    slots = torch.stack([image, t([1, 0], [0.6, 0.8])], dim=1)  # slot 0 perfect, slot 1 as above
    expected = (softplus(-1.0) + (softplus(-0.4) + softplus(-0.8) + softplus(-1.0) + softplus(-0.2)) / 4) / 2
    assert math.isclose(slot_loss(image, slots, ONE).item(), expected, rel_tol=1e-6)


def test_multi_positive_is_one_info_nce_per_sub_caption_slot_as_dreamlip_released():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    image = t(e1, e2)
    texts = t([e1, e2], [e2, e2])  # image 0: one matching, one wrong sub-caption; image 1: two matching
    # Slot 0 texts [e1, e2]: plain InfoNCE of a perfect batch. Slot 1 texts [e2, e2]: logits [[0, 0], [1, 1]]
    # (rows images): image→text log 2 for both rows; text→image rows [0, 1], labels 0 and 1.
    slot0 = softplus(-1.0)
    slot1 = (math.log(2) + (softplus(1.0) + softplus(-1.0)) / 2) / 2
    assert math.isclose(multi_positive_loss(image, texts, ONE).item(), (slot0 + slot1) / 2, rel_tol=1e-6)


def test_multi_positive_reaches_zero_with_perfect_embeddings():
    # The paper's single softmax over all N·K texts stays above log K / 2 here; the released form goes to 0.
    image = torch.eye(4)
    texts = image[:, None].expand(-1, 3, -1)
    assert multi_positive_loss(image, texts, torch.tensor(50.0)).item() < 1e-6


def test_identical_texts_in_a_batch_are_not_negatives():
    image = t([1, 0, 0], [0.8, 0.6, 0], [0, 0, 1])
    text = t([0.9, 0.436, 0], [0.9, 0.436, 0], [0, 0, 1])  # images 0 and 1 share one caption string
    ids = torch.tensor([7, 7, 3])
    scale = torch.tensor(30.0)
    unmasked = info_nce(image, text, scale)
    masked = info_nce(image, text, scale, ids)
    assert unmasked.item() > 0.2  # each of the two images is pushed from the other's (identical) text
    assert masked.item() < 1e-3  # masked, nothing is left to push apart
    # By hand: with the pair masked, each row and column holds its own match against image/text 2 only.
    logits = scale * image @ text.T
    rows = [torch.logsumexp(logits[i, [i, 2]], 0) - logits[i, i] for i in (0, 1)]
    rows.append(torch.logsumexp(logits[2], 0) - logits[2, 2])
    cols = [torch.logsumexp(logits[[j, 2], j], 0) - logits[j, j] for j in (0, 1)]
    cols.append(torch.logsumexp(logits[:, 2], 0) - logits[2, 2])
    torch.testing.assert_close(masked, (sum(rows) / 3 + sum(cols) / 3) / 2)
    # Distinct ids change nothing.
    torch.testing.assert_close(info_nce(image, text, scale, torch.tensor([1, 2, 3])), unmasked)


def test_compute_losses_masks_identical_texts_of_every_group():
    image = torch.eye(4)
    same = torch.stack([image[0], image[0], image[2], image[3]])  # texts 0 and 1 identical (one string)
    out = {
        "branches": image[:, None],
        "patches": image[:, None].expand(-1, 2, -1),
        "scale": torch.tensor(50.0),
        "long": image[:, None],
        "short": same[:, None],
        "subs": same[:, None],
    }
    cfg = LossConfig(long=1.0, short=1.0, multi_positive=1.0)
    ids = {"short": torch.tensor([5, 5, 6, 7]), "subs": torch.tensor([[5], [5], [6], [7]]), "long": torch.arange(4)}
    plain, masked = compute_losses(out, cfg), compute_losses(out, cfg, ids)
    assert plain["short"] > 1.0 and masked["short"] < plain["short"] / 2
    assert masked["multi_positive"] < plain["multi_positive"] / 2
    torch.testing.assert_close(masked["long"], plain["long"])


def test_slot_weighting_keeps_short_to_long_cls_at_one_to_one_for_any_number_of_corners():
    gen = torch.Generator().manual_seed(3)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=gen), dim=-1)

    image, short, long = unit(6, 8), unit(6, 1, 8), unit(6, 3, 8)
    ratios = []
    for k in (0, 2):  # LoTLIP: short CLS and every long slot each weighted 1 / number of slots
        s, slots = short.clone().requires_grad_(), long[:, : k + 1].clone().requires_grad_()
        out = {"branches": image[:, None], "scale": torch.tensor(5.0), "short": s, "long": slots}
        loss = compute_losses(out, LossConfig(long=1.0, short=1.0, multi_positive=0.0))
        loss["loss"].backward()
        by_hand = (
            info_nce(image, s[:, 0], out["scale"])
            + sum(info_nce(image, slots[:, i], out["scale"]) for i in range(k + 1))
        ) / (k + 2)
        torch.testing.assert_close(loss["loss"], by_hand)
        ratios.append((slots.grad[:, 0].norm() / s.grad.norm()).item())
    assert math.isclose(ratios[0], ratios[1], rel_tol=1e-5)
    # per_loss: each group's mean gets its weight, so 2 corners cut the long CLS's share to a third.
    s, slots = short.clone().requires_grad_(), long.clone().requires_grad_()
    out = {"branches": image[:, None], "scale": torch.tensor(5.0), "short": s, "long": slots}
    compute_losses(out, LossConfig(multi_positive=0.0, slot_weighting="per_loss"))["loss"].backward()
    assert math.isclose((slots.grad[:, 0].norm() / s.grad.norm()).item(), ratios[0] / 3, rel_tol=1e-5)


def test_grouping_weights_and_loss_by_hand():
    texts = t([[1, 0]], [[0, 1]])  # N=2 images, K=1 sub-caption each
    patches = t([[1, 0], [0.6, 0.8], [0, 1]], [[0, 1], [1, 0], [0.6, 0.8]])
    # Image 0: similarities [1, .6, 0], min-max → same, ≥ 0.5 kept → [1, .6, 0] / 1.6.
    # Image 1: similarities [1, 0, .8] → [1, 0, .8] / 1.8.
    weights = grouping_weights(texts, patches, threshold=0.5)
    torch.testing.assert_close(weights, t([[1 / 1.6, 0.6 / 1.6, 0]], [[1 / 1.8, 0, 0.8 / 1.8]]))
    # DreamLIP's released default (sgl_delta 0.0) keeps every patch, the least similar at weight 0.
    torch.testing.assert_close(grouping_weights(texts, patches, threshold=0.0), weights)
    assert LossConfig().grouping_threshold == 0.0
    # A higher threshold drops the 0.6 and 0.8 patches: each sub-caption pools only its best patch.
    torch.testing.assert_close(grouping_weights(texts, patches, threshold=0.9), t([[1, 0, 0]], [[1, 0, 0]]))
    q0 = F.normalize(torch.tensor([1.36, 0.48]), dim=0)  # (1·(1, 0) + .6·(.6, .8)) / 1.6, normalised
    q1 = F.normalize(torch.tensor([0.48, 1.64]), dim=0)  # (1·(0, 1) + .8·(.6, .8)) / 1.8, normalised
    logits = [[q0[0].item(), q0[1].item()], [q1[0].item(), q1[1].item()]]  # pooled rows × sub-caption columns
    rows = softplus(logits[0][1] - logits[0][0]) + softplus(logits[1][0] - logits[1][1])
    cols = softplus(logits[1][0] - logits[0][0]) + softplus(logits[0][1] - logits[1][1])
    got = grouping_loss(texts, patches, ONE, threshold=0.5).item()
    assert math.isclose(got, (rows + cols) / 4, rel_tol=1e-5)


def test_grouping_scope_image_uses_only_the_image_s_own_sub_captions():
    texts = t([[1, 0], [0, 1]])  # one image, K=2
    patches = t([[1, 0], [0, 1], [0.6, 0.8]])
    # Sub-caption 0 pools patches [1, 0, .6]/1.6 … each pooled feature competes with the other sub-caption only.
    batch = grouping_loss(texts, patches, ONE, 0.5, scope="batch")
    image = grouping_loss(texts, patches, ONE, 0.5, scope="image")
    torch.testing.assert_close(batch, image)  # one image: the two scopes see the same pairs
    two = torch.cat([texts, texts.flip(1)]), torch.cat([patches, patches])
    assert grouping_loss(*two, ONE, 0.5, scope="batch") > grouping_loss(*two, ONE, 0.5, scope="image")


def test_multi_branch_pairs_branch_i_with_text_i():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    branches = t([e1, e2], [e2, e1])
    texts = branches.clone()
    assert math.isclose(multi_branch_loss(branches, texts, ONE).item(), softplus(-1.0), rel_tol=1e-6)
    swapped = texts.flip(1)  # branch 0 now faces the other perspective's text
    assert multi_branch_loss(branches, swapped, ONE) > multi_branch_loss(branches, texts, ONE)


def test_every_loss_has_finite_gradients_and_the_total_is_the_weighted_sum():
    gen = torch.Generator().manual_seed(1)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=gen), dim=-1).requires_grad_()

    out = {
        "branches": unit(4, 2, 8),
        "patches": unit(4, 9, 8),
        "long": unit(4, 3, 8),
        "short": unit(4, 1, 8),
        "subs": unit(4, 3, 8),
        "holistic": unit(4, 2, 8),
    }
    cfg = LossConfig(long=1.0, short=0.5, multi_positive=2.0, grouping=0.3, holistic=0.7)
    scale, group_scale = torch.tensor(10.0, requires_grad=True), torch.tensor(5.0, requires_grad=True)
    losses = compute_losses({**out, "scale": scale, "group_scale": group_scale}, cfg)
    parts = {k: v for k, v in losses.items() if k != "loss"}
    assert set(parts) == {"long", "short", "multi_positive", "grouping", "holistic"}
    # Per slot: 3 long slots, 1 short, 3 sub-captions, each weighted 1/7 × its loss weight; the rest as weighted.
    slots = (3 * 1.0 * parts["long"] + 0.5 * parts["short"] + 3 * 2.0 * parts["multi_positive"]) / 7
    torch.testing.assert_close(losses["loss"], slots + 0.3 * parts["grouping"] + 0.7 * parts["holistic"])
    per_loss = compute_losses(
        {**out, "scale": scale, "group_scale": group_scale}, cfg.model_copy(update={"slot_weighting": "per_loss"})
    )
    torch.testing.assert_close(per_loss["loss"], sum(getattr(cfg, k) * v for k, v in parts.items()))
    losses["loss"].backward()
    for name, x in [*out.items(), ("scale", scale), ("group_scale", group_scale)]:
        assert x.grad is not None and torch.isfinite(x.grad).all(), name
    # Degenerate input: all patches equal, so min-max has nothing to spread; still finite.
    flat = torch.ones(2, 4, 8, requires_grad=True)
    loss = grouping_loss(F.normalize(torch.randn(2, 2, 8), dim=-1), F.normalize(flat, dim=-1), ONE)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(flat.grad).all()


def three_losses(t: dict) -> dict:
    """The batch-coupled losses of one batch (a worker's half or the whole), at a fixed logit scale."""
    scale = torch.tensor(4.0)
    return {
        "info_nce": info_nce(t["image"], t["text"], scale),
        "multi_positive": multi_positive_loss(t["image"], t["subs"], scale, t.get("ids")),
        "grouping": grouping_loss(t["subs"], t["patches"], scale),
    }


def _two_process_losses(rank: int, world: int, init_file: str, data: dict, ids: torch.Tensor, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        half = {k: v.chunk(world)[rank].clone().requires_grad_() for k, v in data.items()}
        losses = three_losses({**half, "ids": ids.chunk(world)[rank]})
        sum(losses.values()).backward()
        # Plain lists cross the Manager: tensors would go through shared memory, which a sandbox may not allow.
        results[rank] = ({k: v.item() for k, v in losses.items()}, {k: v.grad.tolist() for k, v in half.items()})
    finally:
        dist.destroy_process_group()


def test_two_processes_compute_the_global_batch_loss_and_its_gradient(tmp_path, monkeypatch):
    # Gloo binds to the address the hostname resolves to unless told an interface; CI containers may not resolve it.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    gen = torch.Generator().manual_seed(2)
    data = {
        "image": F.normalize(torch.randn(6, 8, generator=gen), dim=-1),
        "text": F.normalize(torch.randn(6, 8, generator=gen), dim=-1),
        "subs": F.normalize(torch.randn(6, 2, 8, generator=gen), dim=-1),
        "patches": F.normalize(torch.randn(6, 5, 8, generator=gen), dim=-1),
    }
    # Sub-captions 0 and 4 share one text, on different workers: masked only if the ids travel with the gather.
    ids = torch.arange(12).view(6, 2)
    ids[4, 0] = ids[0, 0]
    full = {k: v.clone().requires_grad_() for k, v in data.items()}
    expected = three_losses({**full, "ids": ids})
    assert expected["multi_positive"] != three_losses(full)["multi_positive"]
    sum(expected.values()).backward()
    results = mp.Manager().dict()
    mp.spawn(_two_process_losses, args=(2, str(tmp_path / "init"), data, ids, results), nprocs=2, join=True)
    for rank in range(2):
        losses, grads = results[rank]
        for name, value in expected.items():  # every worker sees the whole 6-image batch, not its 3 images
            assert math.isclose(losses[name], value.item(), rel_tol=1e-5), (rank, name)
        for name, grad in grads.items():
            # Each worker's gradient (summed over workers by all_gather's backward) / world = the exact gradient,
            # which is what DDP's averaging gives the parameters.
            torch.testing.assert_close(torch.tensor(grad) / 2, full[name].grad.chunk(2)[rank], rtol=1e-4, atol=1e-6)
