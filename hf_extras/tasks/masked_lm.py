"""Masked language-model pretraining: packed text blocks, BERT-style masking, perplexity and masked-token accuracy.

Data and packing are the causal-LM recipe's (`causal_lm.prepare_causal_lm_dataset`: the embedded stdlib corpus or
any text dataset, documents separated by eos; `packing: documents` (default) cuts them into `block_size` blocks whose
`position_ids` restart at each document, so the bidirectional model keeps documents apart in both directions;
`concat` the same blocks without boundaries; `pad` one padded row per document). transformers'
`DataCollatorForLanguageModeling` masks: it picks `mlm_probability` (15%) of the non-special tokens as targets and
replaces 80% of them with the tokenizer's mask token, 10% with a random token and leaves 10% unchanged; every other
position is labelled -100. The model is bidirectional (`bidirectional=True`, set by the task).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import AutoModelForMaskedLM, PreTrainedTokenizerBase

from ..data.packing import Packing
from ..errors import ConfigError
from .causal_lm import CausalLMTask, LanguageModelingCollator, PackedTextArguments
from .metrics import argmax_logits, classification_metrics

__all__ = ["MaskedLMArguments", "MaskedLMTask", "masked_lm_collator", "masked_lm_metrics"]


@dataclass
class MaskedLMArguments(PackedTextArguments):
    """Options of the `masked_lm` task (plus `block_size` and `packing`)."""

    _argument_group_name = "masked_lm task"

    mlm_probability: float = field(default=0.15, metadata={"help": "Share of tokens chosen as prediction targets."})
    mask_replace_prob: float = field(default=0.8, metadata={"help": "Share of targets replaced by the mask token."})
    random_replace_prob: float = field(default=0.1, metadata={"help": "Share of targets replaced by a random token."})


def masked_lm_collator(
    tokenizer: PreTrainedTokenizerBase,
    mlm_probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    seed: int | None = None,
    packing: Packing = "documents",
) -> LanguageModelingCollator:
    """transformers' masking collator (15% targets, 80/10/10 by default) for rows made with `packing` (`position_ids`
    of `documents` rows reach the model); the tokenizer needs a mask token."""
    if tokenizer.mask_token is None:
        raise ValueError(
            f"masked-LM pretraining needs a tokenizer with a mask token; {type(tokenizer).__name__} has none"
        )
    return LanguageModelingCollator(
        tokenizer,
        packing=packing,
        mlm=True,
        mlm_probability=mlm_probability,
        mask_replace_prob=mask_replace_prob,
        random_replace_prob=random_replace_prob,
        seed=seed,
    )


def masked_lm_metrics(eval_pred) -> dict[str, float]:
    """Accuracy of the arg-max prediction at the masked (scored) positions."""
    return {"masked_accuracy": classification_metrics(eval_pred)["accuracy"]}


class MaskedLMTask(CausalLMTask):
    """Masked-LM pretraining with `AutoModelForMaskedLM`; reports perplexity of the masked targets and accuracy."""

    name = "masked_lm"
    arguments = MaskedLMArguments
    auto_model = AutoModelForMaskedLM
    pipeline_tag = "fill-mask"
    training_defaults: ClassVar[dict[str, Any]] = {}
    result_metrics = (
        ("eval loss", "eval_loss"),
        ("perplexity", "eval_perplexity"),
        ("masked-token accuracy", "eval_masked_accuracy"),
    )
    compute_metrics = staticmethod(masked_lm_metrics)
    preprocess_logits_for_metrics = staticmethod(argmax_logits)

    def config_defaults(self, task_args, tokenizer, raw):
        return {"bidirectional": True}

    def collator(self, task_args, tokenizer):
        try:
            return masked_lm_collator(
                tokenizer,
                task_args.mlm_probability,
                task_args.mask_replace_prob,
                task_args.random_replace_prob,
                packing=task_args.packing,
            )
        except ValueError as error:
            raise ConfigError(str(error)) from error

    def sample(self, task_args, model, tokenizer):
        return None
