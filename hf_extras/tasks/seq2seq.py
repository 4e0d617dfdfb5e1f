"""Sequence-to-sequence recipe (`task: seq2seq`): source text in, target text out, through `Seq2SeqTrainer`.

The model is a family's `...ForConditionalGeneration` (`AutoModelForSeq2SeqLM`). Evaluation generates
(`predict_with_generate`) and scores the decoded text with BLEU (`sacrebleu`) and ROUGE-1/2/L (`rouge_score`), both
computed locally by their reference packages, never by Hub-hosted metric scripts.

Offline default data: code-to-docstring pairs from the Python standard library (every install carries it). For each
documented function of `stdlib_sets.STDLIB_MODULES`, the source is the function's code without its docstring
(`ast.unparse`) and the target is the docstring's summary line; train and validation are split by module, so the
split is deterministic and no module contributes to both.

`padding_free: true` trains on one padding-free row per batch (`padding_free.Seq2SeqFlatteningCollator`: packed
sources, packed targets, cross-attention kept within each pair by the model); evaluation, which generates from each
source, still gets padded batches (`eval_data_collator` of the trainer).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from datasets import DatasetDict
from transformers import (
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerBase,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)

from ..errors import ConfigError
from .base import Task
from .labels import check_columns
from .padding_free import PaddingFreeArguments, Seq2SeqFlatteningCollator
from .stdlib_sets import _split, _summary, stdlib_sources

__all__ = [
    "GenerationConfigKeepingSeq2SeqTrainer", "Seq2SeqArguments", "Seq2SeqTask", "code_docstring_dataset",
    "prepare_seq2seq_dataset", "text_metrics",
]  # fmt: skip


@dataclass
class Seq2SeqArguments(PaddingFreeArguments):
    """Options of the `seq2seq` task."""

    _argument_group_name = "seq2seq task"

    source_column: str = field(default="source", metadata={"help": "Column holding the input text."})
    target_column: str = field(
        default="text",
        metadata={
            "help": "Column holding the target text. Data files are read through hf_extras' loader, which needs "
            "`text_column` (default 'text') and renames it to 'text'."
        },
    )
    max_source_length: int = field(default=256, metadata={"help": "Source tokens kept (longer sources are cut)."})
    max_target_length: int = field(
        default=128, metadata={"help": "Target tokens kept, eos included (set generation_max_length to match)."}
    )


def code_docstring_dataset(validation_fraction: float = 0.2, max_source_chars: int = 400) -> DatasetDict:
    """`source` (a stdlib function's code without its docstring) -> `text` (the docstring's summary line).

    Functions whose code is longer than `max_source_chars` or whose summary is shorter than 10 characters are left
    out; the first occurrence of a (source, summary) pair is kept.
    """
    rows: dict[tuple[str, str], dict] = {}
    for module, source in stdlib_sources():
        for node in ast.walk(ast.parse(source)):
            summary = _summary(node)
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not summary or len(summary) < 10:
                continue
            node.body = node.body[1:] or [ast.Pass()]  # drop the docstring (the first statement)
            code = ast.unparse(node)
            if len(code) <= max_source_chars:
                rows.setdefault((code, summary), {"source": code, "text": summary, "module": module})
    return _split(list(rows.values()), validation_fraction)


def prepare_seq2seq_dataset(
    raw: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    source_column: str,
    target_column: str,
    max_source_length: int,
    max_target_length: int,
    num_proc: int | None = None,
) -> DatasetDict:
    """`input_ids`/`attention_mask` of the source and `labels` of the target (ending with eos, so the model learns to
    stop), both cut to their maximum length; no padding (the collator pads per batch)."""
    check_columns(raw, {source_column: "source_column", target_column: "target_column"})
    if max_source_length < 1 or max_target_length < 2:
        raise ValueError(
            f"max_source_length must be >= 1 and max_target_length >= 2 (eos included), got {max_source_length} and "
            f"{max_target_length}"
        )
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: targets need one so that generation learns to stop")

    def tokenize(batch: dict[str, list]) -> dict[str, Any]:
        sources = tokenizer(
            [str(s) for s in batch[source_column]],
            add_special_tokens=False,
            truncation=True,
            max_length=max_source_length,
        )
        targets = tokenizer([str(t) for t in batch[target_column]], add_special_tokens=False)["input_ids"]
        sources["labels"] = [ids[: max_target_length - 1] + [eos] for ids in targets]
        return sources

    return DatasetDict(
        {
            name: split.map(
                tokenize,
                batched=True,
                num_proc=num_proc,
                remove_columns=split.column_names,
                desc=f"tokenise {name} source/target pairs",
            )
            for name, split in raw.items()
        }
    )


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, default 13a tokenisation) and mean ROUGE-1/2/L F1 (rouge_score, stemmed), in percent."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    metrics = {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score}
    for key in ("rouge1", "rouge2", "rougeL"):
        metrics[key] = 100.0 * float(np.mean([s[key].fmeasure for s in scores])) if scores else 0.0
    return metrics


def decode_ids(tokenizer: PreTrainedTokenizerBase, ids: np.ndarray) -> list[str]:
    """Token ids (padded with -100 by the trainer) -> stripped text without special tokens."""
    ids = np.where(ids == -100, tokenizer.pad_token_id, ids)
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


@contextmanager
def _generation_config_kept(model) -> Iterator[None]:
    """Put `model.generation_config` back as it was on exit (in place: a PEFT wrapper forwards to its base's)."""
    config = getattr(model, "generation_config", None)
    saved = copy.deepcopy(config.__dict__) if config is not None else None
    try:
        yield
    finally:
        if config is not None:
            config.__dict__.clear()
            config.__dict__.update(saved)


class GenerationConfigKeepingSeq2SeqTrainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` whose evaluation leaves the model's generation config as it found it.

    transformers 5's `Seq2SeqTrainer.prediction_step` writes every generation default (`max_length=20`,
    `top_k=50`, ...) into `model.generation_config`; a model saved after an evaluation then pins them in its
    `generation_config.json`, and every later `generate(max_new_tokens=...)` warns that both `max_new_tokens` and
    `max_length` are set. Generation during evaluation is unchanged.

    `eval_data_collator` (optional) batches evaluation and prediction instead of `data_collator` (padding-free training
    rows cannot be generated from); a `Seq2SeqFlatteningCollator` without a start token gets the model config's.
    """

    def __init__(self, *args, eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator
        collator = self.data_collator
        if isinstance(collator, Seq2SeqFlatteningCollator) and collator.decoder_start_token_id is None:
            start = self.model.config.decoder_start_token_id
            self.data_collator = dataclasses.replace(collator, decoder_start_token_id=start)

    @contextmanager
    def _evaluation_collator(self) -> Iterator[None]:
        training_collator = self.data_collator
        self.data_collator = self.eval_data_collator or training_collator
        try:
            yield
        finally:
            self.data_collator = training_collator

    def get_eval_dataloader(self, *args, **kwargs):
        with self._evaluation_collator():
            return super().get_eval_dataloader(*args, **kwargs)

    def get_test_dataloader(self, *args, **kwargs):
        with self._evaluation_collator():
            return super().get_test_dataloader(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with _generation_config_kept(self.model):
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with _generation_config_kept(self.model):
            return super().predict(*args, **kwargs)


def _padded_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Sources padded per batch; targets padded with -100 (the model shifts them into decoder inputs)."""
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)


class Seq2SeqTask(Task):
    """Encoder-decoder training with generation-based BLEU/ROUGE (`Seq2SeqTrainer`, `predict_with_generate`)."""

    name = "seq2seq"
    arguments = Seq2SeqArguments
    auto_model = AutoModelForSeq2SeqLM
    pipeline_tag = "text2text-generation"
    trainer_class = GenerationConfigKeepingSeq2SeqTrainer
    training_arguments_class = Seq2SeqTrainingArguments
    training_defaults: ClassVar[dict[str, Any]] = {"predict_with_generate": True, "generation_max_length": 128}
    result_metrics = (("eval loss", "eval_loss"), ("BLEU", "eval_bleu"), ("ROUGE-L", "eval_rougeL"))

    def load_data(self, data_args, seed):
        if data_args.dataset_name is None:
            return code_docstring_dataset(data_args.validation_fraction)
        return super().load_data(data_args, seed)

    def prepare(self, task_args, tokenizer, raw, num_proc):
        self.tokenizer = tokenizer  # decodes generated ids for the metrics and the sample
        self.sample_source = str(raw["validation"][0][task_args.source_column]) if len(raw["validation"]) else None
        try:
            return prepare_seq2seq_dataset(
                raw,
                tokenizer,
                task_args.source_column,
                task_args.target_column,
                task_args.max_source_length,
                task_args.max_target_length,
                num_proc,
            )
        except ValueError as error:
            raise ConfigError(str(error)) from error

    def collator(self, task_args, tokenizer):
        return Seq2SeqFlatteningCollator() if task_args.padding_free else _padded_collator(tokenizer)

    def trainer_kwargs(self, task_args):
        return {"eval_data_collator": _padded_collator(self.tokenizer)} if task_args.padding_free else {}

    def metrics_function(self, task_args, eval_dataset):
        def compute(eval_pred) -> dict[str, float]:
            predictions, labels = eval_pred.predictions, eval_pred.label_ids
            if isinstance(predictions, tuple):
                predictions = predictions[0]
            if predictions.ndim == 3:  # logits (predict_with_generate off): score the teacher-forced arg-max
                predictions = predictions.argmax(-1)
            return text_metrics(decode_ids(self.tokenizer, predictions), decode_ids(self.tokenizer, labels))

        return compute

    def sample(self, task_args, model, tokenizer):
        if self.sample_source is None:
            return None
        import torch

        inputs = tokenizer(
            self.sample_source,
            add_special_tokens=False,
            truncation=True,
            max_length=task_args.max_source_length,
            return_tensors="pt",
        ).to(model.device)
        model.eval()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=task_args.max_target_length, do_sample=False)
        return {
            "prompt": self.sample_source + "\n->\n",
            "completion": tokenizer.decode(out[0], skip_special_tokens=True).strip(),
            "decoding": "greedy",
        }
