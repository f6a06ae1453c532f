"""Builds tiny random-weight LLaVA, InstructBLIP and BLIP-2 checkpoints offline, for tests and the demo."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recaption.errors import ConfigError

FAMILIES = ("llava", "instructblip", "blip2")
# LLaVA-1.5's geometry at the tiny widths: 336-pixel images in 14-pixel patches, 576 image tokens per image, so the
# image dominates the prompt as with the real model (the vLLM bench's prefix-cache and k-prompt figures need that;
# with 16 image tokens the prompts of one image share less than one KV-cache block).
LLAVA_336 = "llava-336"
# Bump when the recipe changes so cached checkpoints are rebuilt.
RECIPE_VERSION = 1

IMAGE_SIZE = 32  # pixels; images are resized to this square by every tiny processor
PATCH_SIZE = 8  # → 16 patches, 16 image tokens for LLaVA (CLS dropped by the "default" feature strategy)
WIDTH = 64
HEADS = 2  # head_dim 32: attention kernels (vLLM's included) reject very small head sizes
LAYERS = 2
NUM_QUERY_TOKENS = 4  # Q-Former queries = image tokens of InstructBLIP and BLIP-2
MAX_POSITIONS = 1024

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]  # ids 0..4, the ids every config below refers to
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_ID = range(5)
QFORMER_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_TOKEN_IDS = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
_TOWER = {
    "hidden_size": WIDTH,
    "intermediate_size": 2 * WIDTH,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
}
_VISION = {**_TOWER, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE}
_VISION_336 = {**_VISION, "image_size": 336, "patch_size": 14}  # LLaVA-1.5's: 24 x 24 = 576 image tokens
_QFORMER = {**_TOWER, "encoder_hidden_size": WIDTH, "max_position_embeddings": 128}

# LLaVA-1.5's conversation format: "USER: <image>\n{prompt} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Caption-like sentences the tiny tokenizers are trained on.
CORPUS = [
    "A red cube sits on a wooden table next to a blue sphere.",
    "The image shows a green triangle on a white background.",
    "Two yellow circles and a black square are arranged in a row.",
    "A small dog runs across a grassy park under a clear blue sky.",
    "A cat sleeps on a soft orange blanket near the window.",
    "There is a tall building with many windows in the city center.",
    "A person in a red jacket rides a bicycle along the river.",
    "The photo shows a bowl of fresh fruit: apples, bananas and grapes.",
    "A white boat floats on calm water at sunset.",
    "Snow covers the mountains in the distance, and pine trees stand in front.",
    "A purple flower grows between grey stones in the garden.",
    "The kitchen has a silver sink, a stove and a wooden shelf with plates.",
    "A child holds a large pink balloon at the fair.",
    "Cars are parked along a narrow street lined with old houses.",
    "A brown horse stands in a field of tall golden grass.",
    "The sign above the door says open in bold white letters.",
    "Three blue bottles stand on the left side of the shelf.",
    "A green car drives on the road in front of a red barn.",
    "The painting is done in a bright impressionist style with thick brush strokes.",
    "In the background there is a forest and a cloudy grey sky.",
    "A man wearing glasses reads a newspaper on a bench.",
    "The round clock on the wall shows ten past three.",
    "A plate holds a slice of pizza with cheese and tomatoes.",
    "Colourful kites fly high above the sandy beach.",
    "The small orange square is above the large blue circle.",
    "A laptop, a cup of coffee and a notebook lie on the desk.",
    "Two birds sit on a branch of a leafless tree in winter.",
    "The image is a black and white photograph of a busy train station.",
    "A woman in a yellow dress walks her dog through the park.",
    "Bright lights reflect on the wet street at night.",
    "The text on the poster is written in large red letters.",
    "A striped umbrella stands in the sand beside two chairs.",
    "The scene is a cartoon drawing of a smiling sun over green hills.",
    "A pair of shoes is placed near the front door on a grey mat.",
    "The bridge crosses a wide river, and boats pass beneath it.",
    # The prompts and their chat wrappers, so formatted prompts stay a few tokens long.
    "Describe this image in detail, including objects, colours, shapes and the background.",
    "What is in the picture? Answer with a short caption.",
    "USER: <image>\nDescribe the image in detail. ASSISTANT: The image shows a red cube.",
    "Question: What is in the image? Answer: A blue sphere.",
]


def build_tiny(family: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Builds one tiny random-weight checkpoint (model + processor) into `out_dir` and returns the path."""
    model, processor = tiny_model(family, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if family in ("llava", LLAVA_336):
        _rewrite_llava_keys_to_hub_layout(out)
    image_size = (_VISION_336 if family == LLAVA_336 else _VISION)["image_size"]
    meta = {"family": family, "seed": seed, "recipe_version": RECIPE_VERSION, "image_size": image_size}
    (out / "tiny.json").write_text(json.dumps(meta, indent=2))
    return out


def tiny_model(family: str, seed: int = 0) -> tuple[Any, Any]:
    """The in-memory (model, processor) that `build_tiny` saves; the same seed gives the same weights."""
    if family not in _BUILDERS:
        raise ConfigError(f"tiny model family {family!r} is unknown; choose one of {', '.join(_BUILDERS)}")
    import torch

    torch.manual_seed(seed)
    return _BUILDERS[family]()


def tiny_cache_dir() -> Path:
    """`$RECAPTION_CACHE/tiny`, by default `~/.cache/recaption/tiny`."""
    return Path(os.environ.get("RECAPTION_CACHE") or "~/.cache/recaption").expanduser() / "tiny"


def ensure_tiny(family: str, root: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Returns `<root>/<family>-<seed>`, building it first if missing or from an older recipe."""
    base = Path(root) if root is not None else tiny_cache_dir()
    target = base / f"{family}-{seed}"
    if _is_current(target):
        return target
    base.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename into place, so nobody ever loads a half-written checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-{seed}.", dir=base))
    try:
        build_tiny(family, tmp, seed)
        if target.exists():  # stale recipe: move it aside first (rename over a non-empty dir fails)
            stale = Path(tempfile.mkdtemp(prefix=f".{family}-{seed}.stale.", dir=base))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, target)
    except OSError:
        if not _is_current(target):  # a concurrent builder did not win the race either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_current(path: Path) -> bool:
    try:
        return json.loads((path / "tiny.json").read_text()).get("recipe_version") == RECIPE_VERSION
    except (OSError, ValueError):
        return False


def _train_tokenizer(special: list[str], corpus: list[str] | None = None, vocab_size: int = 512) -> Any:
    """A byte-level BPE over the corpus: decodes any id sequence to text, so random models print something."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS if corpus is None else corpus, trainer=trainer)
    # Llama-style: BOS in front, no EOS (the model must produce it).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tok


def _lm_tokenizer(image_token_attribute: bool, corpus: list[str] | None = None, vocab_size: int = 512) -> Any:
    """The LM tokenizer. Only LLaVA's gets an `image_token` attribute: the BLIP processors of transformers 5.24
    then call `.content` on that string and fail, so they must add `<image>` themselves (it keeps id 4)."""
    from transformers import PreTrainedTokenizerFast

    extra = {"extra_special_tokens": {"image_token": "<image>"}} if image_token_attribute else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(SPECIAL_TOKENS, corpus, vocab_size),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",  # decoder-only LMs generate after the prompt, so padding goes in front
        model_max_length=MAX_POSITIONS,
        **extra,
    )


def _qformer_tokenizer() -> Any:
    """A BERT-style WordPiece tokenizer, as InstructBLIP's Q-Former reads its instruction with one."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from recaption.bert import as_bert_tokenizer

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        CORPUS,
        trainer=trainers.WordPieceTrainer(vocab_size=400, special_tokens=QFORMER_SPECIAL_TOKENS, show_progress=False),
    )
    return as_bert_tokenizer(tok, model_max_length=128)


def _llama_config(vocab_size: int, tower: dict[str, int] | None = None) -> Any:
    from transformers import LlamaConfig

    tower = tower or _TOWER
    return LlamaConfig(
        **tower,
        **_TOKEN_IDS,
        vocab_size=vocab_size,
        num_key_value_heads=tower["num_attention_heads"],
        max_position_embeddings=MAX_POSITIONS,
    )


def _blip_image_processor() -> Any:
    # The PIL backend needs no torchvision; it saves as "BlipImageProcessor", which any transformers loads.
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def _build_llava() -> tuple[Any, Any]:
    tokenizer = _lm_tokenizer(image_token_attribute=True)
    return llava_model(tokenizer, _VISION, _TOWER)


def _build_llava_336() -> tuple[Any, Any]:
    tokenizer = _lm_tokenizer(image_token_attribute=True)
    return llava_model(tokenizer, _VISION_336, _TOWER)


def llava_model(tokenizer: Any, vision: dict[str, int], text: dict[str, int]) -> tuple[Any, Any]:
    """A random-weight LLaVA-1.5-style (model, processor) around `tokenizer`: a CLIP tower of `vision`
    (hidden/intermediate size, layers, heads, image_size, patch_size) and a Llama of `text` (the same keys less
    the image ones), the llava-hf chat template, a PIL CLIP image processor (no torchvision)."""
    import transformers as tf
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_size, patch_size = vision["image_size"], vision["patch_size"]
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    config = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(**vision, projection_dim=vision["hidden_size"]),
        text_config=_llama_config(len(tokenizer), text),
        image_token_index=IMAGE_ID,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = tf.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return tf.LlavaForConditionalGeneration(config).eval(), processor


def _build_instructblip() -> tuple[Any, Any]:
    import transformers as tf

    tokenizer, qformer_tokenizer = _lm_tokenizer(image_token_attribute=False), _qformer_tokenizer()
    config = tf.InstructBlipConfig(
        vision_config=tf.InstructBlipVisionConfig(**_VISION).to_dict(),
        qformer_config=tf.InstructBlipQFormerConfig(**_QFORMER, vocab_size=len(qformer_tokenizer)).to_dict(),
        text_config=_llama_config(len(tokenizer)).to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=IMAGE_ID,
    )
    processor = tf.InstructBlipProcessor(
        image_processor=_blip_image_processor(),
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=NUM_QUERY_TOKENS,
    )
    return tf.InstructBlipForConditionalGeneration(config).eval(), processor


def _build_blip2() -> tuple[Any, Any]:
    import transformers as tf

    tokenizer = _lm_tokenizer(image_token_attribute=False)
    opt = {"hidden_size": WIDTH, "word_embed_proj_dim": WIDTH, "ffn_dim": 2 * WIDTH, "num_hidden_layers": LAYERS}
    text = tf.OPTConfig(
        **opt, **_TOKEN_IDS, num_attention_heads=HEADS, max_position_embeddings=MAX_POSITIONS, vocab_size=len(tokenizer)
    )
    config = tf.Blip2Config(
        vision_config=tf.Blip2VisionConfig(**_VISION).to_dict(),
        qformer_config=tf.Blip2QFormerConfig(**_QFORMER, vocab_size=len(tokenizer)).to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=IMAGE_ID,
    )
    processor = tf.Blip2Processor(
        image_processor=_blip_image_processor(), tokenizer=tokenizer, num_query_tokens=NUM_QUERY_TOKENS
    )
    return tf.Blip2ForConditionalGeneration(config).eval(), processor


_BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "llava": _build_llava,
    LLAVA_336: _build_llava_336,
    "instructblip": _build_instructblip,
    "blip2": _build_blip2,
}

# Checkpoint key prefixes as llava-hf/llava-1.5-7b-hf stores them (what vLLM's loader expects), from the prefixes
# a transformers version may write: v5 writes `vision_tower.embeddings…` (its CLIP tower has no `vision_model`
# level) and, unconverted, `model.*`. First match wins.
_LLAVA_HUB_PREFIXES = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
]
HUB_ROOTS = ("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.", "language_model.lm_head.")


def llava_hub_key(key: str) -> str:
    """Maps one saved LLaVA weight name to the llava-hf hub layout."""
    for old, new in _LLAVA_HUB_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _rewrite_llava_keys_to_hub_layout(out: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    file = out / "model.safetensors"  # a tiny model is always one file
    with safe_open(file, "pt") as f:
        metadata = f.metadata() or {"format": "pt"}
        tensors = {llava_hub_key(k): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    bad = [k for k in tensors if not k.startswith(HUB_ROOTS)]
    if bad:
        raise RuntimeError(f"tiny llava: weights outside the hub layout after renaming: {bad[:5]}")
    save_file(tensors, str(file), metadata=metadata)
