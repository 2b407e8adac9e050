/* Matrix-vector products for the decode step: y[M,N] = x[M,K] . W[N,K]^T (+ bias), float32 in
 * and out, the weights stored as bfloat16, int8 (one scale per row) or int4 (blocks of 128 with
 * their own step and zero point, below). (float32 weights stay with
 * PyTorch's matmul, which streams them as fast as this code does: measured, BENCHMARKS.md.)
 *
 * Why: a decode step at batch 1-8 reads every weight once and does two flops with it, so its
 * speed is the speed weights stream from memory. Weights are widened to float32 in registers
 * and never written back; activations stay float32 (no bfloat16 round trip, as PyTorch's packed
 * CPU kernels need). Rows of W are split across OpenMP threads. With one or two activation rows
 * (a step, with or without guidance) each thread sweeps its rows start to end as one sequential
 * stream, fetched ahead in software; with more (variations) a tile of rows stays in registers and
 * L1 while every activation row meets it, because there the arithmetic, not memory, is the bound.
 *
 * Built by model/kernels/gemv.py with the machine's own flags (-march=native): the vector width is the
 * machine's (LANES floats, vec.h). The int8 and int4 products on integer dot products live in
 * arch/ (one file per instruction set, int_kernels.h); int8 runs there where one is built in
 * (MUSICBRIDGE_KERNELS=float asks for the widening kernel below instead).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "kernels.h"
#include "int_kernels.h"
#include "vec.h"

#if LANES == 16
#define NT 4
#else
#define NT 2
#endif
#define MT 2

int mb_lanes(void) { return LANES; }

/* An output of the dense kernels from its sum: every path ends here, so that a row comes out the
 * same whichever path its batch took. */
static inline __attribute__((always_inline)) float dense_out(float v, const float *scale, const float *bias,
                                                             int n) {
    if (scale) v *= scale[n];
    if (bias) v += bias[n];
    return v;
}

/* A tile: NTV weight rows [n, n+nt) against MTV activation rows [m, m+mt), the shape fixed at
 * compile time; `kind` (constant at each call) picks the weight format. A tile narrower than its
 * shape (the edges) runs the same code. */

/* One function per tile shape, so that every array below has its exact size and the
 * accumulators stay in registers (arrays sized for the largest shape and partly used were
 * kept in memory: measured 2.5x slower). The weight format is switched on inside the
 * parallel loop, where it is a constant to each inlined tile (outside, OpenMP's outlined body
 * would test it for every vector). */
#define DEFINE_SHAPE(NAME, NTV, MTV)                                                              \
static inline __attribute__((always_inline)) void NAME##_tile(int kind, const float *xm, int mt, int K, \
                                                              const void *w, int n, int nt,       \
                                                              float out[NTV][MTV]) {              \
    vf acc[NTV][MTV];                                                                             \
    for (int r = 0; r < NTV; r++)                                                                 \
        for (int c = 0; c < MTV; c++) acc[r][c] = (vf){0};                                        \
    for (int k = 0; k < K; k += LANES) {                                                          \
        vf xv[MTV];                                                                               \
        for (int c = 0; c < MTV; c++) xv[c] = c < mt ? vload(xm + (size_t)c * K + k) : (vf){0};  \
        for (int r = 0; r < NTV; r++) {                                                           \
            if (r >= nt) break;                                                                   \
            size_t off = (size_t)(n + r) * K + k;                                                 \
            vf wv;                                                                                \
            if (kind == MB_I8) {                                                                  \
                __builtin_prefetch((const int8_t *)w + off + (size_t)NTV * K);                    \
                wv = widen_i8((const int8_t *)w + off);                                           \
            } else if (kind == MB_BF16) {                                                         \
                __builtin_prefetch((const uint16_t *)w + off + (size_t)NTV * K);                  \
                wv = vload_bf16((const uint16_t *)w + off);                                       \
            } else {                                                                              \
                __builtin_prefetch((const float *)w + off + (size_t)NTV * K);                     \
                wv = vload((const float *)w + off);                                              \
            }                                                                                     \
            for (int c = 0; c < MTV; c++) acc[r][c] += wv * xv[c];                                \
        }                                                                                         \
    }                                                                                             \
    for (int r = 0; r < NTV; r++)                                                                 \
        for (int c = 0; c < MTV; c++) out[r][c] = vsum(acc[r][c]);                                \
}                                                                                                 \
static void NAME(int kind, const float *x, int M, int K, const void *w, const float *scale,       \
                 const float *bias, float *y, int N) {                                            \
    int tiles = (N + NTV - 1) / NTV;                                                              \
    _Pragma("omp parallel for schedule(static)")                                                  \
    for (int t = 0; t < tiles; t++) {                                                             \
        int n = t * NTV, nt = N - n < NTV ? N - n : NTV;                                          \
        for (int m = 0; m < M; m += MTV) {                                                        \
            int mt = M - m < MTV ? M - m : MTV;                                                   \
            const float *xm = x + (size_t)m * K;                                                  \
            float out[NTV][MTV];                                                                  \
            switch (kind) {                                                                       \
            case MB_I8: NAME##_tile(MB_I8, xm, mt, K, w, n, nt, out); break;                      \
            case MB_BF16: NAME##_tile(MB_BF16, xm, mt, K, w, n, nt, out); break;                  \
            default: NAME##_tile(MB_F32, xm, mt, K, w, n, nt, out); break;                        \
            }                                                                                     \
            for (int r = 0; r < nt; r++)                                                          \
                for (int c = 0; c < mt; c++)                                                      \
                    y[(size_t)(m + c) * N + n + r] = dense_out(out[r][c], scale, bias, n + r);    \
        }                                                                                         \
    }                                                                                             \
}

/* The next tile's matching bytes are prefetched: rows are short (1-4 KB), too short for the
 * hardware prefetcher to ramp up on its own. */
DEFINE_SHAPE(gemv_four, NT, 4)
DEFINE_SHAPE(gemv_eight, (NT / 2), 8)

/* One or two activation rows (a guided step, the common case): rows are read two at a time start to
 * end, a thread's share one sequential sweep fetched SEQ_AHEAD bytes ahead into L2, where the
 * tiles above interleave NT rows and fetch the next tile (1.4x a plain read's time for bfloat16
 * on an AMD EPYC, Zen 4; BENCHMARKS.md). Each (row, activation row) sum runs in the same order
 * as in the tiles, so a row comes out bit for bit the same whatever it is batched with. */
static inline __attribute__((always_inline)) vf dense_vec(int kind, const void *w, size_t off) {
    if (kind == MB_I8) return widen_i8((const int8_t *)w + off);
    if (kind == MB_BF16) return vload_bf16((const uint16_t *)w + off);
    return vload((const float *)w + off);
}

static inline __attribute__((always_inline)) void dense_pair(int kind, const float *x, int M, int K,
                                                             const void *w, size_t row, size_t row1, vf acc[4]) {
    const int eb = kind == MB_I8 ? 1 : kind == MB_BF16 ? 2 : 4, per_line = 64 / eb;
    const float *x1 = x + (size_t)(M - 1) * K;
    const char *w0 = (const char *)w + row * K * eb, *w1 = (const char *)w + row1 * K * eb;
    vf a00 = (vf){0}, a01 = a00, a10 = a00, a11 = a00;
    for (int k0 = 0; k0 < K; k0 += per_line) {
        __builtin_prefetch(w0 + (size_t)k0 * eb + SEQ_AHEAD, 0, 2);
        __builtin_prefetch(w1 + (size_t)k0 * eb + SEQ_AHEAD, 0, 2);
        for (int k = k0; k < k0 + per_line; k += LANES) {
            vf u = dense_vec(kind, w, row * K + k), v = dense_vec(kind, w, row1 * K + k);
            vf xa = vload(x + k), xb = vload(x1 + k);
            a00 += u * xa;
            a01 += u * xb;
            a10 += v * xa;
            a11 += v * xb;
        }
    }
    acc[0] = a00, acc[1] = a01, acc[2] = a10, acc[3] = a11;
}

static void gemv_pairs(int kind, const float *x, int M, int K, const void *w, const float *scale,
                       const float *bias, float *y, int N) {
    int tiles = (N + 7) / 8;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < tiles; t++) {
        int n = t * 8, nt = N - n < 8 ? N - n : 8;
        vf acc[16];
        for (int i = 0; i < 16; i++) acc[i] = (vf){0};
        for (int r = 0; r < nt; r += 2) {
            /* An odd last row is paired with itself; its second sums are not stored. */
            size_t row = (size_t)(n + r), row1 = r + 1 < nt ? row + 1 : row;
            switch (kind) {
            case MB_I8: dense_pair(MB_I8, x, M, K, w, row, row1, acc + 2 * r); break;
            case MB_BF16: dense_pair(MB_BF16, x, M, K, w, row, row1, acc + 2 * r); break;
            default: dense_pair(MB_F32, x, M, K, w, row, row1, acc + 2 * r); break;
            }
        }
        float sums[16];
#ifdef HAVE_VSUM16
        vf v = vsum16(acc);
        memcpy(sums, &v, sizeof sums);
#else
        for (int i = 0; i < 16; i++) sums[i] = vsum(acc[i]);
#endif
        for (int r = 0; r < nt; r++)
            for (int c = 0; c < M; c++)
                y[(size_t)c * N + n + r] = dense_out(sums[2 * r + c], scale, bias, n + r);
    }
}

/* Each widened weight vector serves every activation row of its tile, so with more rows
 * (guidance x variations) a tile takes fewer weight rows, keeping its accumulators in
 * registers instead of widening the same weights again for each pair of rows. */
static void gemv_dense(int kind, const float *x, int M, int K, const void *w, const float *scale,
                       const float *bias, float *y, int N) {
    if (M <= MT) gemv_pairs(kind, x, M, K, w, scale, bias, y, N);
    else if (M <= 4) gemv_four(kind, x, M, K, w, scale, bias, y, N);
    else gemv_eight(kind, x, M, K, w, scale, bias, y, N);
}

void mb_gemv_bf16(const float *x, int M, int K, const uint16_t *w, const float *bias, float *y, int N) {
    gemv_dense(MB_BF16, x, M, K, w, 0, bias, y, N);
}

void mb_gemv_i8(const float *x, int M, int K, const int8_t *w, const float *scale, const float *bias,
                float *y, int N) {
    gemv_dense(MB_I8, x, M, K, w, scale, bias, y, N);
}

int mb_threads(void) { return omp_get_max_threads(); }

int mb_product(int kind, const float *x, int M, int K, const void *w, const float *scale, float *y, int N) {
    if (kind == MB_I8_VNNI) return mb_gemv_i8_vnni(x, M, K, w, scale, 0, y, N);
    if (kind == MB_I4) return mb_gemv_i4(x, M, K, w, y, N);
    gemv_dense(kind, x, M, K, w, kind == MB_I8 ? scale : 0, 0, y, N);
    return 0;
}

/* Symmetric int8 per output row, the arithmetic of model/decode/quant.py's quantize_int8 in one pass
 * per row: scale = max|w| / 127 (at least 1e-12), q = round-half-even(w * (1 / scale)) in
 * [-127, 127]; with `biased`, stored as q + 128 (the VNNI kernel's unsigned weights). Quantising
 * musicgen-small's decoder at load took seconds in PyTorch's five whole-tensor passes. */
void mb_quantize_i8(const float *w, int N, int K, int8_t *q, float *scale, int biased) {
    const uint8_t flip = biased ? 0x80 : 0; /* q + 128 as a byte is q with its top bit flipped */
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *row = w + (size_t)n * K;
        int k = 0;
        vf top = (vf){0};
        for (; k + LANES <= K; k += LANES) {
            vf a = (vf)((vi)vload(row + k) & 0x7fffffff);
            top = vselect(a > top, a, top);
        }
        float hi = 0.f;
        for (int i = 0; i < LANES; i++) hi = top[i] > hi ? top[i] : hi;
        for (; k < K; k++) hi = fabsf(row[k]) > hi ? fabsf(row[k]) : hi;
        float s = hi / 127.0f;
        s = s < 1e-12f ? 1e-12f : s;
        float inv = 1.0f / s;
        int8_t *out = q + (size_t)n * K;
        /* Clamped first, |t| <= 127, so adding and taking away 1.5 * 2^23 rounds half to even. */
        const vf magic = vsplat(12582912.f), lim = vsplat(127.f);
        for (k = 0; k + LANES <= K; k += LANES) {
            vf t = vload(row + k) * inv;
            t = vselect(t > lim, lim, t);
            t = vselect(t < -lim, -lim, t);
            vi r = __builtin_convertvector((t + magic) - magic, vi);
            vb b = __builtin_convertvector(r, vb) ^ (int8_t)flip;
            memcpy(out + k, &b, sizeof b);
        }
        for (; k < K; k++) {
            float t = nearbyintf(row[k] * inv);
            out[k] = (int8_t)((int8_t)(t > 127.f ? 127.f : t < -127.f ? -127.f : t) ^ (int8_t)flip);
        }
        scale[n] = s;
    }
}
