"""The text tower's tokenizer: a pretrained one from disk, or a BERT-style WordPiece trained on the run's captions."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from recaption.bert import as_bert_tokenizer
from recaption.errors import ConfigError
from recaption.train.config import TextTowerConfig

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: Iterable[str], vocab_size: int):
    """A lower-casing BERT WordPiece tokenizer (`[CLS] text [SEP]`, right padding) for `texts`: every character
    seen (alone and as `##` continuation, so any word can be spelled) plus the most frequent words.

    Built by counting rather than with `tokenizers`' WordPiece trainer, whose ties come out in a different order
    from run to run: the same texts must always give the same vocabulary, or runs would not repeat.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    known = set(vocab)
    ranked = sorted((w for w in words if w not in known), key=lambda w: (-words[w], w))
    vocab += ranked[: max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, splitter, decoders.WordPiece()
    return as_bert_tokenizer(tok, model_max_length=512)


def prepare_tokenizer(cfg: TextTowerConfig, run_dir: str | Path, sample_texts) -> Path:
    """Put the run's tokenizer in `<run_dir>/tokenizer` once, before any worker starts, and return that path.

    An existing one is kept (a resumed run must tokenize as before). Otherwise it is copied from `tokenizer` or the
    pretrained text tower, or trained on `sample_texts()` (an iterable of the data's texts).
    """
    from transformers import AutoTokenizer

    target = Path(run_dir) / "tokenizer"
    if (target / "tokenizer_config.json").is_file():
        return target
    source = cfg.tokenizer or cfg.pretrained
    if source:
        if not Path(source).is_dir():
            raise ConfigError(f"model.text.tokenizer: {source} is not a directory")
        tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        tokenizer = train_wordpiece(sample_texts(), cfg.vocab_size)
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None or tokenizer.pad_token_id is None:
        raise ConfigError(f"tokenizer from {source}: a BERT-style tokenizer with [CLS], [SEP] and [PAD] is needed")
    tmp = target.with_name(".tmp-tokenizer")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def encode(tokenizer, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[CLS] text [SEP]` ids and 0/1 mask, (N, T), padded to the longest text and cut at `max_tokens` (SEP kept)."""
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]
