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
    const uint8_t *starts; /* (batch, T), 1 at a document's first token; NULL: one document per row */
} conv_t;

/* xr[j] = the input row tap j reads at token t (t - j), or `zero` before the row or across a document start */
static inline void tap_rows(const conv_t *a, const float *xb, const uint8_t *st, int64_t t, const float *zero,
                            const float **xr, const int64_t K) {
    int valid = 1;
    xr[0] = xb + t * a->sxt;
    for (int64_t j = 1; j < K; j++) {
        valid = valid && j <= t && !(st && st[t - j + 1]);
        xr[j] = valid ? xb + (t - j) * a->sxt : zero;
    }
}

#define KMAX 16

/* One item (batch row b, tokens t0..t1-1), written for a literal kernel size K at the call (K = 4 is compiled apart,
   fully unrolled): per token, one loop over channels with the K input rows in registers. A tap before the row start
   reads `zero`. */
static inline __attribute__((always_inline)) void conv_fwd_item(const conv_t *a, int64_t it, const float *zero,
                                                                 const int64_t K) {
    const int64_t C = a->C, T = a->T, sxt = a->sxt;
    const int64_t b = it / a->nsplit, t0 = (it % a->nsplit) * a->span, t1 = t0 + a->span < T ? t0 + a->span : T;
    const float *restrict taps = a->taps, *restrict bias = a->bias, *xb = a->x + b * a->sxb;
    const uint8_t *st = a->starts ? a->starts + b * T : 0;
    (void)sxt;
    for (int64_t t = t0; t < t1; t++) {
        const float *xr[KMAX];
        tap_rows(a, xb, st, t, zero, xr, K);
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
   end), dx_t = sum_j taps[K-1-j] g_{t+j} (the g_{t+j} past a document start read as zero); the item's partial
   dtaps / dbias take its own tokens only (the K - 1 halo rows after its range are recomputed, not counted). */
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
    const uint8_t *st = a->starts ? a->starts + b * T : 0;
    (void)sxt;
    for (int64_t t = tend - 1; t >= t0; t--) {
        const float *xr[KMAX], *gr[KMAX];
        tap_rows(a, xb, st, t, zero, xr, K);
        int valid = 1;
        gr[0] = ring + (t % K) * C;
        for (int64_t j = 1; j < K; j++) {
            valid = valid && !(st && t + j < T && st[t + j]);
            gr[j] = valid ? ring + ((t + j) % K) * C : zero;
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

int hfx_conv_silu_fwd(const float *x, const float *taps, const float *bias, const uint8_t *starts, float *y,
                      float *work, int64_t batch, int64_t T, int64_t C, int64_t K, int64_t sxb, int64_t sxt,
                      int64_t nsplit, int nthreads) {
    conv_t a = {x, taps, bias, 0, y, 0, 0, 0, work, batch, T, C, K, sxb, sxt, nsplit, (T + nsplit - 1) / nsplit,
                starts};
    hfx_parallel(conv_fwd, &a, nthreads);
    return 0;
}

int hfx_conv_silu_bwd(const float *x, const float *taps, const float *bias, const uint8_t *starts, const float *gy,
                      float *dx, float *dtaps, float *dbias, float *work, int64_t batch, int64_t T, int64_t C,
                      int64_t K, int64_t sxb, int64_t sxt, int64_t nsplit, int nthreads) {
    conv_t a = {x, taps, bias, gy, 0, dx, dtaps, dbias, work, batch, T, C, K, sxb, sxt, nsplit,
                (T + nsplit - 1) / nsplit, starts};
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

/* ---- SSD within-chunk part (grouped chunkwise decayed linear attention, one scalar log decay per head) ----
   Per block (chunk, batch row, group): gqk (C, C) = q k^T shared by the group's R heads; per head r and token: b the
   within-chunk cumulative log decay, seg the segment (documents), ks the key scale (NULL: 1), gamma the decay from the
   chunk start (0 after a boundary). Pair weights P_r[t, s] = gqk[t, s] L_r[t, s] ks_r[s] with
   L_r[t, s] = exp(b_t - b_s) for s <= t (s < t when strict) in the same segment, else 0; never stored.
   Token rows (v, o, do, QS, dQS, dv) are (C, R, Dv) per block, head r's row t at (t R + r) Dv. */
typedef struct {
    const float *gqk, *b, *seg, *ks, *gamma, *v, *QS, *dO;
    float *o, *dQS, *dgamma, *dgqk, *zrow, *xcol, *dv, *work;
    int64_t blocks, R, C, Dv, sv; /* sv: v's token row stride (v read in place, e.g. a column slice) */
    int strict;
} intra_t;

static inline float pair_decay(float bt, float bs, float st, float ss) {
    const float e = bt - bs;
    return ss == st ? exp2_neg(1.4426950408889634f * (e < 0.0f ? e : 0.0f)) : 0.0f;
}

/* P_r[t, 0..n-1] into p (and L into l when not NULL) */
static inline void pair_row(const float *restrict grow, const float *restrict b, const float *restrict seg,
                            const float *restrict ks, int64_t t, int64_t n, float *restrict p, float *restrict l) {
    const float bt = b[t], st = seg[t];
    #pragma omp simd
    for (int64_t s = 0; s < n; s++) {
        const float L = pair_decay(bt, b[s], st, seg[s]);
        if (l) l[s] = L;
        p[s] = grow[s] * L * (ks ? ks[s] : 1.0f);
    }
}

/* Head r's C token rows of src (row stride RD) into a contiguous (C, Dv) buffer: the rows of one head are 2 KiB
   apart in the token-major layout, which would fold onto a few L1 sets. */
static inline void gather_rows(const float *restrict src, int64_t RD, int64_t C, int64_t Dv, float *restrict dst) {
    for (int64_t t = 0; t < C; t++) memcpy(dst + t * Dv, src + t * RD, Dv * sizeof(float));
}

/* o_r[t] = gamma_r[t] QS_r[t] + sum_s P_r[t, s] v_r[s]; Dv a literal at the call for 64 (accumulator in registers) */
static inline __attribute__((always_inline)) void intra_fwd_head(const intra_t *a, int64_t blk, int64_t r,
                                                                  float *restrict p, float *restrict vloc,
                                                                  const int64_t Dv) {
    const int64_t R = a->R, C = a->C, h = blk * R + r, RD = R * Dv;
    const float *restrict gqk = a->gqk + blk * C * C, *restrict b = a->b + h * C, *restrict seg = a->seg + h * C;
    const float *restrict ks = a->ks ? a->ks + h * C : 0, *restrict gamma = a->gamma + h * C;
    const float *restrict QS = a->QS + blk * C * RD + r * Dv;
    float *restrict o = a->o + blk * C * RD + r * Dv;
    gather_rows(a->v + blk * C * a->sv + r * Dv, a->sv, C, Dv, vloc);
    for (int64_t t = 0; t < C; t++) {
        const int64_t n = a->strict ? t : t + 1;
        pair_row(gqk + t * C, b, seg, ks, t, n, p, 0);
        float acc[Dv];
        const float gt = gamma[t];
        #pragma omp simd
        for (int64_t d = 0; d < Dv; d++) acc[d] = gt * QS[t * RD + d];
        for (int64_t s = 0; s < n; s++) {
            const float ps = p[s];
            const float *restrict vs = vloc + s * Dv;
            #pragma omp simd
            for (int64_t d = 0; d < Dv; d++) acc[d] += ps * vs[d];
        }
        #pragma omp simd
        for (int64_t d = 0; d < Dv; d++) o[t * RD + d] = acc[d];
    }
}

static void intra_fwd(const void *arg, int tid, int nt) {
    const intra_t *a = (const intra_t *)arg;
    float *p = a->work + (int64_t)tid * (a->C + a->C * a->Dv), *vloc = p + a->C;
    for (int64_t blk = tid; blk < a->blocks; blk += nt)
        for (int64_t r = 0; r < a->R; r++) {
            if (a->Dv == 64) intra_fwd_head(a, blk, r, p, vloc, 64);
            else intra_fwd_head(a, blk, r, p, vloc, a->Dv);
        }
}

/* Backward of one head in one block, from dO:
   dQS_r[t] = gamma_r[t] dO_r[t]; dgamma_r[t] = dO_r[t] . QS_r[t];
   dP[t, s] = dO_r[t] . v_r[s] (a whole row of C at once against v_r transposed, vt (Dv, C));
   dgqk[t, s] += dP L ks[s]; X = dP gqk L: xcol[s] = sum_t X, zrow[t] = sum_s X ks[s];
   dv_r[s] = sum_{t >= s} P[t, s] dO_r[t] (P kept in pbuf (C, C) from the row pass).
   Dv and C are literals at the call for 64 (the row of dP and the dv accumulator in registers). */
static inline __attribute__((always_inline)) void intra_bwd_head(const intra_t *a, int64_t blk, int64_t r,
                                                                  float *restrict w, const int64_t Dv,
                                                                  const int64_t C) {
    const int64_t R = a->R, h = blk * R + r, RD = R * Dv;
    float *restrict pbuf = w, *restrict vt = pbuf + C * C, *restrict vloc = vt + Dv * C, *restrict oloc = vloc + C * Dv;
    float *restrict lrow = oloc + C * Dv;
    const float *restrict gqk = a->gqk + blk * C * C, *restrict b = a->b + h * C, *restrict seg = a->seg + h * C;
    const float *restrict ks = a->ks ? a->ks + h * C : 0, *restrict gamma = a->gamma + h * C;
    const float *restrict QS = a->QS + blk * C * RD + r * Dv;
    float *restrict dQS = a->dQS + blk * C * RD + r * Dv, *restrict dv = a->dv + blk * C * RD + r * Dv;
    float *restrict dgqk = a->dgqk + blk * C * C, *restrict xcol = a->xcol + h * C, *restrict zrow = a->zrow + h * C;
    float *restrict dgamma = a->dgamma + h * C;
    gather_rows(a->v + blk * C * a->sv + r * Dv, a->sv, C, Dv, vloc);
    gather_rows(a->dO + blk * C * RD + r * Dv, RD, C, Dv, oloc);
    for (int64_t s = 0; s < C; s++)
        for (int64_t d = 0; d < Dv; d++) vt[d * C + s] = vloc[s * Dv + d];
    memset(xcol, 0, C * sizeof(float));
    for (int64_t t = 0; t < C; t++) {
        const int64_t n = a->strict ? t : t + 1;
        const float *restrict dot = oloc + t * Dv;
        const float gt = gamma[t];
        float dg = 0.0f;
        #pragma omp simd reduction(+:dg)
        for (int64_t d = 0; d < Dv; d++) {
            dQS[t * RD + d] = gt * dot[d];
            dg += dot[d] * QS[t * RD + d];
        }
        dgamma[t] = dg;
        float *restrict prow = pbuf + t * C;
        pair_row(gqk + t * C, b, seg, ks, t, n, prow, lrow);
        float drow[C];
        #pragma omp simd
        for (int64_t s = 0; s < C; s++) drow[s] = 0.0f;
        for (int64_t d = 0; d < Dv; d++) {
            const float od = dot[d];
            const float *restrict vd = vt + d * C;
            #pragma omp simd
            for (int64_t s = 0; s < C; s++) drow[s] += od * vd[s];
        }
        const float *restrict grow = gqk + t * C;
        float *restrict dgrow = dgqk + t * C;
        float zr = 0.0f;
        #pragma omp simd reduction(+:zr)
        for (int64_t s = 0; s < n; s++) {
            const float dl = drow[s] * lrow[s], x = dl * grow[s], k = ks ? ks[s] : 1.0f;
            dgrow[s] += dl * k;
            xcol[s] += x;
            zr += x * k;
        }
        zrow[t] = zr;
    }
    for (int64_t s = 0; s < C; s++) {
        float acc[Dv];
        #pragma omp simd
        for (int64_t d = 0; d < Dv; d++) acc[d] = 0.0f;
        for (int64_t t = a->strict ? s + 1 : s; t < C; t++) {
            const float pts = pbuf[t * C + s];
            const float *restrict dot = oloc + t * Dv;
            #pragma omp simd
            for (int64_t d = 0; d < Dv; d++) acc[d] += pts * dot[d];
        }
        #pragma omp simd
        for (int64_t d = 0; d < Dv; d++) dv[s * RD + d] = acc[d];
    }
}

static void intra_bwd(const void *arg, int tid, int nt) {
    const intra_t *a = (const intra_t *)arg;
    const int64_t C = a->C, Dv = a->Dv;
    float *w = a->work + (int64_t)tid * (C * C + 3 * Dv * C + C);
    for (int64_t blk = tid; blk < a->blocks; blk += nt) {
        memset(a->dgqk + blk * C * C, 0, C * C * sizeof(float));
        for (int64_t r = 0; r < a->R; r++) {
            if (Dv == 64 && C == 64) intra_bwd_head(a, blk, r, w, 64, 64);
            else intra_bwd_head(a, blk, r, w, Dv, C);
        }
    }
}

int hfx_intra_fwd(const float *gqk, const float *b, const float *seg, const float *ks, const float *gamma,
                  const float *v, const float *QS, float *o, float *work, int64_t blocks, int64_t R, int64_t C,
                  int64_t Dv, int64_t sv, int strict, int nthreads) {
    intra_t a = {gqk, b, seg, ks, gamma, v, QS, 0, o, 0, 0, 0, 0, 0, 0, work, blocks, R, C, Dv, sv, strict};
    hfx_parallel(intra_fwd, &a, nthreads);
    return 0;
}

int hfx_intra_bwd(const float *gqk, const float *b, const float *seg, const float *ks, const float *gamma,
                  const float *v, const float *QS, const float *dO, float *dQS, float *dgamma, float *dgqk,
                  float *zrow, float *xcol, float *dv, float *work, int64_t blocks, int64_t R, int64_t C, int64_t Dv,
                  int64_t sv, int strict, int nthreads) {
    intra_t a = {gqk, b, seg, ks, gamma, v, QS, dO, 0, dQS, dgamma, dgqk, zrow, xcol, dv, work, blocks, R, C, Dv,
                 sv, strict};
    hfx_parallel(intra_bwd, &a, nthreads);
    return 0;
}

/* ---- SSD state writes, backward: per token row t and head r, with dvt = d(v w) from the state products,
   dw[r, t] = dvt_r[t] . v_r[t] and dv_r[t] += w[r, t] dvt_r[t]. Token rows (C, R, Dv) per block, v with row stride
   sv (read in place); w, dw (blocks, R, C). */
typedef struct {
    const float *dvt, *v, *w;
    float *dv, *dw;
    int64_t blocks, R, C, Dv, sv;
} writes_t;

static void writes_bwd(const void *arg, int tid, int nt) {
    const writes_t *a = (const writes_t *)arg;
    const int64_t R = a->R, C = a->C, Dv = a->Dv, RD = R * Dv;
    for (int64_t blk = tid; blk < a->blocks; blk += nt)
        for (int64_t t = 0; t < C; t++)
            for (int64_t r = 0; r < R; r++) {
                const float *restrict g = a->dvt + (blk * C + t) * RD + r * Dv;
                const float *restrict v = a->v + (blk * C + t) * a->sv + r * Dv;
                float *restrict dv = a->dv + (blk * C + t) * RD + r * Dv;
                const float wt = a->w[(blk * R + r) * C + t];
                float acc = 0.0f;
                #pragma omp simd reduction(+:acc)
                for (int64_t d = 0; d < Dv; d++) {
                    acc += g[d] * v[d];
                    dv[d] += wt * g[d];
                }
                a->dw[(blk * R + r) * C + t] = acc;
            }
}

int hfx_writes_bwd(const float *dvt, const float *v, const float *w, float *dv, float *dw, int64_t blocks, int64_t R,
                   int64_t C, int64_t Dv, int64_t sv, int nthreads) {
    writes_t a = {dvt, v, w, dv, dw, blocks, R, C, Dv, sv};
    hfx_parallel(writes_bwd, &a, nthreads);
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
            lib.hfx_conv_silu_fwd.argtypes = [p] * 6 + [i64] * 7 + [i32]
            lib.hfx_conv_silu_bwd.argtypes = [p] * 9 + [i64] * 7 + [i32]
            lib.hfx_norm_fwd.argtypes = [p] * 7 + [i64] * 6 + [f32, i32, i32]
            lib.hfx_norm_bwd.argtypes = [p] * 12 + [i64] * 6 + [i32, i32]
            lib.hfx_intra_fwd.argtypes = [p] * 9 + [i64] * 5 + [i32, i32]
            lib.hfx_intra_bwd.argtypes = [p] * 15 + [i64] * 5 + [i32, i32]
            lib.hfx_writes_bwd.argtypes = [p] * 5 + [i64] * 5 + [i32]
            fns = (lib.hfx_conv_silu_fwd, lib.hfx_conv_silu_bwd, lib.hfx_norm_fwd, lib.hfx_norm_bwd)
            for fn in (*fns, lib.hfx_intra_fwd, lib.hfx_intra_bwd, lib.hfx_writes_bwd):
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
    """The address of a float32 CPU tensor's data (the kernels read raw float32 memory: anything else is refused)."""
    if t is None:
        return None
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise TypeError(f"hf_extras CPU kernels take float32 CPU tensors, got {t.dtype} on {t.device}")
    return ctypes.c_void_p(t.data_ptr())


def _byte_ptr(t: Tensor | None):
    """The address of a uint8 CPU mask's data."""
    if t is None:
        return None
    if t.dtype != torch.uint8 or t.device.type != "cpu" or not t.is_contiguous():
        raise TypeError(f"hf_extras CPU kernels take contiguous uint8 CPU masks, got {t.dtype} on {t.device}")
    return ctypes.c_void_p(t.data_ptr())


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
    if hasattr(torch.ops.hf_extras, "conv_silu_v2"):
        return

    @torch.library.custom_op("hf_extras::conv_silu_v2", mutates_args=())
    def _conv_silu(x: Tensor, taps: Tensor, bias: Tensor | None, starts: Tensor | None) -> Tensor:
        x, sxt = _rows_view(x)
        batch, seq_len, channels = x.shape
        y = x.new_empty(batch, seq_len, channels)
        taps = taps.contiguous()
        threads = torch.get_num_threads()
        zero = x.new_zeros(threads, channels)  # the input before the first token
        load_kernel().hfx_conv_silu_fwd(
            _ptr(x), _ptr(taps), _ptr(bias), _byte_ptr(starts), _ptr(y), _ptr(zero), batch, seq_len, channels,
            taps.shape[0],
            x.stride(0), sxt, _items(seq_len), threads,
        )  # fmt: skip
        return y

    @_conv_silu.register_fake
    def _(x, taps, bias, starts):
        return x.new_empty(x.shape)

    @torch.library.custom_op("hf_extras::conv_silu_v2_backward", mutates_args=())
    def _conv_silu_backward(
        x: Tensor, taps: Tensor, bias: Tensor | None, starts: Tensor | None, gy: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
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
            _ptr(x), _ptr(taps), _ptr(bias), _byte_ptr(starts), _ptr(gy), _ptr(dx), _ptr(dtaps), _ptr(dbias),
            _ptr(work),
            batch, seq_len, channels, kernel, x.stride(0), sxt, nsplit, threads,
        )  # fmt: skip
        return dx, dtaps.sum(0), dbias.sum(0)

    @_conv_silu_backward.register_fake
    def _(x, taps, bias, starts, gy):
        return x.new_empty(x.shape), taps.new_empty(taps.shape), x.new_empty(x.shape[-1])

    def _conv_setup(ctx, inputs, output):
        x, taps, bias, starts = inputs
        ctx.save_for_backward(x, taps, bias, starts)
        ctx.has_bias = bias is not None

    def _conv_backward(ctx, gy):
        x, taps, bias, starts = ctx.saved_tensors
        dx, dtaps, dbias = torch.ops.hf_extras.conv_silu_v2_backward(x, taps, bias, starts, gy)
        return dx, dtaps, (dbias if ctx.has_bias else None), None

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


def conv_silu(x: Tensor, taps: Tensor, bias: Tensor | None, document_starts: Tensor | None = None) -> Tensor:
    """``silu`` of the causal depthwise conv of ``x`` (batch, time, channels) from a zero start; ``taps``
    (kernel, channels), tap ``kernel - 1`` on the current token; ``document_starts`` (batch, time) bool: a tap never
    reads across a document start (as ``conv_ops.causal_depthwise_conv``). Differentiable; callers check
    ``kernels_apply``."""
    _define_ops()
    starts = document_starts.to(torch.uint8).contiguous() if document_starts is not None else None
    return torch.ops.hf_extras.conv_silu_v2(x, taps, bias, starts)


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


def _chunk_rows(v: Tensor) -> tuple[Tensor, int]:
    """``v`` (..., C, R, Dv) as rows of ``R * Dv`` with one stride for every (chunk, token), read in place when it has
    one (Mamba-2's x inside xBC, batch 1, one group), else a contiguous copy; and that row stride."""
    *lead, C, R, Dv = v.shape
    if v.stride(-1) == 1 and v.stride(-2) == Dv:
        stride, expected = v.stride(-3), v.stride(-3) * C
        uniform = True
        for size, st in zip(reversed(lead), reversed(v.stride()[: len(lead)])):
            uniform = uniform and (size == 1 or st == expected)
            expected *= size
        if uniform:
            return v, stride
    return v.contiguous(), R * Dv


def _intra(
    gqk: Tensor, b: Tensor, seg: Tensor, ks: Tensor | None, gamma: Tensor, v: Tensor, QS: Tensor, strict: bool
) -> Tensor:
    """``ssd_intra`` by the kernel."""
    *lead, R, C = b.shape
    Dv = v.shape[-1]
    gqk, b, seg, gamma, QS = (t.contiguous() for t in (gqk, b, seg, gamma, QS))
    v, sv = _chunk_rows(v)
    ks = ks.contiguous() if ks is not None else None
    o = v.new_empty(v.shape)
    threads = torch.get_num_threads()
    work = v.new_empty(threads, C + C * Dv)
    blocks = b.numel() // (R * C) if C else 0
    load_kernel().hfx_intra_fwd(
        _ptr(gqk), _ptr(b), _ptr(seg), _ptr(ks), _ptr(gamma), _ptr(v), _ptr(QS), _ptr(o), _ptr(work),
        blocks, R, C, Dv, sv, int(strict), threads,
    )  # fmt: skip
    return o


def _intra_backward(
    gqk: Tensor,
    b: Tensor,
    seg: Tensor,
    ks: Tensor | None,
    gamma: Tensor,
    v: Tensor,
    QS: Tensor,
    dO: Tensor,
    strict: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``ssd_intra_backward`` by the kernel."""
    *lead, R, C = b.shape
    Dv = v.shape[-1]
    gqk, b, seg, gamma, QS, dO = (t.contiguous() for t in (gqk, b, seg, gamma, QS, dO))
    v, sv = _chunk_rows(v)
    ks = ks.contiguous() if ks is not None else None
    dQS, dv = v.new_empty(v.shape), v.new_empty(v.shape)
    dgamma, zrow, xcol = torch.empty_like(b), torch.empty_like(b), torch.empty_like(b)
    dgqk = torch.empty_like(gqk)
    threads = torch.get_num_threads()
    work = v.new_empty(threads, C * C + 3 * Dv * C + C)
    blocks = b.numel() // (R * C) if C else 0
    load_kernel().hfx_intra_bwd(
        _ptr(gqk), _ptr(b), _ptr(seg), _ptr(ks), _ptr(gamma), _ptr(v), _ptr(QS), _ptr(dO), _ptr(dQS),
        _ptr(dgamma), _ptr(dgqk), _ptr(zrow), _ptr(xcol), _ptr(dv), _ptr(work), blocks, R, C, Dv, sv, int(strict),
        threads,
    )  # fmt: skip
    return dQS, dgamma, dgqk, zrow, xcol, dv


def _writes_backward(dvt: Tensor, v: Tensor, w: Tensor, dv: Tensor) -> Tensor:
    """``ssd_state_writes_backward`` by the kernel (``dv`` updated in place)."""
    *lead, R, C = w.shape
    Dv = v.shape[-1]
    dvt, w = dvt.contiguous(), w.contiguous()
    v, sv = _chunk_rows(v)
    if not dv.is_contiguous():
        raise ValueError("ssd_state_writes_backward: dv must be contiguous (it is updated in place)")
    dw = w.new_empty(w.shape)
    blocks = w.numel() // (R * C) if C else 0
    load_kernel().hfx_writes_bwd(
        _ptr(dvt), _ptr(v), _ptr(w), _ptr(dv), _ptr(dw), blocks, R, C, Dv, sv, torch.get_num_threads()
    )
    return dw


def _define_intra_ops() -> None:
    """The within-chunk part as operators (opaque to torch.compile inside the SSD's autograd function), once per
    process."""
    if hasattr(torch.ops.hf_extras, "ssd_intra_v1"):
        return
    fwd = torch.library.custom_op("hf_extras::ssd_intra_v1", _intra, mutates_args=())
    bwd = torch.library.custom_op("hf_extras::ssd_intra_v1_backward", _intra_backward, mutates_args=())
    writes = torch.library.custom_op("hf_extras::ssd_state_writes_v1_backward", _writes_backward, mutates_args=("dv",))

    @writes.register_fake
    def _(dvt, v, w, dv):
        return w.new_empty(w.shape)

    @fwd.register_fake
    def _(gqk, b, seg, ks, gamma, v, QS, strict):
        return v.new_empty(v.shape)

    @bwd.register_fake
    def _(gqk, b, seg, ks, gamma, v, QS, dO, strict):
        v_like, b_like = v.new_empty(v.shape), b.new_empty(b.shape)
        return (
            v_like,
            b_like,
            gqk.new_empty(gqk.shape),
            b.new_empty(b.shape),
            b.new_empty(b.shape),
            v.new_empty(v.shape),
        )


def ssd_intra(
    gqk: Tensor, b: Tensor, seg: Tensor, ks: Tensor | None, gamma: Tensor, v: Tensor, QS: Tensor, strict: bool
) -> Tensor:
    """SSD's output within each chunk: ``o_r[t] = gamma_r[t] QS_r[t] + sum_s P_r[t, s] v_r[s]`` with the pair weights
    ``P_r[t, s] = gqk[t, s] exp(b_t - b_s) ks_r[s]`` (s <= t, or s < t when ``strict``, same segment; else 0), computed
    on the fly, never stored. gqk (..., C, C) is shared by the R heads of a group; b, seg, ks, gamma (..., R, C); v, QS
    and the output (..., C, R, Dv) (token rows, heads side by side). Not differentiable:
    ``retention_ops._GroupedChunkwise`` calls it in its forward and ``ssd_intra_backward`` in its backward."""
    _define_intra_ops()
    return torch.ops.hf_extras.ssd_intra_v1(gqk, b, seg, ks, gamma, v, QS, strict)


def ssd_intra_backward(
    gqk: Tensor,
    b: Tensor,
    seg: Tensor,
    ks: Tensor | None,
    gamma: Tensor,
    v: Tensor,
    QS: Tensor,
    dO: Tensor,
    strict: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """From ``dO`` (the gradient of ``ssd_intra``'s output): ``dQS = gamma dO``, ``d gamma`` (``dO . QS`` per row),
    ``d gqk``, and with ``X_r = dP_r * gqk * L_r`` its row sums weighted by ``ks`` and its column sums (the pair decays'
    share of the log-decay gradient and of ``d ks``), and ``dv`` through the pair weights."""
    _define_intra_ops()
    return torch.ops.hf_extras.ssd_intra_v1_backward(gqk, b, seg, ks, gamma, v, QS, dO, strict)


def ssd_state_writes_backward(dvt: Tensor, v: Tensor, w: Tensor, dv: Tensor) -> Tensor:
    """Backward of the state writes ``k^T (v * w)``: from ``dvt`` (the gradient of ``v * w``, (..., C, R, Dv)), adds
    ``w * dvt`` to ``dv`` in place (contiguous, (..., C, R, Dv)) and returns ``dw = sum_d dvt * v`` (..., R, C), with
    ``w`` (..., R, C) (one weight per head and token). One pass; ``v`` read in place where its rows allow."""
    _define_intra_ops()
    return torch.ops.hf_extras.ssd_state_writes_v1_backward(dvt, v, w, dv)
