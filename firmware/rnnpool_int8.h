/* Int8 kernels of RNNPool-Face (C99). Arithmetic mirrors detector/export/int8_ref.py bit for bit.
 * Activations are int8 HWC, symmetric (zero point 0); accumulators int32; requantisation
 * rq(acc) = (acc * m + 2^(n-1)) >> n with a Q31 multiplier m and a total shift n (arithmetic shift). */
#ifndef RNNPOOL_INT8_H
#define RNNPOOL_INT8_H

#include <stdint.h>

#ifndef RP_HIDDEN
#define RP_HIDDEN 16 /* RNNPool hidden size (both cells); the generator checks the model against it */
#endif
#define RP_MAXIN 16  /* largest RNNPool input channel count */
#define RP_MAXC 128  /* largest convolution channel count */

/* Stem: 3x3 stride-2 conv on v = 2p - 255 (zero padding), ReLU, 1 -> cout channels. */
typedef struct {
    const uint32_t *w;    /* (cout, 5) int16 pair words (w00 w01)(w02 w10)(w11 w12)(w20 w21)(w22 0) */
    const int32_t *b;     /* (cout) */
    const uint64_t *rq;   /* (cout, 2) requantisation doublewords (m | rnd << 32), (sh), see rqc() */
    int cout;
} stem_t;

/* FastGRNN cell. pre = rq(W x + U h) in Q12 with W (int16, in the accumulator units of U h) and U (int8 values),
 * both stored as int16 pairs in words; rq(acc) = floor((acc m_k + 2^(n-1)) / 2^n) = (hi32(acc m_k) + rnd) >> sh
 * with one shift for all units: rnd = 2^(n-33), sh = n - 32 (n >= 33). consts holds per unit (m_k, bg), (bu, 0),
 * bg and bu being the Q12 biases + 8 + 32768 so that the table index is usat((pre + b) >> 4, 12). */
typedef struct {
    const uint32_t *W;      /* rnn1: (hid, in / 2) words of int16 pairs */
    const uint64_t *W64;    /* (hid, in / 4) doublewords (same values as W) */
    const uint64_t *U;      /* (hid, hid / 4) doublewords: words (lo first) of int16 pairs */
    const uint64_t *consts; /* (hid, 2) doublewords */
    const uint32_t *zg_lut; /* (4096): sigmoid Q15 | g << 16, g = ((zeta (32768 - sigmoid) + 2^14) >> 15) + nu */
    int32_t rnd, sh;
    int in, hid;
} cell_t;

typedef struct {
    cell_t r1, r2;
    int32_t om; int on;   /* Q12 state -> int8 output */
} rnnpool_t;

/* Pointwise (1x1) conv: out = sat(rq(b + w . x)): [0, 127] for the expansion (ReLU6), [-128, 127] for the
 * linear projection. */
typedef struct {
    const uint64_t *w;    /* packed int16 pairs, see mac_groups() in kernels.c */
    const int32_t *b;
    const uint64_t *rq;   /* (cout, 2) requantisation doublewords */
    int cin, cout;
} pw_t;

/* Depthwise 3x3 conv, zero padding 1, stride 1 or 2, ReLU6 output in [0, 127]. */
typedef struct {
    const uint64_t *w;    /* [c/4][3x3 tap] doublewords of int16 pairs (w_c0, w_c2) | (w_c1, w_c3) << 32 */
    const int32_t *b;
    const uint64_t *rq;   /* (c, 2) requantisation doublewords */
    int c, stride;
} dw_t;

/* MBConv: [expand pw ReLU6] -> dw ReLU6 -> project pw (+ rq(x) residual). */
typedef struct {
    const pw_t *expand;   /* NULL: no expansion */
    dw_t dw;
    pw_t project;
    int residual;
    int32_t rm; int rn;   /* residual requantisation */
} mbconv_t;

/* Detection head: one 3x3 conv, zero padding 1, outputs int32 accumulators [cls..., box(4)]. */
typedef struct {
    const uint64_t *w;    /* per kernel row, the packed pairs of mac_groups() over (kx, cin) */
    const int32_t *b;
    int cin, cout;
} head_t;

/* Receives the cout int32 outputs of one head location (row-major order within a head). */
typedef void (*emit_fn)(void *ctx, int head, const int32_t *v, int n);

extern const int16_t rp_sigmoid_lut[4096];
extern const int16_t rp_tanh_lut[4096];

/* Bytes of scratch each streamed stage needs (after the frame in the arena). */
int32_t rnnpool_stem_scratch_bytes(int h, int w, const stem_t *s, const rnnpool_t *r);
int32_t mbconv_scratch_bytes(int h, int w, const mbconv_t *m);

/* Stem + RNNPool, streamed patch row by patch row: frame (h x w uint8) is overwritten in place by the
 * (h/8) x (w/8) x (4 * hid2) int8 output. scratch: rnnpool_stem_scratch_bytes(), 4-byte aligned. */
void rnnpool_stem_run(uint8_t *frame, int h, int w, const stem_t *s, const rnnpool_t *r, void *scratch);

/* One MBConv block, in place on act (h x w x cin -> ceil(h/s) x ceil(w/s) x cout), expansion row by row. */
void mbconv_run(int8_t *act, int h, int w, const mbconv_t *m, void *scratch);

/* Head on a full h x w x cin map; emit() once per location. scratch: head_scratch_bytes(). */
int32_t head_scratch_bytes(int h, int w, const head_t *hd);
void head_run(const int8_t *act, int h, int w, const head_t *hd, int index, emit_fn emit, void *ctx, void *scratch);

#endif
