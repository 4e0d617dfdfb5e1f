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
  chunks only ``u_n = U0_n - W_n S_n``, ``S_{n+1} = a_chunk S_n + K_n^T u_n`` (two small matmuls per chunk, with a
  hand-written backward, ``_InterChunk``); outputs ``o = gamma q S_n + P u`` batched after the loop. O(T).
* ``parallel``  -- the delta rule has no cheaper whole-sequence form than the triangular system itself, so this is
  the chunkwise form with one chunk spanning the input (quadratic memory; one solve of size T). Short inputs only.
* ``recurrent`` -- one token at a time; the reference and the decoding step.

Document boundaries and padding (as in every hf_extras kernel): a log decay of ``-inf`` at a token resets the state
before that token writes (the document's first token): a packed row gives each document the outputs it has alone,
forward and backward, with no NaN and nothing exponentiated above 0 (the chunkwise form replaces ``-inf`` by 0 in the
cumulative sums and cuts the pairs that span a boundary with a mask). A pad (``k = 0`` and ``v = 0``, or ``beta = 0``,
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


class _InterChunk(torch.autograd.Function):
    """The recurrence across chunks, ``u_n = U_n - W_n S_n``, ``S_{n+1} = g_n S_n + K_n u_n``, with a hand-written
    backward: two small matmuls per chunk each way, the rest batched over all chunks afterwards (autograd through
    the loop would add several ops and their bookkeeping per chunk, most of the run time for short chunks).

    Layout chunk-major: W (N, BH, C, Dk), U (N, BH, C, Dv), K (N, BH, Dk, C) (the decayed keys, transposed),
    g (N, BH, 1, 1) or None (no decay), S0 (BH, Dk, Dv). Returns the state entering each chunk (N, BH, Dk, Dv), the
    corrected values u (N, BH, C, Dv) and the final state.
    """

    @staticmethod
    def forward(ctx, W, U, K, g, S0):
        states, news = [], []
        S = S0
        for n in range(W.shape[0]):
            states.append(S)
            u = torch.baddbmm(U[n], W[n], S, alpha=-1.0)
            news.append(u)
            S = torch.baddbmm(S if g is None else S * g[n], K[n], u)
        states, news = torch.stack(states), torch.stack(news)
        ctx.save_for_backward(W, K, g, states, news)
        return states, news, S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_states, d_news, d_final):
        W, K, g, states, news = ctx.saved_tensors
        N = W.shape[0]
        dS = d_final if d_final is not None else torch.zeros_like(states[0])
        dS_next, du = [], []  # gradients of the state leaving each chunk and of u, last chunk first
        for n in range(N - 1, -1, -1):
            dS_next.append(dS)
            if d_news is None:
                u_grad = torch.bmm(K[n].transpose(-1, -2), dS)
            else:
                u_grad = torch.baddbmm(d_news[n], K[n].transpose(-1, -2), dS)
            du.append(u_grad)
            carried = dS if g is None else dS * g[n]
            if d_states is not None:
                carried = carried + d_states[n]
            dS = torch.baddbmm(carried, W[n].transpose(-1, -2), u_grad, alpha=-1.0)
        dS_next, du = torch.stack(dS_next[::-1]), torch.stack(du[::-1])
        dW = -torch.matmul(du, states.transpose(-1, -2)) if ctx.needs_input_grad[0] else None
        dK = torch.matmul(dS_next, news.transpose(-1, -2)) if ctx.needs_input_grad[2] else None
        dg = (dS_next * states).sum((-1, -2), keepdim=True) if g is not None and ctx.needs_input_grad[3] else None
        return dW, du, dK, dg, dS


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
    qc, kc, vc = q.view(B, H, N, C, Dk), k.view(B, H, N, C, Dk), v.view(B, H, N, C, Dv)
    bc = beta.view(B, H, N, C, 1)
    idx = torch.arange(C, device=q.device)
    lower = idx[:, None] > idx[None, :]  # s < t
    out_mask = (idx[:, None] > idx[None, :]) if strict else (idx[:, None] >= idx[None, :])

    if g is None:
        lower_w, out_w = lower, out_mask  # the pair weights: masks only
        gamma = gamma_end = eps = None
    else:
        # boundaries: -inf -> 0 in the sums, pairs across a boundary cut by segment ids (never exp(+x), never NaN)
        reset = torch.isneginf(g).view(B, H, N, C)
        seg = torch.cumsum(reset.to(fdt), dim=-1)  # segment of each token inside its chunk (small exact integers)
        b = torch.cumsum(g.masked_fill(torch.isneginf(g), 0.0).view(B, H, N, C), dim=-1)  # within chunk, <= 0
        same = seg.unsqueeze(-1) == seg.unsqueeze(-2)  # [t, s]: no boundary in (s, t]
        decay_pairs = torch.exp((b.unsqueeze(-1) - b.unsqueeze(-2)).clamp(max=0.0))  # [t, s] = a_{s+1..t}
        lower_w, out_w = decay_pairs * (same & lower), decay_pairs * (same & out_mask)
        gamma = (torch.exp(b) * (seg == 0)).unsqueeze(-1)  # chunk start -> t (inclusive), (B, H, N, C, 1)
        b_end, seg_end = b[..., -1:], seg[..., -1:]
        eps = (torch.exp(b_end - b) * (seg == seg_end)).unsqueeze(-1)  # s -> chunk end
        gamma_end = (torch.exp(b_end) * (seg_end == 0)).unsqueeze(-1)  # whole chunk, (B, H, N, 1, 1)

    kb = kc * bc
    A = torch.matmul(kb, kc.transpose(-1, -2))  # [t, s] = beta_t k_t . k_s
    P = torch.matmul(qc, kc.transpose(-1, -2))  # [t, s] = q_t . k_s
    A = A * lower_w  # strictly lower: the unit diagonal is implicit
    P = P * out_w
    Tinv = _unit_lower_inverse(A)  # (I + A)^-1
    U0 = torch.matmul(Tinv, vc * bc)  # u = U0 - W S (S = state entering the chunk)
    W = torch.matmul(Tinv, kb if gamma is None else kb * gamma)

    final = None
    if initial_state is None and not output_final_state and N == 1:
        o = torch.matmul(P, U0)
    else:
        q_in = qc if gamma is None else qc * gamma  # reads of the entering state
        k_out = kc if eps is None else kc * eps  # writes, decayed to the chunk end

        def chunk_major(x):  # (B, H, N, r, c) -> (N, B * H, r, c), contiguous
            return x.movedim(2, 0).reshape(N, B * H, x.shape[-2], x.shape[-1])

        def head_major(x):  # (N, B * H, r, c) -> (B, H, N, r, c)
            return x.view(N, B, H, x.shape[-2], x.shape[-1]).movedim(0, 2)

        S0 = initial_state.to(fdt) if initial_state is not None else q.new_zeros(B, H, Dk, Dv)
        g_end = chunk_major(gamma_end) if gamma_end is not None else None
        states, news, S = _InterChunk.apply(
            chunk_major(W), chunk_major(U0), chunk_major(k_out.transpose(-1, -2)), g_end, S0.reshape(B * H, Dk, Dv)
        )
        o = torch.matmul(q_in, head_major(states)) + torch.matmul(P, head_major(news))
        final = S.view(B, H, Dk, Dv) if output_final_state else None
    o = o.reshape(B, H, N * C, Dv)
    if pad:
        o = o[:, :, :T]
    return o.to(out_dtype), final


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
