"""Corner tokens: the LoTLIP mask element by element, and what the tower's outputs can and cannot see."""

from __future__ import annotations

import pytest
import torch

from recaption.train.corner import CornerTextTower, additive_attention_mask, corner_attention_mask


def rule(length: int, k: int, ctx: int, group: bool = False) -> list[list[bool]]:
    """The mask written out from the rule itself, one (query, key) pair at a time."""

    def kind(i: int) -> str:
        if i == 0:
            return "cls"
        if i <= k:
            return "corner"
        return "text" if i < 1 + k + length else "pad"

    out = []
    for q in range(ctx):
        row = []
        for key in range(ctx):
            qk, kk = kind(q), kind(key)
            if kk == "pad":
                allowed = False
            elif qk in ("cls", "corner"):
                allowed = kk == "text" or q == key or (group and kk in ("cls", "corner"))
            else:  # text, and padding rows, which follow the text rule
                allowed = kk in ("text", "cls")
            row.append(allowed)
        out.append(row)
    return out


@pytest.mark.parametrize("group", [False, True])
def test_mask_matches_the_rule_for_random_lengths_and_corner_counts(group):
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        k = int(torch.randint(0, 5, (), generator=gen))
        ctx = int(torch.randint(k + 2, k + 14, (), generator=gen))
        lengths = torch.randint(1, ctx - k, (3,), generator=gen)
        mask = corner_attention_mask(lengths, k, ctx, specials_see_each_other=group)
        assert mask.dtype == torch.bool and mask.shape == (3, ctx, ctx)
        for b, n in enumerate(lengths.tolist()):
            assert mask[b].tolist() == rule(n, k, ctx, group), (n, k, ctx)


def test_zero_corners_is_a_plain_padding_mask():
    mask = corner_attention_mask(torch.tensor([2, 4]), 0, 6)
    valid = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(mask, valid[:, None, :].expand(2, 6, 6))


def test_too_long_text_is_refused_and_additive_form():
    with pytest.raises(ValueError, match="exceed"):
        corner_attention_mask(torch.tensor([6]), 2, 8)
    mask = corner_attention_mask(torch.tensor([3]), 1, 6)
    add = additive_attention_mask(mask, torch.float32)
    assert add.shape == (1, 1, 6, 6)
    assert torch.equal(add[:, 0] == 0, mask) and add.min() == torch.finfo(torch.float32).min


def tiny_tower(k: int, group: bool = False) -> CornerTextTower:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return CornerTextTower(
        BertModel(cfg, add_pooling_layer=False), embed_dim=16, num_corners=k, specials_see_each_other=group
    ).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    # [CLS]=2 text… [SEP]=3 [PAD]=0; the second text is shorter.
    ids = torch.tensor([[2, 11, 12, 13, 14, 3], [2, 21, 22, 3, 0, 0]])
    return ids, (ids != 0).long()


@torch.no_grad()
def test_text_tokens_never_see_corners_and_cls_sees_them_only_in_group_mode():
    ids, att = batch()
    k = 2
    tower = tiny_tower(k)
    before = tower.token_states(ids, att)
    tower.corners.add_(torch.randn_like(tower.corners))
    after = tower.token_states(ids, att)
    for b, n in enumerate(att.sum(1).tolist()):
        # Every real text token (SEP included) is unchanged, through all layers: text never attends to a corner.
        torch.testing.assert_close(after[b, 1 + k : k + n], before[b, 1 + k : k + n], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 1 : 1 + k], before[:, 1 : 1 + k])  # the corners' own outputs move
    # LoTLIP keeps CLS and the corners apart (diverse slots): CLS does not move either.
    torch.testing.assert_close(after[:, 0], before[:, 0], rtol=0, atol=1e-6)

    group = tiny_tower(k, group=True)
    before = group.token_states(ids, att)
    group.corners.add_(torch.randn_like(group.corners))
    after = group.token_states(ids, att)
    assert not torch.allclose(after[:, 0], before[:, 0], atol=1e-4)  # with specials_see_each_other CLS reads them
    one_layer = tiny_tower(k, group=True)
    one_layer.encoder.encoder.layer = one_layer.encoder.encoder.layer[:1]
    before = one_layer.token_states(ids, att)
    one_layer.corners.add_(1.0)
    after = one_layer.token_states(ids, att)
    # After one layer text is still untouched; deeper, it would hear the corners through CLS.
    torch.testing.assert_close(after[0, 1 + k :], before[0, 1 + k :], rtol=0, atol=1e-6)


@torch.no_grad()
def test_changing_text_moves_cls_and_corners_and_padding_changes_nothing():
    ids, att = batch()
    tower = tiny_tower(2)
    slots = tower(ids, att)
    assert slots.shape == (2, 3, 16)
    other = ids.clone()
    other[1, 4:] = 7  # different ids under padding: nobody may see them
    torch.testing.assert_close(tower(other, att)[1], slots[1], rtol=0, atol=1e-6)
    changed = ids.clone()
    changed[0, 2] = 30
    moved = tower(changed, att)
    assert not torch.allclose(moved[0], slots[0]) and torch.allclose(moved[1], slots[1])


def test_zero_corners_gives_one_slot_equal_to_plain_cls_pooling():
    ids, att = batch()
    tower = tiny_tower(0)
    with torch.no_grad():
        slots = tower(ids, att)
        plain = tower.encoder(input_ids=ids, attention_mask=att).last_hidden_state[:, 0]
    assert slots.shape == (2, 1, 16)
    torch.testing.assert_close(slots[:, 0], tower.proj(plain), rtol=1e-5, atol=1e-5)
