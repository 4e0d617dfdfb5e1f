"""Decayed linear attention (RetNet / gated retention / GLA) as pure tensor functions.

Recurrence, per batch ``b`` and head ``h`` (``S`` is ``Dk x Dv``, the decay acts on the key dim)::

    S_t = diag(a_t) S_{t-1} + k_t^T v_t
    o_t = q_t S_t                                  (inclusive of token t)

The decay is given in log space, ``log_decay = log a <= 0``, as one of

* ``None``             -- no decay (plain linear attention),
* ``(H,)``             -- fixed per head (RetNet),
* ``(B, H, T)``        -- data dependent, one scalar per head and token (gated retention),
* ``(B, H, T, Dk)``    -- data dependent per key channel (GLA).

Three forms compute the same thing (to float tolerance) and all take / return the state:

* ``parallel``   -- whole-sequence ``T x T`` matrix; best for short inputs.
* ``chunkwise``  -- matmuls inside chunks, a recurrence across chunks; O(T), training default.
* ``recurrent``  -- one token at a time; the reference and the decoding step.

``grouped_decayed_linear_attention`` is the per-head-decay case with queries and keys shared by groups of heads and
a per-head key scale (Mamba-2's SSD: ``q = C``, ``k = dt * B``, ``v = x``), time-major; its chunkwise form
(``_GroupedChunkwise``, one autograd node with a hand-written backward) computes ``q k^T`` once per group and the
state products for all heads of a group as one matmul.

Document boundaries (packed rows): a boundary is a decay of zero, ``a_t = 0`` (log decay ``-inf``), at a
document's first token, so the state is reset there and each document gives exactly its outputs alone. Pass them
as ``reset`` (bool ``(B, T)``, True at each document's first token; ``packing.py`` builds it from transformers'
padding-free batches), or as ``-inf`` entries of a data-dependent ``log_decay`` (per key channel: ``-inf`` in
every channel of a token). A fixed ``(H,)`` decay (RetNet) with ``reset`` becomes a per-token one; without it the fixed
path is unchanged. A reset at token 0 discards ``initial_state``. Padding needs no boundary: a token with
``k = v = 0`` and log decay 0 (``a = 1``) leaves the state unchanged in every form.

Numerics: decay factors are computed in float32 (float64 for float64 inputs) from cumulative
sums of log decays *local to a chunk*, and only non-positive exponents are ever exponentiated,
so nothing overflows and underflow (decays -> 0 over long spans) is exact. Boundaries are kept
out of the sums: ``-inf`` (and every reset token's decay) is replaced by 0 before the cumsum,
and a within-chunk *segment index* (the number of resets so far in the chunk) multiplies every
decay factor by ``[segment_t == segment_s]``. So ``-inf - -inf`` never happens (no NaN forward
or backward), the masked factors are exact zeros, and factors within one document keep the
precision of the plain cumsum. (Clamping ``-inf`` to a large finite value instead would leave
that value in every later cumsum of the chunk, and ``b_t - b_s`` would lose ~1e-4 to
cancellation in float32.) The segment masks are elementwise on tensors the forms build anyway
(the ``(C, C)`` decay matrix, the chunk's decay vectors); the per-key form factorises them
through the sub-chunk reference token, so all forms stay matmul-shaped and compile without graph
breaks. Data-dependent decays always take this path (they may hold ``-inf``); a fixed or absent
decay takes it only when ``reset`` is given. Boundaries are per token, so the masks broadcast
over key channels (measured cost: a few percent of the kernel, NOTES_kernels.md). A per-key
``-inf`` in *some* channels of a token only is floored to ``_zero_log_decay`` (-120 in float32,
-800 in float64), whose exp is exactly 0: that channel's later factors in the same chunk then
carry the floor's rounding (~1e-5 relative in float32, ~1e-13 in float64). The carried state
is kept in that float dtype too; matmul operands are cast to the inputs' dtype, and outputs
to ``v``'s dtype. ``q`` is not scaled here (callers scale).

Bidirectional: the anti-causal pass sums ``s > t`` with decay ``prod_{r=t}^{s-1} a_r``, so a
document starting at ``r`` is cut off from the one before it by a zero decay at ``r - 1``;
``reset`` does that (the document's own first decay ``a_r`` is still used in that direction, as
alone). A ``-inf`` log decay is taken literally in both directions (``a_r = 0``), which does not
separate documents in the anti-causal pass: for bidirectional packed rows pass ``reset``.

This file is copied into saved checkpoints: it imports only torch and ``mixer_cpu_kernels`` (the compiled CPU kernels
of the grouped SSD, itself torch and the standard library only).
"""

import torch
from torch import Tensor

from .mixer_cpu_kernels import (
    kernels_apply,
    ssd_chunk_states,
    ssd_chunk_states_backward,
    ssd_intra,
    ssd_intra_backward,
    ssd_state_writes,
    ssd_state_writes_backward,
)

__all__ = [
    "decayed_linear_attention",
    "grouped_decayed_linear_attention",
    "parallel_retention",
    "chunkwise_retention",
    "recurrent_retention",
    "pick_mode",
    "MODES",
]

MODES = ("parallel", "chunkwise", "recurrent")

# Per-key-channel (GLA) decays: the chunk is capped at ``_PER_KEY_MAX_CHUNK`` tokens and split
# into sub-chunks of ``_SUB_CHUNK``: the diagonal sub-blocks materialise a (c, c, Dk) tensor per
# sub-chunk, the off-diagonal ones are matmuls. Measurements: benchmarks/results/NOTES_kernels.md.
_SUB_CHUNK = 4
_PER_KEY_MAX_CHUNK = 32

# ``pick_mode`` thresholds, measured on CPU (benchmarks/results/NOTES_kernels.md).
_PARALLEL_MAX_LEN = 128
_RECURRENT_MAX_LEN = 2  # with a state (decoding a few tokens at a time)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def backward_resets(reset: Tensor) -> Tensor:
    """The resets of the anti-causal pass, in forward time order: a document starting at r must not be seen from
    r - 1 and earlier, so that direction's state is dropped at r - 1 (``(B, T)`` bool; none at the last token)."""
    return torch.cat([reset[:, 1:], torch.zeros_like(reset[:, :1])], 1)


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype for decays and the carried state: float32, or float64 for float64 inputs (also used by scan_ops)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _zero_log_decay(fdt: torch.dtype) -> float:
    """A finite log decay whose exp, and that of anything smaller, is exactly 0 in ``fdt`` (float32 underflows
    below -103.3, float64 below -745.1)."""
    return -800.0 if fdt == torch.float64 else -120.0


def _check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor | None,
    initial_state: Tensor | None,
    chunk_size: int | None = None,
    reset: Tensor | None = None,
) -> None:
    """Validate shapes (no data inspection: keeps it compile-friendly)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, T, D), got {tuple(x.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the same shape as q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape (B, H, T, Dv) = {tuple(q.shape[:3])} + (Dv,), got {tuple(v.shape)}")
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if log_decay is not None:
        if not isinstance(log_decay, Tensor):
            raise ValueError(f"log_decay must be a Tensor or None, got {type(log_decay).__name__}")
        ok = (
            (log_decay.dim() == 1 and log_decay.shape == (H,))
            or (log_decay.dim() == 3 and log_decay.shape == (B, H, T))
            or (log_decay.dim() == 4 and log_decay.shape == (B, H, T, Dk))
        )
        if not ok:
            raise ValueError(
                f"log_decay must have shape (H,)={(H,)}, (B, H, T)={(B, H, T)} or "
                f"(B, H, T, Dk)={(B, H, T, Dk)}, got {tuple(log_decay.shape)}"
            )
    _check_state_reset_chunk(B, H, T, Dk, Dv, initial_state, chunk_size, reset)


def _check_state_reset_chunk(B, H, T, Dk, Dv, initial_state, chunk_size, reset) -> None:
    """The checks shared by ``_check`` and ``_check_grouped``: the initial state, the resets and the chunk size."""
    if initial_state is not None:
        if not isinstance(initial_state, Tensor) or initial_state.shape != (B, H, Dk, Dv):
            shape = tuple(initial_state.shape) if isinstance(initial_state, Tensor) else initial_state
            raise ValueError(f"initial_state must have shape (B, H, Dk, Dv) = {(B, H, Dk, Dv)}, got {shape}")
    if reset is not None and (
        not isinstance(reset, Tensor) or reset.dtype != torch.bool or tuple(reset.shape) != (B, T)
    ):
        got = f"{reset.dtype} {tuple(reset.shape)}" if isinstance(reset, Tensor) else type(reset).__name__
        raise ValueError(
            f"reset must be a bool Tensor of shape (B, T) = {(B, T)}, True at each document's first token "
            f"(see packing.document_starts), got {got}"
        )
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _prep(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, reset: Tensor | None):
    """Common dtypes, the log decay normalised to (b, H, T) or (b, H, T, Dk) in float dtype, and the resets.

    Returns (q, k, v, g, r, per_key, cdt, fdt). ``g`` is None for no decay and no reset; it is
    finite (``-inf`` entries are replaced by 0, or floored, see the module docstring). ``r`` is
    None or a bool tensor broadcastable to ``g`` ((b, h, T) or (b, h, T, 1), b in {1, B}, h in
    {1, H}), True where the decay is zero (``reset``, or ``-inf`` in ``log_decay``). A fixed (H,) decay (or no decay with
    resets) becomes a (1, H, T) expanded view (no copy), so it broadcasts.
    """
    cdt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    fdt = _float_dtype(cdt)
    B, H, T = q.shape[:3]
    g = r = None
    if log_decay is not None:
        g = log_decay.to(fdt)
        if g.dim() == 1:
            g = g.view(1, -1, 1).expand(1, H, T)
        elif g.dim() == 3:  # data dependent: -inf is a zero decay, kept out of the cumsums (see the module docstring)
            r = torch.isneginf(g)
            g = g.masked_fill(r, 0.0)
        else:  # per key: a token whose every channel is -inf is a reset; -inf in some channels only is floored
            r = torch.isneginf(g).all(-1, keepdim=True)
            g = g.masked_fill(r, 0.0).clamp(min=_zero_log_decay(fdt))
    elif reset is not None:
        g = torch.zeros((), dtype=fdt, device=q.device).expand(1, H, T)
    per_key = g is not None and g.dim() == 4
    if reset is not None:
        rv = reset.view(B, 1, T, 1) if per_key else reset.view(B, 1, T)
        r = rv if r is None else r | rv
    return q, k, v, g, r, per_key, cdt, fdt


def _causal_mask(n: int, strict: bool, device: torch.device) -> Tensor:
    return torch.tril(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=-1 if strict else 0)


def _masked_exp(x: Tensor, mask: Tensor) -> Tensor:
    """``exp(x)`` where ``mask`` else 0, never exponentiating a positive number.

    Same result as ``exp(x.masked_fill(~mask, -inf))`` (the masked-out entries are the
    positive differences b_t - b_s, s > t), but clamping to <= 0 and multiplying by the mask
    avoids exp(-inf), which is ~5x slower than a finite exp on x86 CPUs.
    """
    return torch.exp(x.clamp(max=0.0)) * mask


def _empty_result(q, v, initial_state, output_final_state, fdt):
    B, H, _, Dk = q.shape
    o = v.new_zeros(B, H, 0, v.shape[-1])
    if not output_final_state:
        return o, None
    if initial_state is None:
        return o, torch.zeros(B, H, Dk, v.shape[-1], dtype=fdt, device=q.device)
    return o, initial_state.to(fdt)


# --------------------------------------------------------------------------------------------
# recurrent
# --------------------------------------------------------------------------------------------


def _recurrent(q, k, v, log_decay, initial_state, output_final_state, strict, reset=None):
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    out_dtype = v.dtype
    q, k, v, g, r, per_key, cdt, fdt = _prep(q, k, v, log_decay, reset)
    if T == 0:
        return _empty_result(q, v, initial_state, output_final_state, fdt)
    q, k, v = q.to(fdt), k.to(fdt), v.to(fdt)
    a = None
    if g is not None:
        a = torch.exp(g)
        if r is not None:
            a = torch.where(r, 0.0, a)
        a = a.unsqueeze(-1) if per_key else a[..., None, None]  # (b,H,T,Dk,1) / (b,H,T,1,1)
    if initial_state is None:
        S = torch.zeros(B, H, Dk, Dv, dtype=fdt, device=q.device)
    else:
        S = initial_state.to(fdt)
    kv = k.unsqueeze(-1) * v.unsqueeze(-2) if T == 1 else None  # decode fast path
    outs = []
    for t in range(T):
        kv_t = kv[:, :, 0] if kv is not None else k[:, :, t, :, None] * v[:, :, t, None, :]
        if a is not None:
            S = S * a[:, :, t]
        if strict:
            outs.append(torch.matmul(q[:, :, t, None, :], S))
            S = S + kv_t
        else:
            S = S + kv_t
            outs.append(torch.matmul(q[:, :, t, None, :], S))
    o = outs[0] if T == 1 else torch.cat(outs, dim=2)
    return o.to(out_dtype), (S if output_final_state else None)


def recurrent_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor | None = None,
    *,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Token-by-token recurrence (the reference, and the decoding step). ``chunk_size`` is ignored.

    Computes in float32/float64 throughout. Returns ``(o, final_state or None)``. ``reset``: see
    ``decayed_linear_attention``.
    """
    _check(q, k, v, log_decay, initial_state, chunk_size, reset)
    return _recurrent(q, k, v, log_decay, initial_state, output_final_state, False, reset)


# --------------------------------------------------------------------------------------------
# parallel
# --------------------------------------------------------------------------------------------


def _parallel(q, k, v, log_decay, initial_state, output_final_state, strict, reset=None):
    # The whole sequence as one chunk: the full (T, T) score matrix, decays exp(b_t - b_s)
    # masked before exp; per-key decays build it from small sub-blocks (never a (T, T, Dk)
    # tensor). No state loop.
    T = q.shape[2]
    if log_decay is not None and log_decay.dim() == 4:
        C = -(-T // _SUB_CHUNK) * _SUB_CHUNK
    else:
        C = T
    return _chunkwise(q, k, v, log_decay, initial_state, output_final_state, strict, max(C, 1), reset)


def parallel_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor | None = None,
    *,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Whole-sequence ``T x T`` form (best for short inputs). ``chunk_size`` is ignored.

    Same arithmetic as one chunk of the chunkwise form spanning the whole input: cost and
    memory grow as T^2, so keep T short (see ``pick_mode``). ``reset``: see
    ``decayed_linear_attention``.
    """
    _check(q, k, v, log_decay, initial_state, chunk_size, reset)
    return _parallel(q, k, v, log_decay, initial_state, output_final_state, False, reset)


# --------------------------------------------------------------------------------------------
# chunkwise
# --------------------------------------------------------------------------------------------


def _sub_chunk(C: int) -> int:
    """Largest divisor of C that is <= _SUB_CHUNK."""
    for c in range(min(_SUB_CHUNK, C), 0, -1):
        if C % c == 0:
            return c
    return 1


def _intra_per_key(q, k, b, strict, seg=None):
    """Intra-chunk scores for per-key decays with secondary chunking (Yang et al. 2023, GLA).

    q, k, b: (B, H, N, C, Dk), b = within-chunk inclusive cumsum of log decay (non-increasing).
    Returns A: (B, H, N, C, C) in float dtype, A[t, s] = sum_k q_tk k_sk exp(b_tk - b_sk), s <= t.
    Off-diagonal sub-blocks (i > j) use the end of key sub-chunk j as reference, so both
    q * exp(b_t - b_ref) and k * exp(b_ref - b_s) have factors <= 1, then a matmul; diagonal
    sub-blocks build the small (c, c, Dk) pairwise tensor, masked before exp.

    ``seg`` (None or (b, h, N, C, 1) integer-valued floats, the within-chunk count of resets so far) zeroes
    pairs across a zero decay: [seg_t == seg_s]. Off-diagonal it factorises through the
    reference token (s <= ref < t and seg is non-decreasing, so seg_t == seg_s iff both equal
    seg_ref), one mask on each side of the matmul.
    """
    B, H, N, C, Dk = q.shape
    c = _sub_chunk(C)
    M = C // c
    fdt = b.dtype
    cdt = q.dtype
    qs = q.reshape(B, H, N, M, c, Dk)
    ks = k.reshape(B, H, N, M, c, Dk)
    bs = b.reshape(B, H, N, M, c, Dk)

    segs = None if seg is None else seg.reshape(*seg.shape[:3], M, c, seg.shape[-1])

    # diagonal sub-blocks: (..., M, c, c, Dk) pairwise decays
    diff = bs.unsqueeze(-2) - bs.unsqueeze(-3)  # [t, s] = b_t - b_s
    mask = _causal_mask(c, strict, q.device).unsqueeze(-1)
    if segs is not None:
        mask = mask & (segs.unsqueeze(-2) == segs.unsqueeze(-3))
    dec = _masked_exp(diff, mask)
    # elementwise + sum (einsum would lower this to a bmm over tiny K-vectors: much slower)
    A_diag = (qs.unsqueeze(-2) * dec * ks.unsqueeze(-3)).sum(-1)  # (B, H, N, M, c, c), float

    if M == 1:
        return A_diag.reshape(B, H, N, C, C)

    ii, jj = torch.tril_indices(M, M, offset=-1, device=q.device)  # pairs i > j
    b_ref = bs[..., -1, :]  # (B, H, N, M, Dk): end of each sub-chunk
    k_f = torch.exp(b_ref.unsqueeze(-2) - bs)  # (B, H, N, M, c, Dk), factors <= 1
    q_f = torch.exp(bs[:, :, :, ii] - b_ref[:, :, :, jj].unsqueeze(-2))
    if segs is not None:
        s_ref = segs[..., -1:, :]
        k_f = k_f * (segs == s_ref)
        q_f = q_f * (segs[:, :, :, ii] == s_ref[:, :, :, jj])
    k_t = (ks * k_f).to(cdt)
    q_t = (qs[:, :, :, ii] * q_f).to(cdt)
    A_off = torch.matmul(q_t, k_t[:, :, :, jj].transpose(-1, -2))  # (B, H, N, P, c, c)

    # assemble the (M x M) grid of (c x c) blocks; block dims first so index_put hits them
    A = torch.zeros(M, M, B, H, N, c, c, dtype=fdt, device=q.device)
    A = A.index_put((ii, jj), A_off.to(fdt).movedim(3, 0))
    ar = torch.arange(M, device=q.device)
    A = A.index_put((ar, ar), A_diag.movedim(3, 0))
    # (M_i, M_j, B, H, N, c_t, c_s) -> (B, H, N, M_i, c_t, M_j, c_s) -> (B, H, N, C, C)
    return A.permute(2, 3, 4, 0, 5, 1, 6).reshape(B, H, N, C, C)


def _chunkwise(q, k, v, log_decay, initial_state, output_final_state, strict, chunk_size, reset=None):
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    out_dtype = v.dtype
    q, k, v, g, r, per_key, cdt, fdt = _prep(q, k, v, log_decay, reset)
    if T == 0:
        return _empty_result(q, v, initial_state, output_final_state, fdt)
    # effective chunk: no point padding a short input up to a long chunk
    C = min(chunk_size, _PER_KEY_MAX_CHUNK, -(-T // _SUB_CHUNK) * _SUB_CHUNK) if per_key else min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    if pad:
        # zero q/k/v and log decay 0 (a = 1) in the pad: the state passes through unchanged
        q = torch.nn.functional.pad(q, (0, 0, 0, pad))
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
        if g is not None:
            g = torch.nn.functional.pad(g, (0, 0, 0, pad) if per_key else (0, pad))
    seg = None
    if r is not None:
        # within-chunk count of zero decays up to and including each token (see the module docstring)
        ri = r.to(fdt)  # counts are small integers, exact in float; float keeps every cumsum in fdt
        if pad:
            ri = torch.nn.functional.pad(ri, (0, 0, 0, pad) if per_key else (0, pad))
        if per_key:
            seg = torch.cumsum(ri.reshape(*ri.shape[:2], N, C, ri.shape[-1]), dim=-2)
        else:
            seg = torch.cumsum(ri.reshape(*ri.shape[:2], N, C), dim=-1)
    qc = q.reshape(B, H, N, C, Dk)
    kc = k.reshape(B, H, N, C, Dk)
    vc = v.reshape(B, H, N, C, Dv)
    use_state = initial_state is not None or output_final_state or N > 1

    # ---- intra-chunk (all chunks at once) and per-chunk state contributions U_n ----
    if g is None:
        A = torch.matmul(qc, kc.transpose(-1, -2))
        A = A.masked_fill(~_causal_mask(C, strict, q.device), 0.0)
        o = torch.matmul(A, vc)
        q_dec, k_dec, chunk_dec = qc, kc, None
    else:
        gb = g.shape[0]  # 1 for a fixed per-head decay
        if per_key:
            b = torch.cumsum(g.reshape(gb, H, N, C, Dk), dim=-2)  # within-chunk, <= 0
            A = _intra_per_key(qc, kc, b, strict, seg)
            b_end = b[..., -1:, :]  # (gb, H, N, 1, Dk)
            if use_state:
                q_f, k_f, c_f = torch.exp(b), torch.exp(b_end - b), torch.exp(b_end)
                if seg is not None:
                    s_end = seg[..., -1:, :]
                    q_f, k_f, c_f = q_f * (seg == 0), k_f * (seg == s_end), c_f * (s_end == 0)
                q_dec = (qc * q_f).to(cdt)  # decay from chunk start to t
                k_dec = (kc * k_f).to(cdt)  # decay from s to chunk end
                chunk_dec = c_f.transpose(-1, -2)  # (gb, H, N, Dk, 1)
        else:
            b = torch.cumsum(g.reshape(gb, H, N, C), dim=-1)  # within-chunk, <= 0
            diff = b.unsqueeze(-1) - b.unsqueeze(-2)  # [t, s] = b_t - b_s
            mask = _causal_mask(C, strict, q.device)
            if seg is not None:
                mask = mask & (seg.unsqueeze(-1) == seg.unsqueeze(-2))
            D = _masked_exp(diff, mask)
            A = torch.matmul(qc, kc.transpose(-1, -2)) * D
            b_end = b[..., -1:]  # (gb, H, N, 1)
            if use_state:
                q_f, k_f, c_f = torch.exp(b), torch.exp(b_end - b), torch.exp(b_end)
                if seg is not None:
                    s_end = seg[..., -1:]
                    q_f, k_f, c_f = q_f * (seg == 0), k_f * (seg == s_end), c_f * (s_end == 0)
                q_dec = (qc * q_f.unsqueeze(-1)).to(cdt)
                k_dec = (kc * k_f.unsqueeze(-1)).to(cdt)
                chunk_dec = c_f.unsqueeze(-1)  # (gb, H, N, 1, 1)
        o = torch.matmul(A.to(cdt), vc)

    final = None
    if use_state:
        U = torch.matmul(k_dec.transpose(-1, -2), vc).to(fdt)  # (B, H, N, Dk, Dv)
        S0 = initial_state.to(fdt) if initial_state is not None else None
        if chunk_dec is None:
            # no decay: states are an exclusive cumulative sum over chunks
            incl = torch.cumsum(U, dim=2)
            states = incl - U
            if S0 is not None:
                states = states + S0.unsqueeze(2)
            if output_final_state:
                final = incl[:, :, -1] if S0 is None else incl[:, :, -1] + S0
        else:
            # sequential over chunks only (N = T / C steps of elementwise work)
            # (unbind, not U[:, :, n]: select's backward would allocate a full-size zero
            # tensor per chunk, O(N^2) work)
            S = S0 if S0 is not None else torch.zeros(B, H, Dk, Dv, dtype=fdt, device=q.device)
            prev = []
            for dec_n, u_n in zip(chunk_dec.unbind(2), U.unbind(2)):
                prev.append(S)
                S = S * dec_n + u_n
            states = torch.stack(prev, dim=2)  # state entering each chunk
            final = S if output_final_state else None
        if S0 is not None or N > 1:
            # add in the float dtype: with bf16 matmuls, one rounding less on the output
            o = o.to(fdt) + torch.matmul(q_dec, states.to(cdt)).to(fdt)
    o = o.reshape(B, H, N * C, Dv)
    if pad:
        o = o[:, :, :T]
    return o.to(out_dtype), final


def chunkwise_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor | None = None,
    *,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunkwise form: batched matmuls inside all chunks at once, a short loop over chunks
    for the state. O(T); the training default. T need not be a multiple of ``chunk_size``
    (padded internally). Per-key decays (GLA) use chunks of at most ``_PER_KEY_MAX_CHUNK``
    tokens, split into sub-chunks of ``_SUB_CHUNK``. ``reset``: see ``decayed_linear_attention``.
    """
    _check(q, k, v, log_decay, initial_state, chunk_size, reset)
    return _chunkwise(q, k, v, log_decay, initial_state, output_final_state, False, chunk_size, reset)


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------


def pick_mode(seq_len: int, chunk_size: int, has_state: bool) -> str:
    """The "auto" mode: which form is fastest for this input (thresholds measured on CPU,
    see ``_PARALLEL_MAX_LEN``).

    recurrent for one token, or for two continuing from a state (decoding);
    parallel up to ``max(128, chunk_size)`` tokens; chunkwise beyond.
    """
    if seq_len <= 1 or (has_state and seq_len <= _RECURRENT_MAX_LEN):
        return "recurrent"
    if seq_len <= max(_PARALLEL_MAX_LEN, chunk_size):
        return "parallel"
    return "chunkwise"


_FORMS = {"parallel": _parallel, "recurrent": _recurrent}


def _run(mode, q, k, v, g, S0, out_state, strict, chunk_size, reset=None):
    if mode == "chunkwise":
        return _chunkwise(q, k, v, g, S0, out_state, strict, chunk_size, reset)
    return _FORMS[mode](q, k, v, g, S0, out_state, strict, reset)


def decayed_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor | None = None,
    *,
    mode: str = "chunkwise",
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    bidirectional: bool = False,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Decayed linear attention ``S_t = diag(a_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``.

    Args:
        q, k: (B, H, T, Dk); v: (B, H, T, Dv). q is not scaled here.
        log_decay: None, (H,), (B, H, T) or (B, H, T, Dk); values must be <= 0 (not checked);
            ``-inf`` (a zero decay) resets the state (per key: in every channel of the token).
        mode: "parallel", "chunkwise", "recurrent", or "auto" (see ``pick_mode``).
        chunk_size: chunk length for the chunkwise form.
        initial_state: (B, H, Dk, Dv) state before the first token (causal direction).
        output_final_state: also return the state after the last token (float32, or float64
            for float64 inputs).
        bidirectional: add an anti-causal pass over strictly later tokens s > t with decay
            prod_{r=t}^{s-1} a_r (gamma^|t-s| for fixed decays), for encoders.
        reset: optional bool (B, T), True at the first token of each packed document: the decay
            there is zero (the state, ``initial_state`` included, is dropped), in the causal
            pass; the anti-causal pass stops at the token before it. Each document's outputs
            are those it gives alone. See the module docstring and ``packing.py``.

    Returns ``(o, final_state)``; o is (B, H, T, Dv) in v's dtype; final_state is the causal
    direction's state or None. Padded positions must have k = v = 0 and log decay 0; then
    padding anywhere (left, right, interior) leaves the real tokens' outputs and the state
    unchanged.
    """
    if mode == "auto":
        T = q.shape[2] if isinstance(q, Tensor) and q.dim() == 4 else 0
        mode = pick_mode(T, chunk_size, initial_state is not None)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES + ('auto',)}, got {mode!r}")
    _check(q, k, v, log_decay, initial_state, chunk_size, reset)
    o, final = _run(mode, q, k, v, log_decay, initial_state, output_final_state, False, chunk_size, reset)
    if bidirectional:
        # anti-causal pass = the causal recurrence on the time-flipped sequence with
        # time-flipped decays, excluding the diagonal (token t is already in the causal pass)
        fl = [2]
        g_f = None
        if log_decay is not None:
            g_f = log_decay if log_decay.dim() == 1 else torch.flip(log_decay, [2])
        r_f = None
        if reset is not None:
            r_f = torch.flip(backward_resets(reset), [1])
        qf, kf, vf = torch.flip(q, fl), torch.flip(k, fl), torch.flip(v, fl)
        o_b, _ = _run(mode, qf, kf, vf, g_f, None, False, True, chunk_size, r_f)
        o = o + torch.flip(o_b, fl)
    return o, final


# --------------------------------------------------------------------------------------------
# grouped queries/keys, one scalar decay per head (Mamba-2's SSD)
# --------------------------------------------------------------------------------------------


class _GroupedChunkwise(torch.autograd.Function):
    """Chunkwise decayed linear attention with one scalar log decay per head and token, queries and keys shared by
    the ``R`` heads of a group and scaled per head (Mamba-2's SSD: ``q = C``, ``k_h = dt_h B``, ``v = x``), as one
    autograd node with a hand-written backward.

    Layouts, chunk-major and token-major (the heads of a group side by side in the last dim, as Mamba's ``x``):
    q, k (N, B, G, C, Dk); v (N, B, G, C, R, Dv); g log decays (N, B, G, R, C) (``-inf``: the state resets before
    that token writes); ks key scales (N, B, G, R, C) or None; S0 (B, G, Dk, R * Dv) (head h's state in columns
    ``h * Dv:(h + 1) * Dv``); D None or (G, R, Dv), a skip ``o += D v`` per channel (Mamba-2's ``D x``, added here
    where v is read anyway). Per chunk, with ``b`` the within-chunk cumulative log decay of a head::

        L_h[t, s] = exp(b_t - b_s) (s <= t, or s < t when strict; same segment), gamma_t = exp(b_t), eps_s = exp(b_C - b_s)
        o_h = ((q k^T) * L_h * ks_h[None, :]) v_h + gamma_h * (q S_h) (+ D_h v_h)
        S_h <- exp(b_C) S_h + k^T (eps_h ks_h v_h)

    Why: ``q k^T`` is computed once per group (not per head), the state products run as one ``(Dk x C) @ (C x R Dv)``
    and one ``(C x Dk) @ (Dk x R Dv)`` matmul per chunk and group over all its heads, and the recurrence across
    chunks is elementwise (a scalar per head), in place in a preallocated buffer.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, ks, S0, D, strict: bool):
        N, B, G, C, Dk = q.shape
        R, Dv = v.shape[-2:]
        b, seg, gamma, eps, reset = _scalar_decays(g)
        Gqk = torch.matmul(q, k.transpose(-1, -2))  # (N, B, G, C, C), shared by the group's heads
        w = eps if ks is None else eps * ks  # (N, B, G, R, C): a key's weight in the state at the chunk end
        fused = kernels_apply(Gqk)  # float32 on a CPU: compiled passes (mixer_cpu_kernels), P never stored
        if fused:
            vt = ssd_state_writes(v, w)  # (N, B, G, C, R, Dv), contiguous
        else:
            vt = v * w.transpose(-1, -2).unsqueeze(-1)
        # across chunks: states[n] enters chunk n. The chunks' writes U_n = k^T vt go straight into slots 1..N and
        # the recurrence S_{n+1} = U_n + a_n S_n runs in place (elementwise, a scalar decay per head): one buffer
        states = vt.new_empty(N + 1, B, G, Dk, R * Dv)
        states[0] = S0
        torch.matmul(k.transpose(-1, -2), vt.view(N, B, G, C, R * Dv), out=states[1:])
        if fused:
            ssd_chunk_states(states, gamma[..., -1])
        else:
            ge = gamma[..., -1].view(N, B, G, 1, R, 1)
            st, gs = states.view(N + 1, B, G, Dk, R, Dv).unbind(0), ge.unbind(0)
            for n in range(N):
                st[n + 1].addcmul_(st[n], gs[n])
        states, final = states[:N], states[N].clone()
        QS = torch.matmul(q, states).view(N, B, G, C, R, Dv)  # q S_h, before the decay from the chunk start
        # within chunks: o_h = gamma_h (q S_h) + P_h v_h, P_h = (q k^T) * L_h * ks_h (columns)
        L = P = v_h = None
        if fused:
            o = ssd_intra(Gqk, b, seg, ks, gamma, v, QS, D, strict)
        else:
            L = _pair_decays(b, seg, strict)
            P = Gqk.unsqueeze(3) * L
            if ks is not None:
                P = P * ks.unsqueeze(-2)  # column s scaled by the key scale of s
            v_h = v.transpose(-2, -3).contiguous()  # head-major (N, B, G, R, C, Dv) for the per-head products
            o = torch.empty_like(QS)
            torch.addcmul(torch.matmul(P, v_h).transpose(-2, -3), QS, gamma.transpose(-1, -2).unsqueeze(-1), out=o)
            if D is not None:
                o.addcmul_(v, D.unsqueeze(-3))  # (G, R, Dv) -> over the chunk's tokens
        ctx.strict, ctx.fused = strict, fused
        ctx.save_for_backward(q, k, v, v_h, ks, Gqk, P, L, b, seg, gamma, eps, reset, vt, states, QS, D)
        return o, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, d_final):
        # in the forward's precision: a backward called under autocast (bf16 mixed precision) must not run these
        # products in bf16, nor hand bf16 buffers to the float32 kernel
        with torch.autocast(device_type=do.device.type, enabled=False):
            return _GroupedChunkwise._backward(ctx, do, d_final)

    @staticmethod
    def _backward(ctx, do, d_final):
        q, k, v, v_h, ks, Gqk, P, L, b, seg, gamma, eps, reset, vt, states, QS, D = ctx.saved_tensors
        N, B, G, C, Dk = q.shape
        R, Dv = v.shape[-2:]
        do = do.contiguous()
        # within chunks (and o += gamma * (q S)): dQS, d gamma, d(q k^T), dv through P; X = dP * (q k^T) * L: its
        # column sums (x_col) and its row sums weighted by ks (z_row) carry the pair decays' share of the log-decay
        # gradient and of d ks
        dD = None
        if ctx.fused:
            dQS, d_gamma, dGqk, z_row, x_col, dv, dD = ssd_intra_backward(
                Gqk, b, seg, ks, gamma, v, QS, D, do, ctx.strict
            )
            dQS = dQS.view(N, B, G, C, R * Dv)
        else:
            dQS = (do * gamma.transpose(-1, -2).unsqueeze(-1)).view(N, B, G, C, R * Dv)
            d_gamma = (do * QS).sum(-1).transpose(-1, -2)  # (N, B, G, R, C)
            do_h = do.transpose(-2, -3).contiguous()  # head-major (N, B, G, R, C, Dv)
            dP = torch.matmul(do_h, v_h.transpose(-1, -2))  # (N, B, G, R, C, C)
            dv = torch.matmul(P.transpose(-1, -2), do_h).transpose(-2, -3)
            dGqk = (dP * (L if ks is None else L * ks.unsqueeze(-2))).sum(3)
            X = dP.mul_(Gqk.unsqueeze(3) * L)
            x_col = X.sum(-2)
            z_row = (X if ks is None else X.mul_(ks.unsqueeze(-2))).sum(-1)
            if D is not None:  # the skip o += D v
                dv.addcmul_(do, D.unsqueeze(-3))
                dD = (do * v).sum((0, 1, 3))
        dq = torch.matmul(dQS, states.transpose(-1, -2))
        # the recurrence, last chunk first, in one buffer: slot n holds the gradient reaching S_n from chunk n's
        # outputs (q^T dQS), slot N the final state's; then slot n += a_n * slot n + 1 leaves in slot n + 1 the
        # gradient of the state leaving chunk n (dS_next[n]) and in slot 0 that of the initial state
        dS = states.new_empty(N + 1, B, G, Dk, R * Dv)
        torch.matmul(q.transpose(-1, -2), dQS, out=dS[:N])
        if d_final is None:
            dS[N].zero_()
        else:
            dS[N].copy_(d_final.view(B, G, Dk, R * Dv))
        # d_ge: gradient of each chunk's decay exp(b_C), <dS_{n+1}, S_n> per head, while both are in cache
        if ctx.fused:
            d_ge = ssd_chunk_states_backward(dS, states, gamma[..., -1])  # (N, B, G, R)
        else:
            ge = gamma[..., -1].view(N, B, G, 1, R, 1)
            ds, gs = dS.view(N + 1, B, G, Dk, R, Dv).unbind(0), ge.unbind(0)
            st = states.view(N, B, G, Dk, R, Dv).unbind(0)
            d_ge = []
            for n in range(N - 1, -1, -1):
                d_ge.append((ds[n + 1] * st[n]).sum((-3, -1)))
                ds[n].addcmul_(ds[n + 1], gs[n])
            d_ge = torch.stack(d_ge[::-1])  # (N, B, G, R)
        dS_next, dS0 = dS[1:], dS[0]
        # state writes U = k^T vt
        dk = torch.matmul(vt.view(N, B, G, C, R * Dv), dS_next.transpose(-1, -2))
        dvt = torch.matmul(k, dS_next).view(N, B, G, C, R, Dv)
        w = eps if ks is None else eps * ks
        if ctx.fused:  # dw and dv += w dvt in one pass
            dw = ssd_state_writes_backward(dvt, v, w, dv)
        else:
            dw = (dvt * v).sum(-1).transpose(-1, -2)  # (N, B, G, R, C)
            dv = dv.addcmul_(dvt, w.transpose(-1, -2).unsqueeze(-1))
        dq += torch.matmul(dGqk, k)
        dk += torch.matmul(dGqk.transpose(-1, -2), q)
        d_ks = None
        if ks is not None:
            d_ks = x_col + dw * eps
            z_col, d_eps = x_col * ks, dw * ks
        else:
            z_col, d_eps = x_col, dw
        # log decays: b = within-chunk cumsum; pair decays exp(b_t - b_s) give +row sums -column sums
        t_eps = d_eps * eps  # eps_s = exp(b_C - b_s)
        db = z_row - z_col + d_gamma * gamma - t_eps
        d_end = t_eps.sum(-1) + d_ge * gamma[..., -1]  # and the chunk decay exp(b_C)
        db = db + torch.nn.functional.pad(d_end.unsqueeze(-1), (C - 1, 0))
        dg = (db.sum(-1, keepdim=True) - db.cumsum(-1) + db).masked_fill(reset, 0.0)
        return dq, dk, dv, dg, d_ks, dS0, (dD if D is not None else None), None


# A log-decay offset whose exp is exactly 0 in float32 and float64 (exp(-1000) underflows both).
_CUT = 1000.0


def _scalar_decays(g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Within-chunk decays from per-token log decays ``g`` (..., C) (``-inf``: a boundary, the state resets before
    that token writes): ``b`` the cumulative sum with ``-inf`` replaced by 0 and ``seg`` the segment index (number of
    boundaries up to each token, small integers exact in float), from which ``_pair_decays`` builds the pair decays;
    ``gamma_t = exp(b_t)`` (0 after a boundary in the chunk); ``eps_s = exp(b_C - b_s)`` (0 before the chunk's last
    boundary); the boundary mask. Nothing positive is exponentiated, no NaN."""
    reset = torch.isneginf(g)
    seg = torch.cumsum(reset.to(g.dtype), dim=-1)
    b = torch.cumsum(g.masked_fill(reset, 0.0), dim=-1)
    gamma = torch.where(seg == 0, torch.exp(b), 0.0)
    eps = torch.where(seg == seg[..., -1:], torch.exp(b[..., -1:] - b), 0.0)
    return b, seg, gamma, eps, reset


def _pair_decays(b: Tensor, seg: Tensor, strict: bool) -> Tensor:
    """``L`` (..., C, C), ``L[t, s] = exp(b_t - b_s)`` for s <= t (s < t when strict) in the same segment, else 0."""
    C = b.shape[-1]
    # exponent b_t - b_s, minus _CUT per boundary in (s, t] (0 exactly within a segment, so those pairs keep the
    # plain cumsum's precision; exp(<= -_CUT) is exactly 0); clamped to <= 0 (the pairs s > t, masked after the exp).
    # Float arithmetic only, in place in one (..., C, C) buffer: bool masks and bool x float products are several
    # times slower on CPU.
    L = torch.sub(b.unsqueeze(-1), b.unsqueeze(-2))
    L.add_(seg.unsqueeze(-1) - seg.unsqueeze(-2), alpha=-_CUT).clamp_(max=0.0).exp_()
    return L.mul_(_causal_mask(C, strict, b.device).to(b.dtype))


def _grouped_chunkwise(
    q, k, v, log_decay, key_scale, initial_state, output_final_state, strict, chunk_size, reset, skip_scale
):
    """Time-major inputs (see ``grouped_decayed_linear_attention``) -> padded, chunk-major, one ``_GroupedChunkwise``."""
    B, T, G, Dk = q.shape
    H, Dv = v.shape[-2:]
    R = H // G
    out_dtype = v.dtype
    fdt = _float_dtype(torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))
    q, k, v = q.to(fdt), k.to(fdt), v.to(fdt)
    g = log_decay.to(fdt)
    if reset is not None:
        g = g.masked_fill(reset[..., None], float("-inf"))
    ks = key_scale.to(fdt) if key_scale is not None else None
    D = skip_scale.to(fdt).reshape(G, R, Dv) if skip_scale is not None else None
    if T == 0:
        o = v.new_zeros(B, 0, H, Dv).to(out_dtype)
        if not output_final_state:
            return o, None
        return o, (initial_state.to(fdt) if initial_state is not None else q.new_zeros(B, H, Dk, Dv))
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    if pad:  # zero q/k/v and log decay 0 (a = 1) in the pad: the state passes through unchanged
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g = torch.nn.functional.pad(g, (0, 0, 0, pad))
        ks = torch.nn.functional.pad(ks, (0, 0, 0, pad)) if ks is not None else None

    def chunk_major(x, width):  # (B, N * C, G, width...) -> (N, B, G, C, width...)
        return x.reshape(B, N, C, G, *width).transpose(2, 3).transpose(0, 1)

    def per_head(x):  # (B, N * C, H) -> (N, B, G, R, C)
        return x.reshape(B, N, C, G, R).permute(1, 0, 3, 4, 2).contiguous()

    if initial_state is None:
        S0 = q.new_zeros(B, G, Dk, R * Dv)
    else:  # (B, H, Dk, Dv) -> the group's heads side by side
        S0 = initial_state.to(fdt).reshape(B, G, R, Dk, Dv).transpose(2, 3).reshape(B, G, Dk, R * Dv)
    o, S = _GroupedChunkwise.apply(
        chunk_major(q, (Dk,)).contiguous(),
        chunk_major(k, (Dk,)).contiguous(),
        chunk_major(v, (R, Dv)),
        per_head(g),
        per_head(ks) if ks is not None else None,
        S0,
        D,
        strict,
    )
    o = o.transpose(0, 1).transpose(2, 3).reshape(B, N * C, H, Dv)  # (N, B, G, C, R, Dv) -> time-major
    if pad:
        o = o[:, :T]
    final = S.view(B, G, Dk, R, Dv).transpose(2, 3).reshape(B, H, Dk, Dv) if output_final_state else None
    return o.to(out_dtype), final


def grouped_decayed_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    key_scale: Tensor | None = None,
    *,
    mode: str = "chunkwise",
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    bidirectional: bool = False,
    reset: Tensor | None = None,
    skip_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``decayed_linear_attention`` with one scalar log decay per head and token, and queries / keys shared by the
    heads of a group, scaled per head: Mamba-2's SSD (``q = C``, ``k = B``, ``key_scale = dt``, ``v = x``,
    ``log_decay = dt * A``), in Mamba's time-major layout, without materialising per-head queries or keys; with
    ``skip_scale`` also Mamba-2's ``D x`` skip.

    Args:
        q, k: (B, T, G, Dk), shared by the ``R = H / G`` consecutive heads of each group.
        v: (B, T, H, Dv).
        log_decay: (B, T, H), values <= 0 (``-inf`` resets, as in ``decayed_linear_attention``).
        key_scale: None or (B, T, H): head h's key at t is ``key_scale[:, t, h] * k[:, t, h // R]``.
        mode, chunk_size, initial_state (B, H, Dk, Dv), output_final_state, bidirectional, reset (B, T): as in
            ``decayed_linear_attention`` (which this equals, head by head, to float rounding).
        skip_scale: None or (H, Dv): adds ``skip_scale * v`` to the output (once, also when bidirectional); in the
            chunkwise form the within-chunk kernel adds it where it reads v anyway.

    Returns ``(o, final_state)``: o is (B, T, H, Dv) in v's dtype; final_state (B, H, Dk, Dv) or None.
    The chunkwise and parallel forms run ``_GroupedChunkwise`` (parallel = one chunk spanning the input); the
    recurrent form (decoding) expands the groups and runs ``decayed_linear_attention``'s.
    """
    if mode == "auto":
        T = q.shape[1] if isinstance(q, Tensor) and q.dim() == 4 else 0
        mode = pick_mode(T, chunk_size, initial_state is not None)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES + ('auto',)}, got {mode!r}")
    _check_grouped(q, k, v, log_decay, key_scale, initial_state, chunk_size, reset)
    if skip_scale is not None and tuple(skip_scale.shape) != tuple(v.shape[2:]):
        raise ValueError(f"skip_scale must have shape (H, Dv) = {tuple(v.shape[2:])}, got {tuple(skip_scale.shape)}")
    if mode == "recurrent":
        B, T, G, Dk = q.shape
        R = v.shape[2] // G

        def heads(x):  # (B, T, G, Dk) -> (B, H, T, Dk)
            return x.transpose(1, 2).repeat_interleave(R, dim=1)

        kh = heads(k)
        if key_scale is not None:
            kh = kh * key_scale.transpose(1, 2).unsqueeze(-1)
        o, final = decayed_linear_attention(
            heads(q),
            kh,
            v.transpose(1, 2),
            log_decay.transpose(1, 2),
            mode="recurrent",
            initial_state=initial_state,
            output_final_state=output_final_state,
            bidirectional=bidirectional,
            reset=reset,
        )
        o = o.transpose(1, 2)
        return (o if skip_scale is None else o + v * skip_scale.to(o.dtype)), final
    C = chunk_size if mode == "chunkwise" else max(q.shape[1], 1)
    # float32 throughout (float64 for float64 inputs), also under autocast: the state is carried in float32
    with torch.autocast(device_type=q.device.type, enabled=False):
        return _grouped_both_ways(
            q, k, v, log_decay, key_scale, initial_state, output_final_state, bidirectional, C, reset, skip_scale
        )


def _grouped_both_ways(
    q, k, v, log_decay, key_scale, initial_state, output_final_state, bidirectional, C, reset, skip_scale
):
    o, final = _grouped_chunkwise(
        q, k, v, log_decay, key_scale, initial_state, output_final_state, False, C, reset, skip_scale
    )
    if bidirectional:
        # the anti-causal pass: the causal recurrence on the time-flipped sequence, strictly earlier tokens only
        # (token t is counted in the causal pass); a document starting at r is cut at r - 1 in this direction
        fl = [1]
        r_f = None
        if reset is not None:
            r_f = torch.flip(backward_resets(reset), fl)
        ks_f = torch.flip(key_scale, fl) if key_scale is not None else None
        flipped = (torch.flip(x, fl) for x in (q, k, v, log_decay))
        o_b, _ = _grouped_chunkwise(*flipped, ks_f, None, False, True, C, r_f, None)  # the skip: counted once
        o = o + torch.flip(o_b, fl)
    return o, final


def _check_grouped(q, k, v, log_decay, key_scale, initial_state, chunk_size, reset) -> None:
    """Shapes of ``grouped_decayed_linear_attention``'s arguments (no data inspection: compile-friendly)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a Tensor of shape (B, T, G or H, D) (time-major), got {got}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the same shape as q {tuple(q.shape)}, got {tuple(k.shape)}")
    B, T, G, Dk = q.shape
    H = v.shape[2]
    if v.shape[:2] != (B, T) or H % G != 0:
        raise ValueError(
            f"v must have shape (B, T, H, Dv) with (B, T) = {(B, T)} and H a multiple of the {G} groups of q/k, "
            f"got {tuple(v.shape)}"
        )
    for name, x in (("log_decay", log_decay), ("key_scale", key_scale)):
        if x is None and name == "key_scale":
            continue
        if not isinstance(x, Tensor) or tuple(x.shape) != (B, T, H):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{name} must have shape (B, T, H) = {(B, T, H)} (one value per token and head), got {got}"
            )
    _check_state_reset_chunk(B, H, T, Dk, v.shape[3], initial_state, chunk_size, reset)
