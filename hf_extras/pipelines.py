"""`pipeline("question-answering")` again: transformers 5 removed its extractive-QA pipeline; hf_extras registers one.

`import hf_extras` calls `register_qa_pipeline()`, which takes "question-answering" off transformers'
`REMOVED_TASKS` (checked before the registry) and registers `QuestionAnsweringPipeline` through
`PIPELINE_REGISTRY.register_pipeline`. It serves any `AutoModelForQuestionAnswering` model (hf_extras' families and
transformers' own, e.g. BERT) with a fast tokenizer, and windows and decodes exactly as the `question_answering`
recipe does (`hf_extras.data.qa_spans`): a long context is split into windows that overlap by `doc_stride` tokens,
and the best span over all windows is returned with character offsets into the context.

    qa = pipeline("question-answering", model=model, tokenizer=tokenizer)
    qa(question="Who?", context="...")            # {"answer", "score", "start", "end"}
    qa(question="Who?", context="...", top_k=3)   # a list of the 3 best
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from transformers import AutoModelForQuestionAnswering
from transformers.pipelines.base import ChunkPipeline

from .data.qa_spans import best_spans, default_max_answer_length, tokenize_qa_windows

__all__ = ["QuestionAnsweringPipeline", "register_qa_pipeline"]

TASK = "question-answering"


class QuestionAnsweringPipeline(ChunkPipeline):
    """Extractive QA: `{"question", "context"}` -> `{"answer", "score", "start", "end"}` (`top_k` > 1: a list).

    Parameters (at construction or per call): `top_k` (1), `max_seq_len` (384 tokens per window), `doc_stride`
    (128), `max_answer_len` (tokens; 30, or 100 for hf_extras' byte tokenizer: `default_max_answer_length`),
    `n_best_size` (20 candidates per window before ranking). `score` is the softmax of the span scores over the
    n-best candidates.
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(
        self, top_k=None, max_seq_len=None, doc_stride=None, max_answer_len=None, n_best_size=None, **kwargs
    ):
        preprocess = {k: v for k, v in (("max_seq_len", max_seq_len), ("doc_stride", doc_stride)) if v is not None}
        postprocess = {
            k: v
            for k, v in (("top_k", top_k), ("max_answer_len", max_answer_len), ("n_best_size", n_best_size))
            if v is not None
        }
        if kwargs:
            raise TypeError(f"unexpected question-answering pipeline argument(s): {sorted(kwargs)}")
        return preprocess, {}, postprocess

    def __call__(self, *args, question=None, context=None, **kwargs):
        """`qa(question=..., context=...)`, `qa({"question": ..., "context": ...})` or a list of such dicts."""
        if args:
            if question is not None or context is not None:
                raise TypeError("pass either a {question, context} dict (or a list of them) or question=/context=")
            inputs = args[0]
        elif question is not None and context is not None:
            if isinstance(question, list) != isinstance(context, list):
                raise TypeError("question and context must both be strings or both be lists of the same length")
            inputs = (
                [{"question": q, "context": c} for q, c in zip(question, context, strict=True)]
                if isinstance(question, list)
                else {"question": question, "context": context}
            )
        else:
            raise TypeError("the question-answering pipeline needs question= and context=")
        return super().__call__(inputs, **kwargs)

    def preprocess(self, example: dict[str, str], max_seq_len: int = 384, doc_stride: int = 128):
        if not isinstance(example, dict) or not {"question", "context"} <= example.keys():
            raise TypeError(f"expected a dict with 'question' and 'context', got {type(example).__name__}")
        if not example["context"]:
            raise ValueError("the context is empty: there is nothing to extract an answer from")
        encoding = tokenize_qa_windows(
            self.tokenizer, [example["question"]], [example["context"]], max_length=max_seq_len, doc_stride=doc_stride
        )
        names = [n for n in self.tokenizer.model_input_names if n in encoding]
        windows = len(encoding["input_ids"])
        for i in range(windows):
            yield {
                **{name: torch.tensor([encoding[name][i]]) for name in names},
                "offsets": encoding["offset_mapping"][i],
                "context": example["context"],
                "is_last": i == windows - 1,
            }

    def _forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        extra = {key: inputs.pop(key) for key in ("offsets", "context", "is_last")}
        outputs = self.model(**inputs)
        return {"start_logits": outputs.start_logits, "end_logits": outputs.end_logits, **extra}

    @cached_property
    def _default_max_answer_len(self) -> int:  # once per pipeline: it compares the tokenizer's vocabulary
        return default_max_answer_length(self.tokenizer)

    def postprocess(
        self, outputs: list[dict[str, Any]], top_k: int = 1, max_answer_len: int | None = None, n_best_size: int = 20
    ):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if max_answer_len is None:
            max_answer_len = self._default_max_answer_len
        spans = best_spans(
            outputs[0]["context"],
            [o["offsets"] for o in outputs],
            [o["start_logits"][0].float().numpy() for o in outputs],
            [o["end_logits"][0].float().numpy() for o in outputs],
            n_best_size=max(n_best_size, top_k),
            max_answer_length=max_answer_len,
        )
        if not spans:  # no window had a context token (e.g. the question filled it)
            spans = [{"answer": "", "score": 0.0, "start": 0, "end": 0}]
        return spans[0] if top_k == 1 else spans[:top_k]


def register_qa_pipeline() -> None:
    """Make `pipeline("question-answering", ...)` build `QuestionAnsweringPipeline` (idempotent)."""
    from transformers.pipelines import PIPELINE_REGISTRY, REMOVED_TASKS

    REMOVED_TASKS.pop(TASK, None)  # checked before the registry: a registered task listed here still raises
    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is not QuestionAnsweringPipeline:
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=QuestionAnsweringPipeline, pt_model=AutoModelForQuestionAnswering, type="text"
        )
