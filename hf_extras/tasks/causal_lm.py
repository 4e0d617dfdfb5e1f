"""Causal language-model pretraining (`task: causal_lm`): tokenise, separate documents with eos, pack; its `Task`.

Why packing: the default corpus is a few hundred long files; padding each to a block would waste most compute, so
documents (each followed by ``eos`` so the model learns where one ends) are packed into full ``block_size`` blocks.
``packing`` says how (``hf_extras.data.packing``): ``documents`` (default) marks each document start with
``position_ids`` restarting at 0, transformers' padding-free convention, so the model keeps documents apart and the
first token of a document is not predicted from the previous one; ``concat`` is the plain eos-separated stream;
``pad`` gives each document its own padded row. Labels are made by the collator (``LanguageModelingCollator``:
``input_ids``, -100 at pads and at each document's first token; the model shifts them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from datasets import DatasetDict
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, PreTrainedTokenizerBase

from ..data.packing import Packing, check_packing, pack_documents
from ..data.tokenizer import NUM_SPECIAL_TOKENS, is_byte_tokenizer
from ..errors import ConfigError
from .base import Task
from .metrics import IGNORE_INDEX

__all__ = [
    "CausalLMArguments",
    "CausalLMTask",
    "LanguageModelingCollator",
    "PackedTextArguments",
    "causal_lm_collator",
    "document_labels",
    "prepare_causal_lm_dataset",
]


def prepare_causal_lm_dataset(
    dataset: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    num_proc: int | None = None,
    batch_size: int = 1000,
    packing: Packing = "documents",
) -> DatasetDict:
    """Tokenise ``text`` (no special tokens), append eos per document, pack into rows (``pack_documents``).

    ``documents`` (default): ``input_ids`` and ``position_ids`` (restarting at 0 at each document start), every row
    exactly ``block_size`` tokens; ``concat``: ``input_ids`` and ``attention_mask`` (all ones), the same blocks;
    ``pad``: one ``input_ids``/``attention_mask`` row per document, cut to ``block_size``. All int64. Blocks are cut
    per ``map`` batch of ``batch_size`` documents, each batch's remainder (under ``block_size`` tokens) dropped, as
    transformers' ``run_clm`` does; the result is deterministic for a given dataset and tokenizer. With hf_extras'
    byte tokenizer, ids come straight from the UTF-8 bytes (same ids, ~100x faster than its ByteLevel pre-tokenizer).
    """
    check_packing(packing)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("tokenizer has no eos_token: it is needed to separate documents")
    for name, split in dataset.items():
        if "text" not in split.column_names:
            raise ValueError(f"split {name!r} has no 'text' column (columns: {split.column_names})")
    encode = _byte_encoder(tokenizer) if is_byte_tokenizer(tokenizer) else _generic_encoder(tokenizer)

    def tokenize_and_pack(batch: dict[str, list[Any]]) -> dict[str, Any]:
        return pack_documents(encode(batch["text"]), eos_id, block_size, packing)

    return DatasetDict(
        {
            name: split.map(
                tokenize_and_pack,
                batched=True,
                batch_size=batch_size,
                num_proc=num_proc,
                remove_columns=split.column_names,
                desc=f"tokenise and pack {name} ({packing}, {block_size} tokens)",
            )
            for name, split in dataset.items()
        }
    )


def _generic_encoder(tokenizer: PreTrainedTokenizerBase):
    def encode(texts: list[str]) -> list[np.ndarray]:
        # verbose=False: whole documents exceed model_max_length on purpose (we pack them).
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(doc, dtype=np.int64) for doc in ids]

    return encode


def _byte_encoder(tokenizer: PreTrainedTokenizerBase):
    """Byte tokenizer shortcut: id = byte + NUM_SPECIAL_TOKENS, unless a special literal occurs.

    A text containing e.g. ``"<s>"`` goes through the tokenizer, which maps the literal to
    its special id; this keeps the ids identical to ``tokenizer(text)``.
    """
    literals = tuple(tokenizer.get_added_vocab())
    generic = _generic_encoder(tokenizer)

    def encode(texts: list[str]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for text in texts:
            if any(lit in text for lit in literals):
                out.extend(generic([text]))
            else:
                raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
                out.append(raw.astype(np.int64) + NUM_SPECIAL_TOKENS)
        return out

    return encode


def document_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal-LM labels: ``input_ids``, -100 at pads (``attention_mask`` 0) and at each document's first token
    (``position_ids`` 0, or without them each row's first real token), as ``DataCollatorWithFlattening`` writes them:
    a document's first token is never predicted from the previous document (or from a left pad)."""
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    first = position_ids == 0 if position_ids is not None else real & (real.cumsum(-1) == 1)
    return input_ids.masked_fill(~real | first, IGNORE_INDEX)


@dataclass
class LanguageModelingCollator(DataCollatorForLanguageModeling):
    """transformers' ``DataCollatorForLanguageModeling`` for rows of any ``packing`` (``hf_extras.data.packing``).

    ``concat``: transformers' behaviour unchanged. ``documents``: rows of one length with ``position_ids`` are stacked
    (no padding, no ``attention_mask``: transformers' padding-free form) and ``position_ids`` reach the model; causal
    labels are -100 at each document's first token. ``pad``: rows are padded per batch; causal labels are -100 at
    pads (by ``attention_mask``, so a pad token equal to eos keeps eos a target) and at each row's first token. With
    ``mlm=True`` transformers' masking applies on top of any packing (targets are drawn among non-special tokens).
    """

    mlm: bool = False
    packing: Packing = "documents"

    def __post_init__(self):
        check_packing(self.packing)
        if self.packing == "documents" and self.pad_to_multiple_of:
            raise ValueError(
                "pad_to_multiple_of does not apply to packing='documents' (rows are block_size long, never padded): "
                "choose block_size as that multiple instead"
            )
        super().__post_init__()

    def torch_call(self, examples: list[Any]) -> dict[str, Any]:
        packed = isinstance(examples[0], Mapping) and "position_ids" in examples[0]
        if packed and len({len(e["input_ids"]) for e in examples}) > 1:
            raise ValueError(
                "rows with position_ids (packing='documents') must all have one length (block_size); "
                "use packing='pad' for rows of different lengths"
            )
        batch = super().torch_call(examples)
        if packed and "attention_mask" not in examples[0]:
            batch.pop("attention_mask", None)  # all ones: tokenizer.pad added it
        if not self.mlm and self.packing != "concat":
            batch["labels"] = document_labels(
                batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids")
            )
        return batch


def causal_lm_collator(
    tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None, packing: Packing = "documents"
) -> LanguageModelingCollator:
    """The causal-LM collator for rows made with ``packing`` (``LanguageModelingCollator``, ``mlm=False``).

    With the byte tokenizer pad (0) differs from eos (1), so eos stays a training target in every mode.
    """
    return LanguageModelingCollator(tokenizer=tokenizer, pad_to_multiple_of=pad_to_multiple_of, packing=packing)


PACKING_HELP = (
    "How documents become rows: `documents` (default: blocks of block_size with position_ids restarting at each "
    "document, so the model keeps documents apart and no document is predicted from the previous one), `concat` "
    "(the same blocks, documents separated by eos only) or `pad` (one padded row per document, cut to block_size)."
)


@dataclass
class PackedTextArguments:
    """`block_size` and `packing`, shared by the causal- and masked-LM tasks."""

    block_size: int = field(default=256, metadata={"help": "Tokens per packed training block."})
    packing: Packing = field(default="documents", metadata={"help": PACKING_HELP})

    def __post_init__(self):
        try:
            check_packing(self.packing)
        except ValueError as error:
            raise ConfigError(str(error)) from error


@dataclass
class CausalLMArguments(PackedTextArguments):
    """Options of the `causal_lm` task."""

    _argument_group_name = "causal_lm task"

    sample_prompt: str = field(default="def ", metadata={"help": "Prompt of the sample printed after training."})
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Length of the sample (0 = no sample)."})
    sample_temperature: float = field(
        default=0.8, metadata={"help": "Sampling temperature of the sample (0 = greedy); seeded with `seed`."}
    )


class CausalLMTask(Task):
    """Causal language-model pretraining on packed text blocks (`prepare_causal_lm_dataset`, `causal_lm_collator`)."""

    name = "causal_lm"
    arguments = CausalLMArguments
    auto_model = AutoModelForCausalLM
    pipeline_tag = "text-generation"
    # count tokens for metrics.json (documents/concat blocks: every token is real, so "all" is exact; pad counts pads;
    # "non_padding" cannot be a default: the command line parses this field as a boolean)
    training_defaults: ClassVar[dict[str, Any]] = {"include_num_input_tokens_seen": True}
    result_metrics = (("eval loss", "eval_loss"), ("perplexity", "eval_perplexity"))

    def prepare(self, task_args, tokenizer, raw, num_proc):
        return prepare_causal_lm_dataset(
            raw, tokenizer, task_args.block_size, num_proc=num_proc, packing=task_args.packing
        )

    def collator(self, task_args, tokenizer):
        return causal_lm_collator(tokenizer, packing=task_args.packing)

    def derived_metrics(self, metrics):
        loss = metrics.get("eval_loss")
        if loss is not None:
            metrics["eval_perplexity"] = math.exp(min(loss, 700.0))  # exp overflows past ~709
        return metrics

    def sample(self, task_args, model, tokenizer):
        if task_args.sample_max_new_tokens <= 0:
            return None
        import torch

        inputs = tokenizer(task_args.sample_prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        sampling = task_args.sample_temperature > 0
        kwargs = {"do_sample": True, "temperature": task_args.sample_temperature} if sampling else {"do_sample": False}
        model.eval()
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=task_args.sample_max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs
            )
        completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return {
            "prompt": task_args.sample_prompt,
            "completion": completion,
            "decoding": f"sampling, temperature {task_args.sample_temperature}" if sampling else "greedy",
        }
