"""Extractive QA recipe: windows and answer positions, n-best decoding, SQuAD loading, `hf-extras train` end to end."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA
from datasets import Dataset

from hf_extras.cli import main
from hf_extras.data import build_byte_tokenizer
from hf_extras.data.qa_spans import answer_token_positions, best_spans, default_max_answer_length, tokenize_qa_windows
from hf_extras.errors import ConfigError
from hf_extras.tasks.question_answering import (
    QuestionAnsweringArguments,
    fix_answer_starts,
    load_squad_json,
    predict_answers,
    prepare_qa_features,
    qa_metrics,
    split_by_article,
)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "question_answering.yaml"
TINY = [
    "--hidden_size", "32", "--num_hidden_layers", "1", "--num_heads", "2", "--max_steps", "2",
    "--max_train_samples", "16", "--max_eval_samples", "6", "--per_device_train_batch_size", "4",
    "--max_seq_length", "96", "--doc_stride", "32", "--eval_strategy", "no", "--logging_steps", "1",
    "--disable_tqdm", "true",
]  # fmt: skip

QUESTION = "Where did they meet?"
CONTEXT = (
    "Alice and Bob grew up in different towns and never wrote to each other for many years. "
    "Much later, after a long journey across the sea, they finally met in the old harbour of Lisbon."
)
ANSWER = "the old harbour of Lisbon"


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def windows(tokenizer, max_length=80, doc_stride=24):
    encoding = tokenize_qa_windows(tokenizer, [QUESTION], [CONTEXT], max_length=max_length, doc_stride=doc_stride)
    start = CONTEXT.index(ANSWER)
    return encoding, answer_token_positions(encoding, tokenizer, [start], [ANSWER])


def test_answer_in_a_later_window_maps_to_its_tokens(tokenizer):
    encoding, (starts, ends) = windows(tokenizer)
    assert len(encoding["input_ids"]) >= 3  # the context is split into overlapping windows
    holding = [w for w, s in enumerate(starts) if s != 0]
    assert holding and holding[0] >= 1  # the first window does not hold the answer...
    assert starts[0] == ends[0] == 0  # ...so it points at the CLS position
    assert encoding["input_ids"][0][0] == tokenizer.cls_token_id
    for w in holding:
        span = encoding["input_ids"][w][starts[w] : ends[w] + 1]
        assert tokenizer.decode(span) == ANSWER
        offsets = encoding["offset_mapping"][w]
        assert CONTEXT[offsets[starts[w]][0] : offsets[ends[w]][1]] == ANSWER
    for w in range(len(starts)):  # only context tokens carry offsets; the question and specials are None
        ids, offsets = encoding["input_ids"][w], encoding["offset_mapping"][w]
        question_len = len(QUESTION.encode())
        assert all(o is None for o in offsets[: question_len + 2])  # <cls> question <sep>
        assert offsets[len(ids) - 1] is None  # final <sep>


def test_windows_overlap_by_doc_stride(tokenizer):
    encoding, _ = windows(tokenizer, max_length=80, doc_stride=24)
    first, second = (
        [o for o in encoding["offset_mapping"][w] if o is not None] for w in range(2)
    )  # context offsets of windows 0 and 1
    assert first[-24:] == second[:24]


def test_gold_logits_decode_back_to_the_gold_text(tokenizer):
    encoding, (starts, ends) = windows(tokenizer)
    start_logits, end_logits = [], []
    for w, ids in enumerate(encoding["input_ids"]):
        s, e = np.full(len(ids), -5.0), np.full(len(ids), -5.0)
        if starts[w] != 0:
            s[starts[w]], e[ends[w]] = 8.0, 8.0
        start_logits.append(s)
        end_logits.append(e)
    spans = best_spans(
        CONTEXT, encoding["offset_mapping"], start_logits, end_logits, n_best_size=5, max_answer_length=40
    )
    assert spans[0]["answer"] == ANSWER
    assert CONTEXT[spans[0]["start"] : spans[0]["end"]] == ANSWER
    assert len(spans) == 5 and sum(s["score"] for s in spans) == pytest.approx(1.0)
    assert [s["score"] for s in spans] == sorted((s["score"] for s in spans), reverse=True)
    # max_answer_length shorter than the gold span: the gold span is no longer a candidate
    short = best_spans(CONTEXT, encoding["offset_mapping"], start_logits, end_logits, max_answer_length=5)
    assert short[0]["answer"] != ANSWER and len(tokenizer(short[0]["answer"], add_special_tokens=False).input_ids) <= 5


def test_features_and_metrics_end_to_end_with_gold_logits(tokenizer):
    examples = Dataset.from_list(
        [
            {"id": "a", "question": QUESTION, "context": CONTEXT,
             "answers": {"text": [ANSWER, "Lisbon"], "answer_start": [CONTEXT.index(ANSWER), CONTEXT.index("Lisbon")]}},
            {"id": "b", "question": "Who grew up?", "context": CONTEXT,
             "answers": {"text": ["Alice and Bob"], "answer_start": [0]}},
        ]
    )  # fmt: skip
    features = prepare_qa_features(examples, tokenizer, max_length=80, doc_stride=24, keep_offsets=True)
    assert set(features["example_id"]) == {"a", "b"} and len(features) > 2
    length = max(len(ids) for ids in features["input_ids"])
    start_logits = np.full((len(features), length), -5.0)
    end_logits = np.full((len(features), length), -5.0)
    for row, (s, e) in enumerate(zip(features["start_positions"], features["end_positions"])):
        if s != 0:
            start_logits[row, s], end_logits[row, e] = 8.0, 8.0
    predictions = predict_answers(examples, features, start_logits, end_logits, max_answer_length=40)
    assert predictions == {"a": ANSWER, "b": "Alice and Bob"}
    scores = qa_metrics(examples, predictions)
    assert scores == {"exact_match": 100.0, "f1": 100.0, "scored_questions": 2.0}


def test_fix_answer_starts():
    context = "The answer is  forty two."
    assert fix_answer_starts(context, ["forty two", "forty two", "nine"], [15, 13, 0]) == [15, 15, None]


def squad_payload():
    article = lambda title, n: {  # noqa: E731
        "title": title,
        "paragraphs": [
            {
                "context": f"{title} paragraph {p} has the word gold in it.",
                "qas": [
                    {"id": f"{title}-{p}-{q}", "question": "Which word?",
                     "answers": [{"text": "gold", "answer_start": len(f"{title} paragraph {p} has the word ")}]}
                    for q in range(2)
                ],
            }
            for p in range(n)
        ],
    }  # fmt: skip
    return {"version": "1.1", "data": [article(f"Article{i}", 2) for i in range(12)]}


def test_official_squad_json_flattens_and_splits_by_article(tmp_path):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad_payload()))
    rows = load_squad_json(path)
    assert len(rows) == 12 * 2 * 2 and set(rows.column_names) >= {"id", "title", "context", "question", "answers"}
    row = rows[0]
    start = row["answers"]["answer_start"][0]
    assert row["context"][start : start + 4] == "gold"
    splits = split_by_article(rows, 0.3)
    assert not set(splits["train"]["title"]) & set(splits["validation"]["title"])
    assert len(splits["train"]) + len(splits["validation"]) == len(rows)


def test_train_offline_default(tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(CONFIG), *TINY, f"--output_dir={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "question_answering" and metrics["steps"] == 2
    for key in ("final_eval_exact_match", "final_eval_f1", "final_eval_loss"):
        assert key in metrics, key
    assert metrics["final_eval_scored_questions"] == 6  # max_eval_samples counts questions, with all their windows
    assert "pipeline('question-answering')" in metrics["sample"]["decoding"]


def test_train_on_official_squad_json_file(tmp_path):
    source = os.path.join(SHARED_DATA, "squad_v1.1_dev.json")
    if not os.path.isfile(source):
        pytest.skip("../shared/data/squad_v1.1_dev.json is not available")
    payload = json.loads(Path(source).read_text())
    # a few articles, one paragraph each: small and fast, still nested official JSON
    payload["data"] = [{**a, "paragraphs": a["paragraphs"][:1]} for a in payload["data"][:10]]
    path = tmp_path / "dev_small.json"
    path.write_text(json.dumps(payload))
    out = tmp_path / "run"
    argv = ["train", str(CONFIG), *TINY, f"--output_dir={out}", f"--dataset_name={path}", "--validation_fraction=0.3"]
    argv += ["--max_seq_length=256", "--doc_stride=32"]  # SQuAD questions are long in bytes: leave room per window
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["final_eval_f1"] <= 100.0 and metrics["final_eval_scored_questions"] == 6


def test_flat_jsonl_rows_with_renamed_columns(tmp_path):
    rows = [
        {"q": f"Which number is {i}?", "passage": f"The number {i} is written here.",
         "gold": {"text": [str(i)], "answer_start": [len("The number ")]}, "title": f"t{i % 5}"}
        for i in range(30)
    ]  # fmt: skip
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    columns = ["--question_column=q", "--context_column=passage", "--answers_column=gold", "--validation_fraction=0.4"]
    assert main(["train", str(CONFIG), *TINY, *columns, f"--output_dir={out}", f"--dataset_name={path}"]) == 0
    assert main(["train", str(CONFIG), *TINY, "--question_column=nope", f"--dataset_name={path}",
                 f"--output_dir={out}"]) == 2  # fmt: skip
    shutil.rmtree(out)


def test_overlong_question_is_shortened_not_fatal(tokenizer):
    encoding = tokenize_qa_windows(tokenizer, ["why " * 60], [CONTEXT], max_length=80, doc_stride=24)
    assert all(len(ids) <= 80 for ids in encoding["input_ids"])
    assert all(sum(o is not None for o in offsets) > 24 for offsets in encoding["offset_mapping"][:-1])
    with pytest.raises(ValueError, match="raise max_length or lower doc_stride"):
        tokenize_qa_windows(tokenizer, [QUESTION], [CONTEXT], max_length=30, doc_stride=27)


def test_max_answer_length_default_follows_the_tokenizer(tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    assert default_max_answer_length(tokenizer) == 100  # a token per byte
    assert default_max_answer_length(PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")) == 30


@pytest.mark.parametrize(
    ("values", "field"),
    [({"n_best_size": 0}, "n_best_size"), ({"max_answer_length": 0}, "max_answer_length"),
     ({"max_seq_length": 128, "doc_stride": 128}, "doc_stride")],
)  # fmt: skip
def test_bad_qa_arguments_are_named_at_construction(values, field):
    with pytest.raises(ConfigError, match=field):
        QuestionAnsweringArguments(**values)
