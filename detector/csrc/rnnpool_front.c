/*
 * rnnpool_front.c: the front of RNNPool-Face in float32 C (C99 + pthreads): input normalisation, the 3x3
 * ConvBNReLU stem (BatchNorm folded into the weights by the caller) and RNNPool, for one image.
 *
 * Built and loaded by detector/native.py (ctypes); the reference semantics are RNNPoolFace.forward,
 * detector/nn/rnnpool.py (RNNPool._forward_windows) and FastGRNNCell.
 *
 * Algorithm (exact, up to float rounding):
 *   - W1 x + bias_gate is computed once per padded pixel (rows of a ring buffer, one per patch row);
 *   - rnn1 runs once per (padded row, patch column) row segment and once per (patch row, padded column) column
 *     segment, shared by all the patches that contain it; rnn2's W2 s + bias_gate is computed once per summary;
 *   - rnn2 runs its four sweeps per patch.
 *   The RNN steps are vectorised over VL independent sequences (SIMD lanes): every buffer an RNN reads is laid out
 *   [unit][sequence], and columns are stored phase-major (column c = q * stride_cols + phase at
 *   phase * Qs + q) so that the sequences of a batch read contiguous memory at every step.
 *   FastGRNN is run on g = h / k, k = sigmoid(zeta) + sigmoid(nu): g' = c + z (g - r c), r = sigmoid(zeta) / k,
 *   with k folded into U (and into the next layer's weights), and one exp2 per unit and step (see below).
 *   Threads split the image into bands of patch rows; each recomputes the few rows its band shares with the next.
 */
#define _POSIX_C_SOURCE 200112L

#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define RP_INLINE static inline __attribute__((always_inline))
#define RP_EXPORT __attribute__((visibility("default")))
#else
#define RP_INLINE static inline
#define RP_EXPORT
#endif

#ifndef VL
#if defined(__AVX__) || !(defined(__GNUC__) || defined(__clang__))
#define VL 8 /* sequences per RNN batch (SIMD lanes): one AVX register */
#else
#define VL 4 /* one SSE / NEON register */
#endif
#endif
#define ALIGN_F 16     /* buffers start on multiples of 16 floats (64 bytes) */
#define MAX_THREADS 64
#define MAX_STEPS 1024 /* patch side limit */
#define BARRIER_SPINS 50000 /* pause instructions a thread spins at a barrier before it sleeps (0.2-2 ms by CPU) */

static inline void spin_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

enum { RP_OK = 0, RP_EINVAL = -1, RP_ENOMEM = -2 };

/* ---------------------------------------------------------------------------------------------------------------
 * The FastGRNN update, with one exp2 per unit and step.
 *
 * Pre-activations are kept as y = -log2(e) a (the scale folded into the W x tables, U and W2), so that
 * E = exp(-a) = 2^y and z = sigmoid(a) = 1 / (1 + E); with d = bias_update - bias_gate,
 * W = exp(-2 (a + d)) = 2^(2 y + kd), kd = -2 log2(e) d, and c = tanh(a + d) = (1 - W) / (1 + W).
 * When every |d| <= 10 ("fused"), W = E^2 K with K = exp(-2 d) per unit: one exp2 per unit-step; otherwise W gets
 * its own exp2. The new state g' = c + z (g - r c) = [(1 - W)(1 + E - r) + g (1 + W)] / [(1 + E)(1 + W)]
 * = [u + b (g - u)] / [(1 + E) b], u = 1 + E - r, b = (1 + W) / 2: one division.
 * y is clamped to [-40, 40] (|a| <= 27.7: beyond, z is saturated in float and, as |d| <= 10 when fused, so is
 * tanh(a + d)); when fused, W (>= 2^-109, a normal float) is clamped to <= 2^60, otherwise its exponent to
 * [-40, 40]: nothing overflows or goes subnormal.
 * 2^y = 2^n p(f): n = round(y) (adding 1.5 * 2^23 rounds to an integer), f = y - n in [-0.5, 0.5], p a degree-5
 * minimax polynomial (relative error 2e-7), 2^n added straight to the exponent bits. Branch-free.
 * Accuracy (measured on [-30, 30]): sigmoid and tanh absolute error < 1.5e-7; relative error < 1e-6 for sigmoid
 * above -20 and for tanh where |x| >= 0.05 (like any tanh = 2 sigmoid(2x) - 1, its relative error grows near 0).
 * ------------------------------------------------------------------------------------------------------------- */
#define EXP2_C0 1.000000119e+00f
#define EXP2_C1 6.931469440e-01f
#define EXP2_C2 2.402212024e-01f
#define EXP2_C3 5.550713465e-02f
#define EXP2_C4 9.675537236e-03f
#define EXP2_C5 1.327644452e-03f
#define EXP2_MAGIC 12582912.0f /* 1.5 * 2^23 */
/* 2^f for f in [-0.5, 0.5] (Horner; scalar or vector f) */
#define EXP2_POLY(f) (((((EXP2_C5 * (f) + EXP2_C4) * (f) + EXP2_C3) * (f) + EXP2_C2) * (f) + EXP2_C1) * (f) + EXP2_C0)
#define Y_CLAMP 40.0f
#define W_MAX 1152921504606846976.0f /* 2^60 */
#define NEG_LOG2E (-1.44269504088896341)
#define FUSED_D_MAX 10.0

typedef struct {
    int h;           /* hidden size */
    const float *ut; /* (h, h): ut[j * h + k] = -log2(e) k_scale U[k][j] (U's columns contiguous) */
    const float *kd; /* (h,): exp(-2 d) when fused, else -2 log2(e) d; d = bias_update - bias_gate */
    float r;         /* sigmoid(zeta) / k_scale */
    int fused;
} cell_t;

/* Scalar versions (plain C build, and reference for the exported test helper). */
RP_INLINE float s_clamp(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

RP_INLINE float s_exp2(float y)
{
    const float t = y + EXP2_MAGIC;
    const float f = y - (t - EXP2_MAGIC);
    float p = EXP2_POLY(f);
    uint32_t pb, tb;
    memcpy(&pb, &p, sizeof pb);
    memcpy(&tb, &t, sizeof tb);
    pb += tb << 23;
    memcpy(&p, &pb, sizeof p);
    return p;
}

RP_INLINE float s_update(float y, float kd, float r, float g, const int fused)
{
    const float e = s_exp2(s_clamp(y, -Y_CLAMP, Y_CLAMP));
    const float w = fused ? s_clamp(e * e * kd, 0.0f, W_MAX) : s_exp2(s_clamp(y * 2.0f + kd, -Y_CLAMP, Y_CLAMP));
    const float b = w * 0.5f + 0.5f, u = e + (1.0f - r);
    return (u + b * (g - u)) / ((e + 1.0f) * b);
}

/* One set of VL sequences run by a kernel call: step t reads unit k, lane b of the pre-activation
   -log2(e) (W x + bias_gate) at base[off[t] + k * xs + b]; the final g of unit k, lane b goes to out[k * os + b]. */
typedef struct {
    const float *base;
    const ptrdiff_t *off;
    ptrdiff_t xs;
    float *out;
    ptrdiff_t os;
} stream_t;

#if (defined(__GNUC__) || defined(__clang__)) && !defined(RP_PLAIN_C)
/* GCC/Clang vector extensions: one vf holds unit k of the VL sequences of a batch. The compiler lowers them to
   whatever SIMD the target has (AVX: one ymm register). */
#define RP_VECTOR 1
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef float vf_u __attribute__((vector_size(VL * sizeof(float)), aligned(4), may_alias));
typedef int vi __attribute__((vector_size(VL * sizeof(float))));
typedef unsigned int vu __attribute__((vector_size(VL * sizeof(float))));

RP_INLINE vf vload(const float *p) { return *(const vf_u *)p; }
RP_INLINE void vstore(float *p, vf v) { *(vf_u *)p = v; }
RP_INLINE vf vsplat(float s) { return (vf){0} + s; }
#if defined(__AVX__) && VL == 8
RP_INLINE vf vmin(vf a, vf b) { return __builtin_ia32_minps256(a, b); }
RP_INLINE vf vmax(vf a, vf b) { return __builtin_ia32_maxps256(a, b); }
#elif defined(__SSE__) && VL == 4
RP_INLINE vf vmin(vf a, vf b) { return __builtin_ia32_minps(a, b); }
RP_INLINE vf vmax(vf a, vf b) { return __builtin_ia32_maxps(a, b); }
#else
RP_INLINE vf vmin(vf a, vf b)
{
    const vi m = a < b;
    return (vf)(((vi)a & m) | ((vi)b & ~m));
}
RP_INLINE vf vmax(vf a, vf b)
{
    const vi m = a > b;
    return (vf)(((vi)a & m) | ((vi)b & ~m));
}
#endif
RP_INLINE vf v_clamp(vf x, float lo, float hi) { return vmax(vmin(x, vsplat(hi)), vsplat(lo)); }

RP_INLINE vf v_exp2(vf y) /* |y| <= 100 */
{
    const vf t = y + EXP2_MAGIC;
    const vf f = y - (t - EXP2_MAGIC);
    const vf p = EXP2_POLY(f);
    return (vf)((vu)p + ((vu)t << 23));
}

/* New state of one unit from its pre-activation y and its old state g. */
RP_INLINE vf v_update(vf y, float kd, float r, vf g, const int fused)
{
    const vf e = v_exp2(v_clamp(y, -Y_CLAMP, Y_CLAMP));
    const vf w = fused ? vmin(e * e * kd, vsplat(W_MAX)) : v_exp2(v_clamp(y * 2.0f + kd, -Y_CLAMP, Y_CLAMP));
    const vf b = w * 0.5f + 0.5f, u = e + (1.0f - r);
    return (u + b * (g - u)) / ((e + 1.0f) * b);
}

RP_INLINE vf v_first(vf y, float kd, float r, const int fused) /* from the zero state: u + b (0 - u) = u - b u */
{
    return v_update(y, kd, r, vsplat(0.0f), fused);
}

#define LOAD8(a, x, xs, k0)                                                                                        \
    vf a##0 = vload(x + (k0 + 0) * xs), a##1 = vload(x + (k0 + 1) * xs), a##2 = vload(x + (k0 + 2) * xs),         \
       a##3 = vload(x + (k0 + 3) * xs), a##4 = vload(x + (k0 + 4) * xs), a##5 = vload(x + (k0 + 5) * xs),         \
       a##6 = vload(x + (k0 + 6) * xs), a##7 = vload(x + (k0 + 7) * xs)
#define FMA8(a, gj, u)                                                                                             \
    do {                                                                                                           \
        a##0 += gj * u[0];                                                                                         \
        a##1 += gj * u[1];                                                                                         \
        a##2 += gj * u[2];                                                                                         \
        a##3 += gj * u[3];                                                                                         \
        a##4 += gj * u[4];                                                                                         \
        a##5 += gj * u[5];                                                                                         \
        a##6 += gj * u[6];                                                                                         \
        a##7 += gj * u[7];                                                                                         \
    } while (0)
#define UPDATE8(a, gn, go, kd, k0)                                                                                 \
    do {                                                                                                           \
        vstore(gn + 0 * VL, v_update(a##0, kd[k0 + 0], r, vload(go + 0 * VL), fused));                            \
        vstore(gn + 1 * VL, v_update(a##1, kd[k0 + 1], r, vload(go + 1 * VL), fused));                            \
        vstore(gn + 2 * VL, v_update(a##2, kd[k0 + 2], r, vload(go + 2 * VL), fused));                            \
        vstore(gn + 3 * VL, v_update(a##3, kd[k0 + 3], r, vload(go + 3 * VL), fused));                            \
        vstore(gn + 4 * VL, v_update(a##4, kd[k0 + 4], r, vload(go + 4 * VL), fused));                            \
        vstore(gn + 5 * VL, v_update(a##5, kd[k0 + 5], r, vload(go + 5 * VL), fused));                            \
        vstore(gn + 6 * VL, v_update(a##6, kd[k0 + 6], r, vload(go + 6 * VL), fused));                            \
        vstore(gn + 7 * VL, v_update(a##7, kd[k0 + 7], r, vload(go + 7 * VL), fused));                            \
    } while (0)

/*
 * Runs ns (1 or 2) independent streams of VL sequences for T >= 1 steps from the zero state, interleaved so that
 * the out-of-order core overlaps their dependency chains. scratch: 4 * h * VL floats (double-buffered states).
 */
RP_INLINE void grnn_h(const int h, const int fused, const int ns, const cell_t *cell, int T, const stream_t *s0,
                      const stream_t *s1, float *restrict scratch)
{
    const float *restrict ut = cell->ut;
    const float *restrict kd = cell->kd;
    const float r = cell->r;
    const ptrdiff_t hv = (ptrdiff_t)h * VL;
    float *restrict pa = scratch, *restrict na = scratch + hv; /* stream 0: old, new */
    float *restrict pb = scratch + 2 * hv, *restrict nb = scratch + 3 * hv;
    const ptrdiff_t xs0 = s0->xs, xs1 = ns > 1 ? s1->xs : 0;
    {
        const float *x = s0->base + s0->off[0];
        for (int k = 0; k < h; k++) vstore(pa + k * VL, v_first(vload(x + k * xs0), kd[k], r, fused));
        if (ns > 1) {
            const float *y = s1->base + s1->off[0];
            for (int k = 0; k < h; k++) vstore(pb + k * VL, v_first(vload(y + k * xs1), kd[k], r, fused));
        }
    }
    for (int t = 1; t < T; t++) {
        const float *x = s0->base + s0->off[t];
        const float *y = ns > 1 ? s1->base + s1->off[t] : x;
        int k0 = 0;
        for (; k0 + 8 <= h; k0 += 8) {
            LOAD8(a, x, xs0, k0);
            if (ns > 1) {
                LOAD8(b, y, xs1, k0);
                for (int j = 0; j < h; j++) {
                    const float *u = ut + j * h + k0;
                    const vf ga = vload(pa + j * VL), gb = vload(pb + j * VL);
                    FMA8(a, ga, u);
                    FMA8(b, gb, u);
                }
                UPDATE8(a, (na + k0 * VL), (pa + k0 * VL), kd, k0);
                UPDATE8(b, (nb + k0 * VL), (pb + k0 * VL), kd, k0);
            } else {
                for (int j = 0; j < h; j++) {
                    const float *u = ut + j * h + k0;
                    const vf ga = vload(pa + j * VL);
                    FMA8(a, ga, u);
                }
                UPDATE8(a, (na + k0 * VL), (pa + k0 * VL), kd, k0);
            }
        }
        for (; k0 < h; k0++) {
            vf a = vload(x + k0 * xs0);
            vf b = ns > 1 ? vload(y + k0 * xs1) : a;
            for (int j = 0; j < h; j++) {
                const float u = ut[j * h + k0];
                a += vload(pa + j * VL) * u;
                if (ns > 1) b += vload(pb + j * VL) * u;
            }
            vstore(na + k0 * VL, v_update(a, kd[k0], r, vload(pa + k0 * VL), fused));
            if (ns > 1) vstore(nb + k0 * VL, v_update(b, kd[k0], r, vload(pb + k0 * VL), fused));
        }
        float *tmp = pa;
        pa = na;
        na = tmp;
        tmp = pb;
        pb = nb;
        nb = tmp;
    }
    for (int k = 0; k < h; k++) vstore(s0->out + k * s0->os, vload(pa + k * VL));
    if (ns > 1)
        for (int k = 0; k < h; k++) vstore(s1->out + k * s1->os, vload(pb + k * VL));
}

#else /* plain C */

/* One stream at a time; g holds the state, pre the pre-activations. */
static void grnn_one(const int h, const int fused, const cell_t *cell, int T, const stream_t *st, float *restrict g,
                     float *restrict pre)
{
    const float *restrict ut = cell->ut;
    const float *restrict kd = cell->kd;
    const float r = cell->r;
    const ptrdiff_t xs = st->xs;
    for (int t = 0; t < T; t++) {
        const float *restrict x = st->base + st->off[t];
        for (int k = 0; k < h; k++)
            for (int b = 0; b < VL; b++) pre[k * VL + b] = x[k * xs + b];
        if (t > 0) {
            for (int j = 0; j < h; j++) {
                const float *restrict gj = g + (size_t)j * VL;
                for (int k = 0; k < h; k++) {
                    const float u = ut[(size_t)j * h + k];
                    for (int b = 0; b < VL; b++) pre[k * VL + b] += u * gj[b];
                }
            }
        }
        for (int k = 0; k < h; k++)
            for (int b = 0; b < VL; b++)
                g[k * VL + b] = s_update(pre[k * VL + b], kd[k], r, t > 0 ? g[k * VL + b] : 0.0f, fused);
    }
    for (int k = 0; k < h; k++)
        for (int b = 0; b < VL; b++) st->out[k * st->os + b] = g[k * VL + b];
}

RP_INLINE void grnn_h(const int h, const int fused, const int ns, const cell_t *cell, int T, const stream_t *s0,
                      const stream_t *s1, float *restrict scratch)
{
    grnn_one(h, fused, cell, T, s0, scratch, scratch + (size_t)h * VL);
    if (ns > 1) grnn_one(h, fused, cell, T, s1, scratch, scratch + (size_t)h * VL);
}
#endif

/* Exported for the tests: sigmoid and tanh of n values, computed as in the RNN kernels. */
RP_EXPORT void rnnpool_front_activations(int n, const float *x, float *tanh_out, float *sigmoid_out)
{
    for (int i = 0; i < n; i++) {
        const float y = (float)(NEG_LOG2E * x[i]);
        const float e = s_exp2(s_clamp(y, -Y_CLAMP, Y_CLAMP));
        const float w = s_exp2(s_clamp(2.0f * y, -Y_CLAMP, Y_CLAMP));
        sigmoid_out[i] = 1.0f / (1.0f + e);
        tanh_out[i] = (1.0f - w) / (1.0f + w);
    }
#ifdef RP_VECTOR
    /* the vector exp2 must agree with the scalar one */
    for (int i = 0; i < n; i += VL) {
        float buf[VL], e[VL];
        const int m = n - i < VL ? n - i : VL;
        for (int b = 0; b < VL; b++) buf[b] = s_clamp(b < m ? (float)(NEG_LOG2E * x[i + b]) : 0.0f, -Y_CLAMP, Y_CLAMP);
        vstore(e, v_exp2(vload(buf)));
        for (int b = 0; b < m; b++)
            if (e[b] != s_exp2(buf[b])) sigmoid_out[i + b] = tanh_out[i + b] = -2.0f; /* flags a mismatch */
    }
#endif
}

#define GRNN_INSTANCE(name, H, FUSED, NS)                                                                          \
    static void name(const cell_t *c, int T, const stream_t *s0, const stream_t *s1, float *scratch)               \
    {                                                                                                              \
        grnn_h(H, FUSED, NS, c, T, s0, s1, scratch);                                                               \
    }
GRNN_INSTANCE(grnn_16f1, 16, 1, 1)
GRNN_INSTANCE(grnn_16f2, 16, 1, 2)
GRNN_INSTANCE(grnn_16u1, 16, 0, 1)
GRNN_INSTANCE(grnn_16u2, 16, 0, 2)
GRNN_INSTANCE(grnn_8f1, 8, 1, 1)
GRNN_INSTANCE(grnn_8f2, 8, 1, 2)
GRNN_INSTANCE(grnn_8u1, 8, 0, 1)
GRNN_INSTANCE(grnn_8u2, 8, 0, 2)
GRNN_INSTANCE(grnn_anyf1, c->h, 1, 1)
GRNN_INSTANCE(grnn_anyf2, c->h, 1, 2)
GRNN_INSTANCE(grnn_anyu1, c->h, 0, 1)
GRNN_INSTANCE(grnn_anyu2, c->h, 0, 2)

/* Two streams interleaved need 2 x 8 accumulators: worth it with 32 vector registers (AVX-512), not with 16. */
#ifndef RP_PAIRS
#if defined(__AVX__) && !defined(__AVX512VL__)
#define RP_PAIRS 0
#else
#define RP_PAIRS 1
#endif
#endif

/* Runs stream s0 and, when s1 is not NULL, s1 (same cell and T). scratch: 4 * h * VL floats. */
static void grnn(const cell_t *c, int T, const stream_t *s0, const stream_t *s1, float *scratch)
{
    typedef void (*fn_t)(const cell_t *, int, const stream_t *, const stream_t *, float *);
    static const fn_t table[3][2][2] = {
        {{grnn_16u1, grnn_16u2}, {grnn_16f1, grnn_16f2}},
        {{grnn_8u1, grnn_8u2}, {grnn_8f1, grnn_8f2}},
        {{grnn_anyu1, grnn_anyu2}, {grnn_anyf1, grnn_anyf2}},
    };
    const int hi = c->h == 16 ? 0 : (c->h == 8 ? 1 : 2);
#if RP_PAIRS
    table[hi][c->fused != 0][s1 != NULL](c, T, s0, s1, scratch);
#else
    table[hi][c->fused != 0][0](c, T, s0, NULL, scratch);
    if (s1 != NULL) table[hi][c->fused != 0][0](c, T, s1, NULL, scratch);
#endif
}

/* ---------------------------------------------------------------------------------------------------------------
 * Geometry and workspace.
 * ------------------------------------------------------------------------------------------------------------- */
static size_t round_up(size_t v, size_t m) { return (v + m - 1) / m * m; }
static int ceil_div(int a, int b) { return (a + b - 1) / b; }

typedef struct {
    /* stem layer l reads a padded, column-phase-major buffer: (cin, hin + 2, stride * qw), padded column
       pc = q * stride + phase at phase * qw + q */
    int cin, hin, win, cout, hout, wout, stride, qw;
    const float *w, *b; /* (cout, cin, 3, 3), (cout,) */
    float *in;          /* padded input */
} stem_t;

typedef struct {
    /* input */
    const float *image;
    int C, H, W;
    const float *mean, *std;
    /* stem */
    int n_stem;
    stem_t stem[8];
    float *feat; /* rnnpool input (Cf, Hf, Wf) when there is a stem */
    int Cf, Hf, Wf;
    /* rnnpool geometry */
    int h1, h2, pr, pc, sr, sc;
    int out_h, out_w, top, left;
    int S;  /* out_w rounded up to VL: lanes of row-segment / patch batches */
    int Qs; /* columns per phase */
    int M;  /* sc * Qs rounded up to VL: lanes of column-segment batches */
    /* parameters */
    const float *w1s, *bg1s; /* -log2(e) W1 (h1, Cf), -log2(e) bias_gate1 */
    const float *w2s, *bg2s; /* -log2(e) k1 W2 (h2, h1), -log2(e) bias_gate2 */
    cell_t cell1, cell2;
    float k2;
    /* per-thread scratch */
    float *scratch;
    size_t scratch_floats;
    float *out;
    /* threads */
    int nthreads;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int bar_count, bar_gen;
    int started;
} ctx_t;

static void barrier_wait(ctx_t *c)
{
    if (c->nthreads <= 1) return;
    /* spin first (the phases between barriers are short and every thread is busy), then sleep */
    const int gen = __atomic_load_n(&c->bar_gen, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&c->bar_count, 1, __ATOMIC_ACQ_REL) == c->nthreads) {
        __atomic_store_n(&c->bar_count, 0, __ATOMIC_RELAXED);
        pthread_mutex_lock(&c->mu);
        __atomic_store_n(&c->bar_gen, gen + 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&c->cv);
        pthread_mutex_unlock(&c->mu);
        return;
    }
    for (long spin = 0; spin < BARRIER_SPINS; spin++) {
        if (__atomic_load_n(&c->bar_gen, __ATOMIC_ACQUIRE) != gen) return;
        spin_pause();
    }
    pthread_mutex_lock(&c->mu);
    while (__atomic_load_n(&c->bar_gen, __ATOMIC_ACQUIRE) == gen) pthread_cond_wait(&c->cv, &c->mu);
    pthread_mutex_unlock(&c->mu);
}

/* Per-thread scratch layout (floats). */
static size_t scratch_size(int C, int h1, int h2, int pr, int S, int M, int stem_w)
{
    const int hm = h1 > h2 ? h1 : h2;
    size_t n = 0;
    n += round_up((size_t)pr * h1 * M, ALIGN_F);     /* wx ring */
    n += round_up((size_t)C * M, ALIGN_F);           /* one input row, column-phase-major */
    n += round_up((size_t)pr * h1 * S, ALIGN_F);     /* row summaries ring */
    n += round_up((size_t)pr * h2 * S, ALIGN_F);     /* rnn2 row inputs ring */
    n += round_up((size_t)h1 * M, ALIGN_F);          /* column summaries of one patch row */
    n += round_up((size_t)h2 * M, ALIGN_F);          /* rnn2 column inputs */
    n += round_up((size_t)4 * hm * VL, ALIGN_F);     /* RNN states */
    n += round_up((size_t)4 * h2 * VL, ALIGN_F);     /* rnn2 results */
    n += round_up((size_t)stem_w, ALIGN_F);          /* stem output row */
    return n;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Stem.
 * ------------------------------------------------------------------------------------------------------------- */

/*
 * d[q] = src[q * s + ph - lead] (normalised: (v - mean) / scale) for the q where that index lies in [0, w), else 0;
 * q in [0, n). The phase ph of a row stored column-phase-major with lead zero columns before it.
 */
RP_INLINE void fill_phase_s(const int s, float *restrict d, int n, const float *restrict src, int w, int ph, int lead,
                            float mean, float scale, int normalise)
{
    /* valid q: 0 <= q * s + ph - lead < w */
    int q0 = lead - ph > 0 ? (lead - ph + s - 1) / s : 0;
    int q1 = w + lead - ph > 0 ? (w + lead - ph + s - 1) / s : 0;
    if (q0 > n) q0 = n;
    if (q1 > n) q1 = n;
    if (q1 < q0) q1 = q0;
    for (int q = 0; q < q0; q++) d[q] = 0.0f;
    const float *restrict sp = src + (ph - lead);
    if (normalise)
        for (int q = q0; q < q1; q++) d[q] = (sp[q * s] - mean) / scale;
    else
        for (int q = q0; q < q1; q++) d[q] = sp[q * s];
    for (int q = q1; q < n; q++) d[q] = 0.0f;
}

static void fill_phase(int s, float *d, int n, const float *src, int w, int ph, int lead, float mean, float scale,
                       int normalise)
{
    if (s == 1)
        fill_phase_s(1, d, n, src, w, ph, lead, mean, scale, normalise);
    else if (s == 2)
        fill_phase_s(2, d, n, src, w, ph, lead, mean, scale, normalise);
    else if (s == 4)
        fill_phase_s(4, d, n, src, w, ph, lead, mean, scale, normalise);
    else
        fill_phase_s(s, d, n, src, w, ph, lead, mean, scale, normalise);
}

/* Writes one row (w values; NULL: a zero row) into padded row prow of the channel plane of a stem input buffer with
   column stride s and qw columns per phase (one zero column on the left, zeros on the right). */
static void put_padded_row(float *restrict plane, int s, int qw, int prow, const float *restrict src, int w,
                           float mean, float scale, int normalise)
{
    float *restrict dst = plane + (size_t)prow * s * qw;
    if (src == NULL) {
        memset(dst, 0, sizeof(float) * (size_t)s * qw);
        return;
    }
    for (int ph = 0; ph < s; ph++) fill_phase(s, dst + (size_t)ph * qw, qw, src, w, ph, 1, mean, scale, normalise);
}

/* Normalises the image into stem layer 0's padded input, padded rows [r0, r1). */
static void stem_fill_input(ctx_t *c, int r0, int r1)
{
    const stem_t *L = &c->stem[0];
    for (int ch = 0; ch < L->cin; ch++) {
        float *plane = L->in + (size_t)ch * (L->hin + 2) * L->stride * L->qw;
        for (int pr = r0; pr < r1; pr++) {
            const int y = pr - 1;
            const float *src = (y >= 0 && y < L->hin) ? c->image + ((size_t)ch * c->H + y) * c->W : NULL;
            put_padded_row(plane, L->stride, L->qw, pr, src, L->win, c->mean[ch], c->std[ch], 1);
        }
    }
}

#if defined(__GNUC__) || defined(__clang__)
__attribute__((noinline))
#endif
static void axpy(int n, float a, const float *restrict x, float *restrict y)
{
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

/* Stem layer l, output rows [y0, y1): conv + bias + ReLU, written to the next layer's padded input (rows y + 1;
   the thread owning output row 0 / the last row also writes the zero border rows) or to feat. */
static void stem_layer(ctx_t *c, int l, int y0, int y1, float *restrict row)
{
    const stem_t *L = &c->stem[l];
    const int s = L->stride, qw = L->qw, wo = L->wout;
    const size_t in_plane = (size_t)(L->hin + 2) * s * qw, in_row = (size_t)s * qw;
    const stem_t *N = l + 1 < c->n_stem ? &c->stem[l + 1] : NULL;
    for (int o = 0; o < L->cout; o++) {
        float *nplane = N ? N->in + (size_t)o * (N->hin + 2) * N->stride * N->qw : NULL;
        if (N && y0 == 0) put_padded_row(nplane, N->stride, N->qw, 0, NULL, 0, 0.0f, 1.0f, 0);
        if (N && y1 == L->hout) put_padded_row(nplane, N->stride, N->qw, N->hin + 1, NULL, 0, 0.0f, 1.0f, 0);
        for (int y = y0; y < y1; y++) {
            const float bias = L->b[o];
            for (int x = 0; x < wo; x++) row[x] = bias;
            for (int ci = 0; ci < L->cin; ci++) {
                const float *wk = L->w + ((size_t)o * L->cin + ci) * 9;
                for (int dy = 0; dy < 3; dy++) {
                    const float *src_row = L->in + ci * in_plane + (size_t)(s * y + dy) * in_row;
                    for (int dx = 0; dx < 3; dx++)
                        axpy(wo, wk[dy * 3 + dx], src_row + (size_t)(dx % s) * qw + dx / s, row);
                }
            }
            for (int x = 0; x < wo; x++) row[x] = row[x] > 0.0f ? row[x] : 0.0f;
            if (N)
                put_padded_row(nplane, N->stride, N->qw, y + 1, row, wo, 0.0f, 1.0f, 0);
            else
                memcpy(c->feat + ((size_t)o * L->hout + y) * wo, row, sizeof(float) * wo);
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------------
 * RNNPool over patch rows [i0, i1).
 * ------------------------------------------------------------------------------------------------------------- */
typedef struct {
    float *wx, *inpm, *rowsum, *r2, *colsum, *c2, *g, *res, *stemrow;
} scratch_t;

static scratch_t carve_scratch(const ctx_t *c, float *base)
{
    scratch_t s;
    const int hm = c->h1 > c->h2 ? c->h1 : c->h2;
    float *p = base;
#define TAKE(name, n) (s.name = p, p += round_up((size_t)(n), ALIGN_F))
    TAKE(wx, (size_t)c->pr * c->h1 * c->M);
    TAKE(inpm, (size_t)c->Cf * c->M);
    TAKE(rowsum, (size_t)c->pr * c->h1 * c->S);
    TAKE(r2, (size_t)c->pr * c->h2 * c->S);
    TAKE(colsum, (size_t)c->h1 * c->M);
    TAKE(c2, (size_t)c->h2 * c->M);
    TAKE(g, (size_t)4 * hm * VL);
    TAKE(res, (size_t)4 * c->h2 * VL);
#undef TAKE
    s.stemrow = p;
    return s;
}

/* -log2(e) (W1 x + bias_gate) of padded row r into ring slot r % pr, column-phase-major, all M lanes written. */
static void wx_row(const ctx_t *c, scratch_t *s, int r)
{
    const int h1 = c->h1, sc = c->sc, Qs = c->Qs, M = c->M, Cf = c->Cf, Wf = c->Wf;
    float *restrict dst = s->wx + (size_t)(r % c->pr) * h1 * M;
    const int y = r - c->top;
    if (y < 0 || y >= c->Hf) {
        for (int k = 0; k < h1; k++) {
            const float bg = c->bg1s[k];
            float *restrict d = dst + (size_t)k * M;
            for (int m = 0; m < M; m++) d[m] = bg;
        }
        return;
    }
    /* the input row (normalised when there is no stem), zero-padded, column-phase-major: inpm[ch][m] */
    for (int ch = 0; ch < Cf; ch++) {
        const float *src = c->n_stem == 0 ? c->image + ((size_t)ch * c->H + y) * c->W
                                          : c->feat + ((size_t)ch * c->Hf + y) * Wf;
        const float mean = c->n_stem == 0 ? c->mean[ch] : 0.0f, scale = c->n_stem == 0 ? c->std[ch] : 1.0f;
        float *d = s->inpm + (size_t)ch * M;
        for (int ph = 0; ph < sc; ph++)
            fill_phase(sc, d + (size_t)ph * Qs, Qs, src, Wf, ph, c->left, mean, scale, c->n_stem == 0);
        for (int m = sc * Qs; m < M; m++) d[m] = 0.0f;
    }
    for (int k = 0; k < h1; k++) {
        float *restrict d = dst + (size_t)k * M;
        const float *restrict w = c->w1s + (size_t)k * Cf;
        const float bg = c->bg1s[k];
        int ch = 0;
        for (; ch < Cf; ch += 4) { /* four channels per pass */
            const int nc = Cf - ch < 4 ? Cf - ch : 4;
            const float *restrict i0 = s->inpm + (size_t)ch * M;
            const float *restrict i1 = nc > 1 ? i0 + M : i0, *restrict i2 = nc > 2 ? i0 + 2 * M : i0;
            const float *restrict i3 = nc > 3 ? i0 + 3 * M : i0;
            const float w0 = w[ch], w1 = nc > 1 ? w[ch + 1] : 0.0f, w2 = nc > 2 ? w[ch + 2] : 0.0f;
            const float w3 = nc > 3 ? w[ch + 3] : 0.0f;
            if (ch == 0)
                for (int m = 0; m < M; m++) d[m] = bg + w0 * i0[m] + w1 * i1[m] + w2 * i2[m] + w3 * i3[m];
            else
                for (int m = 0; m < M; m++) d[m] += w0 * i0[m] + w1 * i1[m] + w2 * i2[m] + w3 * i3[m];
        }
    }
}

/* rnn2's input projection: dst[k2][n] = bg2s[k2] + sum_k w2s[k2][k] src[k][n], n < lanes (y units). */
static void project2(const ctx_t *c, const float *restrict src, float *restrict dst, int lanes)
{
    const int h1 = c->h1, h2 = c->h2;
    const float *restrict w2 = c->w2s;
#ifdef RP_VECTOR
    for (int n0 = 0; n0 < lanes; n0 += VL) {
        int k2 = 0;
        for (; k2 + 8 <= h2; k2 += 8) {
            vf a0 = vsplat(c->bg2s[k2 + 0]), a1 = vsplat(c->bg2s[k2 + 1]), a2 = vsplat(c->bg2s[k2 + 2]);
            vf a3 = vsplat(c->bg2s[k2 + 3]), a4 = vsplat(c->bg2s[k2 + 4]), a5 = vsplat(c->bg2s[k2 + 5]);
            vf a6 = vsplat(c->bg2s[k2 + 6]), a7 = vsplat(c->bg2s[k2 + 7]);
            const float *wr = w2 + (size_t)k2 * h1;
            for (int k = 0; k < h1; k++) {
                const vf v = vload(src + (size_t)k * lanes + n0);
                a0 += v * wr[0 * h1 + k];
                a1 += v * wr[1 * h1 + k];
                a2 += v * wr[2 * h1 + k];
                a3 += v * wr[3 * h1 + k];
                a4 += v * wr[4 * h1 + k];
                a5 += v * wr[5 * h1 + k];
                a6 += v * wr[6 * h1 + k];
                a7 += v * wr[7 * h1 + k];
            }
            float *d = dst + (size_t)k2 * lanes + n0;
            vstore(d + 0 * (size_t)lanes, a0);
            vstore(d + 1 * (size_t)lanes, a1);
            vstore(d + 2 * (size_t)lanes, a2);
            vstore(d + 3 * (size_t)lanes, a3);
            vstore(d + 4 * (size_t)lanes, a4);
            vstore(d + 5 * (size_t)lanes, a5);
            vstore(d + 6 * (size_t)lanes, a6);
            vstore(d + 7 * (size_t)lanes, a7);
        }
        for (; k2 < h2; k2++) {
            vf a = vsplat(c->bg2s[k2]);
            for (int k = 0; k < h1; k++) a += vload(src + (size_t)k * lanes + n0) * w2[(size_t)k2 * h1 + k];
            vstore(dst + (size_t)k2 * lanes + n0, a);
        }
    }
#else
    for (int k2 = 0; k2 < h2; k2++) {
        float *restrict d = dst + (size_t)k2 * lanes;
        const float bg = c->bg2s[k2];
        for (int n = 0; n < lanes; n++) d[n] = bg;
        for (int k = 0; k < h1; k++) {
            const float w = w2[(size_t)k2 * h1 + k];
            const float *restrict sk = src + (size_t)k * lanes;
            for (int n = 0; n < lanes; n++) d[n] += w * sk[n];
        }
    }
#endif
}

static void rnnpool_band(const ctx_t *c, scratch_t *s, int i0, int i1)
{
    const int h1 = c->h1, h2 = c->h2, pr = c->pr, pc = c->pc, sr = c->sr, sc = c->sc;
    const int S = c->S, Qs = c->Qs, M = c->M, out_h = c->out_h, out_w = c->out_w;
    ptrdiff_t off_rowseg[MAX_STEPS], off_colseg[MAX_STEPS], off_r2f[MAX_STEPS], off_r2b[MAX_STEPS];
    ptrdiff_t off_c2b[MAX_STEPS];
    for (int t = 0; t < pc; t++) off_rowseg[t] = (ptrdiff_t)(t % sc) * Qs + t / sc;
    for (int t = 0; t < pc; t++) off_c2b[t] = off_rowseg[pc - 1 - t];
    int next_row = i0 * sr;
    for (int i = i0; i < i1; i++) {
        /* new padded rows: W1 x, rnn1 along their row segments (all their batches, two at a time), rnn2's
           projection */
        const int r_begin = i * sr > next_row ? i * sr : next_row, r_end = i * sr + pr;
        for (int r = r_begin; r < r_end; r++) wx_row(c, s, r);
        const int per_row = S / VL, nbatch = (r_end - r_begin) * per_row;
        for (int bi = 0; bi < nbatch; bi += 2) {
            stream_t st[2];
            for (int e = 0; e < 2 && bi + e < nbatch; e++) {
                const int r = r_begin + (bi + e) / per_row, s0 = (bi + e) % per_row * VL;
                st[e] = (stream_t){s->wx + (size_t)(r % pr) * h1 * M + s0, off_rowseg, M,
                                   s->rowsum + (size_t)(r % pr) * h1 * S + s0, S};
            }
            grnn(&c->cell1, pc, &st[0], bi + 1 < nbatch ? &st[1] : NULL, s->g);
        }
        for (int r = r_begin; r < r_end; r++)
            project2(c, s->rowsum + (size_t)(r % pr) * h1 * S, s->r2 + (size_t)(r % pr) * h2 * S, S);
        if (r_end > next_row) next_row = r_end;
        /* rnn1 down the column segments of patch row i */
        for (int t = 0; t < pr; t++) off_colseg[t] = (ptrdiff_t)((i * sr + t) % pr) * h1 * M;
        for (int m0 = 0; m0 < M; m0 += 2 * VL) {
            const stream_t a = {s->wx + m0, off_colseg, M, s->colsum + m0, M};
            const stream_t b = {s->wx + m0 + VL, off_colseg, M, s->colsum + m0 + VL, M};
            grnn(&c->cell1, pr, &a, m0 + VL < M ? &b : NULL, s->g);
        }
        project2(c, s->colsum, s->c2, M);
        /* rnn2: four sweeps per patch */
        for (int t = 0; t < pr; t++) {
            off_r2f[t] = (ptrdiff_t)((i * sr + t) % pr) * h2 * S;
            off_r2b[pr - 1 - t] = off_r2f[t];
        }
        for (int s0 = 0; s0 < S; s0 += VL) {
            float *res = s->res;
            const stream_t rf = {s->r2 + s0, off_r2f, S, res, VL};
            const stream_t rb = {s->r2 + s0, off_r2b, S, res + h2 * VL, VL};
            const stream_t cf = {s->c2 + s0, off_rowseg, M, res + 2 * h2 * VL, VL};
            const stream_t cb = {s->c2 + s0, off_c2b, M, res + 3 * h2 * VL, VL};
            grnn(&c->cell2, pr, &rf, &rb, s->g);
            grnn(&c->cell2, pc, &cf, &cb, s->g);
            const int nb = out_w - s0 < VL ? out_w - s0 : VL;
            for (int ch = 0; ch < 4 * h2; ch++) {
                float *restrict o = c->out + ((size_t)ch * out_h + i) * out_w + s0;
                const float *restrict src = res + (size_t)ch * VL;
                for (int b = 0; b < nb; b++) o[b] = c->k2 * src[b];
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------------
 * Threads.
 * ------------------------------------------------------------------------------------------------------------- */
typedef struct {
    ctx_t *c;
    int tid;
} worker_arg_t;

static void run_worker(ctx_t *c, int tid)
{
    const int nt = c->nthreads;
    scratch_t s = carve_scratch(c, c->scratch + (size_t)tid * c->scratch_floats);
    if (c->n_stem > 0) {
        const stem_t *L0 = &c->stem[0];
        const int rows = L0->hin + 2;
        stem_fill_input(c, tid * rows / nt, (tid + 1) * rows / nt);
        barrier_wait(c);
        for (int l = 0; l < c->n_stem; l++) {
            const int ho = c->stem[l].hout;
            stem_layer(c, l, tid * ho / nt, (tid + 1) * ho / nt, s.stemrow);
            barrier_wait(c);
        }
    }
    rnnpool_band(c, &s, tid * c->out_h / nt, (tid + 1) * c->out_h / nt);
}

static void *worker_main(void *p)
{
    worker_arg_t *a = (worker_arg_t *)p;
    ctx_t *c = a->c;
    pthread_mutex_lock(&c->mu);
    while (!c->started) pthread_cond_wait(&c->cv, &c->mu);
    const int go = a->tid < c->nthreads;
    pthread_mutex_unlock(&c->mu);
    if (go) run_worker(c, a->tid);
    return NULL;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Entry points.
 * ------------------------------------------------------------------------------------------------------------- */
typedef struct {
    int Cf, Hf, Wf, out_h, out_w, top, left, S, Qs, M, stem_w_max;
    size_t stem_in[8], feat, shared, per_thread;
} plan_t;

static int make_plan(int channels, int height, int width, int n_stem, const int *stem_out, const int *stem_stride,
                     int h1, int h2, int pr, int pc, int sr, int sc, plan_t *p)
{
    if (channels < 1 || height < 1 || width < 1 || n_stem < 0 || n_stem > 8 || h1 < 1 || h2 < 1 || pr < 1 ||
        pc < 1 || sr < 1 || sc < 1 || pr > MAX_STEPS || pc > MAX_STEPS || h1 > 4096 || h2 > 4096)
        return RP_EINVAL;
    if ((double)height * width * channels > 1e9) return RP_EINVAL;
    memset(p, 0, sizeof *p);
    int C = channels, H = height, W = width;
    p->stem_w_max = 0;
    for (int l = 0; l < n_stem; l++) {
        const int s = stem_stride[l], co = stem_out[l];
        if (s < 1 || co < 1) return RP_EINVAL;
        const int ho = ceil_div(H, s), wo = ceil_div(W, s), qw = wo + 2;
        p->stem_in[l] = round_up((size_t)C * (H + 2) * s * qw, ALIGN_F);
        if (wo > p->stem_w_max) p->stem_w_max = wo;
        C = co;
        H = ho;
        W = wo;
    }
    p->Cf = C;
    p->Hf = H;
    p->Wf = W;
    const int out_h = ceil_div(H, sr), out_w = ceil_div(W, sc);
    int tot_h = (out_h - 1) * sr + pr - H, tot_w = (out_w - 1) * sc + pc - W;
    if (tot_h < 0) tot_h = 0;
    if (tot_w < 0) tot_w = 0;
    p->out_h = out_h;
    p->out_w = out_w;
    p->top = tot_h / 2;
    p->left = tot_w / 2;
    p->S = (int)round_up((size_t)out_w, VL);
    const int cols_used = (out_w - 1) * sc + pc;
    int Qs = ceil_div(cols_used, sc);
    if (Qs < p->S + (pc - 1) / sc) Qs = p->S + (pc - 1) / sc;
    p->Qs = Qs;
    p->M = (int)round_up((size_t)sc * Qs, VL);
    p->feat = n_stem > 0 ? round_up((size_t)C * H * W, ALIGN_F) : 0;
    size_t shared = ALIGN_F; /* alignment slack */
    for (int l = 0; l < n_stem; l++) shared += p->stem_in[l];
    shared += p->feat;
    shared += round_up((size_t)h1 * h1, ALIGN_F) + round_up((size_t)h2 * h2, ALIGN_F); /* ut1, ut2 */
    shared += 2 * round_up((size_t)h1, ALIGN_F) + 2 * round_up((size_t)h2, ALIGN_F);  /* kd1, kd2, bg1s, bg2s */
    shared += round_up((size_t)h1 * C, ALIGN_F) + round_up((size_t)h2 * h1, ALIGN_F); /* w1s, w2s */
    p->shared = shared;
    p->per_thread = scratch_size(C, h1, h2, pr, p->S, p->M, p->stem_w_max);
    return RP_OK;
}

static int clamp_threads(int threads, int out_h)
{
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > out_h) threads = out_h;
    return threads;
}

/*
 * Floats of workspace that rnnpool_front needs for these sizes and thread count (0: invalid arguments).
 */
RP_EXPORT size_t rnnpool_front_workspace_size(int channels, int height, int width, int n_stem, const int *stem_out,
                                              const int *stem_stride, int hidden1, int hidden2, int patch_rows,
                                              int patch_cols, int stride_rows, int stride_cols, int threads)
{
    plan_t p;
    if (make_plan(channels, height, width, n_stem, stem_out, stem_stride, hidden1, hidden2, patch_rows, patch_cols,
                  stride_rows, stride_cols, &p) != RP_OK)
        return 0;
    return p.shared + (size_t)clamp_threads(threads, p.out_h) * p.per_thread;
}

static double sigmoid_d(float v) { return 1.0 / (1.0 + exp(-(double)v)); }

static float *take(float **ws, size_t n)
{
    float *p = *ws;
    *ws += round_up(n, ALIGN_F);
    return p;
}

/* kd of a cell (see cell_t); returns whether the fused form applies (every |bias_update - bias_gate| <= 20). */
static int make_kd(int h, const float *bg, const float *bu, float *kd)
{
    int fused = 1;
    for (int k = 0; k < h; k++)
        if (!(fabs((double)bu[k] - bg[k]) <= FUSED_D_MAX)) fused = 0;
    for (int k = 0; k < h; k++) {
        const double d = (double)bu[k] - bg[k];
        kd[k] = (float)(fused ? exp(-2.0 * d) : -2.0 * 1.44269504088896341 * d);
    }
    return fused;
}

/*
 * The front of RNNPool-Face on one image.
 *
 * image: (channels, height, width) float pixels (0..255). pixel_mean, pixel_std: (channels,).
 * n_stem 3x3 ConvBNReLU layers (padding 1), BatchNorm folded: layer l has stem_out[l] output channels and stride
 * stem_stride[l]; stem_weight holds every layer's (out, in, 3, 3) weights one after the other, stem_bias every
 * layer's (out,) biases.
 * RNNPool (hidden1, hidden2, patch (patch_rows, patch_cols), stride (stride_rows, stride_cols)); rnn1 and rnn2 are
 * each packed as [W (hidden, input) row-major, U (hidden, hidden) row-major, bias_gate (hidden), bias_update
 * (hidden), zeta, nu].
 * threads: worker threads (1 = run on the caller's thread).
 * workspace: rnnpool_front_workspace_size(...) floats (any alignment), or NULL to allocate one for this call.
 * out: (4 * hidden2, ceil(H' / stride_rows), ceil(W' / stride_cols)), H' x W' the stem's output size.
 * Returns 0, or RP_EINVAL (-1) for invalid arguments, RP_ENOMEM (-2) when memory runs out.
 */
RP_EXPORT int rnnpool_front(const float *image, int channels, int height, int width, const float *pixel_mean,
                            const float *pixel_std, int n_stem, const int *stem_out, const int *stem_stride,
                            const float *stem_weight, const float *stem_bias, int hidden1, int hidden2,
                            int patch_rows, int patch_cols, int stride_rows, int stride_cols, const float *rnn1,
                            const float *rnn2, int threads, float *workspace, size_t workspace_floats, float *out)
{
    plan_t p;
    if (image == NULL || out == NULL || pixel_mean == NULL || pixel_std == NULL || rnn1 == NULL || rnn2 == NULL)
        return RP_EINVAL;
    int rc = make_plan(channels, height, width, n_stem, stem_out, stem_stride, hidden1, hidden2, patch_rows,
                       patch_cols, stride_rows, stride_cols, &p);
    if (rc != RP_OK) return rc;
    if (n_stem > 0 && (stem_weight == NULL || stem_bias == NULL)) return RP_EINVAL;
    const int nt = clamp_threads(threads, p.out_h);
    const size_t need = p.shared + (size_t)nt * p.per_thread;
    float *owned = NULL;
    if (workspace == NULL) {
        owned = (float *)malloc(sizeof(float) * need);
        if (owned == NULL) return RP_ENOMEM;
        workspace = owned;
    } else if (workspace_floats < need) {
        return RP_EINVAL;
    }

    ctx_t c;
    memset(&c, 0, sizeof c);
    float *ws = (float *)(((uintptr_t)workspace + 63) & ~(uintptr_t)63);
    c.image = image;
    c.C = channels;
    c.H = height;
    c.W = width;
    c.mean = pixel_mean;
    c.std = pixel_std;
    c.n_stem = n_stem;
    {
        int C = channels, H = height, W = width;
        const float *wp = stem_weight, *bp = stem_bias;
        for (int l = 0; l < n_stem; l++) {
            stem_t *L = &c.stem[l];
            L->cin = C;
            L->hin = H;
            L->win = W;
            L->cout = stem_out[l];
            L->stride = stem_stride[l];
            L->hout = ceil_div(H, L->stride);
            L->wout = ceil_div(W, L->stride);
            L->qw = L->wout + 2;
            L->w = wp;
            L->b = bp;
            wp += (size_t)L->cout * C * 9;
            bp += L->cout;
            L->in = ws;
            ws += p.stem_in[l];
            C = L->cout;
            H = L->hout;
            W = L->wout;
        }
    }
    c.feat = ws;
    ws += p.feat;
    c.Cf = p.Cf;
    c.Hf = p.Hf;
    c.Wf = p.Wf;
    c.h1 = hidden1;
    c.h2 = hidden2;
    c.pr = patch_rows;
    c.pc = patch_cols;
    c.sr = stride_rows;
    c.sc = stride_cols;
    c.out_h = p.out_h;
    c.out_w = p.out_w;
    c.top = p.top;
    c.left = p.left;
    c.S = p.S;
    c.Qs = p.Qs;
    c.M = p.M;

    /* parameters, in y = -log2(e) a units: the W x + bias_gate tables, k-scaled U transposed, k1-scaled W2 */
    const int h1 = hidden1, h2 = hidden2, Cf = p.Cf;
    const float *u1 = rnn1 + (size_t)h1 * Cf, *bg1 = u1 + (size_t)h1 * h1, *bu1 = bg1 + h1;
    const float zeta1 = bu1[h1], nu1 = bu1[h1 + 1];
    const float *u2 = rnn2 + (size_t)h2 * h1, *bg2 = u2 + (size_t)h2 * h2, *bu2 = bg2 + h2;
    const float zeta2 = bu2[h2], nu2 = bu2[h2 + 1];
    const double a1 = sigmoid_d(zeta1), k1 = a1 + sigmoid_d(nu1);
    const double a2 = sigmoid_d(zeta2), k2 = a2 + sigmoid_d(nu2);
    float *ut1 = take(&ws, (size_t)h1 * h1), *ut2 = take(&ws, (size_t)h2 * h2);
    float *kd1 = take(&ws, h1), *kd2 = take(&ws, h2), *bg1s = take(&ws, h1), *bg2s = take(&ws, h2);
    float *w1s = take(&ws, (size_t)h1 * Cf), *w2s = take(&ws, (size_t)h2 * h1);
    for (int k = 0; k < h1; k++)
        for (int j = 0; j < h1; j++) ut1[(size_t)j * h1 + k] = (float)(NEG_LOG2E * k1 * u1[(size_t)k * h1 + j]);
    for (int k = 0; k < h2; k++)
        for (int j = 0; j < h2; j++) ut2[(size_t)j * h2 + k] = (float)(NEG_LOG2E * k2 * u2[(size_t)k * h2 + j]);
    const int fused1 = make_kd(h1, bg1, bu1, kd1), fused2 = make_kd(h2, bg2, bu2, kd2);
    for (int k = 0; k < h1; k++) bg1s[k] = (float)(NEG_LOG2E * bg1[k]);
    for (int k = 0; k < h2; k++) bg2s[k] = (float)(NEG_LOG2E * bg2[k]);
    for (size_t n = 0; n < (size_t)h1 * Cf; n++) w1s[n] = (float)(NEG_LOG2E * rnn1[n]);
    for (size_t n = 0; n < (size_t)h2 * h1; n++) w2s[n] = (float)(NEG_LOG2E * k1 * rnn2[n]);
    c.w1s = w1s;
    c.bg1s = bg1s;
    c.bg2s = bg2s;
    c.w2s = w2s;
    c.cell1 = (cell_t){h1, ut1, kd1, (float)(a1 / k1), fused1};
    c.cell2 = (cell_t){h2, ut2, kd2, (float)(a2 / k2), fused2};
    c.k2 = (float)k2;
    c.scratch = ws;
    c.scratch_floats = p.per_thread;
    c.out = out;

    if (nt <= 1) {
        c.nthreads = 1;
        run_worker(&c, 0);
    } else {
        pthread_t tids[MAX_THREADS];
        worker_arg_t args[MAX_THREADS];
        pthread_mutex_init(&c.mu, NULL);
        pthread_cond_init(&c.cv, NULL);
        c.nthreads = nt;
        int created = 0;
        for (int t = 1; t < nt; t++) {
            args[t].c = &c;
            args[t].tid = t;
            if (pthread_create(&tids[t], NULL, worker_main, &args[t]) != 0) break;
            created = t;
        }
        /* fewer threads than asked for if creation failed: the work is split among those that exist */
        pthread_mutex_lock(&c.mu);
        c.nthreads = created + 1;
        c.started = 1;
        pthread_cond_broadcast(&c.cv);
        pthread_mutex_unlock(&c.mu);
        run_worker(&c, 0);
        for (int t = 1; t <= created; t++) pthread_join(tids[t], NULL);
        pthread_cond_destroy(&c.cv);
        pthread_mutex_destroy(&c.mu);
    }
    free(owned);
    return RP_OK;
}
