"""A `tokenizers` WordPiece tokenizer as a BERT-style transformers tokenizer (trainer text tower, tiny models)."""

from __future__ import annotations


def as_bert_tokenizer(tok, model_max_length: int):
    """A `tokenizers` WordPiece tokenizer with BERT's special tokens as a transformers tokenizer: `[CLS] text
    [SEP]`, right padding (a bidirectional encoder with absolute positions keeps text at position 0)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        padding_side="right",
        model_max_length=model_max_length,
    )
