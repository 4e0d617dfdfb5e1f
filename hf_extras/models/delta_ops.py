"""The (gated) delta rule as pure tensor functions: DeltaNet and Gated DeltaNet.

Recurrence, per batch ``b`` and head ``h`` (``S`` is ``Dk x Dv``, rows indexed by key channels, as in
``retention_ops`` and transformers' ``torch_recurrent_gated_delta_rule``)::

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
        = a_t S_{t-1} + k_t u_t^T,      u_t = beta_t (v_t - a_t S_{t-1}^T k_t)
    o_t = scale * q_t S_t                                  (inclusive of token t)

(the papers write the transpose, ``S_t = S_{t-1} a_t (I - beta_t k_t^T k_t) + beta_t k_t^T v_t`` with row vectors).
The memory is corrected, not only decayed and added to: token t first removes what the decayed state already
predicts for ``k_t`` and writes the difference (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta
Rule over Sequence Length"; Gated DeltaNet, Yang et al. 2025). The caller normalises ``q`` and ``k`` (L2), so
``I - beta k k^T`` is a contraction for ``0 <= beta <= 1``; ``beta`` is ``(B, H, T)``; the decay is given in log
space, ``log_decay = log a <= 0``, as ``None`` (DeltaNet, ``a = 1``) or ``(B, H, T)`` (one scalar per head and token).

Forms (all take and return the state, and agree to float tolerance):

* ``chunkwise`` -- WY / UT representation: per chunk of C tokens one unit-lower-triangular system
  ``(I + A) [U0 | W] = [beta v | beta gamma k]`` with ``A_ts = beta_t (k_t . k_s) a_{s+1..t}`` (s < t), solved for
  all chunks at once through a blocked inverse (``_unit_lower_inverse``), matmuls for everything else, and across
  chunks only ``u_n = U0_n - W_n S_n``, ``S_{n+1} = a_chunk S_n + K_n^T u_n`` (two small matmuls per chunk); outputs
  ``o = gamma q S_n + P u`` batched after the loop. The whole form is one autograd node per block of chunks
  (``_Chunkwise``, hand-written backward; blocks of ~``_BLOCK_ROWS`` rows keep the working set in cache). O(T).
* ``parallel``  -- the delta rule has no cheaper whole-sequence form than the triangular system itself, so this is
  the chunkwise form with one chunk spanning the input (quadratic memory; one solve of size T). Short inputs only.
* ``recurrent`` -- one token at a time; the reference and the decoding step.

Document boundaries and padding (as in every hf_extras kernel): a log decay of ``-inf`` at a token resets the state
before that token writes (the document's first token): a packed row gives each document the outputs it has alone,
forward and backward, with no NaN and nothing exponentiated above 0 (the chunkwise form replaces ``-inf`` by 0 in the
cumulative sums and cuts the pairs that span a boundary by an exponent offset that underflows to exactly 0). A pad (``k = 0`` and ``v = 0``, or ``beta = 0``,
with log decay 0) leaves the state unchanged.

Numerics: everything is computed in float32 (float64 for float64 inputs) whatever the input dtype, so bf16/fp16
inputs carry a float32 state and 16k-token sequences stay finite; outputs are cast to ``v``'s dtype.

This file is copied into saved checkpoints: it must import only torch / typing.
"""

import torch
from torch import Tensor

__all__ = [
    "gated_delta_rule",
    "chunkwise_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "parallel_gated_delta_rule",
    "pick_mode",
    "MODES",
]

MODES = ("parallel", "chunkwise", "recurrent")

# "auto": the parallel form is one chunk of T tokens (a solve of size T), so it only pays when the input fits in one
# chunk anyway; decoding one or two tokens from a state is cheapest step by step.
_RECURRENT_MAX_LEN = 2


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of every computation and of the carried state: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(q, k, v, beta, log_decay, initial_state, chunk_size) -> None:
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
    if not isinstance(beta, Tensor) or beta.shape != (B, H, T):
        shape = tuple(beta.shape) if isinstance(beta, Tensor) else type(beta).__name__
        raise ValueError(f"beta must have shape (B, H, T) = {(B, H, T)}, got {shape}")
    if log_decay is not None and (not isinstance(log_decay, Tensor) or log_decay.shape != (B, H, T)):
        shape = tuple(log_decay.shape) if isinstance(log_decay, Tensor) else type(log_decay).__name__
        raise ValueError(
            f"log_decay must be None (DeltaNet) or have shape (B, H, T) = {(B, H, T)} (one log decay per head and "
            f"token), got {shape}"
        )
    if initial_state is not None:
        if not isinstance(initial_state, Tensor) or initial_state.shape != (B, H, Dk, Dv):
            shape = tuple(initial_state.shape) if isinstance(initial_state, Tensor) else initial_state
            raise ValueError(f"initial_state must have shape (B, H, Dk, Dv) = {(B, H, Dk, Dv)}, got {shape}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _prep(q, k, v, beta, log_decay, scale):
    """Everything in the float dtype; q scaled."""
    cdt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    fdt = _float_dtype(cdt)
    q = q.to(fdt)
    if scale != 1.0:
        q = q * scale
    g = log_decay.to(fdt) if log_decay is not None else None
    return q, k.to(fdt), v.to(fdt), beta.to(fdt), g, fdt


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


def _recurrent(q, k, v, beta, log_decay, initial_state, output_final_state, strict, scale):
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    out_dtype = v.dtype
    q, k, v, beta, g, fdt = _prep(q, k, v, beta, log_decay, scale)
    if T == 0:
        return _empty_result(q, v, initial_state, output_final_state, fdt)
    # exp(-inf) = 0 is exact (a boundary); its gradient exp(g) * grad is 0, not NaN
    a = torch.exp(g)[..., None, None] if g is not None else None  # (B, H, T, 1, 1)
    S = initial_state.to(fdt) if initial_state is not None else q.new_zeros(B, H, Dk, Dv)
    outs = []
    for t in range(T):
        k_t = k[:, :, t, None, :]  # (B, H, 1, Dk)
        if a is not None:
            S = S * a[:, :, t]
        if strict:  # read before this token's write (the anti-causal pass)
            outs.append(torch.matmul(q[:, :, t, None, :], S))
        u_t = beta[:, :, t, None, None] * (v[:, :, t, None, :] - torch.matmul(k_t, S))  # (B, H, 1, Dv)
        S = S + k_t.transpose(-1, -2) * u_t
        if not strict:
            outs.append(torch.matmul(q[:, :, t, None, :], S))
    o = outs[0] if T == 1 else torch.cat(outs, dim=2)
    return o.to(out_dtype), (S if output_final_state else None)


# --------------------------------------------------------------------------------------------
# chunkwise (WY / UT representation)
# --------------------------------------------------------------------------------------------


# The chunkwise form runs in blocks of chunks of about this many (token, head) rows x 64 channels (1 MB per q-sized
# float32 tensor): small enough for the block's working set to stay in cache, large enough that the per-block op
# overhead stays small (measured at B*H = 4, D = 64: 4096 rows 20% faster than one block at T = 2048 and 8192; 1024
# rows slower again).
_BLOCK_ROWS = 4096
# The inverse starts from diagonal blocks of this size (a batched triangular solve), then doubles by matmuls.
_INVERSE_BASE = 16


def _unit_lower_inverse(A: Tensor) -> Tensor:
    """``(I + A)^-1`` for strictly lower-triangular ``A`` ``(..., C, C)``.

    Diagonal blocks of ``_INVERSE_BASE`` are inverted by a batched triangular solve against the identity, then
    neighbouring blocks are joined, ``[[X, 0], [Y, Z]]^-1 = [[X^-1, 0], [-Z^-1 Y X^-1, Z^-1]]``, until one block
    spans the chunk: a few small matmuls instead of a size-C solve against every right-hand side, which on CPU runs
    several times slower than a matmul of the same size (forward and backward).
    """
    C = A.shape[-1]
    n = 1 << max(C - 1, 0).bit_length()  # next power of two; zero rows/columns leave the top-left block exact
    if n != C:
        A = torch.nn.functional.pad(A, (0, n - C, 0, n - C))
    lead = A.shape[:-2]

    def diagonal_blocks(size: int) -> Tensor:  # (..., n / size, size, size)
        nb = n // size
        return torch.diagonal(A.reshape(*lead, nb, size, nb, size), dim1=-4, dim2=-2).movedim(-1, -3)

    s = min(_INVERSE_BASE, n)
    D = diagonal_blocks(s)
    eye = torch.eye(s, dtype=A.dtype, device=A.device).expand_as(D)
    T = torch.linalg.solve_triangular(D, eye, upper=False, unitriangular=True)
    while s < n:
        Y = diagonal_blocks(2 * s)[..., s:, :s]
        X_inv, Z_inv = T[..., 0::2, :, :], T[..., 1::2, :, :]
        off = -torch.matmul(torch.matmul(Z_inv, Y), X_inv)
        T = torch.cat([torch.cat([X_inv, torch.zeros_like(X_inv)], dim=-1), torch.cat([off, Z_inv], dim=-1)], dim=-2)
        s *= 2
    T = T.reshape(*lead, n, n)
    return T[..., :C, :C] if n != C else T


class _Chunkwise(torch.autograd.Function):
    """The whole chunkwise form (WY / UT representation) as one autograd node with a hand-written backward.

    Inputs chunk-major: q, k (N, BH, C, Dk) (q already scaled), v (N, BH, C, Dv), beta (N, BH, C), g (N, BH, C) log
    decays or None (DeltaNet), S0 (BH, Dk, Dv). Per chunk, with ``b`` the within-chunk cumulative log decay (``-inf``
    replaced by 0) and segments cut at each ``-inf``::

        L[t, s] = a_{s+1..t} for s < t in the same segment, else 0     gamma_t = a_{1..t}, eps_s = a_{s+1..C}
        A = diag(beta) (k k^T) * L,   P = (q k^T) * (L + I)   (L alone when strict),   T = (I + A)^-1
        U0 = T diag(beta) v,   W = T diag(beta gamma) k
        u_n = U0_n - W_n S_n,   S_{n+1} = a_{1..C} S_n + (eps k)_n^T u_n,   o = gamma q S_n + P u_n

    Returns o (N, BH, C, Dv) and the final state. Why one node: autograd through these ~40 small ops records and
    replays each, and recomputes masks and decays; here the backward reuses the forward's pair products ``k k^T``,
    ``q k^T``, the pair decays and the inverse, per-token scalings are folded into the C x C matrices, and the
    recurrence across chunks runs two small matmuls per chunk each way, written in place into preallocated
    chunk-major buffers (no per-chunk tensors to stack).
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, g, S0, strict: bool):
        N, BH, C, Dk = q.shape
        Dv = v.shape[-1]
        q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
        idx = torch.arange(C, device=q.device)
        lower = idx[:, None] > idx[None, :]  # s < t
        if g is None:
            L = lower.to(q.dtype)
            gamma = eps = reset = None
        else:
            L, gamma, eps, reset = _pair_decays(g.contiguous(), lower)
        Kk = torch.matmul(k, k.transpose(-1, -2))  # [t, s] = k_t . k_s
        Qk = torch.matmul(q, k.transpose(-1, -2))  # [t, s] = q_t . k_s
        Tinv = _unit_lower_inverse(Kk * L * beta.unsqueeze(-1))  # (I + A)^-1
        U0 = torch.matmul(Tinv * beta.unsqueeze(-2), v)
        W = torch.matmul(Tinv * (beta if gamma is None else beta * gamma).unsqueeze(-2), k)
        ke = k if eps is None else k * eps.unsqueeze(-1)  # writes, decayed to the chunk end
        # across chunks: states[n] enters chunk n, states[N] is the final state
        states = q.new_empty(N + 1, BH, Dk, Dv)
        news = q.new_empty(N, BH, C, Dv)
        states[0] = S0
        st, nw, u0, w, ket = states.unbind(0), news.unbind(0), U0.unbind(0), W.unbind(0), ke.transpose(-1, -2).unbind(0)
        ge = None if gamma is None else gamma[..., -1, None, None].unbind(0)  # the whole chunk's decay (BH, 1, 1)
        for n in range(N):
            torch.baddbmm(u0[n], w[n], st[n], alpha=-1.0, out=nw[n])
            torch.baddbmm(st[n] if ge is None else st[n] * ge[n], ket[n], nw[n], out=st[n + 1])
        states, final = states[:N], states[N].clone()
        P = Qk * (L if strict else L + torch.eye(C, dtype=L.dtype, device=L.device))
        o = torch.matmul(q if gamma is None else q * gamma.unsqueeze(-1), states)
        o.view(N * BH, C, Dv).baddbmm_(P.view(N * BH, C, C), news.view(N * BH, C, Dv))
        ctx.strict = strict
        ctx.save_for_backward(q, k, v, beta, gamma, eps, reset, Kk, Qk, L, Tinv, W, ke, states, news)
        return o, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, d_final):
        q, k, v, beta, gamma, eps, reset, Kk, Qk, L, Tinv, W, ke, states, news = ctx.saved_tensors
        N, BH, C, Dk = q.shape
        do = do.contiguous()
        M = L if ctx.strict else L + torch.eye(C, dtype=L.dtype, device=L.device)
        # o = gamma q S_n + P u_n: the parts that need no recurrence, batched over all chunks
        dP = torch.matmul(do, news.transpose(-1, -2))
        d_news = torch.matmul((Qk * M).transpose(-1, -2), do)
        d_qg = torch.matmul(do, states.transpose(-1, -2))
        d_states = torch.matmul((q if gamma is None else q * gamma.unsqueeze(-1)).transpose(-1, -2), do)
        # the recurrence, last chunk first: du_n = d_news_n + ke_n dS_{n+1}; dS_n = g dS_{n+1} + d_states_n - W^T du_n
        dS_next = torch.empty_like(states)  # gradient of the state leaving each chunk
        du = torch.empty_like(news)
        dS0 = torch.empty_like(states[0])
        dsn, dun, dnw, ds = dS_next.unbind(0), du.unbind(0), d_news.unbind(0), d_states.unbind(0)
        ke_, wt = ke.unbind(0), W.transpose(-1, -2).unbind(0)
        ge = None if gamma is None else gamma[..., -1, None, None].unbind(0)
        if d_final is None:
            dsn[N - 1].zero_()
        else:
            dsn[N - 1].copy_(d_final)
        for n in range(N - 1, -1, -1):
            torch.baddbmm(dnw[n], ke_[n], dsn[n], out=dun[n])
            carried = ds[n] + dsn[n] if ge is None else torch.addcmul(ds[n], dsn[n], ge[n])
            torch.baddbmm(carried, wt[n], dun[n], alpha=-1.0, out=dsn[n - 1] if n > 0 else dS0)
        dW_neg = torch.matmul(du, states.transpose(-1, -2))  # -dL/dW
        d_ke = torch.matmul(news, dS_next.transpose(-1, -2))
        # U0 = (T * beta_col) v, W = (T * bg_col) k
        bcol = beta.unsqueeze(-2)
        bg = beta if gamma is None else beta * gamma
        dv = torch.matmul((Tinv * bcol).transpose(-1, -2), du)
        dTb = torch.matmul(du, v.transpose(-1, -2))  # d(T * beta_col)
        dTbg_neg = torch.matmul(dW_neg, k.transpose(-1, -2))  # -d(T * bg_col)
        dbeta = (dTb * Tinv).sum(-2)
        dbg = (dTbg_neg * Tinv).sum(-2).neg_()
        dTinv = torch.addcmul(dTb * bcol, dTbg_neg, bg.unsqueeze(-2), value=-1.0)
        # through the inverse, d(X^-1) = -X^-1 dX X^-1, to A = (Kk * L) * beta_row, then to k and q
        TinvT = Tinv.transpose(-1, -2)
        dA = torch.matmul(torch.matmul(TinvT, dTinv), TinvT).neg_().mul_(L)  # zero off the same-segment pairs s < t
        X = dA * Kk
        dbeta = dbeta + X.sum(-1)
        dKk = dA.mul_(beta.unsqueeze(-1))
        dQk = dP.mul_(M)
        dk = torch.matmul(dKk + dKk.transpose(-1, -2), k)
        dk3 = dk.view(N * BH, C, Dk)
        dk3.baddbmm_(dQk.view(N * BH, C, C).transpose(-1, -2), q.view(N * BH, C, Dk))
        dk3.baddbmm_(
            (Tinv * bg.unsqueeze(-2)).view(N * BH, C, C).transpose(-1, -2), dW_neg.view(N * BH, C, Dk), alpha=-1.0
        )
        dk.addcmul_(d_ke, eps.unsqueeze(-1)) if eps is not None else dk.add_(d_ke)
        dq = torch.matmul(dQk, k)
        dq.addcmul_(d_qg, gamma.unsqueeze(-1)) if gamma is not None else dq.add_(d_qg)
        dg = None
        if gamma is None:
            dbeta = dbeta + dbg
        else:
            dbeta = dbeta + dbg * gamma
            if ctx.needs_input_grad[4]:
                # gradient of the within-chunk cumulative log decay b, then of g (b = cumsum g; -inf positions get 0).
                # Pair decays exp(b_t - b_s): +row sums -column sums (the diagonal, exp(0), cancels).
                Z = X.mul_(beta.unsqueeze(-1)).addcmul_(dQk, Qk)
                db = Z.sum(-1) - Z.sum(-2) + ((d_qg * q).sum(-1) + dbg * beta) * gamma
                t_eps = (d_ke * k).sum(-1) * eps  # eps_s = exp(b_C - b_s)
                d_end = t_eps.sum(-1) + (dS_next * states).sum((-1, -2)) * gamma[..., -1]  # and gend = exp(b_C)
                db = db - t_eps + torch.nn.functional.pad(d_end.unsqueeze(-1), (C - 1, 0))
                dg = (db.sum(-1, keepdim=True) - db.cumsum(-1) + db).masked_fill(reset, 0.0)
        return dq, dk, dv, dbeta, dg, dS0, None


# A log-decay offset whose exp is exactly 0 in float32 and float64 (exp(-1000) underflows both).
_CUT = 1000.0


def _pair_decays(g: Tensor, lower: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Within-chunk decays from log decays ``g`` (..., C), ``-inf`` marking a boundary (the state resets before that
    token writes): ``L`` (..., C, C) with ``L[t, s] = a_{s+1..t}`` for s < t in the same segment (else 0), ``gamma_t
    = a_{1..t}`` (0 after a boundary in the chunk), ``eps_s = a_{s+1..C}`` (0 before the chunk's last boundary), and
    the boundary mask. Nothing positive is exponentiated: -inf becomes 0 in the cumulative sum; a pair across a
    boundary gets ``-_CUT`` per boundary added to its exponent (exactly 0 within a segment, so those pairs keep the
    cumsum's precision) and underflows to 0. Float arithmetic in place in one (..., C, C) buffer (bool masks and
    bool x float products are several times slower on CPU)."""
    reset = torch.isneginf(g)
    seg = torch.cumsum(reset.to(g.dtype), dim=-1)  # segment of each token inside its chunk (small exact integers)
    b = torch.cumsum(g.masked_fill(reset, 0.0), dim=-1)  # <= 0
    L = torch.sub(b.unsqueeze(-1), b.unsqueeze(-2))
    L.add_(seg.unsqueeze(-1) - seg.unsqueeze(-2), alpha=-_CUT).clamp_(max=0.0).exp_().mul_(lower.to(g.dtype))
    gamma = torch.where(seg == 0, torch.exp(b), 0.0)
    eps = torch.where(seg == seg[..., -1:], torch.exp(b[..., -1:] - b), 0.0)
    return L, gamma, eps, reset


def _chunkwise(q, k, v, beta, log_decay, initial_state, output_final_state, strict, scale, chunk_size):
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    out_dtype = v.dtype
    q, k, v, beta, g, fdt = _prep(q, k, v, beta, log_decay, scale)
    if T == 0:
        return _empty_result(q, v, initial_state, output_final_state, fdt)
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    if pad:  # a pad writes nothing (k = v = beta = 0) and keeps the state (log decay 0)
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta = torch.nn.functional.pad(beta, (0, pad))
        if g is not None:
            g = torch.nn.functional.pad(g, (0, pad))
    BH = B * H
    S0 = initial_state.to(fdt).reshape(BH, Dk, Dv) if initial_state is not None else q.new_zeros(BH, Dk, Dv)

    def chunk_major(x):  # (B, H, N * C, ...) -> (N, B * H, C, ...), contiguous: a run of chunks is a contiguous slice
        return x.reshape(BH, N, C, *x.shape[3:]).transpose(0, 1).contiguous()

    # blocks of chunks, one autograd node each, the state passed from block to block: each block's working set stays
    # in cache (measured ~20% faster than one node over all chunks at T=2048, B*H=4). split, not slicing: its
    # backward concatenates the blocks' gradients once (a slice's backward zero-fills a full-size tensor per block)
    per = max(1, _BLOCK_ROWS * 64 // (BH * C * max(Dk, Dv)))
    blocks = [chunk_major(x).split(per) for x in (q, k, v, beta)]
    blocks.append(chunk_major(g).split(per) if g is not None else [None] * len(blocks[0]))
    S, outs = S0, []
    for qb, kb, vb, bb, gb in zip(*blocks):
        o_blk, S = _Chunkwise.apply(qb, kb, vb, bb, gb, S, strict)
        outs.append(o_blk)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    o = o.transpose(0, 1).reshape(B, H, N * C, Dv)
    if pad:
        o = o[:, :, :T]
    return o.to(out_dtype), (S.view(B, H, Dk, Dv) if output_final_state else None)


def _parallel(q, k, v, beta, log_decay, initial_state, output_final_state, strict, scale):
    return _chunkwise(q, k, v, beta, log_decay, initial_state, output_final_state, strict, scale, max(q.shape[2], 1))


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------


def pick_mode(seq_len: int, chunk_size: int, has_state: bool) -> str:
    """The "auto" mode: recurrent for one token (or two continuing from a state: decoding), parallel when the input
    fits in one chunk (the same computation), chunkwise beyond."""
    if seq_len <= 1 or (has_state and seq_len <= _RECURRENT_MAX_LEN):
        return "recurrent"
    if seq_len <= chunk_size:
        return "parallel"
    return "chunkwise"


def _run(mode, q, k, v, beta, g, S0, out_state, strict, scale, chunk_size):
    if mode == "chunkwise":
        return _chunkwise(q, k, v, beta, g, S0, out_state, strict, scale, chunk_size)
    if mode == "parallel":
        return _parallel(q, k, v, beta, g, S0, out_state, strict, scale)
    return _recurrent(q, k, v, beta, g, S0, out_state, strict, scale)


def reverse_log_decay(log_decay: Tensor) -> Tensor:
    """Log decays of the anti-causal pass, in original time order: position t gets ``log a_{t+1}`` (0 at the end).

    So the decay from a later token s to t is ``a_{t+1} ... a_s``, the mirror image of the causal ``a_{s+1} ... a_t``,
    and a boundary (``-inf`` at a document's first token) cuts both directions at the same place.
    """
    return torch.nn.functional.pad(log_decay[..., 1:], (0, 1))


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_decay: Tensor | None = None,
    *,
    mode: str = "chunkwise",
    chunk_size: int = 64,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    bidirectional: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The gated delta rule ``S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = scale q_t S_t``.

    Args:
        q, k: (B, H, T, Dk), normalised by the caller (L2 per head: the rule is stable for ``0 <= beta <= 1``);
            v: (B, H, T, Dv); beta: (B, H, T) write strengths.
        log_decay: None (DeltaNet) or (B, H, T) log decays ``<= 0``; ``-inf`` marks a document boundary.
        mode: "parallel", "chunkwise", "recurrent", or "auto" (see ``pick_mode``).
        chunk_size: chunk length of the chunkwise form.
        scale: multiplies q (transformers' Qwen3-Next applies ``Dk ** -0.5``).
        initial_state: (B, H, Dk, Dv) state before the first token (causal direction).
        output_final_state: also return the state after the last token (float32; float64 for float64 inputs).
        bidirectional: add an anti-causal pass (encoders): the same rule run from the last token to the first, each
            output reading the reverse state before its own token's write (token t counts once, in the causal pass);
            decays as ``reverse_log_decay`` describes. It starts from a zero state.

    Returns ``(o, final_state)``; o is (B, H, T, Dv) in v's dtype; final_state is the causal direction's or None.
    """
    if mode == "auto":
        T = q.shape[2] if isinstance(q, Tensor) and q.dim() == 4 else 0
        mode = pick_mode(T, chunk_size, initial_state is not None)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES + ('auto',)}, got {mode!r}")
    _check(q, k, v, beta, log_decay, initial_state, chunk_size)
    # float32 throughout, also under autocast (whose bf16 matmuls would undo it; CPU has no bf16 triangular solve)
    with torch.autocast(device_type=q.device.type, enabled=False):
        return _gated_delta_rule(
            q, k, v, beta, log_decay, mode, chunk_size, scale, initial_state, output_final_state, bidirectional
        )


def _gated_delta_rule(
    q, k, v, beta, log_decay, mode, chunk_size, scale, initial_state, output_final_state, bidirectional
):
    o, final = _run(mode, q, k, v, beta, log_decay, initial_state, output_final_state, False, scale, chunk_size)
    if bidirectional:
        fl = [2]
        g_rev = torch.flip(reverse_log_decay(log_decay), fl) if log_decay is not None else None
        o_b, _ = _run(
            mode,
            torch.flip(q, fl),
            torch.flip(k, fl),
            torch.flip(v, fl),
            torch.flip(beta, fl),
            g_rev,
            None,
            False,
            True,
            scale,
            chunk_size,
        )
        o = o + torch.flip(o_b, fl)
    return o, final


def _form(mode: str):
    def form(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        beta: Tensor,
        log_decay: Tensor | None = None,
        *,
        chunk_size: int = 64,
        scale: float = 1.0,
        initial_state: Tensor | None = None,
        output_final_state: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        return gated_delta_rule(
            q,
            k,
            v,
            beta,
            log_decay,
            mode=mode,
            chunk_size=chunk_size,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
        )

    form.__name__ = f"{mode}_gated_delta_rule"
    form.__doc__ = f"``gated_delta_rule(..., mode={mode!r})`` (causal)."
    return form


chunkwise_gated_delta_rule = _form("chunkwise")
recurrent_gated_delta_rule = _form("recurrent")
parallel_gated_delta_rule = _form("parallel")
