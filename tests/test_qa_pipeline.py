"""`pipeline("question-answering")`: gone from transformers 5, registered again by `import hf_extras`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REPO, run_without_hf_extras
from datasets import Dataset
from transformers import BertConfig, BertForQuestionAnswering, pipeline

import hf_extras
from hf_extras.data import build_byte_tokenizer
from hf_extras.data.qa_spans import default_max_answer_length, tokenize_qa_windows
from hf_extras.pipelines import QuestionAnsweringPipeline
from hf_extras.tasks.question_answering import predict_answers, prepare_qa_features

CONTEXT = (
    "The harbour of Lisbon is old. Ships have sailed from it for centuries, carrying spices, wine and cork. "
    "Alice and Bob finally met there on a windy morning in early spring, long after they left school."
)
QUESTION = "Where did Alice and Bob meet?"


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def retnet_qa():
    config = hf_extras.RetNetConfig(
        vocab_size=264, hidden_size=32, num_hidden_layers=1, num_heads=2, bidirectional=True
    )
    return hf_extras.RetNetForQuestionAnswering(config).eval()


def test_transformers_alone_has_no_question_answering_pipeline():
    result = run_without_hf_extras(
        """
        from transformers import pipeline
        try:
            pipeline("question-answering")
        except KeyError as error:
            print("raised:", error)
        """,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "raised:" in result.stdout and "has been removed" in result.stdout


def test_pipeline_answers_with_character_offsets(retnet_qa, tokenizer):
    qa = pipeline("question-answering", model=retnet_qa, tokenizer=tokenizer)
    assert isinstance(qa, QuestionAnsweringPipeline)
    answer = qa(question=QUESTION, context=CONTEXT, max_seq_len=64, doc_stride=16)
    assert set(answer) == {"answer", "score", "start", "end"}
    assert answer["answer"] and CONTEXT[answer["start"] : answer["end"]] == answer["answer"]
    assert 0.0 < answer["score"] <= 1.0
    top = qa({"question": QUESTION, "context": CONTEXT}, top_k=3, max_seq_len=64, doc_stride=16)
    assert isinstance(top, list) and len(top) == 3 and top[0] == answer
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    batch = qa([{"question": QUESTION, "context": CONTEXT}] * 2, batch_size=2, max_seq_len=64, doc_stride=16)
    assert batch == [answer, answer]


def test_pipeline_decodes_exactly_as_the_recipe(retnet_qa, tokenizer):
    """Same windows and n-best decoding as `question_answering`'s evaluation: same answer over several windows."""
    examples = Dataset.from_list(
        [{"id": "x", "question": QUESTION, "context": CONTEXT, "answers": {"text": ["Lisbon"], "answer_start": [15]}}]
    )
    features = prepare_qa_features(examples, tokenizer, max_length=64, doc_stride=16, keep_offsets=True)
    assert len(features) > 3
    batch = tokenizer.pad({"input_ids": features["input_ids"]}, return_tensors="pt")  # the last window is shorter
    with torch.no_grad():
        out = retnet_qa(**batch)
    recipe = predict_answers(
        examples, features, out.start_logits.numpy(), out.end_logits.numpy(), 20, default_max_answer_length(tokenizer)
    )
    qa = pipeline("question-answering", model=retnet_qa, tokenizer=tokenizer)
    assert qa(question=QUESTION, context=CONTEXT, max_seq_len=64, doc_stride=16)["answer"] == recipe["x"]


def test_pipeline_serves_a_transformers_bert(tokenizer):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=264, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, pad_token_id=0,
    )  # fmt: skip
    qa = pipeline("question-answering", model=BertForQuestionAnswering(config).eval(), tokenizer=tokenizer)
    answer = qa(question=QUESTION, context=CONTEXT, max_seq_len=96, doc_stride=32, top_k=2)
    assert len(answer) == 2
    for a in answer:
        assert CONTEXT[a["start"] : a["end"]] == a["answer"] and np.isfinite(a["score"])


def test_bad_arguments_are_named(retnet_qa, tokenizer):
    qa = pipeline("question-answering", model=retnet_qa, tokenizer=tokenizer)
    with pytest.raises(TypeError, match="question= and context="):
        qa(question=QUESTION)
    with pytest.raises(ValueError, match="top_k"):
        qa(question=QUESTION, context=CONTEXT, top_k=0)


def test_default_answer_length_fits_a_byte_tokenizer(retnet_qa, tokenizer):
    """A 100-byte answer is found by default; 30 tokens (the subword default) would rule it out."""
    gold = "Alice and Bob finally met there on a windy morning in early spring, long after they left school."
    start_char = CONTEXT.index(gold)
    encoding = tokenize_qa_windows(tokenizer, [QUESTION], [CONTEXT], max_length=384, doc_stride=128)
    offsets = encoding["offset_mapping"][0]
    first = next(i for i, o in enumerate(offsets) if o is not None and o[0] == start_char)
    last = next(i for i, o in enumerate(offsets) if o is not None and o[1] == start_char + len(gold))
    assert last - first + 1 == len(gold) > 30
    start_logits, end_logits = torch.zeros(1, len(offsets)), torch.zeros(1, len(offsets))
    start_logits[0, first], end_logits[0, last] = 10.0, 10.0
    outputs = [{"context": CONTEXT, "offsets": offsets, "start_logits": start_logits, "end_logits": end_logits}]
    qa = pipeline("question-answering", model=retnet_qa, tokenizer=tokenizer)
    assert qa.postprocess(outputs)["answer"] == gold
    assert qa.postprocess(outputs, max_answer_len=30)["answer"] != gold
