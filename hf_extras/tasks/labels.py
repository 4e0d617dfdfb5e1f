"""Label vocabularies read from the data, shared by the sequence- and token-classification recipes.

Why from the data: a local JSON/CSV file carries label *names* ("positive", "B-PER"), a Hub dataset often a
`ClassLabel` feature with names; the model config needs `num_labels`, `id2label` and `label2id` in both cases, and
saved models then report names through `pipeline()`.
"""

from __future__ import annotations

from typing import Any

from datasets import ClassLabel, Dataset, DatasetDict, Sequence

__all__ = ["label_names", "label_config", "label_encoder", "check_columns"]


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
