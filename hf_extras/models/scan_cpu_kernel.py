"""A fused selective scan for CPUs: a small C kernel, compiled on first use, called through ``ctypes``.

Why: on a CPU the PyTorch chunkwise scan is memory-bound. It materialises the ``(T, D, N)`` decays and states in
~15 array-sized passes forward and ~40 backward, while the recurrence itself needs one pass over ``(T, D)`` inputs
with the ``(D, N)`` state in registers. No maintained library ships a CPU selective scan (``mamba_ssm`` and
flash-linear-attention are GPU-only), so this file holds one, written for the semantics of ``scan_ops``:

* forward: per batch row and block of 16 channels, a loop over time with the block's state in L1, saving the state
  at every ``CHECKPOINT``-th step (``(batch, T / CHECKPOINT, D, N)``);
* backward: per block, chunks from the last: the chunk's states recomputed from its checkpoint, then the adjoint
  recurrence backwards in time (the formulas of ``scan_ops._ChunkwiseScan``). ``dB`` and ``dC`` (sums over
  channels) and ``dA`` (a sum over batch rows) are written as per-block / per-row partial sums that the caller adds,
  so the result does not depend on the thread count or schedule.
* document boundaries: an optional ``reset`` mask (``(batch, T)`` bytes, 1 at a document's first token) zeroes the
  decay at that step, forward and in the backward's recomputation, so ``h_{t-1}`` is dropped and no gradient flows
  through it (the semantics of ``scan_ops``).

``exp`` is a degree-7 polynomial on ``2^f`` (relative error < 1e-8, below float32 rounding) so that the compiler
vectorises it; arguments below ``-126 / log2(e)`` give 0, like float32 ``exp`` (to 1e-38). Threads are POSIX
threads (``torch.get_num_threads()`` of them, at most one per work item), not OpenMP: a second OpenMP runtime
beside torch's would fight it for cores.

Built on first use by ``cpu_kernel_build`` (a machine with no C compiler, or a failed build, gets ``None`` from
``load_kernel()`` and ``scan_ops`` uses its PyTorch forms; ``HF_EXTRAS_CPU_KERNEL=0`` turns the kernel off). Float32
only (float64 stays on the PyTorch forms, which are the reference).

This file is copied into saved checkpoints: it imports only torch and the standard library.
"""

import ctypes

import torch
from torch import Tensor

from .cpu_kernel_build import C_COMMON, build_library, kernel_enabled

_LOG2_E = 1.4426950408889634
CHECKPOINT = 64  # steps between saved states (backward recomputes at most this many per block)
BLOCK = 16  # channels per work item

_SOURCE = (
    C_COMMON
    + r"""
#define BLOCK @BLOCK@

typedef struct {
    const float *x, *dt, *A2t, *At, *B, *C, *h0, *gy, *gh;
    const uint8_t *reset;
    float *y, *h_last, *ckpt, *dx, *ddt, *dB, *dC, *dA, *dh0, *work;
    int64_t batch, T, D, Dp, N, K, nblk, nck;
    int tid;
} args_t;

/* States are [n][j] in a block (j: the block's BLOCK channels), so the inner loops run over channels: the decays
   A2t / At are (N, Dp) with Dp = nblk * BLOCK (zero-padded), and padded channels have dt = x = 0 (state stays 0). */

static inline void load_row(const float *src, int64_t row, int64_t nd, float *dst) {
    for (int64_t j = 0; j < BLOCK; j++) dst[j] = j < nd ? src[row + j] : 0.0f;
}

static void fwd_item(const args_t *a, int64_t item) {
    const int64_t T = a->T, D = a->D, Dp = a->Dp, N = a->N, K = a->K;
    const int64_t b = item / a->nblk, d0 = (item % a->nblk) * BLOCK;
    const int64_t nd = d0 + BLOCK < D ? BLOCK : D - d0;
    float h[64 * BLOCK], dtv[BLOCK], xv[BLOCK], v[BLOCK], acc[BLOCK];
    for (int64_t n = 0; n < N; n++)
        for (int64_t j = 0; j < BLOCK; j++) h[n * BLOCK + j] = (a->h0 && j < nd) ? a->h0[(b * D + d0 + j) * N + n] : 0.0f;
    for (int64_t t = 0; t < T; t++) {
        if (a->ckpt && t % K == 0) {
            float *dst = a->ckpt + ((b * a->nck + t / K) * D + d0) * N;
            for (int64_t j = 0; j < nd; j++)
                for (int64_t n = 0; n < N; n++) dst[j * N + n] = h[n * BLOCK + j];
        }
        const int64_t row = (b * T + t) * D + d0;
        const float *Bt = a->B + (b * T + t) * N, *Ct = a->C + (b * T + t) * N;
        const float keep = (a->reset && a->reset[b * T + t]) ? 0.0f : 1.0f; /* 0: a document starts here */
        load_row(a->dt, row, nd, dtv);
        load_row(a->x, row, nd, xv);
        for (int64_t j = 0; j < BLOCK; j++) { v[j] = dtv[j] * xv[j]; acc[j] = 0.0f; }
        for (int64_t n = 0; n < N; n++) {
            const float bn = Bt[n], cn = Ct[n], *A2n = a->A2t + n * Dp + d0;
            float *hn = h + n * BLOCK;
#pragma omp simd
            for (int64_t j = 0; j < BLOCK; j++) {
                const float hv = exp2_neg(dtv[j] * A2n[j]) * keep * hn[j] + v[j] * bn;
                hn[j] = hv;
                acc[j] += cn * hv;
            }
        }
        for (int64_t j = 0; j < nd; j++) a->y[row + j] = acc[j];
    }
    if (a->h_last)
        for (int64_t j = 0; j < nd; j++)
            for (int64_t n = 0; n < N; n++) a->h_last[(b * D + d0 + j) * N + n] = h[n * BLOCK + j];
}

static void bwd_item(const args_t *a, int64_t item) {
    const int64_t T = a->T, D = a->D, Dp = a->Dp, N = a->N, K = a->K;
    const int64_t b = item / a->nblk, blk = item % a->nblk, d0 = blk * BLOCK;
    const int64_t nd = d0 + BLOCK < D ? BLOCK : D - d0, S = N * BLOCK;
    float g[64 * BLOCK], dA[64 * BLOCK], dtv[BLOCK], xv[BLOCK], v[BLOCK], gyv[BLOCK], dv[BLOCK], dlaA[BLOCK];
    /* per thread: the chunk's states (start state first) and decays */
    float *hbuf = a->work + (int64_t)a->tid * (2 * K + 1) * S, *abuf = hbuf + (K + 1) * S;
    float *dBp = a->dB + (b * a->nblk + blk) * T * N, *dCp = a->dC + (b * a->nblk + blk) * T * N;
    for (int64_t n = 0; n < N; n++)
        for (int64_t j = 0; j < BLOCK; j++) {
            g[n * BLOCK + j] = (a->gh && j < nd) ? a->gh[(b * D + d0 + j) * N + n] : 0.0f;
            dA[n * BLOCK + j] = 0.0f;
        }
    for (int64_t c = a->nck - 1; c >= 0; c--) {
        const int64_t t0 = c * K, t1 = t0 + K < T ? t0 + K : T;
        const float *src = a->ckpt + ((b * a->nck + c) * D + d0) * N;
        for (int64_t n = 0; n < N; n++)
            for (int64_t j = 0; j < BLOCK; j++) hbuf[n * BLOCK + j] = j < nd ? src[j * N + n] : 0.0f;
        for (int64_t t = t0; t < t1; t++) {
            const int64_t row = (b * T + t) * D + d0;
            const float *Bt = a->B + (b * T + t) * N;
            const float *hp = hbuf + (t - t0) * S;
            float *hc = hbuf + (t - t0 + 1) * S, *ac = abuf + (t - t0) * S;
            const float keep = (a->reset && a->reset[b * T + t]) ? 0.0f : 1.0f;
            load_row(a->dt, row, nd, dtv);
            load_row(a->x, row, nd, xv);
            for (int64_t j = 0; j < BLOCK; j++) v[j] = dtv[j] * xv[j];
            for (int64_t n = 0; n < N; n++) {
                const float bn = Bt[n], *A2n = a->A2t + n * Dp + d0;
#pragma omp simd
                for (int64_t j = 0; j < BLOCK; j++) {
                    const float an = exp2_neg(dtv[j] * A2n[j]) * keep;
                    ac[n * BLOCK + j] = an;
                    hc[n * BLOCK + j] = an * hp[n * BLOCK + j] + v[j] * bn;
                }
            }
        }
        for (int64_t t = t1 - 1; t >= t0; t--) {
            const int64_t row = (b * T + t) * D + d0;
            const float *Bt = a->B + (b * T + t) * N, *Ct = a->C + (b * T + t) * N;
            const float *hp = hbuf + (t - t0) * S, *hc = hbuf + (t - t0 + 1) * S, *ac = abuf + (t - t0) * S;
            float *dBt = dBp + t * N, *dCt = dCp + t * N;
            load_row(a->dt, row, nd, dtv);
            load_row(a->x, row, nd, xv);
            load_row(a->gy, row, nd, gyv);
            for (int64_t j = 0; j < BLOCK; j++) { v[j] = dtv[j] * xv[j]; dv[j] = 0.0f; dlaA[j] = 0.0f; }
            for (int64_t n = 0; n < N; n++) {
                const float bn = Bt[n], cn = Ct[n], *An = a->At + n * Dp + d0;
                float *gn = g + n * BLOCK, *dAn = dA + n * BLOCK, sC = 0.0f, sB = 0.0f;
#pragma omp simd reduction(+ : sC, sB)
                for (int64_t j = 0; j < BLOCK; j++) {
                    const float an = ac[n * BLOCK + j];
                    const float G = gyv[j] * cn + gn[j];
                    sC += gyv[j] * hc[n * BLOCK + j];
                    sB += G * v[j];
                    dv[j] += G * bn;
                    const float dla = G * an * hp[n * BLOCK + j];
                    dlaA[j] += dla * An[j];
                    dAn[j] += dla * dtv[j];
                    gn[j] = an * G;
                }
                dCt[n] += sC;
                dBt[n] += sB;
            }
            for (int64_t j = 0; j < nd; j++) {
                a->dx[row + j] = dv[j] * dtv[j];
                a->ddt[row + j] = dlaA[j] + dv[j] * xv[j];
            }
        }
    }
    for (int64_t j = 0; j < nd; j++)
        for (int64_t n = 0; n < N; n++) {
            a->dA[(b * D + d0 + j) * N + n] = dA[n * BLOCK + j];
            if (a->dh0) a->dh0[(b * D + d0 + j) * N + n] = g[n * BLOCK + j];
        }
}

/* hfx_parallel workers: a private copy of the arguments with this thread's id (bwd_item's work buffer) */
static void run_fwd(const void *p, int tid, int nt) {
    args_t a = *(const args_t *)p;
    a.tid = tid;
    for (int64_t i = tid; i < a.batch * a.nblk; i += nt) fwd_item(&a, i);
}

static void run_bwd(const void *p, int tid, int nt) {
    args_t a = *(const args_t *)p;
    a.tid = tid;
    for (int64_t i = tid; i < a.batch * a.nblk; i += nt) bwd_item(&a, i);
}

int hfx_scan_fwd(const float *x, const float *dt, const float *A2t, const float *B, const float *C, const float *h0,
                 const uint8_t *reset, float *y, float *h_last, float *ckpt, int64_t batch, int64_t T, int64_t D,
                 int64_t N, int64_t K, int nthreads) {
    if (N > 64) return -2;
    args_t a; memset(&a, 0, sizeof(a));
    a.x = x; a.dt = dt; a.A2t = A2t; a.B = B; a.C = C; a.h0 = h0; a.reset = reset;
    a.y = y; a.h_last = h_last; a.ckpt = ckpt;
    a.batch = batch; a.T = T; a.D = D; a.N = N; a.K = K; a.nblk = (D + BLOCK - 1) / BLOCK; a.Dp = a.nblk * BLOCK;
    a.nck = (T + K - 1) / K;
    hfx_parallel(run_fwd, &a, nthreads);
    return 0;
}

int hfx_scan_bwd(const float *x, const float *dt, const float *A2t, const float *At, const float *B, const float *C,
                 const uint8_t *reset, const float *ckpt, const float *gy, const float *gh, float *dx, float *ddt,
                 float *dB, float *dC, float *dA, float *dh0, float *work, int64_t batch, int64_t T, int64_t D,
                 int64_t N, int64_t K, int nthreads) {
    if (N > 64) return -2;
    args_t a; memset(&a, 0, sizeof(a));
    a.x = x; a.dt = dt; a.A2t = A2t; a.At = At; a.B = B; a.C = C; a.reset = reset;
    a.ckpt = (float *)ckpt; a.gy = gy; a.gh = gh;
    a.dx = dx; a.ddt = ddt; a.dB = dB; a.dC = dC; a.dA = dA; a.dh0 = dh0; a.work = work;
    a.batch = batch; a.T = T; a.D = D; a.N = N; a.K = K; a.nblk = (D + BLOCK - 1) / BLOCK; a.Dp = a.nblk * BLOCK;
    a.nck = (T + K - 1) / K;
    hfx_parallel(run_bwd, &a, nthreads);
    return 0;
}
""".replace("@BLOCK@", str(BLOCK))
)

MAX_STATE = 64  # the kernel's per-block state buffers hold BLOCK x 64 floats
_LIB = {}


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel (built once per machine and cached), or ``None`` where it cannot be built."""
    if "lib" not in _LIB:
        lib = build_library("selective_scan", _SOURCE, "CPU selective-scan kernel")
        if lib is not None:
            p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
            lib.hfx_scan_fwd.argtypes = [p] * 10 + [i64] * 5 + [i32]
            lib.hfx_scan_bwd.argtypes = [p] * 17 + [i64] * 5 + [i32]
            lib.hfx_scan_fwd.restype = lib.hfx_scan_bwd.restype = i32
        _LIB["lib"] = lib
    return _LIB["lib"]


def kernel_applies(x: Tensor, N: int) -> bool:
    """Whether the kernel can run this scan: float32 CPU tensors, state size <= 64, kernel enabled and built."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and N <= MAX_STATE
        and kernel_enabled()
        and load_kernel() is not None
    )


def _ptr(t: Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"hf_extras CPU selective-scan kernel: {what} failed with code {rc}")


def _decays_by_state(A: Tensor, scale: float) -> Tensor:
    """``(A * scale).T`` as a contiguous ``(N, D)`` array padded with zeros to whole blocks of channels."""
    D, N = A.shape
    out = A.new_zeros(N, -(-D // BLOCK) * BLOCK)
    out[:, :D] = A.t() * scale
    return out


def _reset_bytes(reset: Tensor | None) -> Tensor | None:
    """The ``(batch, T)`` bool boundary mask as contiguous bytes for the kernel (None: no boundaries)."""
    return None if reset is None else reset.to(torch.uint8).contiguous()


def kernel_forward(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    h0: Tensor | None,
    save_checkpoints: bool,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(y, final state, checkpoints)`` of the causal scan (no ``D x`` term); inputs float32, made contiguous.
    ``reset``: optional bool ``(batch, T)``, zero decay at True tokens (document starts)."""
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    reset = _reset_bytes(reset)
    A2t = _decays_by_state(A, _LOG2_E)
    h0 = h0.contiguous() if h0 is not None else None
    batch, T, D = x.shape
    N = A.shape[1]
    y = torch.empty_like(x)
    h_last = x.new_empty(batch, D, N)
    ckpt = x.new_empty(batch, (T + CHECKPOINT - 1) // CHECKPOINT, D, N) if save_checkpoints else None
    rc = load_kernel().hfx_scan_fwd(
        _ptr(x),
        _ptr(dt),
        _ptr(A2t),
        _ptr(B),
        _ptr(C),
        _ptr(h0),
        _ptr(reset),
        _ptr(y),
        _ptr(h_last),
        _ptr(ckpt),
        batch,
        T,
        D,
        N,
        CHECKPOINT,
        max(1, min(torch.get_num_threads(), batch * -(-D // BLOCK))),  # at most one thread per work item
    )
    _check(rc, "forward")
    return y, h_last, ckpt


def kernel_backward(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    ckpt: Tensor,
    gy: Tensor,
    gh: Tensor | None,
    need_dh0: bool,
    reset: Tensor | None = None,
):
    """``(dx, ddt, dA, dB, dC, dh0)`` of the causal scan, from the forward's inputs (``reset`` included) and
    checkpoints."""
    x, dt, B, C, gy = (t.contiguous() for t in (x, dt, B, C, gy))
    reset = _reset_bytes(reset)
    A2t, At = _decays_by_state(A, _LOG2_E), _decays_by_state(A, 1.0)
    gh = gh.contiguous() if gh is not None else None
    batch, T, D = x.shape
    N = A.shape[1]
    nblk = (D + BLOCK - 1) // BLOCK
    threads = max(1, min(torch.get_num_threads(), batch * nblk))
    dx, ddt = torch.empty_like(x), torch.empty_like(x)
    dB = x.new_zeros(batch, nblk, T, N)
    dC = x.new_zeros(batch, nblk, T, N)
    dA = x.new_empty(batch, D, N)
    dh0 = x.new_empty(batch, D, N) if need_dh0 else None
    work = x.new_empty(threads, 2 * CHECKPOINT + 1, N, BLOCK)
    rc = load_kernel().hfx_scan_bwd(
        _ptr(x),
        _ptr(dt),
        _ptr(A2t),
        _ptr(At),
        _ptr(B),
        _ptr(C),
        _ptr(reset),
        _ptr(ckpt),
        _ptr(gy),
        _ptr(gh),
        _ptr(dx),
        _ptr(ddt),
        _ptr(dB),
        _ptr(dC),
        _ptr(dA),
        _ptr(dh0),
        _ptr(work),
        batch,
        T,
        D,
        N,
        CHECKPOINT,
        threads,
    )
    _check(rc, "backward")
    return dx, ddt, dA.sum(0), dB.sum(1), dC.sum(1), dh0


# --------------------------------------------------------------------------------------------
# torch operators: opaque to torch.compile (no graph break), differentiable through `register_autograd`
# --------------------------------------------------------------------------------------------

# versioned names: a checkpoint's older copy of this file may define the earlier operators in the same process
_OP_FWD, _OP_BWD = "hf_extras::fused_selective_scan_v2", "hf_extras::fused_selective_scan_v2_backward"


def _num_checkpoints(T: int) -> int:
    return (T + CHECKPOINT - 1) // CHECKPOINT


def _define_ops() -> None:
    """Define the two operators once per process (a checkpoint's copy of this file may be imported as well)."""
    if hasattr(torch.ops.hf_extras, "fused_selective_scan_v2"):
        return

    @torch.library.custom_op(_OP_FWD, mutates_args=())
    def _fwd(
        x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor | None, reset: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        return kernel_forward(x, dt, A, B, C, h0, save_checkpoints=True, reset=reset)

    @_fwd.register_fake
    def _(x, dt, A, B, C, h0, reset):
        batch, T, D = x.shape
        N = A.shape[1]
        return torch.empty_like(x), x.new_empty(batch, D, N), x.new_empty(batch, _num_checkpoints(T), D, N)

    @torch.library.custom_op(_OP_BWD, mutates_args=())
    def _bwd(
        x: Tensor,
        dt: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        ckpt: Tensor,
        gy: Tensor,
        gh: Tensor | None,
        reset: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return kernel_backward(x, dt, A, B, C, ckpt, gy, gh, need_dh0=True, reset=reset)

    @_bwd.register_fake
    def _(x, dt, A, B, C, ckpt, gy, gh, reset):
        batch, T, D = x.shape
        N = A.shape[1]
        return (
            torch.empty_like(x),
            torch.empty_like(x),
            A.new_empty(D, N),
            B.new_empty(B.shape),
            C.new_empty(C.shape),
            x.new_empty(batch, D, N),
        )

    def setup_context(ctx, inputs, output):
        x, dt, A, B, C, h0, reset = inputs
        ctx.save_for_backward(x, dt, A, B, C, output[2], reset)
        ctx.has_h0 = h0 is not None

    def backward(ctx, gy, gh, _gckpt):
        x, dt, A, B, C, ckpt, reset = ctx.saved_tensors
        if gy is None:
            gy = torch.zeros_like(x)
        dx, ddt, dA, dB, dC, dh0 = torch.ops.hf_extras.fused_selective_scan_v2_backward(
            x, dt, A, B, C, ckpt, gy, gh, reset
        )
        return dx, ddt, dA, dB, dC, (dh0 if ctx.has_h0 else None), None

    _fwd.register_autograd(backward, setup_context=setup_context)


def fused_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor | None, reset: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(y, final state)`` of the causal scan (no ``D x``) by the compiled kernel; differentiable, compilable.
    ``reset``: optional bool ``(batch, T)``, zero decay at document starts. Callers check ``kernel_applies``
    first."""
    _define_ops()
    y, h, _ = torch.ops.hf_extras.fused_selective_scan_v2(x, dt, A, B, C, h0, reset)
    return y, h
