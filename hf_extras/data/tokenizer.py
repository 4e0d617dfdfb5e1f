"""Offline byte-level fast tokenizer.

Why: hf_extras must train and run with no downloads, and its tasks need a *fast* tokenizer
(offsets for extractive QA, ``word_ids()`` for token classification, cls/sep templates for
pairs). ``ByT5Tokenizer`` is slow and has none of these, so we build the equivalent with the
``tokenizers`` library: the 256 GPT-2 ByteLevel characters as vocabulary, no merges, a
ByteLevel pre-tokenizer/decoder and a template post-processor. Every Unicode string encodes
losslessly (never ``<unk>``) and offsets point into the original text.

The cls/sep template is what encoder tasks (masked LM, classification, QA) read; generation tasks (causal LM,
seq2seq) train on plain text, so their run folders save the tokenizer without it (``tokenizer_for_task``): then
``pipeline("text-generation")``, which calls the tokenizer with its defaults, feeds the prompt ``generate()`` was
trained on.
"""

from __future__ import annotations

import copy
from functools import cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = [
    "SPECIAL_TOKENS",
    "PAD_TOKEN_ID",
    "EOS_TOKEN_ID",
    "BOS_TOKEN_ID",
    "UNK_TOKEN_ID",
    "MASK_TOKEN_ID",
    "CLS_TOKEN_ID",
    "SEP_TOKEN_ID",
    "NUM_SPECIAL_TOKENS",
    "VOCAB_SIZE",
    "PADDED_VOCAB_SIZE",
    "byte_to_unicode",
    "build_byte_tokenizer",
    "is_byte_tokenizer",
    "tokenizer_for_task",
    "PLAIN_TEXT_TASKS",
]

# Fixed ids 0..6, in this order; the byte alphabet follows at 7..262 (byte b -> id 7 + b).
SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "<pad>",
    "eos_token": "</s>",
    "bos_token": "<s>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
    "cls_token": "<cls>",
    "sep_token": "<sep>",
}
PAD_TOKEN_ID, EOS_TOKEN_ID, BOS_TOKEN_ID, UNK_TOKEN_ID, MASK_TOKEN_ID, CLS_TOKEN_ID, SEP_TOKEN_ID = range(7)
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)
VOCAB_SIZE = NUM_SPECIAL_TOKENS + 256  # 263 == len(tokenizer)
PADDED_VOCAB_SIZE = (VOCAB_SIZE + 7) // 8 * 8  # 264: recommended model vocab_size (multiple of 8)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet).

    Re-implemented here because transformers 5 no longer exports ``bytes_to_unicode``; it is
    the exact table ``tokenizers.pre_tokenizers.ByteLevel`` uses.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    bs, cs, n = printable[:], printable[:], 0
    for b in range(256):
        if b not in printable:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# tasks whose models read plain text (no cls/sep): the tokenizer in their run folders adds no special tokens
PLAIN_TEXT_TASKS = frozenset({"causal_lm", "seq2seq"})


def _post_processor(cls_sep: bool) -> processors.TemplateProcessing:
    """``<cls> A <sep>`` / ``<cls> A <sep> B <sep>`` (token types 0/1), or plain ``A`` / ``A B``."""
    if not cls_sep:
        return processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    return processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, CLS_TOKEN_ID), (sep, SEP_TOKEN_ID)],
    )


def _build_backend(cls_sep: bool = True) -> Tokenizer:
    """The raw ``tokenizers.Tokenizer``: specials 0..6, bytes 7..262, no merges."""
    specials = list(SPECIAL_TOKENS.values())
    vocab = _reference_vocab()
    assert set(byte_to_unicode().values()) == set(pre_tokenizers.ByteLevel.alphabet())

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    # Register the specials as added tokens so they are atomic in text and skipped on decode.
    tok.add_special_tokens(specials)
    # use_regex=True splits into GPT-2 "words": these become word_ids().
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = _post_processor(cls_sep)
    return tok


def build_byte_tokenizer(model_max_length: int = 2048, cls_sep: bool = True) -> PreTrainedTokenizerFast:
    """Build the offline byte-level fast tokenizer (``len == VOCAB_SIZE == 263``).

    With ``cls_sep`` (the default, for encoder tasks) single sequences get ``<cls> A <sep>``, pairs
    ``<cls> A <sep> B <sep>`` with token_type_ids 0/1 (request them with ``return_token_type_ids=True``);
    without it a call adds no special tokens (plain text, as causal-LM pretraining reads it). Padding is on the
    right; generation callers switch ``padding_side`` to ``"left"`` themselves. The result round-trips through
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` with no network access.
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(cls_sep),
        model_max_length=model_max_length,
        padding_side="right",
        truncation_side="right",
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )
    assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
    return tokenizer


def is_byte_tokenizer(tokenizer: object) -> bool:
    """True when ``tokenizer`` encodes text exactly as :func:`build_byte_tokenizer` does.

    Then, with ``add_special_tokens=False``, the ids of a text that contains no special-token
    literal are just its UTF-8 bytes plus ``NUM_SPECIAL_TOKENS``: callers use this to skip the
    (slow, ~1 MB/s per core) ByteLevel pre-tokenizer when packing large corpora.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return False
    if not isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel) or not isinstance(backend.model, models.BPE):
        return False
    # the length first: a GPT-2-style ByteLevel BPE (50k entries) is refused without building its vocabulary dict
    return len(tokenizer) == VOCAB_SIZE and tokenizer.get_vocab() == _reference_vocab()


def tokenizer_for_task(tokenizer: PreTrainedTokenizerFast, task: str) -> PreTrainedTokenizerFast:
    """The byte tokenizer set up for ``task``: no special tokens by default for plain-text tasks
    (``PLAIN_TEXT_TASKS``), the cls/sep template for the others. Other tokenizers are returned unchanged.

    A copy when the template changes, so one loaded from a causal-LM run folder gets cls/sep back for fine-tuning a
    classifier or QA head, and a causal-LM run saves one whose plain calls match ``generate()``'s training input.
    """
    if not is_byte_tokenizer(tokenizer):
        return tokenizer
    cls_sep = task not in PLAIN_TEXT_TASKS
    if (tokenizer("a").input_ids[0] == CLS_TOKEN_ID) == cls_sep:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.backend_tokenizer.post_processor = _post_processor(cls_sep)
    return tokenizer


@cache
def _reference_vocab() -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    vocab.update({ch: NUM_SPECIAL_TOKENS + b for b, ch in byte_to_unicode().items()})
    return vocab
