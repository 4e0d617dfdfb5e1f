"""Fused CPU kernels for the memory-bound parts around a mixer's scan: the causal depthwise conv with its SiLU, and
Mamba-2's gated RMS norm with the ``D`` skip folded in. C, compiled on first use by ``cpu_kernel_build``.

Why: in PyTorch each is a chain of array-sized passes. The conv is ``kernel`` shifted multiply-adds and a SiLU
forward, twice as many passes backward; the norm with its skip is ~8 passes forward and ~15 backward. Each kernel
here reads its inputs once and writes its outputs once, per token row (the conv's few earlier rows stay in L1), and
recomputes what the backward needs (the conv's pre-activation, the norm's input) instead of storing it. Measured in
the Mamba-2 benchmark (``benchmarks/mamba2_vs_transformers.py``): see the README.

* conv: ``y = silu(bias + sum_j taps[K-1-j] * x[t-j])`` from a zero start (the training form of
  ``conv_ops._CausalConv``); ``x`` may be a column slice of a wider row (Mamba-2's ``xBC`` inside the ``in_proj``
  output) and is read in place.
* norm: ``out = weight * rms_g(u) [* silu(z)]`` with ``u = (y + D x) [* silu(z)]`` (gate before or after the norm),
  RMS over groups of channels, the per-(token, group) reciprocal RMS saved for the backward.

Work is split over (batch row, range of tokens) items; the per-channel gradient sums (conv taps and bias, the norm's
weight and ``D``) are written as one partial sum per item and added by torch in a fixed order, so results do not
depend on the thread count. Float32 only; callers check ``kernels_apply`` and keep their PyTorch forms otherwise.

This file is copied into saved checkpoints: it imports only torch and the standard library.
"""

import ctypes

import torch
from torch import Tensor

from .cpu_kernel_build import C_COMMON, build_library, kernel_enabled

_SOURCE = (
    C_COMMON
    + r"""
static inline float sigm(float x) { return 1.0f / (1.0f + exp2_neg(-1.4426950408889634f * x)); }

/* ---- causal depthwise conv + SiLU ---- */
typedef struct {
    const float *x, *taps, *bias, *gy;
    float *y, *dx, *dtaps, *dbias, *work;
    int64_t batch, T, C, K, sxb, sxt, nsplit, span;
} conv_t;

#define KMAX 16

/* One item (batch row b, tokens t0..t1-1), written for a literal kernel size K at the call (K = 4 is compiled apart,
   fully unrolled): per token, one loop over channels with the K input rows in registers. A tap before the row start
   reads `zero`. */
static inline __attribute__((always_inline)) void conv_fwd_item(const conv_t *a, int64_t it, const float *zero,
                                                                 const int64_t K) {
    const int64_t C = a->C, T = a->T, sxt = a->sxt;
    const int64_t b = it / a->nsplit, t0 = (it % a->nsplit) * a->span, t1 = t0 + a->span < T ? t0 + a->span : T;
    const float *restrict taps = a->taps, *restrict bias = a->bias, *xb = a->x + b * a->sxb;
    for (int64_t t = t0; t < t1; t++) {
        const float *xr[KMAX];
        for (int64_t j = 0; j < K; j++) xr[j] = j <= t ? xb + (t - j) * sxt : zero;
        float *restrict yr = a->y + (b * T + t) * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; c++) {
            float pre = bias ? bias[c] : 0.0f;
            for (int64_t j = 0; j < K; j++) pre += taps[(K - 1 - j) * C + c] * xr[j][c];
            yr[c] = pre * sigm(pre);
        }
    }
}

/* Backward, tokens last to first: g_t = gy_t * silu'(pre_t) (pre recomputed) into a ring of K rows (zeros past the
   end), dx_t = sum_j taps[K-1-j] g_{t+j}; the item's partial dtaps / dbias take its own tokens only (the K - 1 halo
   rows after its range are recomputed, not counted). */
static inline __attribute__((always_inline)) void conv_bwd_item(const conv_t *a, int64_t it, float *ring,
                                                                 const float *zero, const int64_t K) {
    const int64_t C = a->C, T = a->T, sxt = a->sxt;
    const int64_t b = it / a->nsplit, t0 = (it % a->nsplit) * a->span, t1 = t0 + a->span < T ? t0 + a->span : T;
    const int64_t tend = t1 + K - 1 < T ? t1 + K - 1 : T;
    const float *restrict taps = a->taps, *restrict bias = a->bias, *xb = a->x + b * a->sxb;
    float *restrict dtaps = a->dtaps + it * K * C, *restrict dbias = a->dbias ? a->dbias + it * C : 0;
    memset(dtaps, 0, K * C * sizeof(float));
    if (dbias) memset(dbias, 0, C * sizeof(float));
    memset(ring, 0, K * C * sizeof(float));
    for (int64_t t = tend - 1; t >= t0; t--) {
        const float *xr[KMAX], *gr[KMAX];
        for (int64_t j = 0; j < K; j++) {
            xr[j] = j <= t ? xb + (t - j) * sxt : zero;
            gr[j] = ring + ((t + j) % K) * C;
        }
        float *restrict g = ring + (t % K) * C;
        const float *restrict gyr = a->gy + (b * T + t) * C;
        if (t >= t1) {  /* halo: the gradient at the pre-activation only */
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                float pre = bias ? bias[c] : 0.0f;
                for (int64_t j = 0; j < K; j++) pre += taps[(K - 1 - j) * C + c] * xr[j][c];
                const float s = sigm(pre);
                g[c] = gyr[c] * s * (1.0f + pre * (1.0f - s));
            }
            continue;
        }
        float *restrict dxr = a->dx + (b * T + t) * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; c++) {
            float pre = bias ? bias[c] : 0.0f;
            for (int64_t j = 0; j < K; j++) pre += taps[(K - 1 - j) * C + c] * xr[j][c];
            const float s = sigm(pre), gc = gyr[c] * s * (1.0f + pre * (1.0f - s));
            g[c] = gc;
            if (dbias) dbias[c] += gc;
            float d = taps[(K - 1) * C + c] * gc;
            for (int64_t j = 0; j < K; j++) dtaps[(K - 1 - j) * C + c] += gc * xr[j][c];
            for (int64_t j = 1; j < K; j++) d += taps[(K - 1 - j) * C + c] * gr[j][c];
            dxr[c] = d;
        }
    }
}

static void conv_fwd(const void *p, int tid, int nt) {
    const conv_t *a = (const conv_t *)p;
    const float *zero = a->work + (int64_t)tid * a->C;
    for (int64_t it = tid; it < a->batch * a->nsplit; it += nt) {
        if (a->K == 4) conv_fwd_item(a, it, zero, 4);
        else conv_fwd_item(a, it, zero, a->K);
    }
}

static void conv_bwd(const void *p, int tid, int nt) {
    const conv_t *a = (const conv_t *)p;
    float *ring = a->work + (int64_t)tid * (a->K + 1) * a->C, *zero = ring + a->K * a->C;
    for (int64_t it = tid; it < a->batch * a->nsplit; it += nt) {
        if (a->K == 4) conv_bwd_item(a, it, ring, zero, 4);
        else conv_bwd_item(a, it, ring, zero, a->K);
    }
}

int hfx_conv_silu_fwd(const float *x, const float *taps, const float *bias, float *y, float *work, int64_t batch,
                      int64_t T, int64_t C, int64_t K, int64_t sxb, int64_t sxt, int64_t nsplit, int nthreads) {
    conv_t a = {x, taps, bias, 0, y, 0, 0, 0, work, batch, T, C, K, sxb, sxt, nsplit, (T + nsplit - 1) / nsplit};
    hfx_parallel(conv_fwd, &a, nthreads);
    return 0;
}

int hfx_conv_silu_bwd(const float *x, const float *taps, const float *bias, const float *gy, float *dx,
                      float *dtaps, float *dbias, float *work, int64_t batch, int64_t T, int64_t C, int64_t K,
                      int64_t sxb, int64_t sxt, int64_t nsplit, int nthreads) {
    conv_t a = {x, taps, bias, gy, 0, dx, dtaps, dbias, work, batch, T, C, K, sxb, sxt, nsplit,
                (T + nsplit - 1) / nsplit};
    hfx_parallel(conv_bwd, &a, nthreads);
    return 0;
}

/* ---- gated RMS norm with the D skip ---- */
typedef struct {
    const float *y, *x, *D, *z, *w, *gout;
    float *out, *rstd, *dy, *dx, *dz, *dw, *dD;
    int64_t rows, I, G, sx, sz, nitems;
    float eps;
    int before;
} norm_t;

/* One token row; `before` and `skip` are literal constants at each call, so each variant is compiled branch-free. */
static inline void norm_fwd_row(const norm_t *a, int64_t r, const int before, const int skip) {
    const int64_t I = a->I, G = a->G, gs = I / G;
    const float *restrict yr = a->y + r * I, *restrict zr = a->z + r * a->sz, *restrict w = a->w;
    const float *restrict xr = skip ? a->x + r * a->sx : 0, *restrict D = a->D;
    float *restrict o = a->out + r * I;
    const float eps = a->eps;
    for (int64_t g = 0; g < G; g++) {
        const int64_t c0 = g * gs, c1 = c0 + gs;
        float ss = 0.0f;
        #pragma omp simd reduction(+:ss)
        for (int64_t c = c0; c < c1; c++) {
            float u = skip ? yr[c] + D[c] * xr[c] : yr[c];
            if (!before) u *= zr[c] * sigm(zr[c]);
            o[c] = u;
            ss += u * u;
        }
        const float rs = 1.0f / sqrtf(ss / (float)gs + eps);
        a->rstd[r * G + g] = rs;
        #pragma omp simd
        for (int64_t c = c0; c < c1; c++) o[c] = w[c] * o[c] * rs * (before ? zr[c] * sigm(zr[c]) : 1.0f);
    }
}

static inline void norm_bwd_row(const norm_t *a, int64_t r, float *restrict dw, float *restrict dD, const int before,
                                const int skip) {
    const int64_t I = a->I, G = a->G, gs = I / G;
    const float *restrict yr = a->y + r * I, *restrict zr = a->z + r * a->sz, *restrict w = a->w;
    const float *restrict xr = skip ? a->x + r * a->sx : 0, *restrict D = a->D, *restrict go = a->gout + r * I;
    float *restrict dyr = a->dy + r * I, *restrict dzr = a->dz + r * I, *restrict dxr = skip ? a->dx + r * I : 0;
    for (int64_t g = 0; g < G; g++) {
        const int64_t c0 = g * gs, c1 = c0 + gs;
        const float rs = a->rstd[r * G + g];
        float dot = 0.0f;
        /* pass 1: n = u rs, gn = gout w (gate after the norm): dot = sum gn n; n kept in dz, gn in dy */
        #pragma omp simd reduction(+:dot)
        for (int64_t c = c0; c < c1; c++) {
            const float sz = zr[c] * sigm(zr[c]);
            const float pre = skip ? yr[c] + D[c] * xr[c] : yr[c];
            const float n = (before ? pre : pre * sz) * rs;
            const float gn = go[c] * w[c] * (before ? sz : 1.0f);
            dw[c] += go[c] * n * (before ? sz : 1.0f);
            dzr[c] = n;
            dyr[c] = gn;
            dot += gn * n;
        }
        dot /= (float)gs;
        /* pass 2: du = rs (gn - n dot), through the gate and the skip */
        #pragma omp simd
        for (int64_t c = c0; c < c1; c++) {
            const float s = sigm(zr[c]), sz = zr[c] * s, dsz = s * (1.0f + zr[c] * (1.0f - s));
            const float n = dzr[c], du = rs * (dyr[c] - n * dot);
            float dpre;
            if (before) {
                dpre = du;
                dzr[c] = go[c] * w[c] * n * dsz;
            } else {
                const float pre = skip ? yr[c] + D[c] * xr[c] : yr[c];
                dpre = du * sz;
                dzr[c] = du * pre * dsz;
            }
            dyr[c] = dpre;
            if (skip) {
                dxr[c] = dpre * D[c];
                dD[c] += dpre * xr[c];
            }
        }
    }
}

static void norm_fwd(const void *p, int tid, int nt) {
    const norm_t *a = (const norm_t *)p;
    const int64_t per = (a->rows + a->nitems - 1) / a->nitems;
    for (int64_t it = tid; it < a->nitems; it += nt) {
        const int64_t r1 = (it + 1) * per < a->rows ? (it + 1) * per : a->rows;
        for (int64_t r = it * per; r < r1; r++) {
            if (a->before) {
                if (a->x) norm_fwd_row(a, r, 1, 1); else norm_fwd_row(a, r, 1, 0);
            } else {
                if (a->x) norm_fwd_row(a, r, 0, 1); else norm_fwd_row(a, r, 0, 0);
            }
        }
    }
}

static void norm_bwd(const void *p, int tid, int nt) {
    const norm_t *a = (const norm_t *)p;
    const int64_t I = a->I, per = (a->rows + a->nitems - 1) / a->nitems;
    for (int64_t it = tid; it < a->nitems; it += nt) {
        float *dw = a->dw + it * I, *dD = a->x ? a->dD + it * I : 0;
        memset(dw, 0, I * sizeof(float));
        if (dD) memset(dD, 0, I * sizeof(float));
        const int64_t r1 = (it + 1) * per < a->rows ? (it + 1) * per : a->rows;
        for (int64_t r = it * per; r < r1; r++) {
            if (a->before) {
                if (a->x) norm_bwd_row(a, r, dw, dD, 1, 1); else norm_bwd_row(a, r, dw, dD, 1, 0);
            } else {
                if (a->x) norm_bwd_row(a, r, dw, dD, 0, 1); else norm_bwd_row(a, r, dw, dD, 0, 0);
            }
        }
    }
}

int hfx_norm_fwd(const float *y, const float *x, const float *D, const float *z, const float *w, float *out,
                 float *rstd, int64_t rows, int64_t I, int64_t G, int64_t sx, int64_t sz, int64_t nitems, float eps,
                 int before, int nthreads) {
    norm_t a = {y, x, D, z, w, 0, out, rstd, 0, 0, 0, 0, 0, rows, I, G, sx, sz, nitems, eps, before};
    hfx_parallel(norm_fwd, &a, nthreads);
    return 0;
}

int hfx_norm_bwd(const float *y, const float *x, const float *D, const float *z, const float *w, const float *gout,
                 const float *rstd, float *dy, float *dx, float *dz, float *dw, float *dD, int64_t rows, int64_t I,
                 int64_t G, int64_t sx, int64_t sz, int64_t nitems, int before, int nthreads) {
    norm_t a = {y, x, D, z, w, gout, 0, (float *)rstd, dy, dx, dz, dw, dD, rows, I, G, sx, sz, nitems, 0.0f, before};
    hfx_parallel(norm_bwd, &a, nthreads);
    return 0;
}

/* ---- SSD pair weights (grouped chunkwise decayed linear attention, one scalar log decay per head) ----
   Per block (chunk, batch row, group): gqk (C, C) = q k^T shared by the group's R heads; per head r and token: b the
   within-chunk cumulative log decay, seg the segment (documents), ks the key scale (NULL: 1).
   L_r[t, s] = exp(b_t - b_s) for s <= t (s < t when strict) in the same segment, else 0. */
typedef struct {
    const float *gqk, *b, *seg, *ks, *dP;
    float *P, *dgqk, *zrow, *xcol;
    int64_t blocks, R, C;
    int strict;
} pair_t;

static inline float pair_decay(float bt, float bs, float st, float ss) {
    const float e = bt - bs;
    return ss == st ? exp2_neg(1.4426950408889634f * (e < 0.0f ? e : 0.0f)) : 0.0f;
}

/* P_r[t, s] = gqk[t, s] L_r[t, s] ks_r[s] */
static void pair_fwd(const void *p, int tid, int nt) {
    const pair_t *a = (const pair_t *)p;
    const int64_t R = a->R, C = a->C;
    for (int64_t blk = tid; blk < a->blocks; blk += nt) {
        const float *restrict gqk = a->gqk + blk * C * C;
        for (int64_t r = 0; r < R; r++) {
            const int64_t h = blk * R + r;
            const float *restrict b = a->b + h * C, *restrict seg = a->seg + h * C;
            const float *restrict ks = a->ks ? a->ks + h * C : 0;
            float *restrict P = a->P + h * C * C;
            for (int64_t t = 0; t < C; t++) {
                const int64_t n = a->strict ? t : t + 1; /* columns 0..n-1 can be nonzero */
                const float bt = b[t], st = seg[t];
                float *restrict row = P + t * C;
                const float *restrict grow = gqk + t * C;
                if (ks) {
                    #pragma omp simd
                    for (int64_t s = 0; s < n; s++) row[s] = grow[s] * pair_decay(bt, b[s], st, seg[s]) * ks[s];
                } else {
                    #pragma omp simd
                    for (int64_t s = 0; s < n; s++) row[s] = grow[s] * pair_decay(bt, b[s], st, seg[s]);
                }
                memset(row + n, 0, (C - n) * sizeof(float));
            }
        }
    }
}

/* From dP (the gradient of P): dgqk = sum_r dP_r L_r ks_r[s]; X_r = dP_r gqk L_r; zrow_r[t] = sum_s X_r[t, s] ks_r[s];
   xcol_r[s] = sum_t X_r[t, s]. */
static void pair_bwd(const void *p, int tid, int nt) {
    const pair_t *a = (const pair_t *)p;
    const int64_t R = a->R, C = a->C;
    for (int64_t blk = tid; blk < a->blocks; blk += nt) {
        const float *restrict gqk = a->gqk + blk * C * C;
        float *restrict dg = a->dgqk + blk * C * C;
        memset(dg, 0, C * C * sizeof(float));
        for (int64_t r = 0; r < R; r++) {
            const int64_t h = blk * R + r;
            const float *restrict b = a->b + h * C, *restrict seg = a->seg + h * C;
            const float *restrict ks = a->ks ? a->ks + h * C : 0, *restrict dP = a->dP + h * C * C;
            float *restrict xcol = a->xcol + h * C;
            memset(xcol, 0, C * sizeof(float));
            for (int64_t t = 0; t < C; t++) {
                const int64_t n = a->strict ? t : t + 1;
                const float bt = b[t], st = seg[t];
                const float *restrict drow = dP + t * C, *restrict grow = gqk + t * C;
                float *restrict dgrow = dg + t * C;
                float zr = 0.0f;
                if (ks) {
                    #pragma omp simd reduction(+:zr)
                    for (int64_t s = 0; s < n; s++) {
                        const float dl = drow[s] * pair_decay(bt, b[s], st, seg[s]), x = dl * grow[s];
                        dgrow[s] += dl * ks[s];
                        xcol[s] += x;
                        zr += x * ks[s];
                    }
                } else {
                    #pragma omp simd reduction(+:zr)
                    for (int64_t s = 0; s < n; s++) {
                        const float dl = drow[s] * pair_decay(bt, b[s], st, seg[s]), x = dl * grow[s];
                        dgrow[s] += dl;
                        xcol[s] += x;
                        zr += x;
                    }
                }
                a->zrow[h * C + t] = zr;
            }
        }
    }
}

int hfx_pair_fwd(const float *gqk, const float *b, const float *seg, const float *ks, float *P, int64_t blocks,
                 int64_t R, int64_t C, int strict, int nthreads) {
    pair_t a = {gqk, b, seg, ks, 0, P, 0, 0, 0, blocks, R, C, strict};
    hfx_parallel(pair_fwd, &a, nthreads);
    return 0;
}

int hfx_pair_bwd(const float *gqk, const float *b, const float *seg, const float *ks, const float *dP, float *dgqk,
                 float *zrow, float *xcol, int64_t blocks, int64_t R, int64_t C, int strict, int nthreads) {
    pair_t a = {gqk, b, seg, ks, dP, 0, dgqk, zrow, xcol, blocks, R, C, strict};
    hfx_parallel(pair_bwd, &a, nthreads);
    return 0;
}
"""
)

_LIB = {}


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernels (built once per machine and cached), or ``None`` where they cannot be built."""
    if "lib" not in _LIB:
        lib = build_library("mixer_kernels", _SOURCE, "CPU mixer kernels")
        if lib is not None:
            p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
            lib.hfx_conv_silu_fwd.argtypes = [p] * 5 + [i64] * 7 + [i32]
            lib.hfx_conv_silu_bwd.argtypes = [p] * 8 + [i64] * 7 + [i32]
            lib.hfx_norm_fwd.argtypes = [p] * 7 + [i64] * 6 + [f32, i32, i32]
            lib.hfx_norm_bwd.argtypes = [p] * 12 + [i64] * 6 + [i32, i32]
            lib.hfx_pair_fwd.argtypes = [p] * 5 + [i64] * 3 + [i32, i32]
            lib.hfx_pair_bwd.argtypes = [p] * 8 + [i64] * 3 + [i32, i32]
            fns = (lib.hfx_conv_silu_fwd, lib.hfx_conv_silu_bwd, lib.hfx_norm_fwd, lib.hfx_norm_bwd)
            for fn in (*fns, lib.hfx_pair_fwd, lib.hfx_pair_bwd):
                fn.restype = i32
        _LIB["lib"] = lib
    return _LIB["lib"]


MAX_KERNEL = 16  # the conv's taps per channel (KMAX in the source)


def kernels_apply(*tensors: Tensor | None) -> bool:
    """Whether the kernels can run on these tensors: float32 on a CPU, not needing float64's reference path, kernels
    enabled and built."""
    return (
        all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)
        and kernel_enabled()
        and load_kernel() is not None
    )


def _ptr(t: Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _rows_view(t: Tensor) -> tuple[Tensor, int]:
    """``t`` (batch, time, width) with unit channel stride and one row stride for every token (a column slice of a
    contiguous tensor qualifies, read in place), and that row stride; otherwise a contiguous copy."""
    batch, seq_len, _ = t.shape
    if t.stride(-1) != 1 or (batch > 1 and t.stride(0) != seq_len * t.stride(1)):
        t = t.contiguous()
    return t, t.stride(1)


def _items(seq_len: int) -> int:
    """Work items per batch row: ranges of 256 tokens (a fixed split, so the per-item partial sums, and the result,
    do not depend on the thread count)."""
    return max(1, -(-seq_len // 256))


# --------------------------------------------------------------------------------------------
# torch operators (opaque to torch.compile, differentiable through `register_autograd`)
# --------------------------------------------------------------------------------------------


def _define_ops() -> None:
    """Define the operators once per process (a checkpoint's copy of this file may be imported as well)."""
    if hasattr(torch.ops.hf_extras, "conv_silu_v1"):
        return

    @torch.library.custom_op("hf_extras::conv_silu_v1", mutates_args=())
    def _conv_silu(x: Tensor, taps: Tensor, bias: Tensor | None) -> Tensor:
        x, sxt = _rows_view(x)
        batch, seq_len, channels = x.shape
        y = x.new_empty(batch, seq_len, channels)
        taps = taps.contiguous()
        threads = torch.get_num_threads()
        zero = x.new_zeros(threads, channels)  # the input before the first token
        load_kernel().hfx_conv_silu_fwd(
            _ptr(x), _ptr(taps), _ptr(bias), _ptr(y), _ptr(zero), batch, seq_len, channels, taps.shape[0],
            x.stride(0), sxt, _items(seq_len), threads,
        )  # fmt: skip
        return y

    @_conv_silu.register_fake
    def _(x, taps, bias):
        return x.new_empty(x.shape)

    @torch.library.custom_op("hf_extras::conv_silu_v1_backward", mutates_args=())
    def _conv_silu_backward(x: Tensor, taps: Tensor, bias: Tensor | None, gy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, sxt = _rows_view(x)
        batch, seq_len, channels = x.shape
        kernel = taps.shape[0]
        nsplit = _items(seq_len)
        threads = torch.get_num_threads()
        taps, gy = taps.contiguous(), gy.contiguous()
        dx = torch.empty_like(gy)
        dtaps = x.new_empty(batch * nsplit, kernel, channels)
        dbias = x.new_empty(batch * nsplit, channels)
        work = x.new_zeros(threads, kernel + 1, channels)  # a ring of kernel rows and a zero row per thread
        load_kernel().hfx_conv_silu_bwd(
            _ptr(x), _ptr(taps), _ptr(bias), _ptr(gy), _ptr(dx), _ptr(dtaps), _ptr(dbias), _ptr(work),
            batch, seq_len, channels, kernel, x.stride(0), sxt, nsplit, threads,
        )  # fmt: skip
        return dx, dtaps.sum(0), dbias.sum(0)

    @_conv_silu_backward.register_fake
    def _(x, taps, bias, gy):
        return x.new_empty(x.shape), taps.new_empty(taps.shape), x.new_empty(x.shape[-1])

    def _conv_setup(ctx, inputs, output):
        x, taps, bias = inputs
        ctx.save_for_backward(x, taps, bias)
        ctx.has_bias = bias is not None

    def _conv_backward(ctx, gy):
        x, taps, bias = ctx.saved_tensors
        dx, dtaps, dbias = torch.ops.hf_extras.conv_silu_v1_backward(x, taps, bias, gy)
        return dx, dtaps, (dbias if ctx.has_bias else None)

    _conv_silu.register_autograd(_conv_backward, setup_context=_conv_setup)

    @torch.library.custom_op("hf_extras::gated_rms_norm_v1", mutates_args=())
    def _gated_norm(
        y: Tensor, x: Tensor | None, D: Tensor | None, z: Tensor, weight: Tensor, groups: int, eps: float, before: bool
    ) -> tuple[Tensor, Tensor]:
        batch, seq_len, width = y.shape
        y, D = y.contiguous(), D.contiguous() if D is not None else None
        z, sz = _rows_view(z)
        x, sx = _rows_view(x) if x is not None else (None, 0)
        out = y.new_empty(batch, seq_len, width)
        rstd = y.new_empty(batch, seq_len, groups)
        load_kernel().hfx_norm_fwd(
            _ptr(y), _ptr(x), _ptr(D), _ptr(z), _ptr(weight), _ptr(out), _ptr(rstd), batch * seq_len, width, groups,
            sx, sz, _items(batch * seq_len), eps, int(before), torch.get_num_threads(),
        )  # fmt: skip
        return out, rstd

    @_gated_norm.register_fake
    def _(y, x, D, z, weight, groups, eps, before):
        return y.new_empty(y.shape), y.new_empty(*y.shape[:2], groups)

    @torch.library.custom_op("hf_extras::gated_rms_norm_v1_backward", mutates_args=())
    def _gated_norm_backward(
        y: Tensor,
        x: Tensor | None,
        D: Tensor | None,
        z: Tensor,
        weight: Tensor,
        rstd: Tensor,
        gout: Tensor,
        groups: int,
        before: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        batch, seq_len, width = y.shape
        y, gout, D = y.contiguous(), gout.contiguous(), D.contiguous() if D is not None else None
        z, sz = _rows_view(z)
        x, sx = _rows_view(x) if x is not None else (None, 0)
        items = _items(batch * seq_len)
        dy, dz = torch.empty_like(y), torch.empty_like(y)
        dx = torch.empty_like(y) if x is not None else y.new_zeros(0)
        dw = y.new_empty(items, width)
        dD = y.new_empty(items, width) if x is not None else y.new_zeros(1, 0)
        load_kernel().hfx_norm_bwd(
            _ptr(y), _ptr(x), _ptr(D), _ptr(z), _ptr(weight), _ptr(gout), _ptr(rstd), _ptr(dy),
            _ptr(dx if x is not None else None), _ptr(dz), _ptr(dw), _ptr(dD if x is not None else None),
            batch * seq_len, width, groups, sx, sz, items, int(before), torch.get_num_threads(),
        )  # fmt: skip
        return dy, dx, dz, dw.sum(0), dD.sum(0)

    @_gated_norm_backward.register_fake
    def _(y, x, D, z, weight, rstd, gout, groups, before):
        dx = y.new_empty(y.shape) if x is not None else y.new_empty(0)
        return y.new_empty(y.shape), dx, y.new_empty(y.shape), weight.new_empty(weight.shape), y.new_empty(y.shape[-1])

    def _norm_setup(ctx, inputs, output):
        y, x, D, z, weight, groups, eps, before = inputs
        ctx.save_for_backward(y, x, D, z, weight, output[1])
        ctx.groups, ctx.before, ctx.has_skip = groups, before, x is not None

    def _norm_backward(ctx, gout, _grstd):
        y, x, D, z, weight, rstd = ctx.saved_tensors
        dy, dx, dz, dw, dD = torch.ops.hf_extras.gated_rms_norm_v1_backward(
            y, x, D, z, weight, rstd, gout, ctx.groups, ctx.before
        )
        if not ctx.has_skip:
            dx = dD = None
        return dy, dx, dD, dz, dw, None, None, None

    _gated_norm.register_autograd(_norm_backward, setup_context=_norm_setup)


def conv_silu(x: Tensor, taps: Tensor, bias: Tensor | None) -> Tensor:
    """``silu`` of the causal depthwise conv of ``x`` (batch, time, channels) from a zero start; ``taps``
    (kernel, channels), tap ``kernel - 1`` on the current token. Differentiable; callers check ``kernels_apply``."""
    _define_ops()
    return torch.ops.hf_extras.conv_silu_v1(x, taps, bias)


def gated_rms_norm(
    y: Tensor,
    z: Tensor,
    weight: Tensor,
    groups: int,
    eps: float,
    norm_before_gate: bool,
    skip: Tensor | None = None,
    skip_scale: Tensor | None = None,
) -> Tensor:
    """Mamba-2's gated RMS norm of ``y + skip_scale * skip`` (all (batch, time, width) but ``skip_scale`` (width,);
    ``skip`` None: no skip) with gate ``z``, RMS over ``groups`` equal groups of channels. Differentiable; callers
    check ``kernels_apply``."""
    _define_ops()
    return torch.ops.hf_extras.gated_rms_norm_v1(y, skip, skip_scale, z, weight, groups, eps, norm_before_gate)[0]


def _pair_weights(gqk: Tensor, b: Tensor, seg: Tensor, ks: Tensor | None, strict: bool) -> Tensor:
    """``ssd_pair_weights`` by the kernel."""
    *lead, R, C = b.shape
    gqk, b, seg = gqk.contiguous(), b.contiguous(), seg.contiguous()
    ks = ks.contiguous() if ks is not None else None
    P = gqk.new_empty(*lead, R, C, C)
    blocks = P.numel() // (R * C * C) if C else 0
    load_kernel().hfx_pair_fwd(
        _ptr(gqk), _ptr(b), _ptr(seg), _ptr(ks), _ptr(P), blocks, R, C, int(strict), torch.get_num_threads()
    )
    return P


def _pair_weights_backward(
    dP: Tensor, gqk: Tensor, b: Tensor, seg: Tensor, ks: Tensor | None, strict: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``ssd_pair_weights_backward`` by the kernel."""
    *lead, R, C = b.shape
    dP, gqk, b, seg = dP.contiguous(), gqk.contiguous(), b.contiguous(), seg.contiguous()
    ks = ks.contiguous() if ks is not None else None
    dgqk = torch.empty_like(gqk)
    zrow, xcol = torch.empty_like(b), torch.empty_like(b)
    blocks = dP.numel() // (R * C * C) if C else 0
    load_kernel().hfx_pair_bwd(
        _ptr(gqk), _ptr(b), _ptr(seg), _ptr(ks), _ptr(dP), _ptr(dgqk), _ptr(zrow), _ptr(xcol),
        blocks, R, C, int(strict), torch.get_num_threads(),
    )  # fmt: skip
    return dgqk, zrow, xcol


def _define_pair_ops() -> None:
    """The pair weights as operators (opaque to torch.compile inside the SSD's autograd function), once per process."""
    if hasattr(torch.ops.hf_extras, "ssd_pair_weights_v1"):
        return
    fwd = torch.library.custom_op("hf_extras::ssd_pair_weights_v1", _pair_weights, mutates_args=())
    bwd = torch.library.custom_op("hf_extras::ssd_pair_weights_v1_backward", _pair_weights_backward, mutates_args=())

    @fwd.register_fake
    def _(gqk, b, seg, ks, strict):
        return gqk.new_empty(*b.shape, b.shape[-1])

    @bwd.register_fake
    def _(dP, gqk, b, seg, ks, strict):
        return torch.empty_like(gqk), torch.empty_like(b), torch.empty_like(b)


def ssd_pair_weights(gqk: Tensor, b: Tensor, seg: Tensor, ks: Tensor | None, strict: bool) -> Tensor:
    """SSD's within-chunk pair weights ``P_r[t, s] = gqk[t, s] exp(b_t - b_s) ks_r[s]`` (s <= t, or s < t when
    ``strict``, same segment; else 0): gqk (..., C, C) shared by the R heads of a group; b, seg, ks (..., R, C);
    returns (..., R, C, C). Not differentiable: ``retention_ops._GroupedChunkwise`` calls it in its forward and
    ``ssd_pair_weights_backward`` in its backward."""
    _define_pair_ops()
    return torch.ops.hf_extras.ssd_pair_weights_v1(gqk, b, seg, ks, strict)


def ssd_pair_weights_backward(
    dP: Tensor, gqk: Tensor, b: Tensor, seg: Tensor, ks: Tensor | None, strict: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """From ``dP`` (the gradient of ``ssd_pair_weights``' output): ``d gqk`` (..., C, C), and with
    ``X_r = dP_r * gqk * L_r``, its row sums weighted by ``ks`` (``sum_s X_r[t, s] ks_r[s]``) and its column sums
    (``sum_t X_r[t, s]``), both (..., R, C): the pair decays' share of the log-decay gradient and of ``d ks``."""
    _define_pair_ops()
    return torch.ops.hf_extras.ssd_pair_weights_v1_backward(dP, gqk, b, seg, ks, strict)
