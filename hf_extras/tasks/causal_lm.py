"""Causal language-model pretraining (`task: causal_lm`): tokenise, separate documents with eos, pack; its `Task`.

Why packing: the default corpus is a few hundred long files; padding each to a block would
waste most compute, so documents are concatenated (each followed by ``eos`` so the model
learns where one ends) and cut into full ``block_size`` blocks. Labels are made by the
collator (``DataCollatorForLanguageModeling(mlm=False)`` copies ``input_ids``; the model
shifts them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from datasets import DatasetDict
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, PreTrainedTokenizerBase

from ..data.tokenizer import NUM_SPECIAL_TOKENS, is_byte_tokenizer
from .base import Task

__all__ = ["CausalLMArguments", "CausalLMTask", "causal_lm_collator", "prepare_causal_lm_dataset"]


def prepare_causal_lm_dataset(
    dataset: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    num_proc: int | None = None,
    batch_size: int = 1000,
) -> DatasetDict:
    """Tokenise ``text`` (no special tokens), append eos per document, pack into blocks.

    Returns every split with only ``input_ids`` and ``attention_mask`` (all ones, int64), each
    row exactly ``block_size`` tokens. Packing runs per ``map`` batch of ``batch_size``
    documents and drops each batch's remainder (under ``block_size`` tokens per batch), as
    transformers' ``run_clm`` does; the result is deterministic for a given dataset and
    tokenizer. With hf_extras' byte tokenizer, ids come straight from the UTF-8 bytes (same
    ids, ~100x faster than its ByteLevel pre-tokenizer).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("tokenizer has no eos_token: it is needed to separate documents")
    for name, split in dataset.items():
        if "text" not in split.column_names:
            raise ValueError(f"split {name!r} has no 'text' column (columns: {split.column_names})")
    encode = _byte_encoder(tokenizer) if is_byte_tokenizer(tokenizer) else _generic_encoder(tokenizer)

    def tokenize_and_pack(batch: dict[str, list[Any]]) -> dict[str, np.ndarray]:
        eos = np.array([eos_id], dtype=np.int64)
        pieces = [part for doc in encode(batch["text"]) for part in (doc, eos)]
        stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        n = len(stream) // block_size * block_size
        blocks = stream[:n].reshape(-1, block_size)
        return {"input_ids": blocks, "attention_mask": np.ones_like(blocks)}

    return DatasetDict(
        {
            name: split.map(
                tokenize_and_pack,
                batched=True,
                batch_size=batch_size,
                num_proc=num_proc,
                remove_columns=split.column_names,
                desc=f"tokenise and pack {name} into blocks of {block_size}",
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


def causal_lm_collator(
    tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None
) -> DataCollatorForLanguageModeling:
    """transformers' causal-LM collator: ``labels = input_ids`` with pad positions at -100.

    With the byte tokenizer pad (0) differs from eos (1), so eos stays a training target.
    """
    return DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False, pad_to_multiple_of=pad_to_multiple_of)


@dataclass
class CausalLMArguments:
    """Options of the `causal_lm` task."""

    _argument_group_name = "causal_lm task"

    block_size: int = field(default=256, metadata={"help": "Tokens per packed training block."})
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
    # count tokens for metrics.json (packed blocks: every token is real, so "all" is exact)
    training_defaults: ClassVar[dict[str, Any]] = {"include_num_input_tokens_seen": True}
    result_metrics = (("eval loss", "eval_loss"), ("perplexity", "eval_perplexity"))

    def prepare(self, task_args, tokenizer, raw, num_proc):
        return prepare_causal_lm_dataset(raw, tokenizer, task_args.block_size, num_proc=num_proc)

    def collator(self, task_args, tokenizer):
        return causal_lm_collator(tokenizer)

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
