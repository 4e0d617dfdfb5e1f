"""Exact softmax attention over a short window of recent tokens, the local half of a linear mixer with
`attention_window` set (LoLCATs' sliding window inside each linearized layer, Zhang et al. 2024).

A token attends to itself and the `window - 1` real tokens before it (causal) or to every real token less than
`window` real tokens away (bidirectional), never across a packed document's boundary and never to a pad. Counting
real tokens rather than positions makes pads invisible wherever they sit, as they are to the linear state. Cost and
cache are linear and bounded: `O(T * window)` per layer in training (blocks of `window` queries against `2 * window`
keys, matmul-shaped), and a decoding step reads a fixed tail of the last `window - 1` keys and values.

The tail `(keys, values, valid)` holds the row's last `window - 1` real tokens in order, right-aligned, `valid`
False in front when fewer were seen; like the conv tail it belongs to the row's first document of the next chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import document_ids, has_interior_pads

# the cached tail: keys (B, H, W-1, Dk), values (B, H, W-1, Dv), valid (B, W-1)
WindowTail = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def local_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    bidirectional: bool = False,
    padding_mask: torch.Tensor | None = None,
    document_starts: torch.Tensor | None = None,
    tail: WindowTail | None = None,
    keep_tail: bool = False,
    mode: str = "auto",
) -> tuple[torch.Tensor, WindowTail | None]:
    """`softmax(q k^T)` over the window, times `v`; `q, k` `(B, H, T, Dk)` (`k` already scaled), `v` `(B, H, T, Dv)`.

    `padding_mask` `(B, T)` (1 = real), `document_starts` `(B, T)` bool (see `packing.py`), `tail` the previous
    chunk's (`None` at a sequence's start). `mode`: `"blocked"` (the training form), `"dense"` (every query against
    every key under the window mask: the reference, and the cheaper form for a few new tokens) or `"auto"`.
    Returns the output `(B, H, T, Dv)` (zeros at pads) and, when `keep_tail`, the new tail.
    """
    if window < 2:
        raise ValueError(f"`window` must be >= 2, got {window}.")
    if bidirectional and (tail is not None or keep_tail):
        raise ValueError("A bidirectional window attention has no cache: pass tail=None and keep_tail=False.")
    batch, _, seq_len, _ = q.shape
    past = 0
    valid = padding_mask.bool() if padding_mask is not None else None
    if tail is not None:  # the cached tokens go in front, as a prefix of keys and values only
        tail_k, tail_v, tail_valid = tail
        past = tail_k.shape[2]
        k, v = torch.cat([tail_k.to(k.dtype), k], dim=2), torch.cat([tail_v.to(v.dtype), v], dim=2)
        new_valid = valid if valid is not None else tail_valid.new_ones(batch, seq_len)
        valid = torch.cat([tail_valid.bool(), new_valid], dim=1)
    docs = document_ids(document_starts, past) if document_starts is not None else None
    if mode == "auto":
        mode = "dense" if seq_len <= window else "blocked"
    if mode == "dense":
        out = _dense(q, k, v, window, bidirectional, valid, docs, past)
    elif mode == "blocked":
        out = _blocked_over_real_tokens(q, k, v, window, bidirectional, valid, docs, past)
    else:
        raise ValueError(f"Unknown window attention mode {mode!r}: use 'auto', 'blocked' or 'dense'.")
    if padding_mask is not None:
        out = out * padding_mask[:, None, :, None].to(out.dtype)
    if not keep_tail:
        return out, None
    if past and seq_len == 1 and docs is None:  # a decoding step: the token joins the tail if it is real
        return out, _shift_in(tail, k[:, :, -1:], v[:, :, -1:], valid[:, -1])
    return out, _last_real_tokens(k, v, valid, docs, window - 1)


def _shift_in(tail: WindowTail, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor) -> WindowTail:
    """The tail after one token (`k`, `v` `(B, H, 1, D)`; `real` `(B,)`): shifted by it where it is real, else kept."""
    tail_k, tail_v, tail_valid = tail
    keep = real[:, None, None, None]
    return (
        torch.where(keep, torch.cat([tail_k[:, :, 1:], k.to(tail_k.dtype)], dim=2), tail_k),
        torch.where(keep, torch.cat([tail_v[:, :, 1:], v.to(tail_v.dtype)], dim=2), tail_v),
        torch.where(real[:, None], torch.cat([tail_valid[:, 1:], real[:, None]], dim=1), tail_valid),
    )


def window_attention_with_cache(
    q, k, v, window: int, cache, layer_idx: int, *, bidirectional, padding_mask, document_starts
) -> torch.Tensor:
    """`local_softmax_attention` for a mixer: reads the layer's tail from a `RecurrentCache` and writes the new one
    (`cache=None`: no tail, as in training)."""
    out, tail = local_softmax_attention(
        q,
        k,
        v,
        window,
        bidirectional=bidirectional,
        padding_mask=padding_mask,
        document_starts=document_starts,
        tail=cache.read_window(layer_idx) if cache is not None else None,
        keep_tail=cache is not None,
    )
    if cache is not None:
        cache.write_window(layer_idx, tail)
    return out


def _window_mask(q_rank, k_rank, window, bidirectional, k_valid, q_doc, k_doc, q_index, k_index) -> torch.Tensor:
    """`(B, 1, Tq, Tk)` bool: which key each query may read; ranks count real tokens, indices order causality."""
    distance = q_rank[:, :, None] - k_rank[:, None, :]
    if bidirectional:
        allowed = distance.abs() < window
    else:
        allowed = (distance < window) & (k_index[None, None, :] <= q_index[None, :, None])
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, :]
    if k_doc is not None:
        allowed = allowed & (q_doc[:, :, None] == k_doc[:, None, :])
    return allowed[:, None]


def _softmax_read(scores: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor, equation: str) -> torch.Tensor:
    """Masked softmax in at least float32 (as transformers' eager attention), then the weighted values."""
    dtype = torch.promote_types(scores.dtype, torch.float32)
    scores = scores.to(dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.einsum(equation, probs, v)


def _dense(q, k, v, window, bidirectional, valid, docs, past):
    """Every query against every key (the tail's included) under the window mask: `O(T * (past + T))`."""
    total = k.shape[2]
    index = torch.arange(total, device=q.device)
    if valid is None:
        rank = index[None].expand(q.shape[0], -1)
    else:
        rank = torch.cumsum(valid.to(torch.int32), dim=1)
    q_docs = docs[:, past:] if docs is not None else None
    allowed = _window_mask(rank[:, past:], rank, window, bidirectional, valid, q_docs, docs, index[past:], index)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k)
    return _softmax_read(scores, allowed, v, "bhqk,bhkd->bhqd")


def _blocked_over_real_tokens(q, k, v, window, bidirectional, valid, docs, past):
    """The blocked form where positions may stand for real-token ranks: as is when no pad sits between real tokens
    (pads only before or after them), else on the real tokens moved, in order, to the front of each row (a stable
    sort: no loop, no host sync) and moved back."""
    if valid is None or not has_interior_pads(valid):
        return _blocked(q, k, v, window, bidirectional, valid, docs, past)
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # real tokens first, in order
    total, seq_len = k.shape[2], q.shape[2]

    def gather(x, idx):
        return x.gather(2, idx[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))

    # queries are the keys' last `seq_len` entries; a tail's queries are computed too and dropped below
    q_full = torch.cat([q.new_zeros(*q.shape[:2], past, q.shape[-1]), q], dim=2) if past else q
    compact = _blocked(
        gather(q_full, order),
        gather(k, order),
        gather(v, order),
        window,
        bidirectional,
        valid.gather(1, order),
        docs.gather(1, order) if docs is not None else None,
        0,
    )
    inverse = torch.argsort(order, dim=1)[:, total - seq_len :]
    return gather(compact, inverse)


def _blocked(q, k, v, window, bidirectional, valid, docs, past):
    """Queries in blocks of `window`, each against the `2 * window` keys (`3 * window` bidirectional) that can hold
    its window: `O(T * window)`. Positions stand for ranks here (no pad between real tokens)."""
    batch, heads, seq_len, dk = q.shape
    total = k.shape[2]
    blocks = -(-seq_len // window)
    span = 3 if bidirectional else 2
    # query block b holds queries b*W .. b*W + W-1; its span of keys starts `lead` tokens before its first query
    lead = window
    right = blocks * window - seq_len + (window if bidirectional else 0)
    start = past - lead  # index in k of the first key of block 0's span (negative: zero padding in front)
    k_ext = F.pad(k, (0, 0, max(0, -start), right))[:, :, max(0, start) :]
    v_ext = F.pad(v, (0, 0, max(0, -start), right))[:, :, max(0, start) :]
    key_valid = torch.ones(batch, total, dtype=torch.bool, device=q.device) if valid is None else valid
    valid_ext = F.pad(key_valid, (max(0, -start), right))[:, max(0, start) :]
    q_blocks = F.pad(q, (0, 0, 0, blocks * window - seq_len)).view(batch, heads, blocks, window, dk)
    k_blocks = k_ext.unfold(2, span * window, window).transpose(-1, -2)  # (B, H, blocks, span * W, Dk)
    v_blocks = v_ext.unfold(2, span * window, window).transpose(-1, -2)
    allowed = valid_ext.unfold(1, span * window, window)[:, :, None, :]  # (B, blocks, 1, span * W)
    a = torch.arange(window, device=q.device)[:, None]
    c = torch.arange(span * window, device=q.device)[None, :]
    distance = lead + a - c  # query a of a block to key c of its span, in tokens
    band = (distance.abs() < window) if bidirectional else (distance >= 0) & (distance < window)
    allowed = allowed & band
    if docs is not None:
        q_docs = F.pad(docs[:, past:], (0, blocks * window - seq_len), value=-1).view(batch, blocks, window)
        k_docs = F.pad(docs, (max(0, -start), right), value=-1)[:, max(0, start) :].unfold(1, span * window, window)
        allowed = allowed & (q_docs[..., :, None] == k_docs[..., None, :])
    scores = torch.einsum("bhnqd,bhnkd->bhnqk", q_blocks, k_blocks)
    out = _softmax_read(scores, allowed[:, None], v_blocks, "bhnqk,bhnkd->bhnqd")
    return out.reshape(batch, heads, blocks * window, -1)[:, :, :seq_len]


def _last_real_tokens(k, v, valid, docs, width: int) -> WindowTail:
    """The tail for the next chunk: the last `width` real tokens of the row's last document, right-aligned. A stable
    sort of the keep mask finds them (no loop, no host sync); only those `width` keys and values are gathered."""
    batch, heads, total, _ = k.shape
    keep = torch.ones(batch, total, dtype=torch.bool, device=k.device) if valid is None else valid
    if docs is not None:
        keep = keep & (docs == docs[:, -1:])
    if total < width:  # fewer tokens than the tail holds: invalid zeros in front
        grow = width - total
        k, v = F.pad(k, (0, 0, grow, 0)), F.pad(v, (0, 0, grow, 0))
        keep = F.pad(keep, (grow, 0))
    last = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, -width:]  # kept entries sort last, in order
    kept = keep.gather(1, last)

    def pick(x):
        return x.gather(2, last[:, None, :, None].expand(-1, heads, -1, x.shape[-1])) * kept[:, None, :, None]

    return pick(k), pick(v), kept
