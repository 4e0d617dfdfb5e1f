"""Token classification with word-level labels: data, label alignment, collator, token accuracy + macro F1.

Rows hold a list of words (the data's `text_column`; set it to `tokens` for CoNLL-style data) and one label per word (`label_column`,
conventionally `ner_tags`; names or `ClassLabel` ids); unset, the offline default labels every token of standard
library source lines with its `tokenize` type (`stdlib_sets.token_type_dataset`). Words are tokenised with
`is_split_into_words=True`; `word_ids()` aligns labels: a word's label goes on its first sub-token, `-100` on its
other sub-tokens and on special tokens, so only one prediction per word is trained and scored. With
`prefix_space` (default) every word but the first gets a leading space, as RoBERTa's `add_prefix_space` does, so
a byte-level tokenizer sees the word boundaries (without it `["x", "=", "1"]` would read `x=1`). With
`padding_free: true` a batch is one row without padding (`padding_free.TokenLabelFlatteningCollator`: transformers'
`DataCollatorWithFlattening`, position ids restarting per example, every token label kept), which the model keeps
apart example by example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from datasets import DatasetDict
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification, PreTrainedTokenizerBase

from .labels import LabelledTextTask, map_labelled_splits
from .metrics import IGNORE_INDEX, argmax_logits
from .padding_free import PaddingFreeArguments, TokenLabelFlatteningCollator
from .stdlib_sets import token_type_dataset

__all__ = [
    "TokenClassificationArguments",
    "TokenClassificationTask",
    "align_word_labels",
    "prepare_token_classification_dataset",
]


@dataclass
class TokenClassificationArguments(PaddingFreeArguments):
    """Options of the `token_classification` task (the list of words is in `text_column`)."""

    _argument_group_name = "token_classification task"

    label_column: str = field(default="ner_tags", metadata={"help": "Column holding one label per word."})
    max_seq_length: int = field(default=256, metadata={"help": "Tokens per example (longer inputs are truncated)."})
    prefix_space: bool = field(
        default=True, metadata={"help": "Prepend a space to every word but the first (word boundaries for bytes)."}
    )


def align_word_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """Per-token labels: the word's label on its first token, -100 on continuation tokens and special tokens."""
    words = np.array([-1 if w is None else w for w in word_ids])
    previous = np.concatenate([[-1], words[:-1]])
    first = (words >= 0) & (words != previous)
    labels = np.asarray(word_labels, dtype=np.int64)
    return np.where(first, labels[np.maximum(words, 0)] if labels.size else IGNORE_INDEX, IGNORE_INDEX).tolist()


def prepare_token_classification_dataset(
    raw: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    label_column: str = "ner_tags",
    max_length: int = 256,
    prefix_space: bool = True,
    num_proc: int | None = None,
) -> tuple[DatasetDict, list[str]]:
    """Tokenised splits (`input_ids`, `attention_mask`, `labels` aligned per token) and the label names.

    The words are in the `text` column (`load_text_dataset` renames the configured `text_column`).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"token classification needs a fast tokenizer (word_ids()); {type(tokenizer).__name__} is slow"
        )

    def tokenize_with(encode_labels):
        def tokenize(batch: dict[str, list]) -> dict[str, Any]:
            words = [[(" " + w if prefix_space and i else w) for i, w in enumerate(ws)] for ws in batch["text"]]
            for ws, ls in zip(words, batch[label_column]):
                if len(ws) != len(ls):
                    raise ValueError(f"a row has {len(ws)} words but {len(ls)} labels in {label_column!r}: {ws[:8]}")
            encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
            encoded["labels"] = [
                align_word_labels(encoded.word_ids(i), encode_labels(ls)) for i, ls in enumerate(batch[label_column])
            ]
            return encoded

        return tokenize

    return map_labelled_splits(raw, label_column, tokenize_with, num_proc, desc="align word labels")


class TokenClassificationTask(LabelledTextTask):
    """Word-level tagging with `AutoModelForTokenClassification`: accuracy and macro F1 over first sub-tokens."""

    name = "token_classification"
    arguments = TokenClassificationArguments
    auto_model = AutoModelForTokenClassification
    pipeline_tag = "token-classification"
    result_metrics: ClassVar[tuple[tuple[str, str], ...]] = (
        ("eval loss", "eval_loss"),
        ("token accuracy", "eval_accuracy"),
        ("macro F1", "eval_macro_f1"),
    )
    preprocess_logits_for_metrics = staticmethod(argmax_logits)
    default_data = staticmethod(lambda fraction: token_type_dataset(fraction).rename_column("tokens", "text"))
    # (the recipe reads the words from `text`, where `load_text_dataset` puts the configured `text_column`)

    def tokenize(self, task_args, tokenizer, raw, num_proc):
        return prepare_token_classification_dataset(
            raw, tokenizer, task_args.label_column, task_args.max_seq_length, task_args.prefix_space, num_proc
        )[0]

    def collator(self, task_args, tokenizer):
        if task_args.padding_free:
            return TokenLabelFlatteningCollator()
        return DataCollatorForTokenClassification(tokenizer)
