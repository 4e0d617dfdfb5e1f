"""Documents into language-model training rows: packed blocks with document boundaries, plain blocks, or one row each.

Three ways to turn tokenised documents (each followed by ``eos``, so the model learns where one ends) into rows:

* ``documents`` (default): the eos-separated stream cut into full ``block_size`` blocks, as ``concat``, plus
  ``position_ids`` that restart at 0 at each document's first token. That is transformers' padding-free convention
  (``DataCollatorWithFlattening``): hf_extras' models read a restart as a document boundary and keep the documents
  apart (the state, conv window and attention reset there), so no document sees the previous one. A document that
  crosses a block end continues in the next block and keeps counting there (no restart at column 0: it is not a
  new document). Rows have one length, so batching is a plain stack and no compute goes to padding.
* ``concat``: the same blocks without ``position_ids`` (documents separated by eos only; the model reads across them).
* ``pad``: each document (with its eos, cut to ``block_size``) is its own row; the collator pads per batch.

This module turns token arrays into rows (numpy, no Python loop over tokens); which tokens are training targets is
the collator's business (``hf_extras.tasks.causal_lm.LanguageModelingCollator``). Not to be confused with
``hf_extras.models.packing``, which reads the boundaries back inside the model.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

__all__ = ["Packing", "PACKING_MODES", "check_packing", "pack_documents"]

Packing = Literal["documents", "concat", "pad"]
PACKING_MODES: tuple[str, ...] = get_args(Packing)


def check_packing(packing: str) -> None:
    """ValueError naming the field and its choices for an unknown packing mode."""
    if packing not in PACKING_MODES:
        raise ValueError(f"packing must be one of {', '.join(PACKING_MODES)}; got {packing!r}")


def pack_documents(
    documents: list[np.ndarray], eos_id: int, block_size: int, packing: Packing = "documents"
) -> dict[str, np.ndarray | list[np.ndarray]]:
    """Rows of ``documents`` (1-d int token arrays, without eos), each document followed by ``eos_id``.

    ``documents``/``concat``: ``input_ids`` ``(n_blocks, block_size)`` int64 cut from the eos-separated stream (the
    remainder under ``block_size`` tokens is dropped, as transformers' ``run_clm`` does); ``concat`` adds
    ``attention_mask`` (all ones, as before packing had modes), ``documents`` adds ``position_ids`` (restarting at 0
    at each document start, counting on across block ends). ``pad``: one ``input_ids``/``attention_mask`` row per
    document, cut to ``block_size`` tokens (ragged lists of arrays).
    """
    check_packing(packing)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    eos = np.array([eos_id], dtype=np.int64)
    if packing == "pad":
        rows = [np.concatenate([np.asarray(doc, dtype=np.int64), eos])[:block_size] for doc in documents]
        return {"input_ids": rows, "attention_mask": [np.ones_like(row) for row in rows]}
    pieces = [part for doc in documents for part in (np.asarray(doc, dtype=np.int64), eos)]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n = len(stream) // block_size * block_size
    blocks = stream[:n].reshape(-1, block_size)
    if packing == "concat":
        return {"input_ids": blocks, "attention_mask": np.ones_like(blocks)}
    lengths = np.array([len(doc) + 1 for doc in documents], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    positions = np.arange(len(stream), dtype=np.int64) - np.repeat(starts, lengths)
    return {"input_ids": blocks, "position_ids": positions[:n].reshape(-1, block_size)}
