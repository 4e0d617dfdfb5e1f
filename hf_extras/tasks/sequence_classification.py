"""Sequence classification of single texts or text pairs: data, tokenisation, collator, accuracy + macro F1.

Any `datasets` dataset or local json/jsonl/csv file with a text column (`text_column`), optionally a second text
column (`text_pair_column`) and a label column (`label_column`, names or ids); unset, the offline default asks
whether a line of English from the standard library is a `comment` or a `docstring` summary
(`stdlib_sets.comment_docstring_dataset`). Label names become `id2label`/`label2id` in the model config. Pairs go
through the tokenizer as pairs, so its post-processor joins them with the separator token (hf_extras' byte
tokenizer: `<cls> A <sep> B <sep>`). Pooling is the model config's `classifier_pooling` (last real token for a
causal backbone, mean for a bidirectional one, unless set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from datasets import DatasetDict
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, PreTrainedTokenizerBase

from ..training import ConfigError, Task
from .labels import check_columns, label_config, label_encoder, label_names
from .metrics import classification_metrics

__all__ = ["SequenceClassificationArguments", "SequenceClassificationTask", "prepare_sequence_classification_dataset"]


@dataclass
class SequenceClassificationArguments:
    """Options of the `sequence_classification` task (the text column is `text_column`)."""

    _argument_group_name = "sequence_classification task"

    label_column: str = field(default="label", metadata={"help": "Column holding the label (name or id)."})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Column holding the second text of a pair (unset = single texts)."}
    )
    max_seq_length: int = field(default=256, metadata={"help": "Tokens per example (longer inputs are truncated)."})


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
    check_columns(raw, {label_column: "label_column", **({text_pair_column: "text_pair_column"} if text_pair_column else {})})
    names = label_names(raw["train"], label_column)
    encode_labels = label_encoder(raw["train"], label_column, names)

    def tokenize(batch: dict[str, list]) -> dict[str, Any]:
        pair = batch[text_pair_column] if text_pair_column else None
        encoded = tokenizer(batch["text"], pair, truncation=True, max_length=max_length)
        return {**encoded, "labels": encode_labels(batch[label_column])}

    data = DatasetDict(
        {
            name: split.map(tokenize, batched=True, num_proc=num_proc, remove_columns=split.column_names, desc="tokenise")
            for name, split in raw.items()
        }
    )
    return data, names


class SequenceClassificationTask(Task):
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
    compute_metrics = staticmethod(classification_metrics)

    def load_data(self, data_args, seed):
        if data_args.dataset_name is None:
            from .stdlib_sets import comment_docstring_dataset

            return comment_docstring_dataset(data_args.validation_fraction)
        return super().load_data(data_args, seed)

    def config_defaults(self, task_args, tokenizer, raw):
        try:
            check_columns(raw, {task_args.label_column: "label_column"})
            return label_config(label_names(raw["train"], task_args.label_column))
        except ValueError as error:
            raise ConfigError(str(error)) from error

    def prepare(self, task_args, tokenizer, raw, num_proc):
        try:
            data, _ = prepare_sequence_classification_dataset(
                raw, tokenizer, task_args.label_column, task_args.text_pair_column, task_args.max_seq_length, num_proc
            )
        except ValueError as error:
            raise ConfigError(str(error)) from error
        return data

    def collator(self, task_args, tokenizer):
        return DataCollatorWithPadding(tokenizer)
