/* The integer kernels on AVX-512 with VNNI (Intel Ice Lake and later, AMD Zen 4 and later):
 * vpdpbusd does four u8 x s8 products and their sum into an int32 lane in one instruction. The
 * arithmetic and the layouts are int_kernels.h's, shared with the other instruction sets. */
#include "../../int_kernels.h"
#ifdef MB_ARCH_AVX512
#include <omp.h>
#include <stdlib.h>

const char *mb_int_arch(void) { return "avx512-vnni"; }
int mb_has_vnni(void) { return 1; }


/* xq holds hi then lo for each block: 2 * QB bytes per block; sx the block scales / 256. */
static void quantize_rows(const float *x, int M, int K, int8_t *xq, float *sx, float *corr) {
    int blocks = K / QB;
    const __m512 lim = _mm512_set1_ps(127.f);
    for (int m = 0; m < M; m++) {
        double c = 0.0;
        for (int b = 0; b < blocks; b++) {
            const float *xb = x + (size_t)m * K + (size_t)b * QB;
            int8_t *hq = xq + ((size_t)m * blocks + b) * 2 * QB, *lq = hq + QB;
            __m512 amax = _mm512_setzero_ps();
            for (int i = 0; i < QB; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(xb + i)));
            float a = _mm512_reduce_max_ps(amax), s = a / 127.f;
            /* Blocks below 1e-30 count as zero: 127 / a would overflow to inf, and hi to NaN. */
            __m512 inv = _mm512_set1_ps(a > 1e-30f ? 127.f / a : 0.f);
            int sum = 0;
            for (int i = 0; i < QB; i += 16) {
                __m512 t = _mm512_mul_ps(_mm512_loadu_ps(xb + i), inv);
                __m512 h = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                __m512 l = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(t, h), _mm512_set1_ps(256.f)),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                l = _mm512_min_ps(_mm512_max_ps(l, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim);
                __m512i hi = _mm512_cvtps_epi32(h), lo = _mm512_cvtps_epi32(l);
                _mm_storeu_si128((__m128i *)(hq + i), _mm512_cvtsepi32_epi8(hi));
                _mm_storeu_si128((__m128i *)(lq + i), _mm512_cvtsepi32_epi8(lo));
                sum += 256 * _mm512_reduce_add_epi32(hi) + _mm512_reduce_add_epi32(lo);
            }
            sx[(size_t)m * blocks + b] = s / 256.f;
            c += 128.0 * (s / 256.0) * sum;
        }
        corr[m] = (float)c;
    }
}

static inline __m512i dot2(__m512i w, const int8_t *xb) {
    __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(xb));
    return _mm512_dpbusd_epi32(_mm512_slli_epi32(t, 8), w, _mm512_loadu_si512(xb + QB));
}


/* Up to two activation rows (a guided step): a thread's rows are read start to end, one
 * sequential stream fetched SEQ_AHEAD bytes ahead into L2, and each weight vector meets both
 * activation rows. Eight rows interleaved a block at a time (below) ran at 1.5x a plain read's
 * time on an AMD EPYC (Zen 4), row after row at 1.1-1.2x (the 96 products of musicgen-small's
 * layers, alternated in one process; BENCHMARKS.md). A tile is eight rows, ending in one vsum16. */
static void vnni_sequential(const int8_t *xq, const float *sx, const float *corr, int blocks, int M, int K,
                            const uint8_t *w, const float *scale, const float *bias, float *y, int N) {
    int tiles = (N + 7) / 8;
    const int8_t *x1 = xq + (size_t)(M - 1) * blocks * 2 * QB;
    const float *s1 = sx + (size_t)(M - 1) * blocks;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < tiles; t++) {
        int n = t * 8, nt = N - n < 8 ? N - n : 8;
        vf acc[16];
        for (int i = 0; i < 16; i++) acc[i] = (vf){0};
        for (int r = 0; r < nt; r++) {
            const uint8_t *wr = w + (size_t)(n + r) * K;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0;
            for (int b = 0; b < blocks; b++) {
                _mm_prefetch((const char *)(wr + (size_t)b * QB + SEQ_AHEAD), _MM_HINT_T1);
                __m512i wv = _mm512_loadu_si512(wr + (size_t)b * QB);
                a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot2(wv, xq + (size_t)b * 2 * QB)), _mm512_set1_ps(sx[b]), a0);
                a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot2(wv, x1 + (size_t)b * 2 * QB)), _mm512_set1_ps(s1[b]), a1);
            }
            acc[2 * r] = (vf)a0;
            acc[2 * r + 1] = (vf)a1;
        }
        vf sums = vsum16(acc);
        for (int r = 0; r < nt; r++)
            for (int c = 0; c < M; c++)
                y[(size_t)c * N + n + r] = int8_out(sums[2 * r + c], corr[c], scale, bias, n + r);
    }
}

/* Three or four activation rows (two jams stepping together, each guided): the same sequential
 * stream, each weight vector meeting every row, 16 / ROWS weight rows a tile (16 accumulators, one
 * vsum16). The tiled path below re-reads each tile once per pair of rows: a two-jam pass of
 * musicgen-small took 28 ms there against 18-22 here (BENCHMARKS.md). At eight rows both are bound
 * by arithmetic (two dot products per row and weight vector) and take the same time, so more rows
 * keep the tiled path. A row's sums run in the same order as in vnni_sequential and the tiled
 * path, so its result is the same bits. */
#define DEFINE_SEQUENTIAL(NAME, ROWS)                                                                      \
static void NAME(const int8_t *xq, const float *sx, const float *corr, int blocks, int M, int K,             \
                 const uint8_t *w, const float *scale, const float *bias, float *y, int N) {                 \
    enum { TILE = 16 / ROWS };                                                                             \
    int tiles = (N + TILE - 1) / TILE;                                                                     \
    const int8_t *xr[ROWS];                                                                                \
    const float *sr[ROWS];                                                                                 \
    for (int c = 0; c < ROWS; c++) {                                                                       \
        int m = c < M ? c : M - 1;                                                                         \
        xr[c] = xq + (size_t)m * blocks * 2 * QB;                                                          \
        sr[c] = sx + (size_t)m * blocks;                                                                   \
    }                                                                                                      \
    _Pragma("omp parallel for schedule(static)")                                                           \
    for (int t = 0; t < tiles; t++) {                                                                      \
        int n = t * TILE, nt = N - n < TILE ? N - n : TILE;                                                \
        vf acc[16];                                                                                        \
        for (int i = 0; i < 16; i++) acc[i] = (vf){0};                                                     \
        for (int r = 0; r < nt; r++) {                                                                     \
            const uint8_t *wr = w + (size_t)(n + r) * K;                                                   \
            __m512 a[ROWS];                                                                                \
            for (int c = 0; c < ROWS; c++) a[c] = _mm512_setzero_ps();                                     \
            for (int b = 0; b < blocks; b++) {                                                             \
                _mm_prefetch((const char *)(wr + (size_t)b * QB + SEQ_AHEAD), _MM_HINT_T1);                \
                __m512i wv = _mm512_loadu_si512(wr + (size_t)b * QB);                                      \
                size_t at = (size_t)b * 2 * QB;                                                            \
                for (int c = 0; c < ROWS; c++)                                                             \
                    a[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot2(wv, xr[c] + at)),                       \
                                           _mm512_set1_ps(sr[c][b]), a[c]);                                \
            }                                                                                              \
            for (int c = 0; c < ROWS; c++) acc[ROWS * r + c] = (vf)a[c];                                   \
        }                                                                                                  \
        vf sums = vsum16(acc);                                                                             \
        for (int r = 0; r < nt; r++)                                                                       \
            for (int c = 0; c < M; c++)                                                                    \
                y[(size_t)c * N + n + r] = int8_out(sums[ROWS * r + c], corr[c], scale, bias, n + r);      \
    }                                                                                                      \
}
DEFINE_SEQUENTIAL(vnni_sequential4, 4)

/* More activation rows (variations): eight weight rows a tile, interleaved a block at a time, against
 * each pair of activation rows in turn, the tile staying in L1/L2 between pairs. Here the product is
 * bound by arithmetic and loads, not memory: each weight vector is loaded once per pair and the
 * activations once per block for all eight rows: 22.6 ms at eight activation rows where the
 * sequential stream above took 30-35 (AMD EPYC, the same 96 products). */
#define VNNI_ROWS 8
int mb_gemv_i8_vnni(const float *x, int M, int K, const uint8_t *w, const float *scale, const float *bias,
                    float *y, int N) {
    int blocks = K / QB, tiles = (N + VNNI_ROWS - 1) / VNNI_ROWS;
    int8_t *xq = malloc((size_t)M * K * 2);
    float *sx = malloc(sizeof(float) * ((size_t)M * blocks + M));
    if (!xq || !sx) { free(xq); free(sx); return -1; }
    float *corr = sx + (size_t)M * blocks;
    quantize_rows(x, M, K, xq, sx, corr);
    if (M <= 4) {
        (M <= 2 ? vnni_sequential : vnni_sequential4)(xq, sx, corr, blocks, M, K, w, scale, bias, y, N);
        free(xq);
        free(sx);
        return 0;
    }
#pragma omp parallel for schedule(static)
    for (int t = 0; t < tiles; t++) {
        int n = t * VNNI_ROWS, nt = N - n < VNNI_ROWS ? N - n : VNNI_ROWS;
        for (int m = 0; m < M; m += 2) {
            int mt = M - m < 2 ? M - m : 2;
            vf acc[2 * VNNI_ROWS]; /* weight row r against activation row m + c: acc[2 r + c] */
            for (int i = 0; i < 2 * VNNI_ROWS; i++) acc[i] = (vf){0};
            for (int b = 0; b < blocks; b++) {
                const int8_t *x0 = xq + ((size_t)m * blocks + b) * 2 * QB;
                const int8_t *x1 = mt > 1 ? x0 + (size_t)blocks * 2 * QB : x0;
                __m512 s0 = _mm512_set1_ps(sx[(size_t)m * blocks + b]);
                __m512 s1 = _mm512_set1_ps(mt > 1 ? sx[(size_t)(m + 1) * blocks + b] : 0.f);
                for (int r = 0; r < VNNI_ROWS; r++) {
                    if (r >= nt) break;
                    const uint8_t *wp = w + (size_t)(n + r) * K + (size_t)b * QB;
                    __builtin_prefetch(wp + (size_t)VNNI_ROWS * K);
                    __m512i wv = _mm512_loadu_si512(wp);
                    acc[2 * r] = (vf)_mm512_fmadd_ps(_mm512_cvtepi32_ps(dot2(wv, x0)), s0, (__m512)acc[2 * r]);
                    acc[2 * r + 1] = (vf)_mm512_fmadd_ps(_mm512_cvtepi32_ps(dot2(wv, x1)), s1, (__m512)acc[2 * r + 1]);
                }
            }
            vf sums = vsum16(acc);
            for (int r = 0; r < nt; r++)
                for (int c = 0; c < mt; c++)
                    y[(size_t)(m + c) * N + n + r] = int8_out(sums[2 * r + c], corr[m + c], scale, bias, n + r);
        }
    }
    free(xq);
    free(sx);
    return 0;
}

void mb_i4_quantize_block(const float *x, int8_t *xq, float *sx, int32_t *sq) {
    __m512 amax = _mm512_setzero_ps();
    for (int i = 0; i < I4_QB; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    float a = _mm512_reduce_max_ps(amax);
    __m512 inv = _mm512_set1_ps(a > 1e-30f ? 127.f / a : 0.f);
    __m512i sum = _mm512_setzero_si512();
    for (int i = 0; i < I4_QB; i += 16) {
        __m512i q = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), inv),
                                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        sum = _mm512_add_epi32(sum, q);
        _mm_storeu_si128((__m128i *)(xq + i), _mm512_cvtsepi32_epi8(q));
    }
    *sx = a / 127.f;
    *sq = _mm512_reduce_add_epi32(sum);
}

static inline __attribute__((always_inline)) __m512i bcast4(const int8_t *x) {
    int32_t v;
    memcpy(&v, x, 4);
    return _mm512_set1_epi32(v);
}

void mb_i4_tile(const int8_t *x0, const int8_t *x1, const float *s0, const float *s1, const int32_t *q0,
                const int32_t *q1, int blocks, const uint8_t *w, int fetch, float *out0, float *out1) {
    const __m512i lo4 = _mm512_set1_epi8(0x0f), hi4 = _mm512_set1_epi8((char)0xf0);
    __m512 f0 = _mm512_setzero_ps(), f1 = _mm512_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        const uint8_t *p = w + (size_t)b * I4_TB;
        if (fetch)
            for (int i = 0; i < I4_TB; i += 64) __builtin_prefetch(p + I4_AHEAD * I4_TB + i, 0, 2);
        const int8_t *a0 = x0 + (size_t)b * I4_QB, *a1 = x1 + (size_t)b * I4_QB;
        /* Four sums per activation row, so that no chain of dependent vpdpbusd is longer than
         * eight a block; the high nibbles are summed in place (16 q), which `>> 4` undoes exactly. */
        __m512i l0a = _mm512_setzero_si512(), l0b = l0a, h0a = l0a, h0b = l0a, l1a = l0a, l1b = l0a, h1a = l0a, h1b = l0a;
        for (int j = 0; j < 16; j += 2) {
            __m512i v = _mm512_loadu_si512(p + 64 * j), u = _mm512_loadu_si512(p + 64 * (j + 1));
            __m512i vl = _mm512_and_si512(v, lo4), vh = _mm512_and_si512(v, hi4);
            __m512i ul = _mm512_and_si512(u, lo4), uh = _mm512_and_si512(u, hi4);
            l0a = _mm512_dpbusd_epi32(l0a, vl, bcast4(a0 + 8 * j));
            h0a = _mm512_dpbusd_epi32(h0a, vh, bcast4(a0 + 8 * j + 4));
            l0b = _mm512_dpbusd_epi32(l0b, ul, bcast4(a0 + 8 * j + 8));
            h0b = _mm512_dpbusd_epi32(h0b, uh, bcast4(a0 + 8 * j + 12));
            l1a = _mm512_dpbusd_epi32(l1a, vl, bcast4(a1 + 8 * j));
            h1a = _mm512_dpbusd_epi32(h1a, vh, bcast4(a1 + 8 * j + 4));
            l1b = _mm512_dpbusd_epi32(l1b, ul, bcast4(a1 + 8 * j + 8));
            h1b = _mm512_dpbusd_epi32(h1b, uh, bcast4(a1 + 8 * j + 12));
        }
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + I4_D_AT)));
        __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + I4_Z_AT)));
        __m512i t0 = _mm512_add_epi32(_mm512_add_epi32(l0a, l0b), _mm512_srai_epi32(_mm512_add_epi32(h0a, h0b), 4));
        __m512i t1 = _mm512_add_epi32(_mm512_add_epi32(l1a, l1b), _mm512_srai_epi32(_mm512_add_epi32(h1a, h1b), 4));
        t0 = _mm512_sub_epi32(t0, _mm512_mullo_epi32(z, _mm512_set1_epi32(q0[b])));
        t1 = _mm512_sub_epi32(t1, _mm512_mullo_epi32(z, _mm512_set1_epi32(q1[b])));
        f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t0), _mm512_mul_ps(d, _mm512_set1_ps(s0[b])), f0);
        f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t1), _mm512_mul_ps(d, _mm512_set1_ps(s1[b])), f1);
    }
    _mm512_storeu_ps(out0, f0);
    _mm512_storeu_ps(out1, f1);
}

#endif
