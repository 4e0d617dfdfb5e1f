"""Extractive question answering (SQuAD v1.1 format): data, windowed features, n-best answers, EM/F1.

Data: the official nested SQuAD JSON (`data[].paragraphs[].qas[]`), or any `datasets` dataset / local file with
flat rows `{id, title, context, question, answers: {text: [...], answer_start: [...]}}` (column names
configurable); unset, a synthetic SQuAD set built from the standard library's docstrings
(`stdlib_sets.function_qa_dataset`). Without a validation split, whole articles (`title`, else the context) are
held out, so no article is in both splits. Features come from `qa_spans` (strided windows, answers mapped to tokens);
evaluation maps the n-best spans of every window back to context text and scores them with the official SQuAD v1.1
exact match and F1 (`metrics.squad_scores`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from datasets import Dataset, DatasetDict
from transformers import AutoModelForQuestionAnswering, DataCollatorWithPadding, PreTrainedTokenizerBase

from ..data.corpus import load_dataset_dict, rename_validation_alias, stable_fraction
from ..data.qa_spans import answer_token_positions, best_spans, default_max_answer_length, tokenize_qa_windows
from ..errors import ConfigError
from .base import DataArguments, Task
from .metrics import squad_scores
from .padding_free import PaddingFreeArguments, refuse_padding_free

__all__ = [
    "QuestionAnsweringArguments",
    "QuestionAnsweringTask",
    "load_squad_json",
    "load_qa_dataset",
    "fix_answer_starts",
    "prepare_qa_features",
    "predict_answers",
    "qa_metrics",
]


@dataclass
class QuestionAnsweringArguments(PaddingFreeArguments):
    """Options of the `question_answering` task."""

    _argument_group_name = "question_answering task"

    max_seq_length: int = field(default=384, metadata={"help": "Tokens per window (question + context + specials)."})
    doc_stride: int = field(default=128, metadata={"help": "Context tokens shared by consecutive windows."})
    n_best_size: int = field(default=20, metadata={"help": "Candidate spans kept per example when decoding."})
    max_answer_length: int | None = field(
        default=None, metadata={"help": "Longest answer, in tokens (unset: 30, or 100 for hf_extras' byte tokenizer)."}
    )
    question_column: str = field(default="question", metadata={"help": "Column holding the question."})
    context_column: str = field(default="context", metadata={"help": "Column holding the context."})
    answers_column: str = field(
        default="answers", metadata={"help": "Column holding {text: [...], answer_start: [...]} (SQuAD)."}
    )

    def __post_init__(self):
        refuse_padding_free(
            self,
            "question_answering",
            "start_positions/end_positions index one window per row and the answer is chosen within a row, so a "
            "padding-free row of several windows would be one window; batches are padded per batch instead",
        )
        for key in ("max_seq_length", "n_best_size", "max_answer_length"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if not 0 <= self.doc_stride < self.max_seq_length:
            raise ConfigError(
                f"doc_stride must be in [0, max_seq_length), got doc_stride={self.doc_stride}, "
                f"max_seq_length={self.max_seq_length}"
            )


def load_squad_json(path: str | Path) -> Dataset:
    """The official nested SQuAD v1.1 JSON as flat rows (`id`, `title`, `context`, `question`, `answers`)."""
    with open(path, encoding="utf-8") as f:
        payload = json.load(f)
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise ValueError(f"{path} is not SQuAD JSON: expected a top-level object with a 'data' list of articles")
    rows = [
        {
            "id": str(qa["id"]),
            "title": article.get("title", ""),
            "context": paragraph["context"],
            "question": qa["question"],
            "answers": {
                "text": [a["text"] for a in qa["answers"]],
                "answer_start": [int(a["answer_start"]) for a in qa["answers"]],
            },
        }
        for article in payload["data"]
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]
    return Dataset.from_list(rows)


def split_by_article(dataset: Dataset, validation_fraction: float) -> DatasetDict:
    """Hold out whole articles: a row is in validation iff `stable_fraction(title or context) < validation_fraction`."""
    if not 0.0 < validation_fraction < 1.0:
        raise ConfigError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    keys = dataset["title"] if "title" in dataset.column_names else dataset["context"]
    held_out = [stable_fraction(str(key)) < validation_fraction for key in keys]
    validation = [i for i, h in enumerate(held_out) if h]
    train = [i for i, h in enumerate(held_out) if not h]
    if not train or not validation:
        raise ConfigError(
            f"holding out {validation_fraction:.0%} of the articles left an empty split "
            f"(train={len(train)}, validation={len(validation)}); change validation_fraction or add articles"
        )
    return DatasetDict(train=dataset.select(train), validation=dataset.select(validation))


def load_qa_dataset(data_args: DataArguments) -> DatasetDict:
    """Raw QA splits: the stdlib default, an official SQuAD JSON file, or any `datasets` dataset with SQuAD columns."""
    name = data_args.dataset_name
    if name is None:
        from .stdlib_sets import function_qa_dataset

        return function_qa_dataset(data_args.validation_fraction)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".json" and path.is_file() and _looks_nested(path):
        return split_by_article(load_squad_json(path), data_args.validation_fraction)
    ds = rename_validation_alias(load_dataset_dict(name, data_args.data_files, data_args.dataset_config_name))
    if "train" not in ds:
        raise ConfigError(f"dataset {name!r} has no 'train' split (splits: {sorted(ds)})")
    if "validation" not in ds:
        ds = split_by_article(ds["train"], data_args.validation_fraction)
    return DatasetDict(train=ds["train"], validation=ds["validation"])


def _looks_nested(path: Path) -> bool:
    """An official SQuAD file is one JSON object `{"data": [...], "version": ...}` (JSON lines are flat rows)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(65536)
    return head.lstrip().startswith("{") and '"paragraphs"' in head


def fix_answer_starts(context: str, texts: Sequence[str], starts: Sequence[int], window: int = 5) -> list[int | None]:
    """Each answer's start, checked against the context: an answer off by a few characters (SQuAD has ~15 off by a
    leading space) is moved to the nearest exact occurrence within `window` characters; `None` if none is found."""
    fixed: list[int | None] = []
    for text, start in zip(texts, starts):
        if context[start : start + len(text)] == text:
            fixed.append(start)
            continue
        near = [s for s in range(max(0, start - window), start + window + 1) if context[s : s + len(text)] == text]
        fixed.append(min(near, key=lambda s: abs(s - start)) if near else None)
    return fixed


def _standardise(split: Dataset, args: QuestionAnsweringArguments, split_name: str) -> Dataset:
    """Rename the configured columns to SQuAD's names and give every row an id; a missing column is named."""
    renames = {args.question_column: "question", args.context_column: "context", args.answers_column: "answers"}
    for column in renames:
        if column not in split.column_names:
            raise ConfigError(
                f"column {column!r} not found in split {split_name!r} (columns: {split.column_names}); set "
                "question_column / context_column / answers_column to the dataset's names"
            )
    for old, new in renames.items():
        if old != new:
            if new in split.column_names:
                split = split.remove_columns(new)
            split = split.rename_column(old, new)
    if "id" not in split.column_names:
        split = split.add_column("id", [f"{split_name}-{i}" for i in range(len(split))])
    return split


def prepare_qa_features(
    examples: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 384,
    doc_stride: int = 128,
    keep_offsets: bool = False,
    num_proc: int | None = None,
) -> Dataset:
    """Windowed features of SQuAD rows: `input_ids`, `attention_mask`, `start_positions`, `end_positions`,
    `example_id`, and (with `keep_offsets`, for evaluation) the context-only `offset_mapping`.

    The first answer is the training target; an answer whose start cannot be confirmed in the context points every
    window at the CLS position.
    """

    def featurise(batch: dict[str, list]) -> dict[str, list]:
        encoding = tokenize_qa_windows(tokenizer, batch["question"], batch["context"], max_length, doc_stride)
        texts, starts = [], []
        for context, answers in zip(batch["context"], batch["answers"]):
            text = answers["text"][0] if answers["text"] else ""
            start = fix_answer_starts(context, [text], answers["answer_start"][:1])[0] if text else None
            texts.append(text if start is not None else "")
            starts.append(start if start is not None else -1)
        start_positions, end_positions = answer_token_positions(encoding, tokenizer, starts, texts)
        sample = encoding["overflow_to_sample_mapping"]
        features = {
            "input_ids": encoding["input_ids"],
            "attention_mask": encoding["attention_mask"],
            "start_positions": start_positions,
            "end_positions": end_positions,
            "example_id": [batch["id"][i] for i in sample],
        }
        if keep_offsets:
            features["offset_mapping"] = encoding["offset_mapping"]
        return features

    return examples.map(
        featurise, batched=True, num_proc=num_proc, remove_columns=examples.column_names, desc="QA windows"
    )


def predict_answers(
    examples: Dataset,
    features: Dataset,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """Best answer text per example id, from the logits of its windows (`features` rows, in prediction order).

    `max_answer_length` is in tokens: for hf_extras' byte tokenizer pass `default_max_answer_length(tokenizer)` (100).

    Only examples that have at least one window in `features` get a prediction.
    """
    windows: dict[str, list[int]] = defaultdict(list)
    for index, example_id in enumerate(features["example_id"]):
        windows[example_id].append(index)
    offsets = features["offset_mapping"]
    predictions: dict[str, str] = {}
    for example_id, context in zip(examples["id"], examples["context"]):
        rows = windows.get(example_id)
        if not rows:
            continue
        spans = best_spans(
            context,
            [offsets[i] for i in rows],
            [start_logits[i] for i in rows],
            [end_logits[i] for i in rows],
            n_best_size,
            max_answer_length,
        )
        predictions[example_id] = spans[0]["answer"] if spans else ""
    return predictions


def qa_metrics(examples: Dataset, predictions: dict[str, str]) -> dict[str, float]:
    """SQuAD v1.1 exact match and F1 (percent) of `predictions` (id -> answer text, e.g. from `predict_answers`)
    against the ground truths of the same questions, and how many questions were scored."""
    references = {i: a["text"] for i, a in zip(examples["id"], examples["answers"]) if i in predictions}
    return {**squad_scores(predictions, references), "scored_questions": float(len(references))}


class QuestionAnsweringTask(Task):
    """Extractive QA with `AutoModelForQuestionAnswering`; evaluation reports SQuAD exact match and F1."""

    name = "question_answering"
    arguments = QuestionAnsweringArguments
    auto_model = AutoModelForQuestionAnswering
    pipeline_tag = "question-answering"
    result_metrics: ClassVar[tuple[tuple[str, str], ...]] = (
        ("eval loss", "eval_loss"),
        ("exact match (%)", "eval_exact_match"),
        ("F1 (%)", "eval_f1"),
    )

    def load_data(self, data_args, seed):
        return load_qa_dataset(data_args)

    def prepare(self, task_args, tokenizer, raw, num_proc):
        self.max_answer_length = task_args.max_answer_length or default_max_answer_length(tokenizer)
        raw = DatasetDict({name: _standardise(split, task_args, name) for name, split in raw.items()})
        self._examples = raw["validation"]
        windows = dict(max_length=task_args.max_seq_length, doc_stride=task_args.doc_stride, num_proc=num_proc)
        return DatasetDict(
            train=prepare_qa_features(raw["train"], tokenizer, **windows),
            validation=prepare_qa_features(raw["validation"], tokenizer, keep_offsets=True, **windows),
        )

    def collator(self, task_args, tokenizer):
        return DataCollatorWithPadding(tokenizer)

    def subset(self, dataset, limit, seed):
        """`limit` questions (all their windows), not `limit` windows: a question is scored on every window."""
        if limit is None:
            return dataset
        ids = list(dict.fromkeys(dataset["example_id"]))
        if limit >= len(ids):
            return dataset
        keep = {ids[i] for i in np.random.default_rng(seed).permutation(len(ids))[:limit]}
        return dataset.select([i for i, e in enumerate(dataset["example_id"]) if e in keep])

    def metrics_function(self, task_args, eval_dataset):
        examples = self._examples

        def compute(eval_pred) -> dict[str, float]:
            start_logits, end_logits = eval_pred.predictions[:2]
            predictions = predict_answers(
                examples, eval_dataset, start_logits, end_logits, task_args.n_best_size, self.max_answer_length
            )
            return qa_metrics(examples, predictions)

        return compute

    def sample(self, task_args, model, tokenizer):
        from transformers import pipeline

        row = self._examples[0]
        answer = pipeline("question-answering", model=model, tokenizer=tokenizer, device=model.device)(
            question=row["question"],
            context=row["context"],
            max_seq_len=task_args.max_seq_length,
            doc_stride=task_args.doc_stride,
            max_answer_len=self.max_answer_length,
        )
        return {
            "prompt": f"Q: {row['question']} (gold: {row['answers']['text'][0]!r}) A: ",
            "completion": repr(answer["answer"]),
            "decoding": "pipeline('question-answering') on a held-out question",
        }
