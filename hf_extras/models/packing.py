"""Document boundaries of packed (padding-free) batches, as the kernels take them.

transformers' padding-free batches (``DataCollatorWithFlattening``) put several documents in one row and mark them
in one of three ways; each helper here turns one into a ``(B, T)`` bool mask, True at the first token of each
document, which ``retention_ops`` and ``scan_ops`` take as ``reset`` (a zero decay there: the state is dropped, so
each document gives exactly its outputs alone):

* ``position_ids`` restarting at ``position_ids_start`` (0 by default) for every document -> ``document_starts``;
* ``seq_idx`` (the document index of each token) -> ``document_starts_from_seq_idx``;
* ``cu_seq_lens_q`` (cumulative lengths ``[0, n_1, n_1 + n_2, ...]`` of a ``(1, T)`` row) ->
  ``document_starts_from_cu_seqlens``.

``boundaries_from_kwargs`` picks whichever a forward call received. Everything is tensor arithmetic on the inputs'
device: no ``.item()``, ``.tolist()`` or data-dependent shapes, so nothing syncs with the host and it compiles.

Why ``position_ids == start`` and not transformers' ``find_packed_sequence_indices`` (a jump of the position other
than +1): that one syncs (it returns None for unpacked rows) and calls every jump a new document, so the pads of a
right-padded row (position 1 in ``generate``) would reset the state before a cached continuation. Here only a
restart at the first position is a boundary; pads need none, since a pad (``k = v = 0``, log decay 0, ``dt = 0``)
never changes the state (``log_decay_with_padding`` sets the log decay).

This file is copied into saved checkpoints: it imports only torch.
"""

import torch
from torch import Tensor

__all__ = [
    "document_starts",
    "document_starts_from_seq_idx",
    "document_starts_from_cu_seqlens",
    "boundaries_from_kwargs",
    "log_decay_with_boundaries",
    "log_decay_with_padding",
    "packed_document_starts",
    "document_ids",
    "padding_touches_state",
    "has_interior_pads",
    "readable_on_host",
]


def document_starts(position_ids: Tensor, position_ids_start: int = 0) -> Tensor:
    """``(B, T)`` bool, True where ``position_ids`` restart at ``position_ids_start`` (a document's first token).

    A row that continues from a cache (positions not starting at ``position_ids_start``) gets no boundary at
    token 0, so the carried state is kept.
    """
    if not isinstance(position_ids, Tensor) or position_ids.dim() != 2:
        raise ValueError(f"position_ids must be a (batch, T) tensor, got {_describe(position_ids)}")
    return position_ids == position_ids_start


def document_starts_from_seq_idx(seq_idx: Tensor) -> Tensor:
    """``(B, T)`` bool from ``seq_idx`` (the document index of each token): True at token 0 and wherever the
    index changes."""
    if not isinstance(seq_idx, Tensor) or seq_idx.dim() != 2:
        raise ValueError(f"seq_idx must be a (batch, T) tensor, got {_describe(seq_idx)}")
    first = torch.ones_like(seq_idx[:, :1], dtype=torch.bool)
    return torch.cat([first, seq_idx[:, 1:] != seq_idx[:, :-1]], dim=1)


def document_starts_from_cu_seqlens(cu_seq_lens: Tensor, seq_len: int) -> Tensor:
    """``(1, seq_len)`` bool from FlashAttention's cumulative lengths ``[0, n_1, n_1 + n_2, ..., seq_len]``
    (the batch of a padding-free row is 1). Entries at or past ``seq_len`` (the end, empty documents) are
    ignored; no host sync."""
    if not isinstance(cu_seq_lens, Tensor) or cu_seq_lens.dim() != 1:
        raise ValueError(f"cu_seq_lens_q must be a 1-d tensor of cumulative lengths, got {_describe(cu_seq_lens)}")
    starts = torch.zeros(seq_len + 1, dtype=torch.bool, device=cu_seq_lens.device)
    starts = starts.index_fill(0, cu_seq_lens.long().clamp(0, seq_len), True)
    return starts[:seq_len].unsqueeze(0)


def boundaries_from_kwargs(
    batch_size: int,
    seq_len: int,
    position_ids: Tensor | None = None,
    seq_idx: Tensor | None = None,
    cu_seq_lens_q: Tensor | None = None,
    position_ids_start: int = 0,
) -> Tensor | None:
    """The ``(B, T)`` document-start mask from whichever marker a forward received (``cu_seq_lens_q``, then
    ``seq_idx``, then ``position_ids``), or None when there is none. Raises when its shape does not fit the
    input's ``(batch_size, seq_len)``.

    Plain (unpacked) ``position_ids`` give a mask that is True at token 0 only: harmless (no state before it), but
    any mask turns a fixed-decay (RetNet) kernel call into the per-token path, so callers that know a batch is not
    packed may skip it."""
    if cu_seq_lens_q is not None:
        if batch_size != 1:
            raise ValueError(
                f"cu_seq_lens_q describes one padding-free row (batch 1), but the input has batch {batch_size}; "
                "pass position_ids or seq_idx for a batch of packed rows"
            )
        starts = document_starts_from_cu_seqlens(cu_seq_lens_q, seq_len)
    elif seq_idx is not None:
        starts = document_starts_from_seq_idx(seq_idx)
    elif position_ids is not None:
        starts = document_starts(position_ids, position_ids_start)
    else:
        return None
    if starts.shape[1] != seq_len or starts.shape[0] not in (1, batch_size):
        raise ValueError(
            f"document boundaries have shape {tuple(starts.shape)}, expected (batch, T) = ({batch_size}, {seq_len}): "
            "position_ids / seq_idx must cover the same tokens as the input"
        )
    return starts.expand(batch_size, seq_len)


def log_decay_with_boundaries(log_decay: Tensor | None, reset: Tensor, num_heads: int | None = None) -> Tensor:
    """The log decay with ``-inf`` (a zero decay) at every ``reset`` token, for kernels that take boundaries only
    through the decay: ``(H,)`` or None become ``(B, H, T)``; ``(B, H, T)`` and ``(B, H, T, Dk)`` keep their
    shape. Causal use: bidirectional passes need ``reset`` itself (see ``retention_ops``)."""
    B, T = reset.shape
    if log_decay is None:
        if num_heads is None:
            raise ValueError("num_heads is needed to build a (B, H, T) log decay from no decay")
        log_decay = torch.zeros(num_heads, device=reset.device)
    if log_decay.dim() == 1:
        log_decay = log_decay.view(1, -1, 1).expand(B, log_decay.shape[0], T)
    r = reset.view(B, 1, T, *([1] * (log_decay.dim() - 3)))
    return log_decay.masked_fill(r, float("-inf"))


def log_decay_with_padding(log_decay: Tensor, attention_mask: Tensor) -> Tensor:
    """Log decay 0 (``a = 1``) at padded positions (``attention_mask`` 0), so a pad never changes the state
    (with ``k = v = 0`` there). A fixed ``(H,)`` decay becomes ``(B, H, T)``."""
    mask = attention_mask.bool()
    B, T = mask.shape
    if log_decay.dim() == 1:
        log_decay = log_decay.view(1, -1, 1).expand(B, log_decay.shape[0], T)
    pad = ~mask.view(B, 1, T, *([1] * (log_decay.dim() - 3)))
    return log_decay.masked_fill(pad, 0.0)


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def packed_document_starts(
    batch_size: int,
    seq_len: int,
    padding_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    seq_idx: Tensor | None = None,
    cu_seq_lens_q: Tensor | None = None,
) -> Tensor | None:
    """The ``(B, T)`` boundaries a backbone hands its mixers: True at the first token of every packed document after
    column 0, or None when the batch is not packed.

    Column 0 is never a boundary (there is no earlier document in the row; a cached state there is the caller's
    choice), and with a ``padding_mask`` (new tokens, 1 = real) a boundary needs a real token preceded by a real
    token: position ids restarting after left pads (what ``generate()`` writes) are no document start. On CPU outside
    ``torch.compile`` an all-False mask becomes None (the check costs no device sync there), so unpacked batches keep
    the fixed-decay kernels; on accelerators the mask is passed as is.
    """
    starts = boundaries_from_kwargs(batch_size, seq_len, position_ids, seq_idx, cu_seq_lens_q)
    if starts is None or seq_len < 2:
        return None
    interior = torch.zeros_like(starts)
    interior[:, 1:] = starts[:, 1:]
    if padding_mask is not None:
        real = padding_mask.bool()
        interior[:, 1:] &= real[:, 1:] & real[:, :-1]
    if readable_on_host(interior) and not bool(interior.any()):
        return None
    return interior


def document_ids(document_starts: Tensor, past_length: int = 0) -> Tensor:
    """``(B, past_length + T)`` int: the document index of every token of each row (cached tokens belong to the
    row's first document), the form transformers' masking utilities compare (``packed_sequence_mask_function``)."""
    ids = torch.cumsum(document_starts.to(torch.int32), dim=1)
    if past_length:
        ids = torch.cat([ids.new_zeros(ids.shape[0], past_length), ids], dim=1)
    return ids


def readable_on_host(tensor: Tensor) -> bool:
    """Whether a mask may be read back to choose a kernel path: on CPU outside ``torch.compile`` (no device sync, no
    graph break). Elsewhere callers take the path that is exact for every mask."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def _real_before_and_after(padding_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(real, seen_before, seen_after)`` int8 ``(B, T)``: the token is real; a real token is at or before it; at or
    after it."""
    real = padding_mask.bool().to(torch.int8)
    before = torch.cummax(real, dim=1).values
    after = torch.cummax(real.flip(1), dim=1).values.flip(1)
    return real, before, after


def has_interior_pads(padding_mask: Tensor) -> bool:
    """Whether some pad lies between two real tokens of a row (assumed True where the mask is not readable)."""
    if not readable_on_host(padding_mask):
        return True
    real, before, after = _real_before_and_after(padding_mask)
    return bool(((before & after) > real).any())


def padding_touches_state(log_decay: Tensor, attention_mask: Tensor, carried_state: bool = False) -> bool:
    """Whether the log decay must be zeroed at pads (``log_decay_with_padding``) for a pad to leave the state alone.

    Always for a per-token decay (the masking is free there) and when a state is carried in (a cache). A fixed
    ``(H,)`` decay (RetNet) otherwise keeps its faster kernel path when no pad follows a real token (no padding, or
    left padding only: the state before the first real token is zero, which a decay does not change); where the mask
    is not readable (``readable_on_host``) a fixed decay is made per token whenever a mask is given.
    """
    if log_decay.dim() > 1 or carried_state or not readable_on_host(attention_mask):
        return True
    real, before, _ = _real_before_and_after(attention_mask)
    return bool((before > real).any())
