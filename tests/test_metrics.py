"""Plain metric functions: classification (vs scikit-learn) and SQuAD v1.1 EM/F1 on cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score
from transformers import EvalPrediction

from hf_extras.tasks.metrics import (
    accuracy,
    classification_metrics,
    macro_f1,
    normalize_answer,
    squad_exact_match,
    squad_f1,
    squad_scores,
)


@pytest.mark.parametrize(
    "text, normalised",
    [
        ("The Cat!", "cat"),  # lower, punctuation, article
        ("  an apple  a day ", "apple day"),  # articles as words, whitespace collapsed
        ("theatre and another", "theatre and another"),  # no article inside words
        ("U.S.A.", "usa"),  # punctuation is deleted, not replaced by a space
        ("rock-n-roll", "rocknroll"),
        ("The", ""),
        ("", ""),
        ("A. Lincoln", "lincoln"),  # "a." -> "a" -> removed: the official script's order (punctuation first)
    ],
)
def test_normalize_answer(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_and_f1_by_hand():
    assert squad_exact_match("the Eiffel Tower.", "Eiffel tower")
    assert not squad_exact_match("Eiffel", "Eiffel Tower")
    # pred {cat, sat} vs truth {cat, sat, down}: P = 2/2, R = 2/3, F1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8
    assert squad_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # repeated tokens count as a multiset: pred {to, to, be} vs truth {to, be}: common 2, P = 2/3, R = 1 -> 0.8
    assert squad_f1("to to be", "to be") == pytest.approx(0.8)
    assert squad_f1("Paris", "London") == 0.0
    # empty strings: two empties are an exact match but F1 0 (no common token), as in the official v1.1 script
    assert squad_exact_match("", "") and squad_f1("", "") == 0.0
    assert squad_exact_match("the", "an")  # both normalise to ""
    assert squad_f1("", "Paris") == 0.0 and squad_f1("Paris", "") == 0.0


def test_squad_scores_max_over_ground_truths_and_missing_predictions():
    references = {
        "q1": ["Denver Broncos", "The Denver Broncos"],  # exact after normalisation -> EM 1, F1 1
        "q2": ["Santa Clara, California", "Levi's Stadium"],  # "Levi's" vs Levi's Stadium -> F1 2*1*0.5/1.5 = 2/3
        "q3": ["gold"],  # no prediction -> 0, still counted
        "q4": ["1,000 yards", "1000"],  # "1000 yards" vs "1000": P 1/2, R 1 -> 2/3; vs "1000 yards": EM
    }
    predictions = {"q1": "denver broncos", "q2": "Levi's", "q4": "1000 yards"}
    scores = squad_scores(predictions, references)
    assert scores["exact_match"] == pytest.approx(100 * (1 + 0 + 0 + 1) / 4)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0 + 1) / 4)


def test_squad_scores_rejects_a_bare_string_reference():
    with pytest.raises(TypeError, match="list of answer texts"):
        squad_scores({"q": "x"}, {"q": "x"})


def test_classification_metrics_ignore_minus_100_and_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(6, 9))
    labels[:, 0] = -100  # e.g. special tokens
    logits = rng.normal(size=(6, 9, 4))
    predictions = logits.argmax(-1)
    keep = labels != -100
    expected_f1 = f1_score(labels[keep], predictions[keep], average="macro")
    assert macro_f1(predictions, labels) == pytest.approx(expected_f1)
    assert accuracy(predictions, labels) == pytest.approx((predictions[keep] == labels[keep]).mean())
    from_logits = classification_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    from_ids = classification_metrics(EvalPrediction(predictions=predictions, label_ids=labels))
    assert from_logits == from_ids == {"accuracy": accuracy(predictions, labels), "macro_f1": expected_f1}


def test_macro_f1_by_hand():
    labels = np.array([0, 1, 1, 2])
    predictions = np.array([0, 1, 0, 0])
    # class 0: 3 predicted, 1 true, 1 hit -> F1 = 2*1 / (3+1) = 1/2; class 1: 1 predicted, 2 true, 1 hit -> 2/3;
    # class 2: 0 predicted, 1 true -> 0. Macro F1 = (1/2 + 2/3 + 0) / 3 = 7/18
    assert macro_f1(predictions, labels) == pytest.approx(7 / 18)
    assert accuracy(predictions, labels) == pytest.approx(0.5)
