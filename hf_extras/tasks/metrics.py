"""Evaluation metrics as plain functions (Hub-hosted `evaluate` metrics cannot load offline).

Classification: accuracy and macro F1 over label ids, ignoring positions labelled -100 (so the same functions score
sequence classification, token classification and masked-LM predictions). Extractive QA: exact match and F1
computed as the official SQuAD v1.1 evaluation script defines them (normalise: lower-case, drop punctuation, drop
the articles a/an/the, collapse whitespace; token-bag F1; maximum over the ground truths; percentages over every
reference question, a missing prediction scoring 0).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "IGNORE_INDEX",
    "accuracy",
    "macro_f1",
    "classification_metrics",
    "argmax_logits",
    "normalize_answer",
    "squad_exact_match",
    "squad_f1",
    "squad_scores",
]

IGNORE_INDEX = -100  # label of positions that are not scored (transformers' loss convention)


def _scored(predictions: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in size")
    keep = labels != IGNORE_INDEX
    return predictions[keep], labels[keep]


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Share of scored positions (label != -100) where the predicted id equals the label; nan if none is scored."""
    predictions, labels = _scored(predictions, labels)
    return float((predictions == labels).mean()) if labels.size else float("nan")


def macro_f1(predictions: np.ndarray, labels: np.ndarray, num_labels: int | None = None) -> float:
    """Unweighted mean over classes of per-class F1 (scikit-learn's `f1_score(average="macro")`).

    Classes are those present in the labels or the predictions (or `range(num_labels)` when given); a class with no
    true and no predicted positions is skipped, one with no correct prediction scores 0.
    """
    predictions, labels = _scored(predictions, labels)
    if not labels.size:
        return float("nan")
    classes = np.arange(num_labels) if num_labels is not None else np.union1d(labels, predictions)
    hit = (predictions[:, None] == classes) & (labels[:, None] == classes)  # (n, classes)
    true_positive = hit.sum(0)
    predicted = (predictions[:, None] == classes).sum(0)
    actual = (labels[:, None] == classes).sum(0)
    present = (predicted + actual) > 0
    f1 = 2 * true_positive / np.maximum(predicted + actual, 1)  # = 2PR / (P + R)
    return float(f1[present].mean())


def argmax_logits(logits, labels=None):
    """`Trainer(preprocess_logits_for_metrics=...)`: keep only the arg-max id, so evaluation stores no full logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(-1)


def classification_metrics(eval_pred) -> dict[str, float]:
    """`Trainer(compute_metrics=...)`: accuracy and macro F1 of arg-max predictions (logits or ids) vs labels."""
    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(predictions, tuple):
        predictions = predictions[0]
    predictions = np.asarray(predictions)
    if predictions.ndim == np.asarray(labels).ndim + 1:  # logits, not ids
        predictions = predictions.argmax(-1)
    return {"accuracy": accuracy(predictions, labels), "macro_f1": macro_f1(predictions, labels)}


# --- SQuAD v1.1 -------------------------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower-case, remove punctuation, remove articles, collapse whitespace (that order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact_match(prediction: str, ground_truth: str) -> bool:
    """True when the normalised strings are equal (two empty answers match)."""
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def squad_f1(prediction: str, ground_truth: str) -> float:
    """Token-bag F1 of the normalised strings in [0, 1]; 0 when they share no token (also when either is empty)."""
    predicted, truth = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    same = sum((Counter(predicted) & Counter(truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(truth)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 in percent, as the official SQuAD v1.1 script computes them.

    `references` maps every question id to its ground-truth answer texts; `predictions` maps ids to one answer text.
    Each question scores the best value over its ground truths; a question without a prediction scores 0 and still
    counts in the total.
    """
    if not references:
        raise ValueError("squad_scores needs at least one reference question")
    exact = f1 = 0.0
    for qid, truths in references.items():
        if isinstance(truths, str) or not isinstance(truths, Iterable):
            raise TypeError(f"references[{qid!r}] must be a list of answer texts, got {truths!r}")
        if qid not in predictions:
            continue
        exact += max(float(squad_exact_match(predictions[qid], t)) for t in truths)
        f1 += max(squad_f1(predictions[qid], t) for t in truths)
    return {"exact_match": 100.0 * exact / len(references), "f1": 100.0 * f1 / len(references)}
