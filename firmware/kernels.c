/* Int8 kernels of RNNPool-Face (C99, portable; DSP-extension paths (SMLAD, SMLABB, SXTB16, SSAT, LDRD)
 * when __ARM_FEATURE_DSP is defined, e.g. Cortex-M4). Every function mirrors detector/export/int8_ref.py:
 * integer sums are exact, so the order of accumulation (scalar or SIMD) does not change a single bit.
 * Assumptions of the portable path: little-endian (int16 vectors are reinterpreted as pair words with
 * memcpy) and arithmetic >> of negative integers (gcc, clang on x86-64, AArch64, Arm). */
#include "rnnpool_int8.h"

#include <string.h>

#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
#include <arm_acle.h>
#define RP_SIMD 1
#else
#define RP_SIMD 0
#endif

/* acc + lo16(a) lo16(b) + hi16(a) hi16(b) (the M4's SMLAD; portable C otherwise) */
#if RP_SIMD
#define SMLAD(a, b, acc) __smlad((a), (b), (acc))
#else
static inline int32_t lo16(uint32_t v)
{
    return (int32_t)((v & 0xFFFFu) ^ 0x8000u) - 0x8000;
}
#define SMLAD(a, b, acc) ((acc) + lo16(a) * lo16(b) + lo16((a) >> 16) * lo16((b) >> 16))
#endif

#define LO(v) ((uint32_t)(v))         /* words of a doubleword (one LDRD loads both) */
#define HI(v) ((uint32_t)((v) >> 32))

/* lo, hi = the two words of the doubleword p[i] (forced LDRD: gcc otherwise splits 64-bit loads) */
#if RP_SIMD
#define LDRD(p, i, lo, hi)                                                                                         \
    __asm("ldrd %0, %1, [%2, %3]" : "=r"(lo), "=r"(hi) : "r"(p), "I"(8 * (i)), "m"((p)[i]))
#else
#define LDRD(p, i, lo, hi) ((lo) = LO((p)[i]), (hi) = HI((p)[i]))
#endif

/* acc + lo16(a) lo16(b) (SMLABB) and acc + hi16(a) hi16(b) (SMLATT) */
#if RP_SIMD
#define SMLABB(a, b, acc) __smlabb((a), (b), (acc))
#define SMLATT(a, b, acc) __smlatt((a), (b), (acc))
#else
#define SMLABB(a, b, acc) ((acc) + lo16(a) * lo16(b))
#define SMLATT(a, b, acc) ((acc) + lo16((a) >> 16) * lo16((b) >> 16))
#endif

/* high word of the 64-bit product (SMMUL): floor(a * b / 2^32); >> on a negative int64 is arithmetic
 * on every compiler we build with (gcc, clang). */
static inline int32_t smmul(int32_t a, int32_t b)
{
#if RP_SIMD
    int32_t r;
    __asm("smmul %0, %1, %2" : "=r"(r) : "r"(a), "r"(b));
    return r;
#else
    return (int32_t)(((int64_t)a * b) >> 32);
#endif
}

/* c + hi32(a * b) (SMMLA) */
static inline int32_t smmla(int32_t a, int32_t b, int32_t c)
{
#if RP_SIMD
    int32_t r;
    __asm("smmla %0, %1, %2, %3" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
#else
    return c + (int32_t)(((int64_t)a * b) >> 32);
#endif
}

/* round(acc * m / 2^n), round half up = floor((acc * m + 2^(n-1)) / 2^n), computed exactly as
 * (hi32(acc' * m) + 2^(n'-33)) >> (n'-32) with n' = max(n, 33), acc' = acc * 2^(n'-n); the generator
 * checks that acc' fits int32 for every layer. */
static inline int32_t rq(int32_t acc, int32_t m, int n)
{
    if (n < 33) {
        acc *= (int32_t)1 << (33 - n);
        n = 33;
    }
    return (smmul(acc, m) + ((int32_t)1 << (n - 33))) >> (n - 32);
}

/* per-channel requantisation from the (m | rnd << 32), (sh | 0) doublewords the generator writes (n >= 33):
 * rq(acc) = (hi32(acc m) + rnd) >> sh with rnd = 2^(n-33), sh = n - 32 */
static inline int32_t rqc(int32_t acc, const uint64_t *r, int c)
{
    uint32_t m, rnd, sh, pad;
    LDRD(r + 2 * c, 0, m, rnd);
    LDRD(r + 2 * c, 1, sh, pad);
    (void)pad;
    return smmla(acc, (int32_t)m, (int32_t)rnd) >> sh;
}

#if RP_SIMD
#define SAT_U7(v) __usat((v), 7) /* [0, 127]: ReLU / ReLU6 outputs (their scale maps 6.0 to >= 127) */
#define SAT_S8(v) __ssat((v), 8) /* [-128, 127] */
#else
#define SAT_U7(v) clampi((v), 0, 127)
#define SAT_S8(v) clampi((v), -128, 127)
#endif

static inline int32_t clampi(int32_t v, int32_t lo, int32_t hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

static inline uint32_t load32(const void *p)
{
    uint32_t v;
    memcpy(&v, p, 4); /* a single LDR on Cortex-M4 (unaligned access allowed) */
    return v;
}

#if RP_SIMD
static inline uint32_t ror8(uint32_t v)
{
    return (v >> 8) | (v << 24); /* folds into SXTB16's rotate */
}
#endif

/* ---------------------------------------------------------------- FastGRNN */

#define RP_H RP_HIDDEN /* hidden size of both cells, fixed at compile time so that loops unroll */

#if RP_SIMD
#define LUT_INDEX(v) __usat((v) >> 4, 12)
#define SAT16(v) __ssat((v), 16)
#else
#define LUT_INDEX(v) clampi((v) >> 4, 0, 4095)
#define SAT16(v) clampi((v), -32768, 32767)
#endif

/* Gate and state update of all units from their accumulators acc = W x + U h; q holds per unit (m, bg) and
 * (bu, 0) (see cell_t). g * cc + 2^17 fits int32 because zeta <= 32767 and nu <= 32766.
 * zg packs sigmoid z (low half) and g (high half). */
static void cell_update(const cell_t *c, const int32_t *acc, int16_t *h)
{
    const uint64_t *q = c->consts;
    const uint32_t *zg = c->zg_lut;
    const int32_t rnd = c->rnd, sh = c->sh;
    for (int k = 0; k < RP_H; k++, q += 2) {
        uint32_t m, bg, bu, pad;
        LDRD(q, 0, m, bg);
        LDRD(q, 1, bu, pad);
        (void)pad;
        int32_t pre = smmla(acc[k], (int32_t)m, rnd) >> sh;
        uint32_t e = zg[LUT_INDEX(pre + (int32_t)bg)];
        int32_t cc = rp_tanh_lut[LUT_INDEX(pre + (int32_t)bu)];
        int32_t g = (int32_t)(e >> 16);
        int32_t v = ((g * cc + (1 << 17)) >> 18) + (SMLABB(e, (uint32_t)(uint16_t)h[k], 1 << 14) >> 15);
        h[k] = (int16_t)SAT16(v);
    }
}

/* a + U row . h: the row is 4 doublewords of int16 pairs, h (8 x int16) arrives as 4 doublewords in registers */
static inline int32_t uh_row(const uint64_t *u, uint64_t h01, uint64_t h23, uint64_t h45, uint64_t h67, int32_t a)
{
    uint32_t p0, p1;
    LDRD(u, 0, p0, p1);
    a = SMLAD(p0, LO(h01), a);
    a = SMLAD(p1, HI(h01), a);
    LDRD(u, 1, p0, p1);
    a = SMLAD(p0, LO(h23), a);
    a = SMLAD(p1, HI(h23), a);
    LDRD(u, 2, p0, p1);
    a = SMLAD(p0, LO(h45), a);
    a = SMLAD(p1, HI(h45), a);
    LDRD(u, 3, p0, p1);
    a = SMLAD(p0, LO(h67), a);
    return SMLAD(p1, HI(h67), a);
}

/* acc[k] += U[k] . h for all units; U rows are 4 doublewords of int16 pairs, h stays in registers */
static void cell_uh(const uint64_t *u, const int16_t *h, int32_t *acc)
{
    uint64_t hq[4];
    memcpy(hq, h, sizeof hq); /* little-endian: word i = (h[2i], h[2i+1]) */
    const uint64_t h01 = hq[0], h23 = hq[1], h45 = hq[2], h67 = hq[3];
    for (int k = 0; k < RP_H; k++, u += 4) {
        acc[k] = uh_row(u, h01, h23, h45, h67, acc[k]);
    }
}

/* rnn2 step: h <- cell(h) with precomputed W x accumulators wx[RP_H] */
static void cell_step_acc(const cell_t *c, const int32_t *wx, int16_t *h, int first)
{
    int32_t acc[RP_H];
    memcpy(acc, wx, sizeof acc);
    if (!first) /* U h = 0 from the zero state */
        cell_uh(c->U, h, acc);
    cell_update(c, acc, h);
}

/* rnn1 step on a 4-channel int8 pixel: h <- cell(h, x). W x and U h share one accumulator per unit (uh_row) rather
 * than calling cell_uh: that saves a store and a reload of acc[] per unit in the hottest loop of the network (rnn1 is
 * most of RNNPool's instructions). */
static void cell_step_px(const cell_t *c, const int8_t *px, int16_t *h, int first)
{
    int32_t acc[RP_H];
    int16_t xv[4] = {px[0], px[1], px[2], px[3]};
    uint32_t x01, x23;
    memcpy(&x01, xv, 4);
    memcpy(&x23, xv + 2, 4);
    const uint64_t *w = c->W64; /* one doubleword (2 words) per unit */
    if (first) { /* U h = 0 from the zero state */
        for (int k = 0; k < RP_H; k++) {
            uint32_t w0, w1;
            LDRD(w + k, 0, w0, w1);
            acc[k] = SMLAD(w1, x23, SMLAD(w0, x01, 0));
        }
    } else {
        uint64_t hq[4];
        memcpy(hq, h, sizeof hq); /* little-endian: word i = (h[2i], h[2i+1]) */
        const uint64_t h01 = hq[0], h23 = hq[1], h45 = hq[2], h67 = hq[3];
        const uint64_t *u = c->U;
        for (int k = 0; k < RP_H; k++, u += 4) {
            uint32_t p0, p1;
            LDRD(w + k, 0, p0, p1);
            acc[k] = uh_row(u, h01, h23, h45, h67, SMLAD(p1, x23, SMLAD(p0, x01, 0)));
        }
    }
    cell_update(c, acc, h);
}

/* rnn1 over `steps` pixels (stride bytes apart) from the zero state */
static void cell_run_px(const cell_t *c, const int8_t *x, int stride, int steps, int16_t *h)
{
    memset(h, 0, RP_H * sizeof(int16_t));
    for (int t = 0; t < steps; t++)
        cell_step_px(c, x + t * stride, h, t == 0);
}

/* rnn2 over precomputed accumulators (steps x RP_H), forward (dir 1) or backward (dir -1) */
static void cell_run_acc(const cell_t *c, const int32_t *wx, int steps, int dir, int16_t *h)
{
    memset(h, 0, RP_H * sizeof(int16_t));
    for (int t = 0; t < steps; t++)
        cell_step_acc(c, wx + (dir > 0 ? t : steps - 1 - t) * RP_H, h, t == 0);
}

/* W x accumulators of rnn2 for one int16 summary vector (W has the shape of U) */
static void cell_wx16(const cell_t *c, const int16_t *x, int32_t *acc)
{
    memset(acc, 0, RP_H * sizeof(int32_t));
    cell_uh(c->W64, x, acc);
}

/* ---------------------------------------------------------------- stem + RNNPool (streamed) */

#define RP_PATCH 8
#define RP_STRIDE 4

typedef struct {
    int hs, ws, oh, ow, padt, padl, wp;
} rp_geom_t;

static int pad_before(int size, int out)
{
    int total = (out - 1) * RP_STRIDE + RP_PATCH - size;
    return total > 0 ? total / 2 : 0;
}

static rp_geom_t rp_geom(int h, int w)
{
    rp_geom_t g;
    g.hs = (h + 1) / 2;
    g.ws = (w + 1) / 2;
    g.oh = (g.hs + RP_STRIDE - 1) / RP_STRIDE;
    g.ow = (g.ws + RP_STRIDE - 1) / RP_STRIDE;
    g.padt = pad_before(g.hs, g.oh);
    g.padl = pad_before(g.ws, g.ow);
    g.wp = (g.ow - 1) * RP_STRIDE + RP_PATCH;
    return g;
}

static int32_t align4(int32_t v)
{
    return (v + 3) & ~3;
}

int32_t rnnpool_stem_scratch_bytes(int h, int w, const stem_t *s, const rnnpool_t *r)
{
    rp_geom_t g = rp_geom(h, w);
    return align4(RP_PATCH * g.wp * s->cout)                   /* stem ring: 8 padded rows */
           + RP_PATCH * g.ow * r->r1.hid * 2                     /* row summaries of those rows */
           + g.wp * r->r1.hid * 2;                               /* column summaries of a patch row */
}

static inline uint32_t pack16(int32_t lo, int32_t hi) /* PKHBT */
{
    return (uint32_t)(lo & 0xFFFF) | ((uint32_t)hi << 16);
}

/* One stem output row r (padded columns zero) into dst (wp x cout). The 9 taps v = 2p - 255 (0 outside the
 * frame) are packed as 5 int16 pairs (v00 v01)(v02 v10)(v11 v12)(v20 v21)(v22 -), the weights likewise. */
static void stem_row(const uint8_t *frame, int h, int w, int r, const stem_t *s, const rp_geom_t *g, int8_t *dst)
{
    const int C = s->cout;
    memset(dst, 0, (size_t)g->wp * C);
    if (r < 0 || r >= g->hs)
        return;
    const int rows_ok = 2 * r - 1 >= 0 && 2 * r + 1 < h;
    for (int x = 0; x < g->ws; x++) {
        int32_t v[9];
        if (rows_ok && x > 0 && 2 * x + 1 < w) {
            const uint8_t *p = frame + (2 * r - 1) * w + 2 * x - 1;
            v[0] = 2 * p[0] - 255, v[1] = 2 * p[1] - 255, v[2] = 2 * p[2] - 255;
            p += w;
            v[3] = 2 * p[0] - 255, v[4] = 2 * p[1] - 255, v[5] = 2 * p[2] - 255;
            p += w;
            v[6] = 2 * p[0] - 255, v[7] = 2 * p[1] - 255, v[8] = 2 * p[2] - 255;
        } else {
            for (int ky = 0; ky < 3; ky++) {
                int iy = 2 * r - 1 + ky;
                for (int kx = 0; kx < 3; kx++) {
                    int ix = 2 * x - 1 + kx;
                    v[ky * 3 + kx] = (iy < 0 || iy >= h || ix < 0 || ix >= w) ? 0 : 2 * (int32_t)frame[iy * w + ix] - 255;
                }
            }
        }
        const uint32_t p0 = pack16(v[0], v[1]), p1 = pack16(v[2], v[3]), p2 = pack16(v[4], v[5]);
        const uint32_t p3 = pack16(v[6], v[7]), p4 = (uint32_t)v[8];
        int8_t *o = dst + (x + g->padl) * C;
        const uint32_t *wc = s->w;
        for (int c = 0; c < C; c++, wc += 5) {
            int32_t acc = SMLAD(wc[0], p0, s->b[c]);
            acc = SMLAD(wc[1], p1, acc);
            acc = SMLAD(wc[2], p2, acc);
            acc = SMLAD(wc[3], p3, acc);
            acc = SMLAD(wc[4], p4, acc); /* high weight half is 0 */
            o[c] = (int8_t)SAT_U7(rqc(acc, s->rq, c));
        }
    }
}

void rnnpool_stem_run(uint8_t *frame, int h, int w, const stem_t *s, const rnnpool_t *r, void *scratch)
{
    const rp_geom_t g = rp_geom(h, w);
    const int C = s->cout, H1 = RP_H, H2 = RP_H;
    int8_t *ring = (int8_t *)scratch;
    int16_t *rows = (int16_t *)(ring + align4(RP_PATCH * g.wp * C));
    int16_t *cols = rows + RP_PATCH * g.ow * H1;
    int32_t prer[RP_PATCH * RP_H], prec[RP_PATCH * RP_H];
    int16_t hv[RP_H], zsum[RP_H];
    static const int8_t zero_px[RP_PATCH * RP_MAXIN];
    /* the rnn1 summary of 8 zero pixels: every segment of a padding row or column */
    cell_run_px(&r->r1, zero_px, C, RP_PATCH, zsum);

    for (int i = 0; i < g.oh; i++) {
        /* new padded stem rows of this patch row: their stem output and row summaries */
        for (int R = (i == 0 ? 0 : RP_STRIDE * i + RP_PATCH - RP_STRIDE); R < RP_STRIDE * i + RP_PATCH; R++) {
            int8_t *slot = ring + (R % RP_PATCH) * g.wp * C;
            const int r_stem = R - g.padt, pad_row = r_stem < 0 || r_stem >= g.hs;
            stem_row(frame, h, w, r_stem, s, &g, slot);
            for (int j = 0; j < g.ow; j++) {
                int16_t *sum = rows + ((R % RP_PATCH) * g.ow + j) * H1;
                if (pad_row)
                    memcpy(sum, zsum, sizeof zsum);
                else
                    cell_run_px(&r->r1, slot + RP_STRIDE * j * C, C, RP_PATCH, sum);
            }
        }
        /* column summaries over the 8 rows of this patch row */
        for (int c = 0; c < g.wp; c++) {
            int16_t h1[RP_H];
            if (c < g.padl || c >= g.padl + g.ws) { /* padding column */
                memcpy(cols + c * H1, zsum, sizeof zsum);
                continue;
            }
            memset(h1, 0, sizeof h1);
            for (int t = 0; t < RP_PATCH; t++)
                cell_step_px(&r->r1, ring + ((RP_STRIDE * i + t) % RP_PATCH) * g.wp * C + c * C, h1, t == 0);
            memcpy(cols + c * H1, h1, sizeof h1);
        }
        /* every patch: rnn2 over its 8 row and 8 column summaries, both directions; the output
         * row i (ow x 4 H2 bytes) overwrites input rows already consumed by the stem ring */
        int8_t *out = (int8_t *)frame + i * g.ow * 4 * H2;
        for (int j = 0; j < g.ow; j++) {
            for (int t = 0; t < RP_PATCH; t++) {
                cell_wx16(&r->r2, rows + (((RP_STRIDE * i + t) % RP_PATCH) * g.ow + j) * H1, prer + t * H2);
                cell_wx16(&r->r2, cols + (RP_STRIDE * j + t) * H1, prec + t * H2);
            }
            int8_t *o = out + j * 4 * H2;
            for (int part = 0; part < 4; part++) {
                cell_run_acc(&r->r2, part < 2 ? prer : prec, RP_PATCH, (part & 1) ? -1 : 1, hv);
                for (int k = 0; k < H2; k++)
                    o[part * H2 + k] = (int8_t)clampi(rq(hv[k], r->om, r->on), -128, 127);
            }
        }
    }
}

/* ---------------------------------------------------------------- MBConv (streamed) */

int32_t mbconv_scratch_bytes(int h, int w, const mbconv_t *m)
{
    (void)h;
    return align4(3 * (w + 2) * m->dw.c); /* the expansion ring */
}

/* the 4 int8 at p as two int16-pair words (x0, x2) and (x1, x3) */
static inline void pairs4(const int8_t *p, uint32_t *w02, uint32_t *w13)
{
#if RP_SIMD
    uint32_t v = load32(p);
    *w02 = (uint32_t)__sxtb16(v);
    *w13 = (uint32_t)__sxtb16(ror8(v));
#else
    *w02 = (uint16_t)p[0] | ((uint32_t)(uint16_t)p[2] << 16);
    *w13 = (uint16_t)p[1] | ((uint32_t)(uint16_t)p[3] << 16);
#endif
}

/* int8 -> int16 pairs in the order of SXTB16: every 4 channels give the words (x0, x2), (x1, x3); n % 4 == 0.
 * pw and head weights are stored as words in the same pair order, so their dot products match. */
static void widen(const int8_t *x, int n, uint64_t *out)
{
    for (int i = 0; i < n; i += 4) {
        uint32_t w02, w13;
        pairs4(x + i, &w02, &w13);
        out[i / 4] = w02 | ((uint64_t)w13 << 32);
    }
}

/* acc[j] += w_j . x for output channels in groups of 4 (then 2). x holds cin/4 doublewords (4 channels as
 * two int16-pair words, see widen()); w holds, per group and input word, the group's weight words, two per
 * doubleword, so every load is one LDRD */
static void mac_groups(const uint64_t *w, const uint64_t *x, int nq, int cout, int32_t *acc)
{
    int co = 0;
    for (; co + 4 <= cout; co += 4) {
        int32_t a0 = acc[co], a1 = acc[co + 1], a2 = acc[co + 2], a3 = acc[co + 3];
        for (int j = 0; j < nq; j++, w += 4) {
            uint32_t xa, xb, p0, p1;
            LDRD(x + j, 0, xa, xb);
            LDRD(w, 0, p0, p1);
            a0 = SMLAD(p0, xa, a0);
            a1 = SMLAD(p1, xa, a1);
            LDRD(w, 1, p0, p1);
            a2 = SMLAD(p0, xa, a2);
            a3 = SMLAD(p1, xa, a3);
            LDRD(w, 2, p0, p1);
            a0 = SMLAD(p0, xb, a0);
            a1 = SMLAD(p1, xb, a1);
            LDRD(w, 3, p0, p1);
            a2 = SMLAD(p0, xb, a2);
            a3 = SMLAD(p1, xb, a3);
        }
        acc[co] = a0, acc[co + 1] = a1, acc[co + 2] = a2, acc[co + 3] = a3;
    }
    for (; co + 2 <= cout; co += 2) {
        int32_t a0 = acc[co], a1 = acc[co + 1];
        for (int j = 0; j < nq; j++, w += 2) {
            uint64_t xv = x[j], p = w[0], q = w[1];
            a0 = SMLAD(LO(p), LO(xv), a0);
            a1 = SMLAD(HI(p), LO(xv), a1);
            a0 = SMLAD(LO(q), HI(xv), a0);
            a1 = SMLAD(HI(q), HI(xv), a1);
        }
        acc[co] = a0, acc[co + 1] = a1;
    }
}

static void pw_pixel(const pw_t *p, const uint64_t *x, int32_t *acc)
{
    memcpy(acc, p->b, (size_t)p->cout * sizeof(int32_t));
    mac_groups(p->w, x, p->cin / 4, p->cout, acc);
}

static void expand_row(const int8_t *in, int w, const pw_t *p, int8_t *dst)
{
    int32_t acc[RP_MAXC];
    uint64_t xw[RP_MAXC / 4];
    for (int x = 0; x < w; x++) {
        widen(in + x * p->cin, p->cin, xw);
        pw_pixel(p, xw, acc);
        int8_t *o = dst + x * p->cout;
        for (int co = 0; co < p->cout; co++)
            o[co] = (int8_t)SAT_U7(rqc(acc[co], p->rq, co));
    }
}

/* one row of 3 taps of the depthwise conv for 4 channels: p = leftmost tap pixel, wk = 3 weight doublewords */
#define DW_ROW3(p, C, wk, a0, a1, a2, a3)                                                                          \
    do {                                                                                                           \
        uint32_t v02, v13;                                                                                         \
        pairs4((p), &v02, &v13);                                                                                   \
        uint32_t w02, w13;                                                                                         \
        LDRD(wk, 0, w02, w13);                                                                                     \
        a0 = SMLABB(v02, w02, a0), a2 = SMLATT(v02, w02, a2);                                                      \
        a1 = SMLABB(v13, w13, a1), a3 = SMLATT(v13, w13, a3);                                                      \
        pairs4((p) + (C), &v02, &v13);                                                                             \
        LDRD(wk, 1, w02, w13);                                                                                     \
        a0 = SMLABB(v02, w02, a0), a2 = SMLATT(v02, w02, a2);                                                      \
        a1 = SMLABB(v13, w13, a1), a3 = SMLATT(v13, w13, a3);                                                      \
        pairs4((p) + 2 * (C), &v02, &v13);                                                                         \
        LDRD(wk, 2, w02, w13);                                                                                     \
        a0 = SMLABB(v02, w02, a0), a2 = SMLATT(v02, w02, a2);                                                      \
        a1 = SMLABB(v13, w13, a1), a3 = SMLATT(v13, w13, a3);                                                      \
    } while (0)

/* depthwise output pixel x of an output row whose 3 input rows are row[0..2] (NULL outside the map; each
 * ring row has one zero pixel on both sides); 4 channels at a time as int16 pairs, one multiply-accumulate per
 * lane (SMLABB/SMLATT) */
static void dw_pixel(const int8_t *const row[3], int x, const dw_t *d, int8_t *dst)
{
    const int C = d->c, off = d->stride * x * C; /* padded column s*x = input column s*x - 1 */
    const uint64_t *wt = d->w;
    for (int c = 0; c < C; c += 4, wt += 9) {
        int32_t a0 = d->b[c], a1 = d->b[c + 1], a2 = d->b[c + 2], a3 = d->b[c + 3];
        if (row[0])
            DW_ROW3(row[0] + off + c, C, wt, a0, a1, a2, a3);
        DW_ROW3(row[1] + off + c, C, wt + 3, a0, a1, a2, a3);
        if (row[2])
            DW_ROW3(row[2] + off + c, C, wt + 6, a0, a1, a2, a3);
        dst[c] = (int8_t)SAT_U7(rqc(a0, d->rq, c));
        dst[c + 1] = (int8_t)SAT_U7(rqc(a1, d->rq, c + 1));
        dst[c + 2] = (int8_t)SAT_U7(rqc(a2, d->rq, c + 2));
        dst[c + 3] = (int8_t)SAT_U7(rqc(a3, d->rq, c + 3));
    }
}

void mbconv_run(int8_t *act, int h, int w, const mbconv_t *m, void *scratch)
{
    const int s = m->dw.stride, ch = m->dw.c;
    const int cin = m->expand ? m->expand->cin : ch, cout = m->project.cout;
    const int ho = (h + s - 1) / s, wo = (w + s - 1) / s;
    const int rs = (w + 2) * ch; /* ring row: w pixels plus a zero pixel on each side */
    int8_t *ring = (int8_t *)scratch;
    int8_t dpx[RP_MAXC]; /* one depthwise output pixel */
    int32_t acc[RP_MAXC];
    uint64_t xw[RP_MAXC / 4];
    int next = 0; /* next input row to expand */
    memset(ring, 0, (size_t)3 * rs); /* the zero border pixels */
    for (int y = 0; y < ho; y++) {
        int last = s * y + 1 < h ? s * y + 1 : h - 1;
        for (; next <= last; next++) {
            if (m->expand)
                expand_row(act + next * w * cin, w, m->expand, ring + (next % 3) * rs + ch);
            else
                memcpy(ring + (next % 3) * rs + ch, act + next * w * cin, (size_t)w * ch);
        }
        const int8_t *row[3];
        for (int ky = 0; ky < 3; ky++) {
            int iy = s * y - 1 + ky;
            row[ky] = (iy < 0 || iy >= h) ? 0 : ring + (iy % 3) * rs;
        }
        /* output row y lands at or below input bytes already expanded (checked by the generator) */
        int8_t *o = act + y * wo * cout;
        for (int x = 0; x < wo; x++) {
            dw_pixel(row, x, &m->dw, dpx);
            widen(dpx, ch, xw);
            pw_pixel(&m->project, xw, acc);
            int8_t *ox = o + x * cout;
            for (int co = 0; co < cout; co++) {
                int32_t v = rqc(acc[co], m->project.rq, co);
                if (m->residual)
                    v += rq(ox[co], m->rm, m->rn); /* same pixel of the input row: read before write */
                ox[co] = (int8_t)SAT_S8(v);
            }
        }
    }
}

/* ---------------------------------------------------------------- detection head */

int32_t head_scratch_bytes(int h, int w, const head_t *hd)
{
    (void)h;
    return 3 * (w + 2) * (hd->cin / 4) * 8;
}

/* widened (int16 pair) copy of input row iy into a ring slot with one zero pixel on each side */
static void head_widen_row(const int8_t *act, int w, int cin, int iy, uint64_t *slot)
{
    const int nq = cin / 4;
    memset(slot, 0, (size_t)nq * 8);
    memset(slot + (w + 1) * nq, 0, (size_t)nq * 8);
    for (int x = 0; x < w; x++)
        widen(act + (iy * w + x) * cin, cin, slot + (x + 1) * nq);
}

void head_run(const int8_t *act, int h, int w, const head_t *hd, int index, emit_fn emit, void *ctx, void *scratch)
{
    int32_t acc[RP_MAXC];
    const int cin = hd->cin, cout = hd->cout, nq = cin / 4, rs = (w + 2) * nq;
    uint64_t *ring = (uint64_t *)scratch; /* 3 widened rows, row r in slot r % 3 */
    head_widen_row(act, w, cin, 0, ring);
    for (int y = 0; y < h; y++) {
        if (y + 1 < h)
            head_widen_row(act, w, cin, y + 1, ring + ((y + 1) % 3) * rs);
        for (int x = 0; x < w; x++) {
            memcpy(acc, hd->b, (size_t)cout * sizeof(int32_t));
            for (int ky = 0; ky < 3; ky++) {
                int iy = y - 1 + ky;
                if (iy < 0 || iy >= h)
                    continue;
                /* the 3 taps of this kernel row are 3 consecutive widened pixels: one dot of 3 cin */
                mac_groups(hd->w + ky * cout * 3 * nq, ring + (iy % 3) * rs + x * nq, 3 * nq, cout, acc);
            }
            emit(ctx, index, acc, cout);
        }
    }
}
