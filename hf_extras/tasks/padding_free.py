"""`padding_free: true` for the fine-tuning recipes: a batch of examples becomes one row, no padding.

transformers' `DataCollatorWithFlattening` concatenates a batch into one `(1, total_tokens)` row with `position_ids`
restarting at 0 at each example; hf_extras' models read the restarts as document boundaries and keep the examples
apart, so every token gets the output it gets alone and no compute goes to padding. That is exact only for heads with
one output per token and per-token labels: token classification (`TokenLabelFlatteningCollator`, which keeps every
label) and seq2seq training (`Seq2SeqFlatteningCollator`: packed sources, packed targets, cross-attention within each
pair; evaluation generates from padded batches). A head with one output per example cannot take the row: sequence
classification pools one vector per row and extractive QA scores start/end positions within a row, so one row would
be one example. Those recipes refuse the option (`refuse_padding_free`) with a ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import DataCollatorWithFlattening

from ..errors import ConfigError

__all__ = ["PaddingFreeArguments", "Seq2SeqFlatteningCollator", "TokenLabelFlatteningCollator", "refuse_padding_free"]


@dataclass
class PaddingFreeArguments:
    """The `padding_free` option, shared by the fine-tuning recipes."""

    padding_free: bool = field(
        default=False,
        metadata={
            "help": "One padding-free row per batch (transformers' DataCollatorWithFlattening: position_ids restart at "
            "each example, which the model keeps apart). Token classification and seq2seq training; heads with one "
            "output per example refuse it."
        },
    )


def refuse_padding_free(args: PaddingFreeArguments, task: str, why: str) -> None:
    """ConfigError naming `padding_free` when a recipe whose head needs one row per example gets it."""
    if args.padding_free:
        raise ConfigError(f"padding_free: true is not supported by task {task}: {why}; set padding_free: false")


class TokenLabelFlatteningCollator(DataCollatorWithFlattening):
    """`DataCollatorWithFlattening` for per-token labels: every example's labels are kept as they are.

    transformers' collator writes `separator_id` (-100) over each example's first label, which is right for causal-LM
    labels (shifted: a document's first token must not be predicted from the previous one) but drops a real label
    for token classification, whose labels are not shifted (a tokenizer without a leading special token puts the
    first word's label there). Here the labels are the examples' own, concatenated.
    """

    def __call__(self, features: list[dict[str, Any]], return_tensors: str | None = None, separator_id=None):
        batch = super().__call__(features, return_tensors, separator_id)
        features = [f for f in features if len(f["input_ids"]) > 0]
        if "labels" not in features[0]:
            return batch
        labels = [np.asarray(f["labels"], dtype=np.int64).reshape(-1) for f in features]
        for f, row in zip(features, labels):
            if len(row) != len(f["input_ids"]):
                raise ValueError(
                    f"token labels must have one label per token: got {len(row)} labels for {len(f['input_ids'])} "
                    "tokens"
                )
        flat = np.concatenate(labels)[None]
        batch["labels"] = torch.from_numpy(flat) if isinstance(batch["labels"], torch.Tensor) else flat
        return batch


@dataclass
class Seq2SeqFlatteningCollator:
    """Source/target pairs as one padding-free row per side, the i-th target answering the i-th source.

    Sources: `input_ids` and `position_ids` (restarting per source) from `DataCollatorWithFlattening`; targets:
    `labels` (every target token, none overwritten: seq2seq labels are not shifted), `decoder_input_ids` (each target
    shifted right behind `decoder_start_token_id`, as the model's own `prepare_decoder_input_ids_from_labels` does for
    one target) and `decoder_position_ids`. hf_extras' seq2seq models keep pairs apart: each source and target is a
    document, and cross-attention stays within each pair. Pairs with an empty source or target are left out (the
    rows would lose their pairing). `decoder_start_token_id` is the model config's (`Seq2SeqTask`'s trainer sets it).
    """

    decoder_start_token_id: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.decoder_start_token_id is None:
            raise ValueError("Seq2SeqFlatteningCollator needs decoder_start_token_id (the model config's)")
        pairs = [(list(f["input_ids"]), list(f["labels"])) for f in features]
        pairs = [(source, target) for source, target in pairs if source and target]
        if not pairs:
            raise ValueError("every pair of the batch has an empty source or target")
        flatten = DataCollatorWithFlattening(return_tensors="pt")
        sources = flatten([{"input_ids": source} for source, _ in pairs])
        targets = flatten([{"input_ids": [self.decoder_start_token_id] + target[:-1]} for _, target in pairs])
        return {
            "input_ids": sources["input_ids"],
            "position_ids": sources["position_ids"],
            "decoder_input_ids": targets["input_ids"],
            "decoder_position_ids": targets["position_ids"],
            "labels": torch.tensor([token for _, target in pairs for token in target], dtype=torch.long)[None],
        }
