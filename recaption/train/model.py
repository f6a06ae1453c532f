"""The two towers (CLIP ViT with M class tokens, BERT with corner tokens), logit scales, and their export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from recaption.errors import ConfigError, TrainingError
from recaption.train.config import ImageTowerConfig, ModelConfig, TextTowerConfig
from recaption.train.corner import CornerTextTower

EXPORT_INFO = "recaption_model.json"
HEADS = "heads.safetensors"


class ImageTower(nn.Module):
    """A CLIP vision transformer with M class tokens (Holistic CLIP's branches); returns projected branch and patch
    tokens. Extra class tokens share the CLS position; all tokens go through the final norm and one projection."""

    def __init__(self, vision: nn.Module, embed_dim: int, num_class_tokens: int = 1) -> None:
        super().__init__()
        self.vision = vision
        self.num_class_tokens = num_class_tokens
        width = vision.config.hidden_size
        self.extra_class = (
            nn.Parameter(torch.randn(num_class_tokens - 1, width) * width**-0.5) if num_class_tokens > 1 else None
        )
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=width**-0.5)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) → branches (B, M, D) and patch tokens (B, P, D), not normalised."""
        vision = self.vision
        hidden = vision.embeddings(pixel_values)  # (B, 1+P, H): CLS first, positions added
        if self.extra_class is not None:
            cls_position = vision.embeddings.position_embedding.weight[0]
            extra = (self.extra_class + cls_position).to(hidden.dtype).expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([hidden[:, :1], extra, hidden[:, 1:]], dim=1)
        hidden = vision.encoder(inputs_embeds=vision.pre_layrnorm(hidden)).last_hidden_state
        tokens = self.proj(vision.post_layernorm(hidden))
        return tokens[:, : self.num_class_tokens], tokens[:, self.num_class_tokens :]


class ContrastiveModel(nn.Module):
    """Image and text towers in one embedding space, a learnable temperature and a separate one for grouping."""

    def __init__(self, image: ImageTower, text: CornerTextTower, init_temperature: float = 0.07) -> None:
        super().__init__()
        self.image = image
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.group_logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))

    def clamp_scales(self, max_logit_scale: float) -> None:
        """Keep exp(scale) in [1, max] as CLIP does, so the temperature cannot run away."""
        with torch.no_grad():
            for p in (self.logit_scale, self.group_logit_scale):
                p.clamp_(0.0, math.log(max_logit_scale))

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        branches, patches = self.image(pixel_values)
        return F.normalize(branches, dim=-1), F.normalize(patches, dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) → (B, K+1, D) normalised slots; slot 0 (CLS) is the embedding of a short text."""
        return F.normalize(self.text(input_ids, attention_mask), dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        long_ids: torch.Tensor | None = None,
        long_mask: torch.Tensor | None = None,
        short_ids: torch.Tensor | None = None,
        short_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Everything one step needs in one call (so DDP sees one forward): image branches and patches, all slots of
        the long texts, the CLS slot of the short texts (alt texts, sub-captions, Holistic texts, concatenated)."""
        branches, patches = self.encode_image(pixel_values)
        # The scales leave through forward so that DDP counts them as used in it.
        out = {"branches": branches, "patches": patches, "scale": self.logit_scale.exp()}
        if self.group_logit_scale.requires_grad:
            out["group_scale"] = self.group_logit_scale.exp()
        if long_ids is not None:
            out["long"] = self.encode_text(long_ids, long_mask)
        if short_ids is not None:
            out["short_all"] = self.encode_text(short_ids, short_mask)[:, 0]
        return out


def build_model(cfg: ModelConfig, vocab_size: int, pad_token_id: int) -> ContrastiveModel:
    """The model a config describes, with towers from transformers configs or pretrained checkpoints on disk."""
    image = ImageTower(vision_encoder(cfg.image), cfg.embed_dim, cfg.image.num_class_tokens)
    encoder = text_encoder(cfg.text, vocab_size, pad_token_id)
    text = CornerTextTower(encoder, cfg.embed_dim, cfg.text.num_corners, cfg.text.corners_see_each_other)
    return ContrastiveModel(image, text, cfg.init_temperature)


def vision_encoder(cfg: ImageTowerConfig) -> nn.Module:
    from transformers import AutoConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    if cfg.pretrained:
        kind = _model_type(AutoConfig, cfg.pretrained, "model.image.pretrained")
        if kind == "clip":  # a whole CLIP checkpoint: keep its vision transformer
            return CLIPModel.from_pretrained(cfg.pretrained).vision_model
        if kind == "clip_vision_model":
            return CLIPVisionModel.from_pretrained(cfg.pretrained)
        raise ConfigError(f"model.image.pretrained: {cfg.pretrained} is a {kind!r} checkpoint, expected a CLIP one")
    config = CLIPVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    return CLIPVisionModel(config)


def text_encoder(cfg: TextTowerConfig, vocab_size: int, pad_token_id: int) -> nn.Module:
    from transformers import AutoConfig, BertConfig, BertModel

    if cfg.pretrained:
        kind = _model_type(AutoConfig, cfg.pretrained, "model.text.pretrained")
        # The tower is built as a BertModel and its tokenizer must give `[CLS] text [SEP]`: RoBERTa-style
        # checkpoints differ in position ids and special tokens, so only BERT checkpoints load.
        if kind != "bert":
            raise ConfigError(
                f"model.text.pretrained: {cfg.pretrained} is a {kind!r} checkpoint, expected a BERT one (model_type bert)"
            )
        model = BertModel.from_pretrained(cfg.pretrained, add_pooling_layer=False)
        if model.config.max_position_embeddings < cfg.context_length:
            raise ConfigError(
                f"model.text.context_length {cfg.context_length} exceeds the checkpoint's "
                f"{model.config.max_position_embeddings} positions"
            )
        return model
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max(cfg.context_length, cfg.short_context_length),
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        pad_token_id=pad_token_id,
    )
    return BertModel(config, add_pooling_layer=False)


def _model_type(auto_config, path: str, key: str) -> str:
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{key}: {path} is not a checkpoint directory (no config.json)")
    return auto_config.from_pretrained(path).model_type


def save_pretrained(model: ContrastiveModel, tokenizer, out_dir: str | Path, cfg: ModelConfig) -> Path:
    """Export: `image/` and `text/` as transformers checkpoints (text with its tokenizer), the projections, corner and
    class tokens and scales in `heads.safetensors`, and the model config; `load_pretrained` reads it back."""
    from safetensors.torch import save_file

    from recaption.train.checkpoint import weights_finite

    if not weights_finite(model):
        raise TrainingError(f"the weights hold NaN or inf: nothing exported to {out_dir}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.image.vision.save_pretrained(out / "image")
    model.text.encoder.save_pretrained(out / "text")
    tokenizer.save_pretrained(out / "text")
    heads = {k: v for k, v in model.state_dict().items() if not k.startswith(("image.vision.", "text.encoder."))}
    save_file({k: v.detach().cpu().contiguous() for k, v in heads.items()}, str(out / HEADS))
    (out / EXPORT_INFO).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return out


def load_pretrained(path: str | Path) -> tuple[ContrastiveModel, object, ModelConfig]:
    """A model exported by `save_pretrained`, with its tokenizer and config."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    path = Path(path)
    cfg = ModelConfig.model_validate(json.loads((path / EXPORT_INFO).read_text()))
    cfg.image.pretrained, cfg.text.pretrained = str(path / "image"), str(path / "text")
    tokenizer = AutoTokenizer.from_pretrained(path / "text")
    model = build_model(cfg, len(tokenizer), tokenizer.pad_token_id)
    missing, unexpected = model.load_state_dict(load_file(str(path / HEADS)), strict=False)
    if unexpected or [k for k in missing if not k.startswith(("image.vision.", "text.encoder."))]:
        raise ConfigError(f"{path}: heads do not fit the model (missing {missing}, unexpected {unexpected})")
    return model, tokenizer, cfg
