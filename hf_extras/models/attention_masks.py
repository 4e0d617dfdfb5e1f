"""The packed-documents and padding parts of softmax attention masks (DyT, the attention blocks of hybrids, seq2seq
cross-attention), as mask functions for transformers' masking utilities (``and_mask_function``).

The boundaries come from ``packing.packed_document_starts``; the block-diagonal part is transformers' own
``packed_sequence_mask_function`` on the tokens' document indices.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.masking_utils import packed_sequence_mask_function

from .packing import document_ids


def mask_with_cached_tokens(padding_mask, cache, new_tokens: int):
    """A 2-D padding mask over the cached and the new tokens. A mask that covers only the new tokens gets ones for
    the cached ones (the KV cache does not keep the padding mask), so a left-padded batch must pass the whole mask, as
    generate() does."""
    if padding_mask is None or cache is None:
        return padding_mask
    missing = cache.get_seq_length() + new_tokens - padding_mask.shape[1]
    if missing <= 0:
        return padding_mask
    return torch.cat([padding_mask.new_ones(padding_mask.shape[0], missing), padding_mask], dim=1)


def attention_document_mask_function(document_starts: torch.Tensor | None, cache) -> Callable | None:
    """The packed-documents part of a self-attention mask, for a forward with or without a KV cache.

    With boundaries: block-diagonal (each query sees keys of its own document; indices are absolute, cached tokens
    first and in the row's first document), and a cache remembers where each row's last document starts
    (``cache.document_start``), so later one-token steps of ``generate()`` after a packed prompt attend to that
    document only, as a recurrent state does after its reset. Without boundaries: that remembered start, if any,
    else None.
    """
    past_length = cache.get_seq_length() if cache is not None else 0
    if document_starts is not None:
        if cache is not None:
            batch, length = document_starts.shape
            columns = torch.arange(length, device=document_starts.device)
            last = (document_starts.long() * columns).amax(dim=1) + past_length
            previous = getattr(cache, "document_start", None)
            if previous is None:
                previous = torch.zeros(batch, dtype=torch.long, device=document_starts.device)
            cache.document_start = torch.where(document_starts.any(dim=1), last, previous)
        return packed_sequence_mask_function(document_ids(document_starts, past_length))
    start = getattr(cache, "document_start", None) if cache is not None else None
    if start is None:
        return None

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx >= start[batch_idx]

    return inner


def cross_document_mask_function(query_starts: torch.Tensor | None, key_starts: torch.Tensor | None) -> Callable | None:
    """Cross-attention of packed seq2seq pairs: decoder document ``i`` sees encoder document ``i`` only (both rows
    hold the same number of documents, in order). None unless both sides are packed; raises if only one is."""
    if query_starts is None and key_starts is None:
        return None
    if query_starts is None or key_starts is None:
        side = "decoder" if query_starts is None else "encoder"
        raise ValueError(
            f"packed seq2seq needs boundaries on both sides: the {side} input has none. Pass position ids that restart "
            "at 0 for each pair in both the source (`position_ids`) and the target (`decoder_position_ids`)."
        )
    q_ids, k_ids = document_ids(query_starts), document_ids(key_starts)

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return q_ids[batch_idx, q_idx] == k_ids[batch_idx, kv_idx]

    return inner
