"""The selective scan of Mamba (S6) as pure tensor functions.

Recurrence, per batch row, channel ``d`` and state ``n`` (``h`` is ``(D, N)``)::

    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t          (elementwise decay per (d, n))
    y_t = C_t . h_t + D x_t                              (sum over n)

Shapes: ``x, dt`` ``(batch, T, D)``, ``A`` ``(D, N)`` (negative), ``B, C`` ``(batch, T, N)``, ``D`` ``(D,)``, states
``(batch, D, N)`` (the layout of transformers' ``MambaMixer`` SSM state). ``dt`` is the step size *after* softplus
(>= 0; a padded token has ``dt = 0``, so it leaves the state unchanged).

Document boundaries (packed rows): ``reset`` (bool ``(batch, T)``, True at each document's first token; see
``packing.py``) makes the decay zero there, ``h_t = dt_t B_t x_t``: ``h_{t-1}`` (``initial_state`` too, at token 0)
is dropped, so each document gives exactly its outputs alone. It is a mask on the decay ``exp(dt A)`` (never a
``log`` of 0), so the log-space arithmetic and the gradients are unchanged elsewhere; every form (and the C kernel,
forward and backward) applies it, with no loop over documents. The anti-causal scan of ``bidirectional`` stops at
the token before each boundary (its decay multiplies ``h_bwd_{t+1}``), so no document sees another from either side.

Forms (they agree to float tolerance, take and return the recurrent state):

* ``recurrent``  -- one token at a time: the reference, and the decoding step.
* ``chunkwise``  -- a Python loop over chunks; inside a chunk a log-depth odd/even (Blelloch-style) parallel scan
  over time, with a hand-written backward that recomputes each chunk's states from the saved chunk-start state.
  Memory is O(batch * T * (D + N)) saved plus O(batch * chunk * D * N) transient, whatever T is.
* ``parallel``   -- the same odd/even scan over the whole sequence, differentiated by plain autograd (it keeps every
  level's states: O(batch * T * D * N) memory). Kept as a second fast form and for compile experiments.
* ``fused``      -- the compiled CPU kernel of ``scan_cpu_kernel`` (C, one pass over time per block of channels,
  the state in L1, a checkpoint every 64 steps for its backward); float32 on a CPU only, elsewhere it falls back to
  ``chunkwise`` with the same numbers.
* ``auto``       -- ``recurrent`` for single-token steps; otherwise ``fused`` where it applies (float32 on a CPU, the
  kernel built, ``HF_EXTRAS_CPU_KERNEL`` not 0), else ``chunkwise``.

Numerics: decays are only ever ``exp`` of non-positive numbers (``dt >= 0``, ``A < 0``), and the parallel scan
combines them by multiplication (products of numbers in ``[0, 1]``), so nothing overflows for any ``dt * A``
(log decays of -50 per step and beyond underflow exactly to 0, as the recurrence does). States and outputs are
computed in float32 (float64 for float64 inputs), whatever the input dtype.

``bidirectional=True`` (encoders): a causal scan plus an anti-causal scan of the time-flipped sequence, with the
same ``dt, A, B, C``, combined as::

    y_t = C_t . h_fwd_t + C_t . h_bwd_t - C_t . (dt_t B_t x_t) + D x_t

where ``h_fwd_t = exp(dt_t A) h_fwd_{t-1} + dt_t B_t x_t`` and ``h_bwd_t = exp(dt_t A) h_bwd_{t+1} + dt_t B_t x_t``.
Both scans include token t itself, so its own contribution is subtracted once (and ``D x`` added once). In matrix
form ``y = M x + D x`` with ``M[t, s] = C_t . (prod of the decays strictly between s and t, and t's own) dt_s B_s``
for every s (the causal kernel for s <= t and its mirror for s > t).

Why ``chunkwise`` is the PyTorch form ``auto`` falls back to (``parallel`` keeps every level of the whole-sequence
scan for autograd, hence its memory and slowness at length; it stays available because it compiles as one graph) and
why ``fused`` is ~3x faster (it reads each ``(T, D)`` input once and keeps the ``(D, N)`` state in registers): timings
in ``benchmarks/results/NOTES_kernels.md``.

Threads: a chunk is ~100 small ops, so the chunk loop runs on one intra-op thread when chunks are small
(``SERIAL_MAX_ELEMENTS``): on an oversubscribed machine every multi-threaded op otherwise waits for a descheduled
worker thread at its join. The thread count is restored after the loop.

This file is copied into saved checkpoints (with ``scan_cpu_kernel``, and ``retention_ops`` for ``_float_dtype``): it
must import only torch and the standard library.
"""

import torch
from torch import Tensor

from .retention_ops import _float_dtype, backward_resets
from .scan_cpu_kernel import fused_scan, kernel_applies

__all__ = [
    "selective_scan",
    "linear_scan",
    "pick_scan_mode",
    "SCAN_MODES",
]

SCAN_MODES = ("parallel", "chunkwise", "recurrent", "fused")


# --------------------------------------------------------------------------------------------
# the log-depth scan h_t = a_t * h_{t-1} + u_t along dim 1
# --------------------------------------------------------------------------------------------


def linear_scan(a: Tensor, u: Tensor, reverse: bool = False) -> Tensor:
    """All states of ``h_t = a_t * h_{t-1} + u_t`` (``h_{-1} = 0``) along dim 1, in O(log T) tensor ops.

    ``reverse=True`` scans from the end: ``h_t = a_t * h_{t+1} + u_t``. ``a`` and ``u`` have the same shape
    ``(batch, T, ...)``; ``a`` holds decays in ``[0, 1]``. Odd/even reduction: pairs of steps are combined into one
    step (``a = a_e a_o``, ``u = u_o + a_o u_e``), the half-length problem is solved recursively, and the other half
    of the states is filled in with one multiply-add. Differentiable by autograd; no loop over tokens.
    """
    T = a.shape[1]
    if T == 1:
        return u
    if T == 2:
        if reverse:
            h1 = u[:, 1:]
            return torch.cat([torch.addcmul(u[:, :1], a[:, :1], h1), h1], dim=1)
        h0 = u[:, :1]
        return torch.cat([h0, torch.addcmul(u[:, 1:], a[:, 1:], h0)], dim=1)
    if T % 2:
        # peel off the step that is processed last and fill it in with one multiply-add
        if reverse:
            rest = linear_scan(a[:, 1:], u[:, 1:], reverse=True)
            return torch.cat([torch.addcmul(u[:, :1], a[:, :1], rest[:, :1]), rest], dim=1)
        rest = linear_scan(a[:, :-1], u[:, :-1])
        return torch.cat([rest, torch.addcmul(u[:, -1:], a[:, -1:], rest[:, -1:])], dim=1)
    a_e, a_o = a[:, 0::2], a[:, 1::2]
    u_e, u_o = u[:, 0::2], u[:, 1::2]
    if reverse:
        # pair (e, o) steps o first: h_e = a_e a_o h_next + (u_e + a_e u_o)
        h_e = linear_scan(a_e * a_o, torch.addcmul(u_e, a_e, u_o), reverse=True)
        h_o_last = u_o[:, -1:]
        h_o = torch.cat([torch.addcmul(u_o[:, :-1], a_o[:, :-1], h_e[:, 1:]), h_o_last], dim=1)
    else:
        h_o = linear_scan(a_e * a_o, torch.addcmul(u_o, a_o, u_e))
        h_e = torch.cat([u_e[:, :1], torch.addcmul(u_e[:, 1:], a_e[:, 1:], h_o[:, :-1])], dim=1)
    return torch.stack([h_e, h_o], dim=2).flatten(1, 2)


# --------------------------------------------------------------------------------------------
# recurrent (reference, decoding)
# --------------------------------------------------------------------------------------------


def _recurrent(x, dt, A, B, C, h, reset=None):
    outs = []
    for t in range(x.shape[1]):
        a = torch.exp(dt[:, t, :, None] * A)
        if reset is not None:
            a = a.masked_fill(reset[:, t, None, None], 0.0)
        h = a * h + (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        outs.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    y = torch.stack(outs, dim=1) if outs else x.new_zeros(x.shape)
    return y, h


# --------------------------------------------------------------------------------------------
# parallel: whole-sequence odd/even scan under autograd
# --------------------------------------------------------------------------------------------


def _parallel(x, dt, A, B, C, h0, reverse=False, reset=None):
    a = torch.exp(dt[..., None] * A)
    if reset is not None:
        a = a.masked_fill(reset[:, :, None, None], 0.0)
    u = (dt * x)[..., None] * B[:, :, None, :]
    if h0 is not None:
        idx = -1 if reverse else 0
        first = torch.addcmul(u[:, idx], a[:, idx], h0).unsqueeze(1)
        u = torch.cat([u[:, :-1], first], 1) if reverse else torch.cat([first, u[:, 1:]], 1)
    h = linear_scan(a, u, reverse=reverse)
    y = torch.einsum("btdn,btn->btd", h, C)
    return y, h[:, 0 if reverse else -1]


# --------------------------------------------------------------------------------------------
# chunkwise: loop over chunks, in-place odd/even scan inside, recomputing backward
# --------------------------------------------------------------------------------------------

_LOG2_E = 1.4426950408889634


def _scan_(a: Tensor, u: Tensor, reverse: bool = False, work: Tensor | None = None) -> None:
    """In place: ``u`` <- all states of ``h_t = a_t h_{t-1} + u_t`` (``reverse``: ``h_t = a_t h_{t+1} + u_t``).

    The same odd/even reduction as ``linear_scan`` written with in-place multiply-adds on strided views of ``u``
    (pair inputs are combined into the odd slots, solved recursively there, then the even slots are filled in):
    no concatenation. The pair decays (T/2 + T/4 + ... < T steps) go to ``work`` (``(batch, >= T - 1, ...)``) when
    given, else to fresh tensors. ``a`` is not modified. Not differentiable (used inside ``_ChunkwiseScan``).
    """
    T = u.shape[1]
    if T <= 4:  # a few sequential multiply-adds: fewer tensor ops than two more levels
        steps = range(T - 2, -1, -1) if reverse else range(1, T)
        for t in steps:
            u[:, t].addcmul_(a[:, t], u[:, t + 1] if reverse else u[:, t - 1])
        return
    if T % 2:
        # peel off the last-processed step: solve the rest, then one multiply-add
        if reverse:
            _scan_(a[:, 1:], u[:, 1:], True, work)
            u[:, 0].addcmul_(a[:, 0], u[:, 1])
        else:
            _scan_(a[:, :-1], u[:, :-1], False, work)
            u[:, -1].addcmul_(a[:, -1], u[:, -2])
        return
    a_e, a_o = a[:, 0::2], a[:, 1::2]
    u_e, u_o = u[:, 0::2], u[:, 1::2]
    half = T // 2
    if work is None:
        a_pair, rest = a_e * a_o, None
    else:
        a_pair, rest = torch.mul(a_e, a_o, out=work[:, :half]), work[:, half:]
    if reverse:
        u_e.addcmul_(a_e, u_o)
        _scan_(a_pair, u_e, True, rest)
        u_o[:, :-1].addcmul_(a_o[:, :-1], u_e[:, 1:])
    else:
        u_o.addcmul_(a_o, u_e)
        _scan_(a_pair, u_o, False, rest)
        u_e[:, 1:].addcmul_(a_e[:, 1:], u_o[:, :-1])


class _Workspace:
    """Chunk-sized ``(batch, L, D, N)`` buffers reused by every chunk of one call.

    Allocating fresh multi-MiB arrays for every chunk costs a page fault per 4 KiB on first touch (measurement in
    ``benchmarks/results/NOTES_kernels.md``).
    """

    def __init__(self, ref: Tensor, batch: int, length: int, D: int, N: int, names=("a", "h", "work")):
        for name in names:
            setattr(self, name, ref.new_empty(batch, length, D, N))


def _chunk_states(v, dt, A2, B, h_start, ws: _Workspace, keep: Tensor | None = None):
    """Decays ``a`` and states ``h`` of one chunk (views of ``ws``), both ``(batch, L, D, N)``; ``A2 = A log2(e)``.

    ``exp2`` is used for the decays: the same values as ``exp(dt A)`` to float rounding, and about twice as fast as
    ``exp`` on CPU. ``keep`` (``(batch, L)``, 0 at document starts, else 1) zeroes the decays at boundaries.
    """
    length = v.shape[1]
    a = torch.mul(dt[..., None], A2, out=ws.a[:, :length]).exp2_()
    if keep is not None:
        a.mul_(keep[:, :, None, None])
    h = torch.mul(v[..., None], B[:, :, None, :], out=ws.h[:, :length])
    h[:, 0].addcmul_(a[:, 0], h_start)
    _scan_(a, h, False, ws.work)
    return a, h


# The chunk loop runs its ops on one intra-op thread when a chunk's (batch, L, D, N) arrays have at most this many
# elements (the default width-512, batch-1, 64-token chunk has 2**19). Each chunk is ~100 small ops: with more
# threads every op forks and joins the pool, and on an oversubscribed machine each join waits for a descheduled
# worker (measurements in benchmarks/results/NOTES_kernels.md). Set it to 0 to always use torch's thread count;
# larger chunks (big batch or width) always do.
SERIAL_MAX_ELEMENTS = 2**20


class _intra_op_threads:
    """``torch.set_num_threads(1)`` inside (when ``enabled``), restored after; a no-op under ``torch.compile``."""

    def __init__(self, enabled: bool):
        self.enabled, self.saved = enabled, None

    def __enter__(self):
        if self.enabled and not torch.compiler.is_compiling():
            saved = torch.get_num_threads()
            if saved > 1:
                self.saved = saved
                torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            torch.set_num_threads(self.saved)
            self.saved = None
        return False


def _serial(x: Tensor, A: Tensor, chunk_size: int) -> bool:
    return x.shape[0] * min(chunk_size, x.shape[1]) * x.shape[2] * A.shape[1] <= SERIAL_MAX_ELEMENTS


class _ChunkwiseScan(torch.autograd.Function):
    """``y_t = C_t . h_t`` and the final state; saves only the inputs and one state per chunk.

    Backward, per chunk from the last: the chunk's decays and states, recomputed from its saved start state (as
    fast as keeping them from the forward on a CPU, where re-reading them from memory costs about as much as
    recomputing them in cache; and memory stays O(batch * T * (D + N)) at any length), the adjoint recurrence ``G_t = C_t gy_t + a_{t+1} G_{t+1}`` as a reverse scan, then::

        dL/dC_t = gy_t . h_t        dL/d(dt_t x_t) = G_t . B_t      dL/dB_t = sum_d G_t dt_t x_t
        dL/d(dt_t A) = G_t a_t h_{t-1}  (-> dt and A)                dL/dh_start = a_0 G_0
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0, chunk_size, reset=None):
        batch, T, D = x.shape
        N = A.shape[-1]
        A2 = A * _LOG2_E
        v = dt * x
        keep = (~reset).to(x.dtype) if reset is not None else None
        keeps = keep.split(chunk_size, 1) if keep is not None else [None] * (-(-T // chunk_size))
        h = h0 if h0 is not None else x.new_zeros(batch, D, N)
        y = x.new_empty(batch, T, D)
        starts = []
        ws = _Workspace(x, batch, min(chunk_size, T), D, N)
        with _intra_op_threads(_serial(x, A, chunk_size)):
            for vc, dtc, Bc, Cc, yc, kc in zip(
                v.split(chunk_size, 1),
                dt.split(chunk_size, 1),
                B.split(chunk_size, 1),
                C.split(chunk_size, 1),
                y.split(chunk_size, 1),
                keeps,
            ):
                starts.append(h)
                _, states = _chunk_states(vc, dtc, A2, Bc, h, ws, kc)
                yc.copy_(torch.einsum("bldn,bln->bld", states, Cc))
                h = states[:, -1].clone()
        ctx.save_for_backward(x, dt, A, B, C, torch.stack(starts, 0), keep)
        ctx.chunk_size = chunk_size
        ctx.has_h0 = h0 is not None
        return y, h

    @staticmethod
    def backward(ctx, gy, gh_last):
        x, dt, A, B, C, starts, keep = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        batch, T, D = x.shape
        N = A.shape[-1]
        A2 = A * _LOG2_E
        v = dt * x
        gv, gdt = torch.empty_like(x), torch.empty_like(dt)
        gB, gC = torch.empty_like(B), torch.empty_like(C)
        gA = torch.zeros_like(A)
        g = gh_last.to(x.dtype) if gh_last is not None else torch.zeros_like(starts[0])
        if gy is None:
            gy = torch.zeros_like(x)
        chunks = list(
            zip(
                v.split(chunk_size, 1),
                dt.split(chunk_size, 1),
                B.split(chunk_size, 1),
                C.split(chunk_size, 1),
                gy.split(chunk_size, 1),
                gv.split(chunk_size, 1),
                gdt.split(chunk_size, 1),
                gB.split(chunk_size, 1),
                gC.split(chunk_size, 1),
                keep.split(chunk_size, 1) if keep is not None else [None] * (-(-T // chunk_size)),
            )
        )
        ws = _Workspace(x, batch, min(chunk_size, T), D, N, names=("a", "h", "work", "G"))
        with _intra_op_threads(_serial(x, A, chunk_size)):
            for i in reversed(range(len(chunks))):
                vc, dtc, Bc, Cc, gyc, gvc, gdtc, gBc, gCc, kc = chunks[i]
                length = vc.shape[1]
                h_start = starts[i]
                a, states = _chunk_states(vc, dtc, A2, Bc, h_start, ws, kc)
                gCc.copy_(torch.einsum("bldn,bld->bln", states, gyc))
                # adjoint: G_t = C_t gy_t + a_{t+1} G_{t+1}, with the later chunks' gradient g entering at the end
                G = torch.mul(gyc[..., None], Cc[:, :, None, :], out=ws.G[:, :length])
                G[:, -1] += g
                if length > 1:
                    G[:, -2].addcmul_(a[:, -1], G[:, -1])
                    _scan_(a[:, 1:], G[:, :-1], True, ws.work)
                g = a[:, 0] * G[:, 0]
                # dL/d(dt A) = G_t a_t h_{t-1}, in `a`'s buffer
                g_log_a = a.mul_(G)
                g_log_a[:, 1:] *= states[:, :-1]
                g_log_a[:, 0] *= h_start
                gvc.copy_(torch.einsum("bldn,bln->bld", G, Bc))
                gBc.copy_(torch.einsum("bldn,bld->bln", G, vc))
                scratch = ws.h[:, :length]  # the states are no longer needed
                torch.sum(torch.mul(g_log_a, A, out=scratch), -1, out=gdtc)
                gA += torch.mul(g_log_a, dtc[..., None], out=scratch).sum((0, 1))
        gx = gv * dt
        gdt = gdt.addcmul_(gv, x)
        return gx, gdt, gA, gB, gC, (g if ctx.has_h0 else None), None, None


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def _check(x, dt, A, B, C, D, initial_state, reset=None):
    if x.dim() != 3 or dt.shape != x.shape:
        raise ValueError(f"x and dt must both have shape (batch, T, D), got {tuple(x.shape)} and {tuple(dt.shape)}")
    batch, T, d = x.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must have shape (D={d}, N), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (batch, T, n):
            raise ValueError(f"{name} must have shape (batch={batch}, T={T}, N={n}), got {tuple(t.shape)}")
    if D is not None and tuple(D.shape) != (d,):
        raise ValueError(f"D must have shape ({d},), got {tuple(D.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, d, n):
        raise ValueError(f"initial_state must have shape ({batch}, {d}, {n}), got {tuple(initial_state.shape)}")
    if reset is not None and (
        not isinstance(reset, Tensor) or reset.dtype != torch.bool or tuple(reset.shape) != (batch, T)
    ):
        got = f"{reset.dtype} {tuple(reset.shape)}" if isinstance(reset, Tensor) else type(reset).__name__
        raise ValueError(
            f"reset must be a bool Tensor of shape (batch, T) = {(batch, T)}, True at each document's first token "
            f"(see packing.document_starts), got {got}"
        )


def pick_scan_mode(seq_len: int, has_state: bool = False, x: Tensor | None = None, state_size: int = 16) -> str:
    """``recurrent`` for a single decoding step; longer inputs ``fused`` where the compiled CPU kernel applies to
    ``x`` (float32 on a CPU, kernel built), else ``chunkwise`` (see the module docstring)."""
    if seq_len == 1:
        return "recurrent"
    return "fused" if x is not None and kernel_applies(x, state_size) else "chunkwise"


def _causal(mode, x, dt, A, B, C, h0, chunk_size, reverse=False, reset=None):
    """One scan direction; ``reset`` (in the input's time order) zeroes the decay at its True tokens."""
    if mode == "parallel":
        return _parallel(x, dt, A, B, C, h0, reverse=reverse, reset=reset)
    if reverse:
        flip = lambda t: None if t is None else t.flip(1)  # noqa: E731
        y, h = _causal(mode, flip(x), flip(dt), A, flip(B), flip(C), h0, chunk_size, reset=flip(reset))
        return y.flip(1), h
    if mode == "recurrent":
        return _recurrent(x, dt, A, B, C, h0, reset)
    if mode == "fused":
        return fused_scan(x, dt, A, B, C, h0, reset)
    return _ChunkwiseScan.apply(x, dt, A, B, C, h0, chunk_size, reset)


def selective_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    mode: str = "auto",
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    bidirectional: bool = False,
    *,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``y = scan(x; dt, A, B, C) + D x`` and the final state (``None`` unless ``output_final_state``).

    Outputs are float32 (float64 for float64 inputs); the caller casts back. ``reset``: optional bool
    ``(batch, T)``, True at each packed document's first token (the state is dropped there). See the module
    docstring for the recurrence, the forms, boundaries and the bidirectional combination.
    """
    _check(x, dt, A, B, C, D, initial_state, reset)
    if mode != "auto" and mode not in SCAN_MODES:
        raise ValueError(f"mode must be 'auto' or one of {SCAN_MODES}, got {mode!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if bidirectional and (initial_state is not None or output_final_state):
        raise ValueError("a bidirectional scan has no recurrent state to start from or to return")
    fdt = _float_dtype(x.dtype)
    x, dt, A, B, C = (t.to(fdt) for t in (x, dt, A, B, C))
    h0 = initial_state.to(fdt) if initial_state is not None else None
    if mode == "auto":
        mode = pick_scan_mode(x.shape[1], initial_state is not None, x, A.shape[1])
    elif mode == "fused" and not kernel_applies(x, A.shape[1]):
        mode = "chunkwise"  # float64, a GPU, N > 64, no compiler, or HF_EXTRAS_CPU_KERNEL=0: the same numbers
    batch, T, d = x.shape
    if T == 0:
        state = h0 if h0 is not None else x.new_zeros(batch, d, A.shape[1])
        return x.new_zeros(batch, 0, d), (state if output_final_state else None)
    if h0 is None and mode == "recurrent":
        h0 = x.new_zeros(batch, d, A.shape[1])
    y, h = _causal(mode, x, dt, A, B, C, h0, chunk_size, reset=reset)
    if bidirectional:
        # the anti-causal decay at t multiplies h_bwd_{t+1}: a document starting at r is cut off at r - 1
        reset_bwd = None if reset is None else backward_resets(reset)
        h0_bwd = x.new_zeros(batch, d, A.shape[1]) if mode == "recurrent" else None
        y_bwd, _ = _causal(mode, x, dt, A, B, C, h0_bwd, chunk_size, reverse=True, reset=reset_bwd)
        # both scans counted token t itself: subtract C_t . (dt_t B_t x_t) once
        y = y + y_bwd - (dt * x) * (B * C).sum(-1, keepdim=True)
    if D is not None:
        y = y + x * D.to(fdt)
    return y, (h if output_final_state else None)
