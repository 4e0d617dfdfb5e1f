"""Fused CPU kernels for the memory-bound parts of the recurrent mixers. C, compiled on first use by
``cpu_kernel_build``, called as ``torch.library`` operators (opaque to ``torch.compile``).

Why: in PyTorch each of these is a chain of array-sized passes over memory; each kernel reads its inputs once and
writes its outputs once, a token row (or a chunk of one head) at a time, and recomputes what its backward needs
instead of storing it. Measured in the Mamba-2 benchmark (``benchmarks/mamba2_vs_transformers.py``): see the README.

* conv: ``y = silu(bias + sum_j taps[K-1-j] * x[t-j])`` from a zero start, a tap never reading across a document
  start (the training form of ``conv_ops.causal_depthwise_conv``); ``x`` may be a column slice of a wider row, read in
  place; the output may be written as up to three tensors by channel range (``mamba2_in_conv``: Mamba-2's in_proj
  output to z, x, B, C, dt with one gradient written for the whole in_proj output). For 4 taps and channel ranges in
  multiples of 16 (Mamba's, Mamba-2's and DeltaNet's convs), a register-blocked form: 16 channels at a time through
  runs of 64 tokens, the taps, the input window and the tap sums in registers.
* gated norm: ``out = weight * rms_g(u) [* silu(z)]`` with ``u = y [* silu(z)]`` (gate before or after the norm),
  RMS over groups of channels; and the plain RMS norm of every block.
* SSD (``retention_ops._GroupedChunkwise``): the within-chunk part (pair weights ``(q k^T) * exp(b_t - b_s) * ks_s``
  computed on the fly, never stored; a register-blocked form for chunk = head_dim = 64), the values' weights, and the
  recurrence across chunks. The state products stay PyTorch matmuls.

Work is split into fixed items (ranges of tokens, chunks, heads); per-channel gradient sums are written as one partial
sum per item and added by torch in a fixed order, so results do not depend on the thread count. Float32 CPU tensors
only (``_ptr`` refuses anything else); callers check ``kernels_apply`` and keep their PyTorch forms otherwise.

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
    const float *x, *taps, *bias;
    float *dx, *dtaps, *dbias, *work;
    int64_t batch, T, C, K, sxb, sxt, nsplit, span;
    const uint8_t *starts; /* (batch, T), 1 at a document's first token; NULL: one document per row */
    /* the output (and its gradient) in up to 3 buffers by channel range: segs[k]..segs[k+1] in ys[k] / gys[k],
       each (batch, T, width) contiguous; dx with row stride sdx and batch stride sdxb */
    float *ys[3];
    const float *gys[3];
    int64_t segs[4], sdx, sdxb;
    int nseg, vec4; /* vec4: K = 4 and every range a multiple of 16 channels (conv_*_item4) */
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
    const int64_t C = a->C, T = a->T;
    const int64_t b = it / a->nsplit, t0 = (it % a->nsplit) * a->span, t1 = t0 + a->span < T ? t0 + a->span : T;
    const float *restrict taps = a->taps, *restrict bias = a->bias, *xb = a->x + b * a->sxb;
    const uint8_t *st = a->starts ? a->starts + b * T : 0;
    for (int64_t t = t0; t < t1; t++) {
        const float *xr[KMAX];
        tap_rows(a, xb, st, t, zero, xr, K);
        for (int k = 0; k < a->nseg; k++) {
            const int64_t c0 = a->segs[k], c1 = a->segs[k + 1];
            float *restrict yr = a->ys[k] + (b * T + t) * (c1 - c0);
            #pragma omp simd
            for (int64_t c = c0; c < c1; c++) {
                float pre = bias ? bias[c] : 0.0f;
                for (int64_t j = 0; j < K; j++) pre += taps[(K - 1 - j) * C + c] * xr[j][c];
                yr[c - c0] = pre * sigm(pre);
            }
        }
    }
}

/* Backward, tokens last to first: g_t = gy_t * silu'(pre_t) (pre recomputed) into a ring of K rows (zeros past the
   end), dx_t = sum_j taps[K-1-j] g_{t+j} (the g_{t+j} past a document start read as zero); the item's partial
   dtaps / dbias take its own tokens only (the K - 1 halo rows after its range are recomputed, not counted). */
static inline __attribute__((always_inline)) void conv_bwd_item(const conv_t *a, int64_t it, float *ring,
                                                                 const float *zero, const int64_t K) {
    const int64_t C = a->C, T = a->T;
    const int64_t b = it / a->nsplit, t0 = (it % a->nsplit) * a->span, t1 = t0 + a->span < T ? t0 + a->span : T;
    const int64_t tend = t1 + K - 1 < T ? t1 + K - 1 : T;
    const float *restrict taps = a->taps, *restrict bias = a->bias, *xb = a->x + b * a->sxb;
    float *restrict dtaps = a->dtaps + it * K * C, *restrict dbias = a->dbias ? a->dbias + it * C : 0;
    memset(dtaps, 0, K * C * sizeof(float));
    if (dbias) memset(dbias, 0, C * sizeof(float));
    memset(ring, 0, K * C * sizeof(float));
    const uint8_t *st = a->starts ? a->starts + b * T : 0;
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
        float *restrict dxr = a->dx + b * a->sdxb + t * a->sdx;
        for (int k = 0; k < a->nseg; k++) {
            const int64_t c0 = a->segs[k], c1 = a->segs[k + 1];
            const float *restrict gyr = a->gys[k] + (b * T + t) * (c1 - c0);
            if (t >= t1) { /* halo: the gradient at the pre-activation only */
                #pragma omp simd
                for (int64_t c = c0; c < c1; c++) {
                    float pre = bias ? bias[c] : 0.0f;
                    for (int64_t j = 0; j < K; j++) pre += taps[(K - 1 - j) * C + c] * xr[j][c];
                    const float s = sigm(pre);
                    g[c] = gyr[c - c0] * s * (1.0f + pre * (1.0f - s));
                }
                continue;
            }
            #pragma omp simd
            for (int64_t c = c0; c < c1; c++) {
                float pre = bias ? bias[c] : 0.0f;
                for (int64_t j = 0; j < K; j++) pre += taps[(K - 1 - j) * C + c] * xr[j][c];
                const float s = sigm(pre), gc = gyr[c - c0] * s * (1.0f + pre * (1.0f - s));
                g[c] = gc;
                if (dbias) dbias[c] += gc;
                float d = taps[(K - 1) * C + c] * gc;
                for (int64_t j = 0; j < K; j++) dtaps[(K - 1 - j) * C + c] += gc * xr[j][c];
                for (int64_t j = 1; j < K; j++) d += taps[(K - 1 - j) * C + c] * gr[j][c];
                dxr[c] = d;
            }
        }
    }
}

/* ---- GCC / clang vector extensions: 16 floats (one AVX-512 register, two AVX2 ones) ---- */
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
#define LD(p) (*(const v16u *)(p))
#define ST(p, x) (*(v16u *)(p) = (x))

/* ---- K = 4 with every output range a multiple of 16 channels (Mamba / Mamba-2 / DeltaNet's convs): per run of SUB
   tokens, 16 channels at a time through the run, with the taps, the last inputs, the next gradients and the tap sums
   in registers (each input and gradient read once, each output written once); runs of SUB tokens keep the rows
   walked per pass few enough for the TLB and L2. Same numbers to float rounding. ---- */
#define SUB 64
typedef int32_t v16i __attribute__((vector_size(64)));
#define VZERO ((v16){0})
#define VAND(x, m) ((v16)((v16i)(x) & (m)))

static inline v16 vmax(v16 a, v16 b) { const v16i m = a > b; return (v16)(((v16i)a & m) | ((v16i)b & ~m)); }
static inline v16 vmin(v16 a, v16 b) { const v16i m = a < b; return (v16)(((v16i)a & m) | ((v16i)b & ~m)); }

/* exp2_neg of each lane, its polynomial (rounding to nearest by the 1.5 * 2^23 shift, |x| <= 127) */
static inline v16 exp2_neg16(v16 x) {
    x = vmin(vmax(x, VZERO - 127.0f), VZERO + 127.0f);
    const v16 xi = (x + 12582912.0f) - 12582912.0f;
    const v16 g = (x - xi) * 0.69314718055994531f;
    const v16 p = HFX_EXP_POLY(g);
    const v16i bits = (__builtin_convertvector(xi, v16i) + 127) << 23;
    return p * (v16)bits;
}

static inline v16 sigm16(v16 x) { return 1.0f / (1.0f + exp2_neg16(-1.4426950408889634f * x)); }

/* all-ones where tap j of token t reads a real input (t - j in the row and no document start in t-j+1..t) */
static inline void tap_masks(const uint8_t *st, int64_t t, v16i *m) {
    int valid = 1;
    for (int j = 1; j < 4; j++) {
        valid = valid && j <= t && !(st && st[t - j + 1]);
        m[j] = (v16i){0} - valid;
    }
}

static inline v16 load_or_zero(const float *p, int64_t t, int64_t sxt, int64_t c) {
    return t >= 0 ? LD(p + t * sxt + c) : VZERO;
}

static inline __attribute__((always_inline)) void conv_fwd_item4(const conv_t *a, int64_t it, const int docs) {
    const int64_t C = a->C, T = a->T, sxt = a->sxt;
    const int64_t b = it / a->nsplit, t0 = (it % a->nsplit) * a->span, t1 = t0 + a->span < T ? t0 + a->span : T;
    const float *restrict xb = a->x + b * a->sxb, *restrict taps = a->taps, *restrict bias = a->bias;
    const uint8_t *st = docs ? a->starts + b * T : 0;
    for (int64_t lo = t0; lo < t1; lo += SUB) {
        const int64_t hi = lo + SUB < t1 ? lo + SUB : t1;
        for (int k = 0; k < a->nseg; k++) {
            const int64_t c0 = a->segs[k], c1 = a->segs[k + 1], width = c1 - c0;
            float *restrict yb = a->ys[k] + b * T * width - c0;
            for (int64_t c = c0; c < c1; c += 16) {
                const v16 w0 = LD(taps + c), w1 = LD(taps + C + c), w2 = LD(taps + 2 * C + c),
                          w3 = LD(taps + 3 * C + c);
                const v16 bv = bias ? LD(bias + c) : VZERO;
                v16 x1 = load_or_zero(xb, lo - 1, sxt, c), x2 = load_or_zero(xb, lo - 2, sxt, c),
                    x3 = load_or_zero(xb, lo - 3, sxt, c);
                for (int64_t t = lo; t < hi; t++) {
                    const v16 x0 = LD(xb + t * sxt + c);
                    v16 pre;
                    if (docs) {
                        v16i m[4];
                        tap_masks(st, t, m);
                        pre = bv + w3 * x0 + w2 * VAND(x1, m[1]) + w1 * VAND(x2, m[2]) + w0 * VAND(x3, m[3]);
                    } else {
                        pre = bv + w3 * x0 + w2 * x1 + w1 * x2 + w0 * x3;
                    }
                    ST(yb + t * width + c, pre * sigm16(pre));
                    x3 = x2; x2 = x1; x1 = x0;
                }
            }
        }
    }
}

/* tokens last to first, in runs of SUB; between runs each 16 channels' next gradients wait in `carry` (3 rows of C)
   and their tap sums in the item's dtaps / dbias */
static inline __attribute__((always_inline)) void conv_bwd_item4(const conv_t *a, int64_t it, float *restrict carry,
                                                                  const int docs) {
    const int64_t C = a->C, T = a->T, sxt = a->sxt, sdx = a->sdx;
    const int64_t b = it / a->nsplit, t0 = (it % a->nsplit) * a->span, t1 = t0 + a->span < T ? t0 + a->span : T;
    const int64_t tend = t1 + 3 < T ? t1 + 3 : T;
    const float *restrict xb = a->x + b * a->sxb, *restrict taps = a->taps, *restrict bias = a->bias;
    float *restrict dtaps = a->dtaps + it * 4 * C, *restrict dbias = a->dbias ? a->dbias + it * C : 0;
    float *restrict dxb = a->dx + b * a->sdxb;
    const uint8_t *st = docs ? a->starts + b * T : 0;
    memset(dtaps, 0, 4 * C * sizeof(float));
    if (dbias) memset(dbias, 0, C * sizeof(float));
    memset(carry, 0, 3 * C * sizeof(float));
    for (int64_t hi = tend; hi > t0; hi -= SUB) {
        const int64_t lo = hi - SUB > t0 ? hi - SUB : t0;
        /* whether token hi - 1 reaches tokens hi, hi + 1, hi + 2 (their gradients are zero past the row) */
        const int r1 = !docs || (hi < T && !st[hi]), r2 = r1 && (!docs || (hi + 1 < T && !st[hi + 1])),
                  r3 = r2 && (!docs || (hi + 2 < T && !st[hi + 2]));
        for (int k = 0; k < a->nseg; k++) {
            const int64_t c0 = a->segs[k], c1 = a->segs[k + 1], width = c1 - c0;
            const float *restrict gyb = a->gys[k] + b * T * width - c0;
            for (int64_t c = c0; c < c1; c += 16) {
                const v16 w0 = LD(taps + c), w1 = LD(taps + C + c), w2 = LD(taps + 2 * C + c),
                          w3 = LD(taps + 3 * C + c);
                const v16 bv = bias ? LD(bias + c) : VZERO;
                v16 d0 = LD(dtaps + c), d1 = LD(dtaps + C + c), d2 = LD(dtaps + 2 * C + c), d3 = LD(dtaps + 3 * C + c);
                v16 db = dbias ? LD(dbias + c) : VZERO;
                /* the pre-activation gradients of tokens t+1..t+3, and whether token t reaches them */
                v16 g1 = LD(carry + c), g2 = LD(carry + C + c), g3 = LD(carry + 2 * C + c);
                int n1 = r1, n2 = r2, n3 = r3;
                const int64_t tl = hi - 1;
                v16 x0 = LD(xb + tl * sxt + c), x1 = load_or_zero(xb, tl - 1, sxt, c),
                    x2 = load_or_zero(xb, tl - 2, sxt, c);
                for (int64_t t = tl; t >= lo; t--) {
                    const v16 x3 = load_or_zero(xb, t - 3, sxt, c);
                    v16 xm1 = x1, xm2 = x2, xm3 = x3;
                    if (docs) {
                        v16i m[4];
                        tap_masks(st, t, m);
                        xm1 = VAND(x1, m[1]); xm2 = VAND(x2, m[2]); xm3 = VAND(x3, m[3]);
                    }
                    const v16 pre = bv + w3 * x0 + w2 * xm1 + w1 * xm2 + w0 * xm3;
                    const v16 s = sigm16(pre), g = LD(gyb + t * width + c) * s * (1.0f + pre * (1.0f - s));
                    if (t < t1) {
                        v16 d = w3 * g;
                        if (docs) {
                            d += w2 * VAND(g1, (v16i){0} - n1) + w1 * VAND(g2, (v16i){0} - n2)
                                 + w0 * VAND(g3, (v16i){0} - n3);
                        } else {
                            d += w2 * g1 + w1 * g2 + w0 * g3;
                        }
                        ST(dxb + t * sdx + c, d);
                        d3 += g * x0; d2 += g * xm1; d1 += g * xm2; d0 += g * xm3;
                        db += g;
                    }
                    if (docs) { /* token t-1 reaches t+j-1 if no start in t..t+j-1 */
                        const int s0 = !st[t];
                        n3 = n2 && s0; n2 = n1 && s0; n1 = s0;
                    }
                    g3 = g2; g2 = g1; g1 = g;
                    x0 = x1; x1 = x2; x2 = x3;
                }
                ST(carry + c, g1); ST(carry + C + c, g2); ST(carry + 2 * C + c, g3);
                ST(dtaps + c, d0); ST(dtaps + C + c, d1); ST(dtaps + 2 * C + c, d2); ST(dtaps + 3 * C + c, d3);
                if (dbias) ST(dbias + c, db);
            }
        }
    }
}

static void conv_fwd(const void *p, int tid, int nt) {
    const conv_t *a = (const conv_t *)p;
    const float *zero = a->work + (int64_t)tid * a->C;
    for (int64_t it = tid; it < a->batch * a->nsplit; it += nt) {
        if (a->vec4) {
            if (a->starts) conv_fwd_item4(a, it, 1);
            else conv_fwd_item4(a, it, 0);
        } else if (a->K == 4) conv_fwd_item(a, it, zero, 4);
        else conv_fwd_item(a, it, zero, a->K);
    }
}

static void conv_bwd(const void *p, int tid, int nt) {
    const conv_t *a = (const conv_t *)p;
    float *ring = a->work + (int64_t)tid * (a->K + 1) * a->C, *zero = ring + a->K * a->C;
    for (int64_t it = tid; it < a->batch * a->nsplit; it += nt) {
        if (a->vec4) {
            if (a->starts) conv_bwd_item4(a, it, ring, 1);
            else conv_bwd_item4(a, it, ring, 0);
        } else if (a->K == 4) conv_bwd_item(a, it, ring, zero, 4);
        else conv_bwd_item(a, it, ring, zero, a->K);
    }
}

static int conv_setup(conv_t *a, const float *x, const float *taps, const float *bias, const uint8_t *starts,
                      int64_t batch, int64_t T, int64_t C, int64_t K, int64_t sxb, int64_t sxt, int64_t nsplit,
                      int nseg, const int64_t *widths) {
    memset(a, 0, sizeof(*a));
    a->x = x; a->taps = taps; a->bias = bias; a->starts = starts;
    a->batch = batch; a->T = T; a->C = C; a->K = K; a->sxb = sxb; a->sxt = sxt; a->nsplit = nsplit;
    a->span = (T + nsplit - 1) / nsplit;
    if (nseg < 1 || nseg > 3 || K > KMAX) return -1;
    a->nseg = nseg;
    for (int k = 0; k < nseg; k++) a->segs[k + 1] = a->segs[k] + widths[k];
    a->vec4 = K == 4;
    for (int k = 0; k < nseg; k++) a->vec4 = a->vec4 && widths[k] % 16 == 0;
    return a->segs[nseg] == C ? 0 : -1;
}

/* y in nseg buffers (channel ranges of widths[k]) */
int hfx_conv_silu_fwd(const float *x, const float *taps, const float *bias, const uint8_t *starts, float *y0,
                      float *y1, float *y2, const int64_t *widths, int nseg, float *work, int64_t batch, int64_t T,
                      int64_t C, int64_t K, int64_t sxb, int64_t sxt, int64_t nsplit, int nthreads) {
    conv_t a;
    if (conv_setup(&a, x, taps, bias, starts, batch, T, C, K, sxb, sxt, nsplit, nseg, widths)) return -1;
    a.ys[0] = y0; a.ys[1] = y1; a.ys[2] = y2; a.work = work;
    hfx_parallel(conv_fwd, &a, nthreads);
    return 0;
}

/* gy in nseg buffers; dx written with row stride sdx and batch stride sdxb (e.g. into a wider gradient buffer) */
int hfx_conv_silu_bwd(const float *x, const float *taps, const float *bias, const uint8_t *starts, const float *gy0,
                      const float *gy1, const float *gy2, const int64_t *widths, int nseg, float *dx, int64_t sdx,
                      int64_t sdxb, float *dtaps, float *dbias, float *work, int64_t batch, int64_t T, int64_t C,
                      int64_t K, int64_t sxb, int64_t sxt, int64_t nsplit, int nthreads) {
    conv_t a;
    if (conv_setup(&a, x, taps, bias, starts, batch, T, C, K, sxb, sxt, nsplit, nseg, widths)) return -1;
    a.gys[0] = gy0; a.gys[1] = gy1; a.gys[2] = gy2;
    a.dx = dx; a.sdx = sdx; a.sdxb = sdxb; a.dtaps = dtaps; a.dbias = dbias; a.work = work;
    hfx_parallel(conv_bwd, &a, nthreads);
    return 0;
}

/* ---- gated RMS norm ---- */
typedef struct {
    const float *y, *z, *w, *gout;
    float *out, *rstd, *dy, *dz, *dw;
    int64_t rows, I, G, sz, nitems;
    float eps;
    int before;
} norm_t;

/* One token row; `before` is a literal constant at each call, so each variant is compiled branch-free. */
static inline void norm_fwd_row(const norm_t *a, int64_t r, const int before) {
    const int64_t I = a->I, G = a->G, gs = I / G;
    const float *restrict yr = a->y + r * I, *restrict zr = a->z + r * a->sz, *restrict w = a->w;
    float *restrict o = a->out + r * I;
    const float eps = a->eps;
    for (int64_t g = 0; g < G; g++) {
        const int64_t c0 = g * gs, c1 = c0 + gs;
        float ss = 0.0f;
        #pragma omp simd reduction(+:ss)
        for (int64_t c = c0; c < c1; c++) {
            const float u = before ? yr[c] : yr[c] * zr[c] * sigm(zr[c]);
            o[c] = u;
            ss += u * u;
        }
        const float rs = 1.0f / sqrtf(ss / (float)gs + eps);
        a->rstd[r * G + g] = rs;
        #pragma omp simd
        for (int64_t c = c0; c < c1; c++) o[c] = w[c] * o[c] * rs * (before ? zr[c] * sigm(zr[c]) : 1.0f);
    }
}

static inline void norm_bwd_row(const norm_t *a, int64_t r, float *restrict dw, const int before) {
    const int64_t I = a->I, G = a->G, gs = I / G;
    const float *restrict yr = a->y + r * I, *restrict zr = a->z + r * a->sz, *restrict w = a->w;
    const float *restrict go = a->gout + r * I;
    float *restrict dyr = a->dy + r * I, *restrict dzr = a->dz + r * I;
    for (int64_t g = 0; g < G; g++) {
        const int64_t c0 = g * gs, c1 = c0 + gs;
        const float rs = a->rstd[r * G + g];
        float dot = 0.0f, srow[gs]; /* the gate's sigmoid, kept for pass 2 */
        /* pass 1: n = u rs, gn = gout w (gate after the norm): dot = sum gn n; n kept in dz, gn in dy */
        #pragma omp simd reduction(+:dot)
        for (int64_t c = c0; c < c1; c++) {
            const float s = sigm(zr[c]), sz = zr[c] * s;
            srow[c - c0] = s;
            const float n = (before ? yr[c] : yr[c] * sz) * rs;
            const float gn = go[c] * w[c] * (before ? sz : 1.0f);
            dw[c] += go[c] * n * (before ? sz : 1.0f);
            dzr[c] = n;
            dyr[c] = gn;
            dot += gn * n;
        }
        dot /= (float)gs;
        /* pass 2: du = rs (gn - n dot), through the gate */
        #pragma omp simd
        for (int64_t c = c0; c < c1; c++) {
            const float s = srow[c - c0], sz = zr[c] * s, dsz = s * (1.0f + zr[c] * (1.0f - s));
            const float n = dzr[c], du = rs * (dyr[c] - n * dot);
            if (before) {
                dyr[c] = du;
                dzr[c] = go[c] * w[c] * n * dsz;
            } else {
                dyr[c] = du * sz;
                dzr[c] = du * yr[c] * dsz;
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
            if (a->before) norm_fwd_row(a, r, 1);
            else norm_fwd_row(a, r, 0);
        }
    }
}

static void norm_bwd(const void *p, int tid, int nt) {
    const norm_t *a = (const norm_t *)p;
    const int64_t I = a->I, per = (a->rows + a->nitems - 1) / a->nitems;
    for (int64_t it = tid; it < a->nitems; it += nt) {
        float *dw = a->dw + it * I;
        memset(dw, 0, I * sizeof(float));
        const int64_t r1 = (it + 1) * per < a->rows ? (it + 1) * per : a->rows;
        for (int64_t r = it * per; r < r1; r++) {
            if (a->before) norm_bwd_row(a, r, dw, 1);
            else norm_bwd_row(a, r, dw, 0);
        }
    }
}

int hfx_norm_fwd(const float *y, const float *z, const float *w, float *out, float *rstd, int64_t rows, int64_t I,
                 int64_t G, int64_t sz, int64_t nitems, float eps, int before, int nthreads) {
    norm_t a = {y, z, w, 0, out, rstd, 0, 0, 0, rows, I, G, sz, nitems, eps, before};
    hfx_parallel(norm_fwd, &a, nthreads);
    return 0;
}

int hfx_norm_bwd(const float *y, const float *z, const float *w, const float *gout, const float *rstd, float *dy,
                 float *dz, float *dw, int64_t rows, int64_t I, int64_t G, int64_t sz, int64_t nitems, int before,
                 int nthreads) {
    norm_t a = {y, z, w, gout, 0, (float *)rstd, dy, dz, dw, rows, I, G, sz, nitems, 0.0f, before};
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
    const float *D; /* the skip: o += D v, D (G, R, Dv) per group (blocks cycle through the G groups); or NULL */
    float *dD;      /* its gradient's partial sums, (blocks, R, Dv) */
    int64_t blocks, R, C, Dv, sv, G; /* sv: v's token row stride (v read in place, e.g. a column slice) */
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
    const float *restrict Dr = a->D ? a->D + ((blk % a->G) * R + r) * Dv : 0;
    gather_rows(a->v + blk * C * a->sv + r * Dv, a->sv, C, Dv, vloc);
    for (int64_t t = 0; t < C; t++) {
        const int64_t n = a->strict ? t : t + 1;
        pair_row(gqk + t * C, b, seg, ks, t, n, p, 0);
        float acc[Dv];
        const float gt = gamma[t];
        #pragma omp simd
        for (int64_t d = 0; d < Dv; d++) acc[d] = gt * QS[t * RD + d] + (Dr ? Dr[d] * vloc[t * Dv + d] : 0.0f);
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

/* ---- C = Dv = 64 (the defaults: chunk 64, Mamba-2 head_dim 64): register-blocked forms of the two heads above,
   4 rows x 64 columns of accumulators (16 vectors of 16 floats) per step. Same numbers to float rounding. ---- */

/* rows t0..t0+3 of P into pbuf (zeros past each row's last column, up to 64) */
static inline void pair_rows4(const float *restrict gqk, const float *restrict b, const float *restrict seg,
                              const float *restrict ks, int64_t t0, int strict, float *restrict pbuf,
                              float *restrict lbuf) {
    for (int64_t i = 0; i < 4; i++) {
        const int64_t t = t0 + i, n = strict ? t : t + 1;
        pair_row(gqk + t * 64, b, seg, ks, t, n, pbuf + t * 64, lbuf ? lbuf + t * 64 : 0);
        memset(pbuf + t * 64 + n, 0, (64 - n) * sizeof(float));
    }
}

static void intra_fwd_head64(const intra_t *a, int64_t blk, int64_t r, float *restrict pbuf, float *restrict vloc) {
    const int64_t R = a->R, h = blk * R + r, RD = R * 64;
    const float *restrict gqk = a->gqk + blk * 4096, *restrict b = a->b + h * 64, *restrict seg = a->seg + h * 64;
    const float *restrict ks = a->ks ? a->ks + h * 64 : 0, *restrict gamma = a->gamma + h * 64;
    const float *restrict QS = a->QS + blk * 64 * RD + r * 64;
    float *restrict o = a->o + blk * 64 * RD + r * 64;
    const float *restrict Dr = a->D ? a->D + ((blk % a->G) * R + r) * 64 : 0;
    gather_rows(a->v + blk * 64 * a->sv + r * 64, a->sv, 64, 64, vloc);
    for (int64_t t0 = 0; t0 < 64; t0 += 4) {
        pair_rows4(gqk, b, seg, ks, t0, a->strict, pbuf, 0);
        v16 acc[4][4];
        for (int i = 0; i < 4; i++) {
            const float g = gamma[t0 + i];
            for (int j = 0; j < 4; j++) acc[i][j] = g * LD(QS + (t0 + i) * RD + 16 * j);
            if (Dr)
                for (int j = 0; j < 4; j++) acc[i][j] += LD(Dr + 16 * j) * LD(vloc + (t0 + i) * 64 + 16 * j);
        }
        const int64_t smax = t0 + 4;
        for (int64_t s = 0; s < smax; s++) {
            const v16 v0 = LD(vloc + s * 64), v1 = LD(vloc + s * 64 + 16), v2 = LD(vloc + s * 64 + 32),
                      v3 = LD(vloc + s * 64 + 48);
            for (int i = 0; i < 4; i++) {
                const float p = pbuf[(t0 + i) * 64 + s];
                acc[i][0] += p * v0;
                acc[i][1] += p * v1;
                acc[i][2] += p * v2;
                acc[i][3] += p * v3;
            }
        }
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) ST(o + (t0 + i) * RD + 16 * j, acc[i][j]);
    }
}

/* rows t0..t0+3 of dP = dO v^T over the first NB column vectors (NB a literal at the call) */
static inline __attribute__((always_inline)) void dp_rows4(const float *restrict oloc, const float *restrict vt,
                                                           int64_t t0, float *restrict dpbuf, const int NB) {
    v16 acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < NB; j++) acc[i][j] = (v16){0};
    for (int64_t d = 0; d < 64; d++) {
        const float o0 = oloc[t0 * 64 + d], o1 = oloc[(t0 + 1) * 64 + d], o2 = oloc[(t0 + 2) * 64 + d],
                    o3 = oloc[(t0 + 3) * 64 + d];
        for (int j = 0; j < NB; j++) {
            const v16 x = LD(vt + d * 64 + 16 * j);
            acc[0][j] += o0 * x;
            acc[1][j] += o1 * x;
            acc[2][j] += o2 * x;
            acc[3][j] += o3 * x;
        }
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < NB; j++) ST(dpbuf + (t0 + i) * 64 + 16 * j, acc[i][j]);
}

static void intra_bwd_head64(const intra_t *a, int64_t blk, int64_t r, float *restrict w) {
    const int64_t R = a->R, h = blk * R + r, RD = R * 64;
    float *restrict pbuf = w, *restrict lbuf = pbuf + 4096, *restrict dpbuf = lbuf + 4096, *restrict vt = dpbuf + 4096;
    float *restrict vloc = vt + 4096, *restrict oloc = vloc + 4096;
    const float *restrict gqk = a->gqk + blk * 4096, *restrict b = a->b + h * 64, *restrict seg = a->seg + h * 64;
    const float *restrict ks = a->ks ? a->ks + h * 64 : 0, *restrict gamma = a->gamma + h * 64;
    const float *restrict QS = a->QS + blk * 64 * RD + r * 64;
    float *restrict dQS = a->dQS + blk * 64 * RD + r * 64, *restrict dv = a->dv + blk * 64 * RD + r * 64;
    float *restrict dgqk = a->dgqk + blk * 4096, *restrict xcol = a->xcol + h * 64, *restrict zrow = a->zrow + h * 64;
    float *restrict dgamma = a->dgamma + h * 64;
    const float *restrict Dr = a->D ? a->D + ((blk % a->G) * R + r) * 64 : 0;
    gather_rows(a->v + blk * 64 * a->sv + r * 64, a->sv, 64, 64, vloc);
    gather_rows(a->dO + blk * 64 * RD + r * 64, RD, 64, 64, oloc);
    for (int64_t s = 0; s < 64; s++)
        for (int64_t d = 0; d < 64; d++) vt[d * 64 + s] = vloc[s * 64 + d];
    /* dQS, d gamma (and the skip's dD = sum_t dO v) */
    float dD[64] = {0};
    for (int64_t t = 0; t < 64; t++) {
        const float gt = gamma[t], *restrict dot = oloc + t * 64, *restrict vr = vloc + t * 64;
        float dg = 0.0f;
        #pragma omp simd reduction(+:dg)
        for (int64_t d = 0; d < 64; d++) {
            dQS[t * RD + d] = gt * dot[d];
            dg += dot[d] * QS[t * RD + d];
            if (Dr) dD[d] += dot[d] * vr[d]; /* loop-invariant: the loop is compiled twice */
        }
        dgamma[t] = dg;
    }
    if (Dr) memcpy(a->dD + h * 64, dD, sizeof(dD));
    /* dP = dO v^T, 4 rows at a time over the column vectors that reach the diagonal; P and L rows alongside */
    for (int64_t t0 = 0; t0 < 64; t0 += 4) {
        pair_rows4(gqk, b, seg, ks, t0, a->strict, pbuf, lbuf);
        switch ((t0 + 4 + 15) / 16) { /* a literal count of column vectors: the accumulators stay in registers */
            case 1: dp_rows4(oloc, vt, t0, dpbuf, 1); break;
            case 2: dp_rows4(oloc, vt, t0, dpbuf, 2); break;
            case 3: dp_rows4(oloc, vt, t0, dpbuf, 3); break;
            default: dp_rows4(oloc, vt, t0, dpbuf, 4); break;
        }
    }
    /* the pair weights' gradients, row by row */
    memset(xcol, 0, 64 * sizeof(float));
    for (int64_t t = 0; t < 64; t++) {
        const int64_t n = a->strict ? t : t + 1;
        const float *restrict drow = dpbuf + t * 64, *restrict lrow = lbuf + t * 64, *restrict grow = gqk + t * 64;
        float *restrict dgrow = dgqk + t * 64;
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
    /* dv = P^T dO, 4 rows (columns s of P) at a time over the tokens t >= s */
    for (int64_t s0 = 0; s0 < 64; s0 += 4) {
        v16 acc[4][4];
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) acc[i][j] = (v16){0};
        for (int64_t t = s0; t < 64; t++) {
            const float *restrict prow = pbuf + t * 64 + s0;
            const v16 x0 = LD(oloc + t * 64), x1 = LD(oloc + t * 64 + 16), x2 = LD(oloc + t * 64 + 32),
                      x3 = LD(oloc + t * 64 + 48);
            for (int i = 0; i < 4; i++) {
                const float p = prow[i];
                acc[i][0] += p * x0;
                acc[i][1] += p * x1;
                acc[i][2] += p * x2;
                acc[i][3] += p * x3;
            }
        }
        if (Dr)
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) acc[i][j] += LD(Dr + 16 * j) * LD(oloc + (s0 + i) * 64 + 16 * j);
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) ST(dv + (s0 + i) * RD + 16 * j, acc[i][j]);
    }
}

static void intra_fwd(const void *arg, int tid, int nt) {
    const intra_t *a = (const intra_t *)arg;
    const int64_t C = a->C, Dv = a->Dv;
    float *w = a->work + (int64_t)tid * (C * C + C * Dv + C);
    for (int64_t blk = tid; blk < a->blocks; blk += nt)
        for (int64_t r = 0; r < a->R; r++) {
            if (Dv == 64 && C == 64) intra_fwd_head64(a, blk, r, w, w + 4096);
            else if (Dv == 64) intra_fwd_head(a, blk, r, w, w + C, 64);
            else intra_fwd_head(a, blk, r, w, w + C, Dv);
        }
}

/* Backward of one head in one block, from dO:
   dQS_r[t] = gamma_r[t] dO_r[t]; dgamma_r[t] = dO_r[t] . QS_r[t];
   dP[t, s] = dO_r[t] . v_r[s] (a whole row of C at once against v_r transposed, vt (Dv, C));
   dgqk[t, s] += dP L ks[s]; X = dP gqk L: xcol[s] = sum_t X, zrow[t] = sum_s X ks[s];
   dv_r[s] = sum_{t >= s} P[t, s] dO_r[t] (P kept in pbuf (C, C) from the row pass).
   The general shapes; C = Dv = 64 runs intra_bwd_head64. */
static void intra_bwd_head(const intra_t *a, int64_t blk, int64_t r, float *restrict w, const int64_t Dv,
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
    const float *restrict Dr = a->D ? a->D + ((blk % a->G) * R + r) * Dv : 0;
    float *restrict dD = a->D ? a->dD + h * Dv : 0;
    gather_rows(a->v + blk * C * a->sv + r * Dv, a->sv, C, Dv, vloc);
    gather_rows(a->dO + blk * C * RD + r * Dv, RD, C, Dv, oloc);
    for (int64_t s = 0; s < C; s++)
        for (int64_t d = 0; d < Dv; d++) vt[d * C + s] = vloc[s * Dv + d];
    memset(xcol, 0, C * sizeof(float));
    if (dD) memset(dD, 0, Dv * sizeof(float));
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
        if (dD) {
            #pragma omp simd
            for (int64_t d = 0; d < Dv; d++) dD[d] += dot[d] * vloc[t * Dv + d];
        }
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
        for (int64_t d = 0; d < Dv; d++) dv[s * RD + d] = acc[d] + (Dr ? Dr[d] * oloc[s * Dv + d] : 0.0f);
    }
}

static void intra_bwd(const void *arg, int tid, int nt) {
    const intra_t *a = (const intra_t *)arg;
    const int64_t C = a->C, Dv = a->Dv;
    float *w = a->work + (int64_t)tid * (3 * C * C + 3 * Dv * C);
    for (int64_t blk = tid; blk < a->blocks; blk += nt) {
        memset(a->dgqk + blk * C * C, 0, C * C * sizeof(float));
        for (int64_t r = 0; r < a->R; r++) {
            if (Dv == 64 && C == 64) intra_bwd_head64(a, blk, r, w);
            else intra_bwd_head(a, blk, r, w, Dv, C);
        }
    }
}

int hfx_intra_fwd(const float *gqk, const float *b, const float *seg, const float *ks, const float *gamma,
                  const float *v, const float *QS, const float *D, float *o, float *work, int64_t blocks, int64_t R,
                  int64_t C, int64_t Dv, int64_t sv, int64_t G, int strict, int nthreads) {
    intra_t a = {gqk, b, seg, ks, gamma, v, QS, 0, o, 0, 0, 0, 0, 0, 0, work, D, 0, blocks, R, C, Dv, sv, G,
                 strict};
    hfx_parallel(intra_fwd, &a, nthreads);
    return 0;
}

int hfx_intra_bwd(const float *gqk, const float *b, const float *seg, const float *ks, const float *gamma,
                  const float *v, const float *QS, const float *D, const float *dO, float *dQS, float *dgamma,
                  float *dgqk, float *zrow, float *xcol, float *dv, float *dD, float *work, int64_t blocks, int64_t R,
                  int64_t C, int64_t Dv, int64_t sv, int64_t G, int strict, int nthreads) {
    intra_t a = {gqk, b, seg, ks, gamma, v, QS, dO, 0, dQS, dgamma, dgqk, zrow, xcol, dv, work, D, dD, blocks, R, C,
                 Dv, sv, G, strict};
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

/* forward: vt_r[t] = w[r, t] v_r[t] (contiguous, from v read in place) */
static void writes_fwd(const void *arg, int tid, int nt) {
    const writes_t *a = (const writes_t *)arg;
    const int64_t R = a->R, C = a->C, Dv = a->Dv, RD = R * Dv;
    for (int64_t blk = tid; blk < a->blocks; blk += nt)
        for (int64_t t = 0; t < C; t++)
            for (int64_t r = 0; r < R; r++) {
                const float *restrict v = a->v + (blk * C + t) * a->sv + r * Dv;
                float *restrict vt = a->dv + (blk * C + t) * RD + r * Dv;
                const float wt = a->w[(blk * R + r) * C + t];
                #pragma omp simd
                for (int64_t d = 0; d < Dv; d++) vt[d] = wt * v[d];
            }
}

int hfx_writes_fwd(const float *v, const float *w, float *vt, int64_t blocks, int64_t R, int64_t C, int64_t Dv,
                   int64_t sv, int nthreads) {
    writes_t a = {0, v, w, vt, 0, blocks, R, C, Dv, sv};
    hfx_parallel(writes_fwd, &a, nthreads);
    return 0;
}

/* ---- SSD across chunks: S_{n+1} += a_n S_n in place over the (N + 1, BG, Dk, R, Dv) state buffer (slot n + 1 holds
   chunk n's writes on entry), a_n one decay per head (ge (N, BG, R)); and its backward over the gradient buffer dS
   (slot n: the gradient reaching S_n from chunk n's outputs, slot N: the final state's), last chunk first:
   dge[n] = <dS[n + 1], S_n> per head, then dS[n] += a_n dS[n + 1]. One work item per (batch row, group, head). */
typedef struct {
    float *S;
    const float *st, *ge;
    float *dge;
    int64_t N, BG, Dk, R, Dv;
} chunks_t;

static void chunks_fwd(const void *arg, int tid, int nt) {
    const chunks_t *a = (const chunks_t *)arg;
    const int64_t BG = a->BG, Dk = a->Dk, R = a->R, Dv = a->Dv, slot = BG * Dk * R * Dv;
    for (int64_t it = tid; it < BG * R; it += nt) {
        const int64_t bg = it / R, r = it % R;
        for (int64_t n = 0; n < a->N; n++) {
            const float g = a->ge[(n * BG + bg) * R + r];
            for (int64_t k = 0; k < Dk; k++) {
                const float *restrict prev = a->S + n * slot + ((bg * Dk + k) * R + r) * Dv;
                float *restrict cur = a->S + (n + 1) * slot + ((bg * Dk + k) * R + r) * Dv;
                #pragma omp simd
                for (int64_t d = 0; d < Dv; d++) cur[d] += g * prev[d];
            }
        }
    }
}

static void chunks_bwd(const void *arg, int tid, int nt) {
    const chunks_t *a = (const chunks_t *)arg;
    const int64_t BG = a->BG, Dk = a->Dk, R = a->R, Dv = a->Dv, slot = BG * Dk * R * Dv;
    for (int64_t it = tid; it < BG * R; it += nt) {
        const int64_t bg = it / R, r = it % R;
        for (int64_t n = a->N - 1; n >= 0; n--) {
            const float g = a->ge[(n * BG + bg) * R + r];
            float acc = 0.0f;
            for (int64_t k = 0; k < Dk; k++) {
                const int64_t off = ((bg * Dk + k) * R + r) * Dv;
                const float *restrict next = a->S + (n + 1) * slot + off, *restrict s = a->st + n * slot + off;
                float *restrict cur = a->S + n * slot + off;
                #pragma omp simd reduction(+:acc)
                for (int64_t d = 0; d < Dv; d++) {
                    acc += next[d] * s[d];
                    cur[d] += g * next[d];
                }
            }
            a->dge[(n * BG + bg) * R + r] = acc;
        }
    }
}

int hfx_chunks_fwd(float *S, const float *ge, int64_t N, int64_t BG, int64_t Dk, int64_t R, int64_t Dv,
                   int nthreads) {
    chunks_t a = {S, 0, ge, 0, N, BG, Dk, R, Dv};
    hfx_parallel(chunks_fwd, &a, nthreads);
    return 0;
}

int hfx_chunks_bwd(float *dS, const float *st, const float *ge, float *dge, int64_t N, int64_t BG, int64_t Dk,
                   int64_t R, int64_t Dv, int nthreads) {
    chunks_t a = {dS, st, ge, dge, N, BG, Dk, R, Dv};
    hfx_parallel(chunks_bwd, &a, nthreads);
    return 0;
}

/* ---- RMS norm (the blocks' pre-norm): out = w x rsqrt(mean(x^2) + eps), rows of I, the reciprocal RMS saved ---- */
typedef struct {
    const float *x, *w, *gout, *rstd;
    float *out, *rs_out, *dx, *dw;
    int64_t rows, I, nitems;
    float eps;
} rms_t;

static void rms_fwd(const void *p, int tid, int nt) {
    const rms_t *a = (const rms_t *)p;
    const int64_t I = a->I, per = (a->rows + a->nitems - 1) / a->nitems;
    const float *restrict w = a->w;
    for (int64_t it = tid; it < a->nitems; it += nt) {
        const int64_t r1 = (it + 1) * per < a->rows ? (it + 1) * per : a->rows;
        for (int64_t r = it * per; r < r1; r++) {
            const float *restrict xr = a->x + r * I;
            float *restrict o = a->out + r * I;
            float ss = 0.0f;
            #pragma omp simd reduction(+:ss)
            for (int64_t c = 0; c < I; c++) ss += xr[c] * xr[c];
            const float rs = 1.0f / sqrtf(ss / (float)I + a->eps);
            a->rs_out[r] = rs;
            #pragma omp simd
            for (int64_t c = 0; c < I; c++) o[c] = w[c] * (xr[c] * rs);
        }
    }
}

static void rms_bwd(const void *p, int tid, int nt) {
    const rms_t *a = (const rms_t *)p;
    const int64_t I = a->I, per = (a->rows + a->nitems - 1) / a->nitems;
    const float *restrict w = a->w;
    for (int64_t it = tid; it < a->nitems; it += nt) {
        float *restrict dw = a->dw + it * I;
        memset(dw, 0, I * sizeof(float));
        const int64_t r1 = (it + 1) * per < a->rows ? (it + 1) * per : a->rows;
        for (int64_t r = it * per; r < r1; r++) {
            const float *restrict xr = a->x + r * I, *restrict go = a->gout + r * I;
            float *restrict dxr = a->dx + r * I;
            const float rs = a->rstd[r];
            float dot = 0.0f;
            #pragma omp simd reduction(+:dot)
            for (int64_t c = 0; c < I; c++) {
                const float n = xr[c] * rs;
                dw[c] += go[c] * n;
                dot += go[c] * w[c] * n;
            }
            dot /= (float)I;
            #pragma omp simd
            for (int64_t c = 0; c < I; c++) dxr[c] = rs * (go[c] * w[c] - xr[c] * rs * dot);
        }
    }
}

int hfx_rms_fwd(const float *x, const float *w, float *out, float *rs, int64_t rows, int64_t I, int64_t nitems,
                float eps, int nthreads) {
    rms_t a = {x, w, 0, 0, out, rs, 0, 0, rows, I, nitems, eps};
    hfx_parallel(rms_fwd, &a, nthreads);
    return 0;
}

int hfx_rms_bwd(const float *x, const float *w, const float *rstd, const float *gout, float *dx, float *dw,
                int64_t rows, int64_t I, int64_t nitems, int nthreads) {
    rms_t a = {x, w, gout, rstd, 0, 0, dx, dw, rows, I, nitems, 0.0f};
    hfx_parallel(rms_bwd, &a, nthreads);
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
            lib.hfx_conv_silu_fwd.argtypes = [p] * 8 + [i32, p] + [i64] * 7 + [i32]
            lib.hfx_conv_silu_bwd.argtypes = [p] * 8 + [i32, p, i64, i64, p, p, p] + [i64] * 7 + [i32]
            lib.hfx_norm_fwd.argtypes = [p] * 5 + [i64] * 5 + [f32, i32, i32]
            lib.hfx_norm_bwd.argtypes = [p] * 8 + [i64] * 5 + [i32, i32]
            lib.hfx_intra_fwd.argtypes = [p] * 10 + [i64] * 6 + [i32, i32]
            lib.hfx_intra_bwd.argtypes = [p] * 17 + [i64] * 6 + [i32, i32]
            lib.hfx_writes_bwd.argtypes = [p] * 5 + [i64] * 5 + [i32]
            lib.hfx_writes_fwd.argtypes = [p] * 3 + [i64] * 5 + [i32]
            lib.hfx_chunks_fwd.argtypes = [p] * 2 + [i64] * 5 + [i32]
            lib.hfx_chunks_bwd.argtypes = [p] * 4 + [i64] * 5 + [i32]
            lib.hfx_rms_fwd.argtypes = [p] * 4 + [i64] * 3 + [f32, i32]
            lib.hfx_rms_bwd.argtypes = [p] * 6 + [i64] * 3 + [i32]
            fns = (lib.hfx_conv_silu_fwd, lib.hfx_conv_silu_bwd, lib.hfx_norm_fwd, lib.hfx_norm_bwd)
            ssd = (lib.hfx_intra_fwd, lib.hfx_intra_bwd, lib.hfx_writes_fwd, lib.hfx_writes_bwd)
            for fn in (*fns, *ssd, lib.hfx_chunks_fwd, lib.hfx_chunks_bwd, lib.hfx_rms_fwd, lib.hfx_rms_bwd):
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


def conv_kernel_applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the conv kernels (``conv_silu``, ``mamba2_in_conv``) can run on input ``x`` (batch, time, channels)
    with an ``nn.Conv1d`` depthwise ``weight`` / ``bias``: at least one token, at most ``MAX_KERNEL`` taps, float32 CPU
    tensors, kernels enabled and built."""
    return x.shape[1] > 0 and weight.shape[-1] <= MAX_KERNEL and kernels_apply(x, weight, bias)


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


def _conv_forward(
    x: Tensor, taps: Tensor, bias: Tensor | None, starts: Tensor | None, widths: list[int]
) -> list[Tensor]:
    """The conv + SiLU of ``x`` (read in place where its rows allow), written as one tensor per channel range."""
    x, sxt = _rows_view(x)
    batch, seq_len, channels = x.shape
    outs = [x.new_empty(batch, seq_len, w) for w in widths]
    taps = taps.contiguous()
    threads = torch.get_num_threads()
    zero = x.new_zeros(threads, channels)  # the input before the first token
    sizes = (ctypes.c_int64 * len(widths))(*widths)
    ys = [_ptr(y) for y in outs] + [None] * (3 - len(outs))
    rc = load_kernel().hfx_conv_silu_fwd(
        _ptr(x), _ptr(taps), _ptr(bias), _byte_ptr(starts), *ys, sizes, len(widths), _ptr(zero), batch, seq_len,
        channels, taps.shape[0], x.stride(0), sxt, _items(seq_len), threads,
    )  # fmt: skip
    _check(rc, "conv forward")
    return outs


def _conv_backward_into(
    x: Tensor, taps: Tensor, bias: Tensor | None, starts: Tensor | None, gys: list[Tensor], dx: Tensor
) -> tuple[Tensor, Tensor]:
    """Backward of ``_conv_forward`` from the outputs' gradients ``gys``: writes ``dx`` (any row stride, e.g. a column
    slice of a wider gradient) and returns the taps' and bias' gradients."""
    x, sxt = _rows_view(x)
    batch, seq_len, channels = x.shape
    if dx.stride(-1) != 1 or (batch > 1 and dx.stride(0) != seq_len * dx.stride(1)):
        raise ValueError("the conv kernel writes dx rows with one stride")
    kernel = taps.shape[0]
    nsplit = _items(seq_len)
    threads = torch.get_num_threads()
    taps = taps.contiguous()
    gys = [g.contiguous() for g in gys]
    dtaps = x.new_empty(batch * nsplit, kernel, channels)
    dbias = x.new_empty(batch * nsplit, channels)
    work = x.new_zeros(threads, kernel + 1, channels)  # a ring of kernel rows and a zero row per thread
    sizes = (ctypes.c_int64 * len(gys))(*(g.shape[-1] for g in gys))
    pointers = [_ptr(g) for g in gys] + [None] * (3 - len(gys))
    rc = load_kernel().hfx_conv_silu_bwd(
        _ptr(x), _ptr(taps), _ptr(bias), _byte_ptr(starts), *pointers, sizes, len(gys), _ptr(dx), dx.stride(1),
        dx.stride(0), _ptr(dtaps), _ptr(dbias), _ptr(work), batch, seq_len, channels, kernel, x.stride(0), sxt,
        nsplit, threads,
    )  # fmt: skip
    _check(rc, "conv backward")
    return dtaps.sum(0), dbias.sum(0)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"hf_extras CPU kernel: {what} refused its arguments (code {rc})")


_DEFINED = []  # non-empty once this module's copy has checked that the operators exist


def _define_ops() -> None:
    """Define every operator of this file once per process (a checkpoint's copy of this file may be imported as
    well, and finds them defined). A change to any operator renames them all (a new version suffix): an older copy
    (an older checkpoint's) then defines and runs its own operators beside these instead of finding them."""
    if _DEFINED:
        return
    if not hasattr(torch.ops.hf_extras, "conv_silu_v4"):
        _define_conv_norm_ops()
        _define_rms_ops()
        _define_ssd_ops()
    _DEFINED.append(True)


def _define_conv_norm_ops() -> None:
    """The conv + SiLU, Mamba-2's in_proj split + conv, and the gated norm, each with its autograd."""

    @torch.library.custom_op("hf_extras::conv_silu_v4", mutates_args=())
    def _conv_silu(x: Tensor, taps: Tensor, bias: Tensor | None, starts: Tensor | None) -> Tensor:
        return _conv_forward(x, taps, bias, starts, [x.shape[-1]])[0]

    @_conv_silu.register_fake
    def _(x, taps, bias, starts):
        return x.new_empty(x.shape)

    @torch.library.custom_op("hf_extras::conv_silu_v4_backward", mutates_args=())
    def _conv_silu_backward(
        x: Tensor, taps: Tensor, bias: Tensor | None, starts: Tensor | None, gy: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        dx = x.new_empty(x.shape)
        dtaps, dbias = _conv_backward_into(x, taps, bias, starts, [gy], dx)
        return dx, dtaps, dbias

    @_conv_silu_backward.register_fake
    def _(x, taps, bias, starts, gy):
        return x.new_empty(x.shape), taps.new_empty(taps.shape), x.new_empty(x.shape[-1])

    def _conv_setup(ctx, inputs, output):
        x, taps, bias, starts = inputs
        ctx.save_for_backward(x, taps, bias, starts)
        ctx.has_bias = bias is not None

    def _conv_backward(ctx, gy):
        x, taps, bias, starts = ctx.saved_tensors
        dx, dtaps, dbias = torch.ops.hf_extras.conv_silu_v4_backward(x, taps, bias, starts, gy)
        return dx, dtaps, (dbias if ctx.has_bias else None), None

    _conv_silu.register_autograd(_conv_backward, setup_context=_conv_setup)

    # Mamba-2's in_proj output -> (z, x, B, C, dt): the conv (+ SiLU) of xBC read in place and written as three
    # tensors, z and dt copied out; the backward writes one gradient for the whole in_proj output (no concatenation)
    @torch.library.custom_op("hf_extras::mamba2_in_conv_v2", mutates_args=())
    def _in_conv(
        zxbcdt: Tensor, taps: Tensor, bias: Tensor | None, starts: Tensor | None, widths: list[int]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        z_width, x_width, bc_width, _ = widths
        conv_end = z_width + x_width + 2 * bc_width
        x, B, C = _conv_forward(zxbcdt[..., z_width:conv_end], taps, bias, starts, [x_width, bc_width, bc_width])
        copy = torch.contiguous_format  # always a copy: an output must not alias the input (one token: a view)
        return (
            zxbcdt[..., :z_width].clone(memory_format=copy),
            x,
            B,
            C,
            zxbcdt[..., conv_end:].clone(memory_format=copy),
        )

    @_in_conv.register_fake
    def _(zxbcdt, taps, bias, starts, widths):
        batch, seq_len, _ = zxbcdt.shape
        return tuple(
            zxbcdt.new_empty(batch, seq_len, w) for w in (widths[0], widths[1], widths[2], widths[2], widths[3])
        )

    @torch.library.custom_op("hf_extras::mamba2_in_conv_v2_backward", mutates_args=())
    def _in_conv_backward(
        zxbcdt: Tensor,
        taps: Tensor,
        bias: Tensor | None,
        starts: Tensor | None,
        widths: list[int],
        dz: Tensor,
        dx: Tensor,
        dB: Tensor,
        dC: Tensor,
        ddt: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        z_width, x_width, bc_width, _ = widths
        conv_end = z_width + x_width + 2 * bc_width
        grad = zxbcdt.new_empty(zxbcdt.shape)
        grad[..., :z_width].copy_(dz)
        grad[..., conv_end:].copy_(ddt)
        dtaps, dbias = _conv_backward_into(
            zxbcdt[..., z_width:conv_end], taps, bias, starts, [dx, dB, dC], grad[..., z_width:conv_end]
        )
        return grad, dtaps, dbias

    @_in_conv_backward.register_fake
    def _(zxbcdt, taps, bias, starts, widths, dz, dx, dB, dC, ddt):
        return zxbcdt.new_empty(zxbcdt.shape), taps.new_empty(taps.shape), taps.new_empty(taps.shape[-1])

    def _in_conv_setup(ctx, inputs, output):
        zxbcdt, taps, bias, starts, widths = inputs
        ctx.save_for_backward(zxbcdt, taps, bias, starts)
        ctx.widths, ctx.has_bias = widths, bias is not None

    def _in_conv_grad(ctx, dz, dx, dB, dC, ddt):
        zxbcdt, taps, bias, starts = ctx.saved_tensors
        batch, seq_len, _ = zxbcdt.shape
        grads = [
            g if g is not None else zxbcdt.new_zeros(batch, seq_len, w)
            for g, w in zip(
                (dz, dx, dB, dC, ddt), (ctx.widths[0], ctx.widths[1], ctx.widths[2], ctx.widths[2], ctx.widths[3])
            )
        ]
        grad, dtaps, dbias = torch.ops.hf_extras.mamba2_in_conv_v2_backward(
            zxbcdt, taps, bias, starts, ctx.widths, *grads
        )
        return grad, dtaps, (dbias if ctx.has_bias else None), None, None

    _in_conv.register_autograd(_in_conv_grad, setup_context=_in_conv_setup)

    @torch.library.custom_op("hf_extras::gated_rms_norm_v2", mutates_args=())
    def _gated_norm(
        y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float, before: bool
    ) -> tuple[Tensor, Tensor]:
        batch, seq_len, width = y.shape
        y = y.contiguous()
        z, sz = _rows_view(z)
        out = y.new_empty(batch, seq_len, width)
        rstd = y.new_empty(batch, seq_len, groups)
        load_kernel().hfx_norm_fwd(
            _ptr(y), _ptr(z), _ptr(weight), _ptr(out), _ptr(rstd), batch * seq_len, width, groups, sz,
            _items(batch * seq_len), eps, int(before), torch.get_num_threads(),
        )  # fmt: skip
        return out, rstd

    @_gated_norm.register_fake
    def _(y, z, weight, groups, eps, before):
        return y.new_empty(y.shape), y.new_empty(*y.shape[:2], groups)

    @torch.library.custom_op("hf_extras::gated_rms_norm_v2_backward", mutates_args=())
    def _gated_norm_backward(
        y: Tensor, z: Tensor, weight: Tensor, rstd: Tensor, gout: Tensor, groups: int, before: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        batch, seq_len, width = y.shape
        y, gout = y.contiguous(), gout.contiguous()
        z, sz = _rows_view(z)
        items = _items(batch * seq_len)
        dy, dz = torch.empty_like(y), torch.empty_like(y)
        dw = y.new_empty(items, width)
        load_kernel().hfx_norm_bwd(
            _ptr(y), _ptr(z), _ptr(weight), _ptr(gout), _ptr(rstd), _ptr(dy), _ptr(dz), _ptr(dw), batch * seq_len,
            width, groups, sz, items, int(before), torch.get_num_threads(),
        )  # fmt: skip
        return dy, dz, dw.sum(0)

    @_gated_norm_backward.register_fake
    def _(y, z, weight, rstd, gout, groups, before):
        return y.new_empty(y.shape), y.new_empty(y.shape), weight.new_empty(weight.shape)

    def _norm_setup(ctx, inputs, output):
        y, z, weight, groups, eps, before = inputs
        ctx.save_for_backward(y, z, weight, output[1])
        ctx.groups, ctx.before = groups, before

    def _norm_backward(ctx, gout, _grstd):
        y, z, weight, rstd = ctx.saved_tensors
        dy, dz, dw = torch.ops.hf_extras.gated_rms_norm_v2_backward(y, z, weight, rstd, gout, ctx.groups, ctx.before)
        return dy, dz, dw, None, None, None

    _gated_norm.register_autograd(_norm_backward, setup_context=_norm_setup)


def conv_silu(x: Tensor, taps: Tensor, bias: Tensor | None, document_starts: Tensor | None = None) -> Tensor:
    """``silu`` of the causal depthwise conv of ``x`` (batch, time, channels) from a zero start; ``taps``
    (kernel, channels), tap ``kernel - 1`` on the current token; ``document_starts`` (batch, time) bool: a tap never
    reads across a document start (as ``conv_ops.causal_depthwise_conv``). Differentiable; callers check
    ``kernels_apply``."""
    _define_ops()
    starts = document_starts.to(torch.uint8).contiguous() if document_starts is not None else None
    return torch.ops.hf_extras.conv_silu_v4(x, taps, bias, starts)


def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float, norm_before_gate: bool) -> Tensor:
    """Mamba-2's gated RMS norm of ``y`` with gate ``z`` (both (batch, time, width); ``z`` may be a column slice of a
    wider row, read in place), RMS over ``groups`` equal groups of channels. Differentiable; callers check
    ``kernels_apply``."""
    _define_ops()
    return torch.ops.hf_extras.gated_rms_norm_v2(y, z, weight, groups, eps, norm_before_gate)[0]


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
    gqk: Tensor,
    b: Tensor,
    seg: Tensor,
    ks: Tensor | None,
    gamma: Tensor,
    v: Tensor,
    QS: Tensor,
    D: Tensor | None,
    strict: bool,
) -> Tensor:
    """``ssd_intra`` by the kernel."""
    *lead, R, C = b.shape
    Dv = v.shape[-1]
    gqk, b, seg, gamma, QS = (t.contiguous() for t in (gqk, b, seg, gamma, QS))
    v, sv = _chunk_rows(v)
    ks = ks.contiguous() if ks is not None else None
    D = D.contiguous() if D is not None else None
    o = v.new_empty(v.shape)
    threads = torch.get_num_threads()
    work = v.new_empty(threads, C * C + C * Dv + C)
    blocks = b.numel() // (R * C) if C else 0
    groups = D.numel() // (R * Dv) if D is not None else 1
    load_kernel().hfx_intra_fwd(
        _ptr(gqk), _ptr(b), _ptr(seg), _ptr(ks), _ptr(gamma), _ptr(v), _ptr(QS), _ptr(D), _ptr(o), _ptr(work),
        blocks, R, C, Dv, sv, groups, int(strict), threads,
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
    D: Tensor | None,
    dO: Tensor,
    strict: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``ssd_intra_backward`` by the kernel."""
    *lead, R, C = b.shape
    Dv = v.shape[-1]
    gqk, b, seg, gamma, QS, dO = (t.contiguous() for t in (gqk, b, seg, gamma, QS, dO))
    v, sv = _chunk_rows(v)
    ks = ks.contiguous() if ks is not None else None
    D = D.contiguous() if D is not None else None
    dQS, dv = v.new_empty(v.shape), v.new_empty(v.shape)
    dgamma, zrow, xcol = torch.empty_like(b), torch.empty_like(b), torch.empty_like(b)
    dgqk = torch.empty_like(gqk)
    threads = torch.get_num_threads()
    work = v.new_empty(threads, 3 * C * C + 3 * Dv * C)
    blocks = b.numel() // (R * C) if C else 0
    groups = D.numel() // (R * Dv) if D is not None else 1
    dD = v.new_empty(blocks // groups, groups, R, Dv) if D is not None else None  # partial sums per (chunk, row)
    load_kernel().hfx_intra_bwd(
        _ptr(gqk), _ptr(b), _ptr(seg), _ptr(ks), _ptr(gamma), _ptr(v), _ptr(QS), _ptr(D), _ptr(dO), _ptr(dQS),
        _ptr(dgamma), _ptr(dgqk), _ptr(zrow), _ptr(xcol), _ptr(dv), _ptr(dD), _ptr(work), blocks, R, C, Dv, sv,
        groups, int(strict), threads,
    )  # fmt: skip
    dD = dD.sum(0).view(D.shape) if D is not None else v.new_zeros(0)
    return dQS, dgamma, dgqk, zrow, xcol, dv, dD


def _chunks(states: Tensor, ge: Tensor) -> None:
    """``ssd_chunk_states`` by the kernel."""
    N1, *_, Dk, RDv = states.shape
    N, R = ge.shape[0], ge.shape[-1]
    if not states.is_contiguous():
        raise ValueError("ssd_chunk_states: the state buffer must be contiguous (it is updated in place)")
    ge = ge.contiguous()
    BG = ge.numel() // (N * R) if N * R else 0
    load_kernel().hfx_chunks_fwd(_ptr(states), _ptr(ge), N, BG, Dk, R, RDv // R, torch.get_num_threads())


def _chunks_backward(dS: Tensor, states: Tensor, ge: Tensor) -> Tensor:
    """``ssd_chunk_states_backward`` by the kernel."""
    *_, Dk, RDv = dS.shape
    N, R = ge.shape[0], ge.shape[-1]
    if not dS.is_contiguous():
        raise ValueError("ssd_chunk_states_backward: the gradient buffer must be contiguous (it is updated in place)")
    ge, states = ge.contiguous(), states.contiguous()
    BG = ge.numel() // (N * R) if N * R else 0
    d_ge = ge.new_empty(ge.shape)
    load_kernel().hfx_chunks_bwd(
        _ptr(dS), _ptr(states), _ptr(ge), _ptr(d_ge), N, BG, Dk, R, RDv // R, torch.get_num_threads()
    )
    return d_ge


def _writes(v: Tensor, w: Tensor) -> Tensor:
    """``ssd_state_writes`` by the kernel."""
    *lead, R, C = w.shape
    Dv = v.shape[-1]
    w = w.contiguous()
    v, sv = _chunk_rows(v)
    vt = v.new_empty(v.shape)
    blocks = w.numel() // (R * C) if C else 0
    load_kernel().hfx_writes_fwd(_ptr(v), _ptr(w), _ptr(vt), blocks, R, C, Dv, sv, torch.get_num_threads())
    return vt


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


def _rms(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``rms_norm`` by the kernel: the output and the reciprocal RMS per row."""
    x = x.contiguous()
    width = x.shape[-1]
    rows = x.numel() // width if width else 0
    out, rstd = x.new_empty(x.shape), x.new_empty(x.shape[:-1])
    load_kernel().hfx_rms_fwd(
        _ptr(x), _ptr(weight), _ptr(out), _ptr(rstd), rows, width, _items(rows), eps, torch.get_num_threads()
    )
    return out, rstd


def _rms_backward(x: Tensor, weight: Tensor, rstd: Tensor, gout: Tensor) -> tuple[Tensor, Tensor]:
    """``rms_norm``'s backward by the kernel."""
    x, gout = x.contiguous(), gout.contiguous()
    width = x.shape[-1]
    rows = x.numel() // width if width else 0
    items = _items(rows)
    dx, dw = x.new_empty(x.shape), x.new_empty(items, width)
    load_kernel().hfx_rms_bwd(
        _ptr(x), _ptr(weight), _ptr(rstd), _ptr(gout), _ptr(dx), _ptr(dw), rows, width, items, torch.get_num_threads()
    )
    return dx, dw.sum(0)


def _define_rms_ops() -> None:
    """The RMS norm with its autograd."""
    fwd = torch.library.custom_op("hf_extras::rms_norm_v2", _rms, mutates_args=())
    bwd = torch.library.custom_op("hf_extras::rms_norm_v2_backward", _rms_backward, mutates_args=())
    fwd.register_fake(lambda x, weight, eps: (x.new_empty(x.shape), x.new_empty(x.shape[:-1])))
    bwd.register_fake(lambda x, weight, rstd, gout: (x.new_empty(x.shape), weight.new_empty(weight.shape)))

    def setup(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight, output[1])

    def backward(ctx, gout, _grstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.hf_extras.rms_norm_v2_backward(x, weight, rstd, gout)
        return dx, dw, None

    fwd.register_autograd(backward, setup_context=setup)


def _define_ssd_ops() -> None:
    """The SSD pieces (called inside `retention_ops._GroupedChunkwise`'s forward and backward: no autograd)."""
    fwd = torch.library.custom_op("hf_extras::ssd_intra_v2", _intra, mutates_args=())
    bwd = torch.library.custom_op("hf_extras::ssd_intra_v2_backward", _intra_backward, mutates_args=())
    writes = torch.library.custom_op("hf_extras::ssd_state_writes_v2_backward", _writes_backward, mutates_args=("dv",))
    torch.library.custom_op("hf_extras::ssd_state_writes_v2", _writes, mutates_args=()).register_fake(
        lambda v, w: v.new_empty(v.shape)
    )
    torch.library.custom_op("hf_extras::ssd_chunk_states_v2", _chunks, mutates_args=("states",))
    torch.library.custom_op(
        "hf_extras::ssd_chunk_states_v2_backward", _chunks_backward, mutates_args=("dS",)
    ).register_fake(lambda dS, states, ge: ge.new_empty(ge.shape))

    @writes.register_fake
    def _(dvt, v, w, dv):
        return w.new_empty(w.shape)

    @fwd.register_fake
    def _(gqk, b, seg, ks, gamma, v, QS, D, strict):
        return v.new_empty(v.shape)

    @bwd.register_fake
    def _(gqk, b, seg, ks, gamma, v, QS, D, dO, strict):
        v_like, b_like = v.new_empty(v.shape), b.new_empty(b.shape)
        return (
            v_like,
            b_like,
            gqk.new_empty(gqk.shape),
            b.new_empty(b.shape),
            b.new_empty(b.shape),
            v.new_empty(v.shape),
            D.new_empty(D.shape) if D is not None else v.new_empty(0),
        )


def ssd_intra(
    gqk: Tensor,
    b: Tensor,
    seg: Tensor,
    ks: Tensor | None,
    gamma: Tensor,
    v: Tensor,
    QS: Tensor,
    D: Tensor | None,
    strict: bool,
) -> Tensor:
    """SSD's output within each chunk: ``o_r[t] = gamma_r[t] QS_r[t] + sum_s P_r[t, s] v_r[s] (+ D_r v_r[t])`` with
    the pair weights ``P_r[t, s] = gqk[t, s] exp(b_t - b_s) ks_r[s]`` (s <= t, or s < t when ``strict``, same segment;
    else 0), computed on the fly, never stored. gqk (N, B, G, C, C) is shared by the R heads of a group; b, seg, ks,
    gamma (N, B, G, R, C); v, QS and the output (N, B, G, C, R, Dv) (token rows, heads side by side); D None or
    (G, R, Dv), a per-channel skip (Mamba-2's ``D x``). Not differentiable: ``retention_ops._GroupedChunkwise`` calls
    it in its forward and ``ssd_intra_backward`` in its backward."""
    _define_ops()
    return torch.ops.hf_extras.ssd_intra_v2(gqk, b, seg, ks, gamma, v, QS, D, strict)


def ssd_intra_backward(
    gqk: Tensor,
    b: Tensor,
    seg: Tensor,
    ks: Tensor | None,
    gamma: Tensor,
    v: Tensor,
    QS: Tensor,
    D: Tensor | None,
    dO: Tensor,
    strict: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """From ``dO`` (the gradient of ``ssd_intra``'s output): ``dQS = gamma dO``, ``d gamma`` (``dO . QS`` per row),
    ``d gqk``, and with ``X_r = dP_r * gqk * L_r`` its row sums weighted by ``ks`` and its column sums (the pair decays'
    share of the log-decay gradient and of ``d ks``), ``dv`` through the pair weights and the skip, and ``dD``
    (``D``'s shape; empty without a skip)."""
    _define_ops()
    return torch.ops.hf_extras.ssd_intra_v2_backward(gqk, b, seg, ks, gamma, v, QS, D, dO, strict)


def ssd_chunk_states(states: Tensor, ge: Tensor) -> None:
    """The recurrence across chunks, in place: ``states`` (N + 1, B, G, Dk, R * Dv) holds in slot n + 1 chunk n's
    writes on entry and the state leaving chunk n on return (``S_{n+1} += a_n S_n``, slot 0 the initial state);
    ``ge`` (N, B, G, R) the chunks' decays per head. One pass over the buffer."""
    _define_ops()
    torch.ops.hf_extras.ssd_chunk_states_v2(states, ge)


def ssd_chunk_states_backward(dS: Tensor, states: Tensor, ge: Tensor) -> Tensor:
    """Backward of ``ssd_chunk_states``, in place: ``dS`` (N + 1, B, G, Dk, R * Dv) holds in slot n the gradient
    reaching S_n from chunk n's outputs and in slot N the final state's; on return slot n + 1 holds the gradient of
    the state leaving chunk n and slot 0 the initial state's. ``states`` (N, ...) the states entering each chunk.
    Returns the gradient of the chunks' decays, (N, B, G, R)."""
    _define_ops()
    return torch.ops.hf_extras.ssd_chunk_states_v2_backward(dS, states, ge)


def ssd_state_writes(v: Tensor, w: Tensor) -> Tensor:
    """``v * w`` (contiguous (..., C, R, Dv)) with ``w`` (..., R, C), one weight per head and token: the values as the
    state products take them. One pass; ``v`` read in place where its rows allow."""
    _define_ops()
    return torch.ops.hf_extras.ssd_state_writes_v2(v, w)


def ssd_state_writes_backward(dvt: Tensor, v: Tensor, w: Tensor, dv: Tensor) -> Tensor:
    """Backward of the state writes ``k^T (v * w)``: from ``dvt`` (the gradient of ``v * w``, (..., C, R, Dv)), adds
    ``w * dvt`` to ``dv`` in place (contiguous, (..., C, R, Dv)) and returns ``dw = sum_d dvt * v`` (..., R, C), with
    ``w`` (..., R, C) (one weight per head and token). One pass; ``v`` read in place where its rows allow."""
    _define_ops()
    return torch.ops.hf_extras.ssd_state_writes_v2_backward(dvt, v, w, dv)


def mamba2_in_conv(
    zxbcdt: Tensor, taps: Tensor, bias: Tensor | None, widths: list[int], document_starts: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Mamba-2's ``in_proj`` output ``(z, xBC, dt)`` (widths ``[z, x, B (= C), dt]``) -> ``z, x, B, C, dt`` with
    ``x, B, C = silu(causal depthwise conv(xBC))`` (taps (kernel, channels), ``document_starts`` as in
    ``conv_silu``): each a separate contiguous tensor, so that the backward writes one gradient for the whole input
    instead of autograd concatenating the pieces' gradients twice. Differentiable; callers check ``kernels_apply``."""
    _define_ops()
    starts = document_starts.to(torch.uint8).contiguous() if document_starts is not None else None
    return torch.ops.hf_extras.mamba2_in_conv_v2(zxbcdt, taps, bias, starts, list(widths))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * x * rsqrt(mean(x^2, -1) + eps)`` in one pass forward and one backward (float32 CPU tensors, the last
    dim normed). Differentiable; callers check ``kernels_apply``."""
    _define_ops()
    return torch.ops.hf_extras.rms_norm_v2(x, weight, eps)[0]
