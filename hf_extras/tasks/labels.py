"""Label vocabularies read from the data, and the `Task` wiring shared by the sequence- and token-classification
recipes.

Why from the data: a local JSON/CSV file carries label *names* ("positive", "B-PER"), a Hub dataset often a
`ClassLabel` feature with names; the model config needs `num_labels`, `id2label` and `label2id` in both cases, and
saved models then report names through `pipeline()`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from datasets import ClassLabel, Dataset, DatasetDict, Sequence

from ..errors import ConfigError
from .base import Task
from .metrics import classification_metrics

__all__ = ["label_names", "label_config", "label_encoder", "check_columns", "map_labelled_splits", "LabelledTextTask"]


def check_columns(raw: DatasetDict, columns: dict[str, str]) -> None:
    """Fail early, naming the option to set, when a split lacks a configured column (`{column: option_name}`)."""
    for split_name, split in raw.items():
        for column, option in columns.items():
            if column not in split.column_names:
                raise ValueError(
                    f"column {column!r} not found in split {split_name!r} (columns: {split.column_names}); set "
                    f"{option} to the dataset's column"
                )


def label_names(train: Dataset, column: str) -> list[str]:
    """Names of the label ids, in id order: a `ClassLabel`'s names (also inside a sequence feature), else the sorted
    distinct values of `column` (strings or ints; nested lists for per-token labels) as strings."""
    class_label = _class_label(train, column)
    if class_label is not None:
        return list(class_label.names)
    values: set[Any] = set()
    for value in train[column]:
        values.update(value if isinstance(value, list) else [value])
    if not values:
        raise ValueError(f"column {column!r} holds no labels")
    return [str(v) for v in sorted(values)]


def _class_label(train: Dataset, column: str) -> ClassLabel | None:
    """The column's `ClassLabel` feature (also as the item feature of a per-token label list), if it has one."""
    feature = train.features[column]
    inner = feature.feature if isinstance(feature, Sequence) else feature[0] if isinstance(feature, list) else feature
    return inner if isinstance(inner, ClassLabel) else None


def label_config(names: list[str]) -> dict[str, Any]:
    """`num_labels`, `id2label`, `label2id` for a model config."""
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }


def label_encoder(train: Dataset, column: str, names: list[str]):
    """A function mapping a list of label values of `column` to ids: `ClassLabel` ints pass through, names (or the
    ints/strings of a vocabulary read from the data) are looked up; a label unseen in training is named."""
    if _class_label(train, column) is not None:
        return list
    index = {name: i for i, name in enumerate(names)}

    def encode(values: list[Any]) -> list[int]:
        try:
            return [index[str(v)] for v in values]
        except KeyError as error:
            raise ValueError(
                f"label {error.args[0]!r} in column {column!r} does not occur in the training split (labels: {names})"
            ) from None

    return encode


def map_labelled_splits(
    raw: DatasetDict,
    label_column: str,
    tokenize_with: Callable[[Callable[[list[Any]], list[int]]], Callable[[dict[str, list]], dict[str, Any]]],
    num_proc: int | None = None,
    desc: str = "tokenise",
) -> tuple[DatasetDict, list[str]]:
    """Label names from the training split, then every split through the batched function
    `tokenize_with(encode_labels)` (its original columns dropped). Returns the splits and the label names."""
    check_columns(raw, {label_column: "label_column"})
    names = label_names(raw["train"], label_column)
    tokenize = tokenize_with(label_encoder(raw["train"], label_column, names))
    data = DatasetDict(
        {
            name: split.map(tokenize, batched=True, num_proc=num_proc, remove_columns=split.column_names, desc=desc)
            for name, split in raw.items()
        }
    )
    return data, names


class LabelledTextTask(Task):
    """Classification wiring: the offline default data (`default_data(validation_fraction)`) when no dataset is
    named, the label vocabulary into the config, accuracy + macro F1, and data errors reported as ConfigError."""

    default_data: ClassVar[Callable[[float], DatasetDict]]
    compute_metrics = staticmethod(classification_metrics)

    def load_data(self, data_args, seed):
        if data_args.dataset_name is None:
            return type(self).default_data(data_args.validation_fraction)
        return super().load_data(data_args, seed)

    def config_defaults(self, task_args, tokenizer, raw):
        try:
            check_columns(raw, {task_args.label_column: "label_column"})
            return label_config(label_names(raw["train"], task_args.label_column))
        except ValueError as error:
            raise ConfigError(str(error)) from error

    def prepare(self, task_args, tokenizer, raw, num_proc):
        try:
            return self.tokenize(task_args, tokenizer, raw, num_proc)
        except ValueError as error:
            raise ConfigError(str(error)) from error

    def tokenize(self, task_args: Any, tokenizer: Any, raw: DatasetDict, num_proc: int | None) -> DatasetDict:
        """Model-ready splits (the recipe's preprocessing function)."""
        raise NotImplementedError
