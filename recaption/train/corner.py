"""LoTLIP corner tokens: the attention mask, its additive 4-D form, and the text tower that adds K corners after CLS."""

from __future__ import annotations

import torch
from torch import nn


def corner_attention_mask(
    text_lengths: torch.Tensor, num_corners: int, context_length: int, specials_see_each_other: bool = False
) -> torch.Tensor:
    """Bool (B, L, L), True where query i may attend key j, for `[CLS][C1..CK][text incl. SEP][padding]`.

    LoTLIP (paper Fig. 3 and released `build_attn_mask`): CLS and each corner attend to themselves and the text, not to
    one another, which keeps the K+1 gathered features diverse; text tokens attend to the text and CLS but never to a
    corner; padding is attended by nobody. `specials_see_each_other` lets CLS and the corners also attend one another.
    Padding rows follow the text rule: their outputs are never used, and a row with no key would make softmax undefined.
    """
    lengths = torch.as_tensor(text_lengths, dtype=torch.long).view(-1)
    first_text = 1 + num_corners
    longest = int(lengths.max()) if lengths.numel() else 0
    if longest + first_text > context_length:
        raise ValueError(
            f"{first_text} special tokens + {longest} text tokens exceed the context length {context_length}"
        )
    pos = torch.arange(context_length, device=lengths.device)
    special = pos < first_text  # (L,)
    text = (pos >= first_text) & (pos < first_text + lengths[:, None])  # (B, L)
    keys_of_text = text[:, None, :] | (pos == 0)[None, None, :]  # text and padding rows: text + CLS
    keys_of_special = text[:, None, :] | torch.eye(context_length, dtype=torch.bool, device=lengths.device)[None]
    if specials_see_each_other:
        keys_of_special = keys_of_special | (special[:, None] & special[None, :])[None]
    return torch.where(special[None, :, None], keys_of_special, keys_of_text)


def additive_attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L, L) bool → (B, 1, L, L) additive mask for a BERT tower: 0 where allowed, the dtype's minimum elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    return torch.where(mask, zero, blocked)[:, None]


class CornerTextTower(nn.Module):
    """A BERT-style encoder with K learnable corner embeddings after CLS; K+1 slot embeddings through one projection.

    Input is what a BERT tokenizer gives (`[CLS] text [SEP] [PAD]…`); the corners are inserted as embeddings, so the
    vocabulary is untouched and a pretrained checkpoint loads as it is (LoTLIP's code appends K ids to the vocabulary
    instead: the same learned vectors at the same positions). Slots go straight to the shared linear projection,
    where LoTLIP's code first passes them through BERT's NSP pooler (dense + tanh). With K=0 this is a plain
    CLS-pooled tower.
    """

    def __init__(
        self, encoder: nn.Module, embed_dim: int, num_corners: int = 0, specials_see_each_other: bool = False
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_corners = num_corners
        self.specials_see_each_other = specials_see_each_other
        width = encoder.config.hidden_size
        std = getattr(encoder.config, "initializer_range", 0.02)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=width**-0.5)
        # Each corner starts from its own random point, so the slots gather different features from the start. They
        # are drawn on a forked generator: the global one advances the same for any K, so models that differ only
        # in K start from the same weights everywhere they share (paired ablation arms).
        self.corners = None
        if num_corners:
            with torch.random.fork_rng(devices=[]):
                self.corners = nn.Parameter(torch.randn(num_corners, width) * std)

    @property
    def num_slots(self) -> int:
        return self.num_corners + 1

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids and their 0/1 mask → (B, K+1, D) slot embeddings (CLS first), not normalised."""
        return self.proj(self.token_states(input_ids, attention_mask)[:, : self.num_slots])

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The encoder's last hidden states of the whole `[CLS][corners][text][pad]` sequence, (B, T+K, H)."""
        words = self.encoder.get_input_embeddings()(input_ids)
        if self.num_corners:
            corners = self.corners.to(words.dtype).expand(words.shape[0], -1, -1)
            words = torch.cat([words[:, :1], corners, words[:, 1:]], dim=1)
        text_lengths = attention_mask.sum(dim=1) - 1  # tokens after CLS, SEP included
        mask = corner_attention_mask(text_lengths, self.num_corners, words.shape[1], self.specials_see_each_other)
        hidden = self.encoder(inputs_embeds=words, attention_mask=additive_attention_mask(mask, words.dtype))
        return hidden.last_hidden_state
