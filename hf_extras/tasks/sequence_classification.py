"""Sequence classification of single texts or text pairs: data, tokenisation, collator, accuracy + macro F1.

Any `datasets` dataset or local json/jsonl/csv file with a text column (`text_column`), optionally a second text
column (`text_pair_column`) and a label column (`label_column`, names or ids); unset, the offline default asks
whether a line of English from the standard library is a `comment` or a `docstring` summary
(`stdlib_sets.comment_docstring_dataset`). Label names become `id2label`/`label2id` in the model config. Pairs go
through the tokenizer as pairs, so its post-processor joins them with the separator token (hf_extras' byte
tokenizer: `<cls> A <sep> B <sep>`). Pooling is the model config's `classifier_pooling` (last real token for a
causal backbone, mean for a bidirectional one, unless set). `padding_free: true` is refused: the head pools one vector
per row, so a padding-free row of several examples would be classified as one (`tasks.padding_free`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from datasets import DatasetDict
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, PreTrainedTokenizerBase

from .labels import LabelledTextTask, check_columns, map_labelled_splits
from .padding_free import PaddingFreeArguments, refuse_padding_free
from .stdlib_sets import comment_docstring_dataset

__all__ = ["SequenceClassificationArguments", "SequenceClassificationTask", "prepare_sequence_classification_dataset"]


@dataclass
class SequenceClassificationArguments(PaddingFreeArguments):
    """Options of the `sequence_classification` task (the text column is `text_column`)."""

    _argument_group_name = "sequence_classification task"

    label_column: str = field(default="label", metadata={"help": "Column holding the label (name or id)."})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Column holding the second text of a pair (unset = single texts)."}
    )
    max_seq_length: int = field(default=256, metadata={"help": "Tokens per example (longer inputs are truncated)."})

    def __post_init__(self):
        refuse_padding_free(
            self,
            "sequence_classification",
            "the head pools one vector per row (last or mean token), so a padding-free row of several examples "
            "would get one prediction; batches are padded per batch instead",
        )


def prepare_sequence_classification_dataset(
    raw: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    label_column: str = "label",
    text_pair_column: str | None = None,
    max_length: int = 256,
    num_proc: int | None = None,
) -> tuple[DatasetDict, list[str]]:
    """Tokenised splits (`input_ids`, `attention_mask`, `labels`) and the label names (ids are their positions).

    Texts are in the `text` column (`load_text_dataset` renames the configured one); pairs are tokenised as pairs.
    """
    if text_pair_column:
        check_columns(raw, {text_pair_column: "text_pair_column"})

    def tokenize_with(encode_labels):
        def tokenize(batch: dict[str, list]) -> dict[str, Any]:
            pair = batch[text_pair_column] if text_pair_column else None
            encoded = tokenizer(batch["text"], pair, truncation=True, max_length=max_length)
            return {**encoded, "labels": encode_labels(batch[label_column])}

        return tokenize

    return map_labelled_splits(raw, label_column, tokenize_with, num_proc)


class SequenceClassificationTask(LabelledTextTask):
    """Text (pair) classification with `AutoModelForSequenceClassification`: accuracy and macro F1."""

    name = "sequence_classification"
    arguments = SequenceClassificationArguments
    auto_model = AutoModelForSequenceClassification
    pipeline_tag = "text-classification"
    result_metrics: ClassVar[tuple[tuple[str, str], ...]] = (
        ("eval loss", "eval_loss"),
        ("accuracy", "eval_accuracy"),
        ("macro F1", "eval_macro_f1"),
    )
    default_data = staticmethod(comment_docstring_dataset)

    def tokenize(self, task_args, tokenizer, raw, num_proc):
        return prepare_sequence_classification_dataset(
            raw, tokenizer, task_args.label_column, task_args.text_pair_column, task_args.max_seq_length, num_proc
        )[0]

    def collator(self, task_args, tokenizer):
        return DataCollatorWithPadding(tokenizer)
