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

Numerics: decay factors are computed in float32 (float64 for float64 inputs) from cumulative
sums of log decays *local to a chunk*, and only non-positive exponents are ever exponentiated,
so nothing overflows and underflow (decays -> 0 over long spans) is exact. The carried state
is kept in that float dtype too; matmul operands are cast to the inputs' dtype, and outputs
to ``v``'s dtype. ``q`` is not scaled here (callers scale).

This file is copied into saved checkpoints: it must import only torch / math / typing.
"""

import torch
from torch import Tensor

__all__ = [
    "decayed_linear_attention",
    "parallel_retention",
    "chunkwise_retention",
    "recurrent_retention",
    "pick_mode",
    "MODES",
]

MODES = ("parallel", "chunkwise", "recurrent")

# Per-key-channel (GLA) decays: the chunk is capped at ``_PER_KEY_MAX_CHUNK`` tokens and split
# into sub-chunks of ``_SUB_CHUNK``. The diagonal sub-blocks materialise a (c, c, Dk) tensor per
# sub-chunk (T * c * Dk elements in all, memory bound), the off-diagonal ones gather one (c, Dk)
# query block per sub-chunk pair ((C / c)^2 / 2 pairs per chunk) and are matmuls; longer chunks
# mean more pairs, so past a point the state recurrence across chunks is cheaper. Measured on the
# dev CPU (torch 2.13, 1 thread, float32, H=4, Dk=Dv=64, forward + backward of the kernel alone,
# machine heavily loaded, so compare within a row only), (chunk, sub-chunk):
#   T=2048 x B=4:  (16,4) 2.4 s  (32,4) 2.7-3.0  (64,4) 4.6  (16,8) 4.3  (32,8) 4.0  (64,8) 4.8  (64,16) 9.5
#   T=8192 x B=1:  (16,4) 4.1 s  (32,4) 3.9      (64,8) 5.3
# (fixed per-head decay, chunk 64, for scale: 0.46 s / 0.72 s.)
_SUB_CHUNK = 4
_PER_KEY_MAX_CHUNK = 32

# ``pick_mode`` thresholds, measured on the dev CPU (2 shared, heavily loaded cores, so +-50%
# noise; torch 2.13; 1 thread; float32; B=1, H=4, Dk=Dv=64; chunk 64; median ms,
# forward / forward+backward):
#
#   T     none: parallel | chunkwise   gated (B,H,T): par | chunk   GLA (B,H,T,Dk): par | chunk
#   128         1.5/7.0  | 1.1/8.1           1.6/6.7 | 1.4/7.8            13/17  | 8.0/23
#   256         7.1/17   | 1.8/9.9           7.9/18  | 1.5/8.9            74/108 | 19/36
#   512          35/54   | 2.7/21             50/58  | 8.0/24            208/215 | 26/57
#
# T <= 64 is a single chunk (both forms do the same work); at 128 it is a wash; from 256
# chunkwise wins clearly. Decoding (forward, with a state), T = 1 / 2 / 4 tokens:
#   recurrent 0.11 / 0.23 / 0.44 ms vs parallel 0.40 / 0.47 / 0.36 (no decay),
#   0.17 / 0.23 / 0.43 vs 0.42 / 0.38 / 0.39 (gated), 0.15 / 0.27 / 0.43 vs 0.67 / 0.63 / 0.63 (GLA).
_PARALLEL_MAX_LEN = 128
_RECURRENT_MAX_LEN = 2  # with a state (decoding a few tokens at a time)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype for decays and the carried state: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor | None,
    initial_state: Tensor | None,
    chunk_size: int | None = None,
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
    if initial_state is not None:
        if not isinstance(initial_state, Tensor) or initial_state.shape != (B, H, Dk, Dv):
            shape = tuple(initial_state.shape) if isinstance(initial_state, Tensor) else initial_state
            raise ValueError(f"initial_state must have shape (B, H, Dk, Dv) = {(B, H, Dk, Dv)}, got {shape}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _prep(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None):
    """Common dtypes, and the log decay normalised to (b, H, T) or (B, H, T, Dk) in float dtype.

    Returns (q, k, v, g, per_key, cdt, fdt); ``g`` is None for no decay. A fixed (H,) decay
    becomes a (1, H, T) expanded view (batch dim 1, no copy), so it broadcasts.
    """
    cdt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    fdt = _float_dtype(cdt)
    per_key = False
    g = None
    if log_decay is not None:
        g = log_decay.to(fdt)
        if g.dim() == 1:
            g = g.view(1, -1, 1).expand(1, g.shape[0], q.shape[2])
        elif g.dim() == 4:
            per_key = True
    return q, k, v, g, per_key, cdt, fdt


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


def _recurrent(q, k, v, log_decay, initial_state, output_final_state, strict):
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    out_dtype = v.dtype
    q, k, v, g, per_key, cdt, fdt = _prep(q, k, v, log_decay)
    if T == 0:
        return _empty_result(q, v, initial_state, output_final_state, fdt)
    q, k, v = q.to(fdt), k.to(fdt), v.to(fdt)
    a = None
    if g is not None:
        a = torch.exp(g)
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
) -> tuple[Tensor, Tensor | None]:
    """Token-by-token recurrence (the reference, and the decoding step). ``chunk_size`` is ignored.

    Computes in float32/float64 throughout. Returns ``(o, final_state or None)``.
    """
    _check(q, k, v, log_decay, initial_state, chunk_size)
    return _recurrent(q, k, v, log_decay, initial_state, output_final_state, strict=False)


# --------------------------------------------------------------------------------------------
# parallel
# --------------------------------------------------------------------------------------------


def _parallel(q, k, v, log_decay, initial_state, output_final_state, strict):
    # The whole sequence as one chunk: the full (T, T) score matrix, decays exp(b_t - b_s)
    # masked before exp; per-key decays build it from small sub-blocks (never a (T, T, Dk)
    # tensor). No state loop.
    T = q.shape[2]
    if log_decay is not None and log_decay.dim() == 4:
        C = -(-T // _SUB_CHUNK) * _SUB_CHUNK
    else:
        C = T
    return _chunkwise(q, k, v, log_decay, initial_state, output_final_state, strict, max(C, 1))


def parallel_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor | None = None,
    *,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Whole-sequence ``T x T`` form (best for short inputs). ``chunk_size`` is ignored.

    Same arithmetic as one chunk of the chunkwise form spanning the whole input: cost and
    memory grow as T^2, so keep T short (see ``pick_mode``).
    """
    _check(q, k, v, log_decay, initial_state, chunk_size)
    return _parallel(q, k, v, log_decay, initial_state, output_final_state, strict=False)


# --------------------------------------------------------------------------------------------
# chunkwise
# --------------------------------------------------------------------------------------------


def _sub_chunk(C: int) -> int:
    """Largest divisor of C that is <= _SUB_CHUNK."""
    for c in range(min(_SUB_CHUNK, C), 0, -1):
        if C % c == 0:
            return c
    return 1


def _intra_per_key(q, k, b, strict):
    """Intra-chunk scores for per-key decays with secondary chunking (Yang et al. 2023, GLA).

    q, k, b: (B, H, N, C, Dk), b = within-chunk inclusive cumsum of log decay (non-increasing).
    Returns A: (B, H, N, C, C) in float dtype, A[t, s] = sum_k q_tk k_sk exp(b_tk - b_sk), s <= t.
    Off-diagonal sub-blocks (i > j) use the end of key sub-chunk j as reference, so both
    q * exp(b_t - b_ref) and k * exp(b_ref - b_s) have factors <= 1, then a matmul; diagonal
    sub-blocks build the small (c, c, Dk) pairwise tensor, masked before exp.
    """
    B, H, N, C, Dk = q.shape
    c = _sub_chunk(C)
    M = C // c
    fdt = b.dtype
    cdt = q.dtype
    qs = q.reshape(B, H, N, M, c, Dk)
    ks = k.reshape(B, H, N, M, c, Dk)
    bs = b.reshape(B, H, N, M, c, Dk)

    # diagonal sub-blocks: (..., M, c, c, Dk) pairwise decays
    diff = bs.unsqueeze(-2) - bs.unsqueeze(-3)  # [t, s] = b_t - b_s
    dec = _masked_exp(diff, _causal_mask(c, strict, q.device).unsqueeze(-1))
    # elementwise + sum (einsum would lower this to a bmm over tiny K-vectors: much slower)
    A_diag = (qs.unsqueeze(-2) * dec * ks.unsqueeze(-3)).sum(-1)  # (B, H, N, M, c, c), float

    if M == 1:
        return A_diag.reshape(B, H, N, C, C)

    ii, jj = torch.tril_indices(M, M, offset=-1, device=q.device)  # pairs i > j
    b_ref = bs[..., -1, :]  # (B, H, N, M, Dk): end of each sub-chunk
    k_t = (ks * torch.exp(b_ref.unsqueeze(-2) - bs)).to(cdt)  # (B, H, N, M, c, Dk), factors <= 1
    q_t = (qs[:, :, :, ii] * torch.exp(bs[:, :, :, ii] - b_ref[:, :, :, jj].unsqueeze(-2))).to(cdt)
    A_off = torch.matmul(q_t, k_t[:, :, :, jj].transpose(-1, -2))  # (B, H, N, P, c, c)

    # assemble the (M x M) grid of (c x c) blocks; block dims first so index_put hits them
    A = torch.zeros(M, M, B, H, N, c, c, dtype=fdt, device=q.device)
    A = A.index_put((ii, jj), A_off.to(fdt).movedim(3, 0))
    ar = torch.arange(M, device=q.device)
    A = A.index_put((ar, ar), A_diag.movedim(3, 0))
    # (M_i, M_j, B, H, N, c_t, c_s) -> (B, H, N, M_i, c_t, M_j, c_s) -> (B, H, N, C, C)
    return A.permute(2, 3, 4, 0, 5, 1, 6).reshape(B, H, N, C, C)


def _chunkwise(q, k, v, log_decay, initial_state, output_final_state, strict, chunk_size):
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    out_dtype = v.dtype
    q, k, v, g, per_key, cdt, fdt = _prep(q, k, v, log_decay)
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
            A = _intra_per_key(qc, kc, b, strict)
            b_end = b[..., -1:, :]  # (gb, H, N, 1, Dk)
            if use_state:
                q_dec = (qc * torch.exp(b)).to(cdt)  # decay from chunk start to t
                k_dec = (kc * torch.exp(b_end - b)).to(cdt)  # decay from s to chunk end
                chunk_dec = torch.exp(b_end).transpose(-1, -2)  # (gb, H, N, Dk, 1)
        else:
            b = torch.cumsum(g.reshape(gb, H, N, C), dim=-1)  # within-chunk, <= 0
            diff = b.unsqueeze(-1) - b.unsqueeze(-2)  # [t, s] = b_t - b_s
            D = _masked_exp(diff, _causal_mask(C, strict, q.device))
            A = torch.matmul(qc, kc.transpose(-1, -2)) * D
            b_end = b[..., -1:]  # (gb, H, N, 1)
            if use_state:
                q_dec = (qc * torch.exp(b).unsqueeze(-1)).to(cdt)
                k_dec = (kc * torch.exp(b_end - b).unsqueeze(-1)).to(cdt)
                chunk_dec = torch.exp(b_end).unsqueeze(-1)  # (gb, H, N, 1, 1)
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
) -> tuple[Tensor, Tensor | None]:
    """Chunkwise form: batched matmuls inside all chunks at once, a short loop over chunks
    for the state. O(T); the training default. T need not be a multiple of ``chunk_size``
    (padded internally). Per-key decays (GLA) use chunks of at most ``_PER_KEY_MAX_CHUNK``
    tokens, split into sub-chunks of ``_SUB_CHUNK`` (see the measurements there).
    """
    _check(q, k, v, log_decay, initial_state, chunk_size)
    return _chunkwise(q, k, v, log_decay, initial_state, output_final_state, False, chunk_size)


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


def _run(mode, q, k, v, g, S0, out_state, strict, chunk_size):
    if mode == "chunkwise":
        return _chunkwise(q, k, v, g, S0, out_state, strict, chunk_size)
    return _FORMS[mode](q, k, v, g, S0, out_state, strict)


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
) -> tuple[Tensor, Tensor | None]:
    """Decayed linear attention ``S_t = diag(a_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``.

    Args:
        q, k: (B, H, T, Dk); v: (B, H, T, Dv). q is not scaled here.
        log_decay: None, (H,), (B, H, T) or (B, H, T, Dk); values must be <= 0 (not checked).
        mode: "parallel", "chunkwise", "recurrent", or "auto" (see ``pick_mode``).
        chunk_size: chunk length for the chunkwise form.
        initial_state: (B, H, Dk, Dv) state before the first token (causal direction).
        output_final_state: also return the state after the last token (float32, or float64
            for float64 inputs).
        bidirectional: add an anti-causal pass over strictly later tokens s > t with decay
            prod_{r=t}^{s-1} a_r (gamma^|t-s| for fixed decays), for encoders.

    Returns ``(o, final_state)``; o is (B, H, T, Dv) in v's dtype; final_state is the causal
    direction's state or None. Padded positions must have k = 0 (and v = 0); then left
    padding without an initial state leaves the real tokens' outputs unchanged.
    """
    if mode == "auto":
        T = q.shape[2] if isinstance(q, Tensor) and q.dim() == 4 else 0
        mode = pick_mode(T, chunk_size, initial_state is not None)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES + ('auto',)}, got {mode!r}")
    _check(q, k, v, log_decay, initial_state, chunk_size)
    o, final = _run(mode, q, k, v, log_decay, initial_state, output_final_state, False, chunk_size)
    if bidirectional:
        # anti-causal pass = the causal recurrence on the time-flipped sequence with
        # time-flipped decays, excluding the diagonal (token t is already in the causal pass)
        fl = [2]
        g_f = None
        if log_decay is not None:
            g_f = log_decay if log_decay.dim() == 1 else torch.flip(log_decay, [2])
        o_b, _ = _run(mode, torch.flip(q, fl), torch.flip(k, fl), torch.flip(v, fl), g_f, None, False, True, chunk_size)
        o = o + torch.flip(o_b, fl)
    return o, final
