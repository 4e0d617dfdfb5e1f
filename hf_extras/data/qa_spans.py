"""Extractive-QA span handling shared by the `question_answering` recipe and the question-answering pipeline.

- `tokenize_qa_windows`: question + context pairs tokenised with character offsets; a context longer than
  `max_length` becomes several windows that overlap by `doc_stride` tokens (the fast tokenizer's
  `return_overflowing_tokens`). Offsets of tokens outside the context are set to `None`, so only context tokens can
  be an answer.
- `answer_token_positions`: gold character spans -> start/end token indices per window; a window that does not
  contain the whole answer points both at the CLS (first) position, as transformers' QA examples do.
- `best_spans`: n-best post-processing of start/end logits over all windows of one example back to context text
  with character offsets and a probability score.

A fast tokenizer is required (offsets and `sequence_ids`); `hf_extras.build_byte_tokenizer()` is one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transformers import BatchEncoding, PreTrainedTokenizerBase

from .tokenizer import is_byte_tokenizer

__all__ = [
    "answer_token_positions", "best_spans", "default_max_answer_length", "tokenize_qa_windows", "window_offsets",
]  # fmt: skip

SUBWORD_MAX_ANSWER_LENGTH = 30  # transformers' QA examples: ~20 words of a subword vocabulary
BYTE_MAX_ANSWER_LENGTH = 100  # the same answers in bytes: keeps 99.8% of the offline default's, 100% of SQuAD dev's


def default_max_answer_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest answer, in tokens, that decoding considers when none is given.

    30 tokens is the ecosystem's default for subword tokenizers; hf_extras' byte tokenizer spends a token per byte,
    so 30 would rule out 46% of the offline default's answers and 6% of SQuAD v1.1 dev's (measured): it gets 100.
    """
    return BYTE_MAX_ANSWER_LENGTH if is_byte_tokenizer(tokenizer) else SUBWORD_MAX_ANSWER_LENGTH


def _check_fast(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"extractive QA needs a fast tokenizer (character offsets, overflowing windows); "
            f"{type(tokenizer).__name__} is slow. Use hf_extras.build_byte_tokenizer() or a *TokenizerFast."
        )


def tokenize_qa_windows(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    contexts: Sequence[str],
    max_length: int = 384,
    doc_stride: int = 128,
    padding: bool | str = False,
) -> BatchEncoding:
    """Tokenise (question, context) pairs into windows of at most `max_length` tokens.

    Returns the tokenizer's encoding with `overflow_to_sample_mapping` (window -> example index) and
    `offset_mapping` where every token outside the context is `None` (see `window_offsets`). The question comes
    first unless the tokenizer pads on the left. `doc_stride` tokens of context are repeated between consecutive
    windows; a question too long to leave more than that in a window is shortened (`_fit_questions`).
    """
    _check_fast(tokenizer)
    if doc_stride < 0 or doc_stride >= max_length:
        raise ValueError(f"doc_stride must be in [0, max_length), got doc_stride={doc_stride}, max_length={max_length}")
    question_first = tokenizer.padding_side == "right"
    first, second = (
        (_fit_questions(tokenizer, questions, max_length, doc_stride), contexts)
        if question_first
        else (contexts, _fit_questions(tokenizer, questions, max_length, doc_stride))
    )
    encoding = tokenizer(
        list(first),
        list(second),
        truncation="only_second" if question_first else "only_first",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=padding,
    )
    context_index = 1 if question_first else 0
    encoding["offset_mapping"] = [
        window_offsets(encoding["offset_mapping"][i], encoding.sequence_ids(i), context_index)
        for i in range(len(encoding["input_ids"]))
    ]
    return encoding


def _fit_questions(
    tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], max_length: int, doc_stride: int
) -> list[str]:
    """Questions without leading spaces, each cut to leave more than `doc_stride` context tokens in a window.

    The fast tokenizer cannot stride a window whose question leaves no more room than the stride (it panics), so an
    over-long question is shortened to its first `max_length - specials - doc_stride - 1` tokens.
    """
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - doc_stride - 1
    if room < 1:
        raise ValueError(
            f"max_length={max_length} leaves no room for a question next to doc_stride={doc_stride} context tokens; "
            "raise max_length or lower doc_stride"
        )
    questions = [q.lstrip() for q in questions]  # leading spaces only waste window room (SQuAD has such questions)
    encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    return [
        q if len(ids) <= room else q[: offsets[room - 1][1]]
        for q, ids, offsets in zip(questions, encoded["input_ids"], encoded["offset_mapping"])
    ]


def window_offsets(offsets, sequence_ids, context_index: int) -> list[tuple[int, int] | None]:
    """Character offsets of one window with `None` for every token that is not part of the context."""
    return [tuple(o) if s == context_index else None for o, s in zip(offsets, sequence_ids)]


def _cls_index(input_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> int:
    cls_id = tokenizer.cls_token_id
    if cls_id is not None and cls_id in input_ids:
        return list(input_ids).index(cls_id)
    return 0


def answer_token_positions(
    encoding: BatchEncoding,
    tokenizer: PreTrainedTokenizerBase,
    answer_starts: Sequence[int],
    answer_texts: Sequence[str],
) -> tuple[list[int], list[int]]:
    """Start and end token index of each window's answer (`answer_starts`/`answer_texts` are per example).

    The answer is the character span `[answer_start, answer_start + len(text))` of the context. A window that holds
    the whole span gets its first and last token; any other window gets the CLS position for both.
    """
    starts, ends = [], []
    for window, example in enumerate(encoding["overflow_to_sample_mapping"]):
        offsets = encoding["offset_mapping"][window]
        char_start = answer_starts[example]
        char_end = char_start + len(answer_texts[example])
        context = np.array([o is not None for o in offsets])
        token_start = np.array([o[0] if o is not None else -1 for o in offsets])
        token_end = np.array([o[1] if o is not None else -1 for o in offsets])
        first, last = np.flatnonzero(context)[[0, -1]] if context.any() else (0, -1)
        if not context.any() or token_start[first] > char_start or token_end[last] < char_end:
            cls = _cls_index(encoding["input_ids"][window], tokenizer)
            starts.append(cls)
            ends.append(cls)
            continue
        # first context token ending after the answer starts; last context token starting before it ends
        starts.append(int(np.flatnonzero(context & (token_end > char_start))[0]))
        ends.append(int(np.flatnonzero(context & (token_start < char_end))[-1]))
    return starts, ends


def best_spans(
    context: str,
    offsets: Sequence[Sequence[tuple[int, int] | None]],
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> list[dict]:
    """The `n_best_size` best answer spans of one example over all its windows, best first.

    For each window, every (start, end) token pair inside the context with `start <= end < start +
    max_answer_length` is scored `start_logit + end_logit`; the best `n_best_size` over all windows are returned as
    `{"answer", "score", "start", "end"}` with character offsets into `context` and `score` the softmax of the
    span scores over the returned candidates (so they sum to 1). Returns `[]` when no window has a valid span.
    """
    if n_best_size < 1 or max_answer_length < 1:
        raise ValueError(f"n_best_size and max_answer_length must be >= 1, got {n_best_size}, {max_answer_length}")
    candidates: list[tuple[float, int, int]] = []
    for window_offsets_, starts, ends in zip(offsets, start_logits, end_logits):
        n = len(window_offsets_)
        starts, ends = np.asarray(starts, dtype=np.float64)[:n], np.asarray(ends, dtype=np.float64)[:n]
        valid = np.array([o is not None for o in window_offsets_])
        span = np.arange(n)[None, :] - np.arange(n)[:, None]  # end - start
        allowed = valid[:, None] & valid[None, :] & (span >= 0) & (span < max_answer_length)
        scores = np.where(allowed, starts[:, None] + ends[None, :], -np.inf)
        k = min(n_best_size, int(allowed.sum()))
        if k == 0:
            continue
        flat = np.argpartition(scores.ravel(), -k)[-k:]
        for index in flat:
            i, j = divmod(int(index), n)
            candidates.append((float(scores[i, j]), window_offsets_[i][0], window_offsets_[j][1]))
    if not candidates:
        return []
    # the same character span can come from two overlapping windows: keep its best score
    best: dict[tuple[int, int], float] = {}
    for score, start, end in candidates:
        if score > best.get((start, end), -np.inf):
            best[(start, end)] = score
    ranked = sorted(best.items(), key=lambda item: -item[1])[:n_best_size]
    logits = np.array([score for _, score in ranked])
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    return [
        {"answer": context[start:end], "score": float(p), "start": int(start), "end": int(end)}
        for ((start, end), _), p in zip(ranked, probabilities)
    ]
