/* The integer kernels on AVX2 with FMA and F16C (Intel Haswell and later, AMD Zen 1-3): the
 * CPUs most producers own. The arithmetic and the layouts are int_kernels.h's.
 *
 * AVX2 has no four-way u8 x s8 dot product, and its two-way one (vpmaddubsw) saturates at
 * 16 bits: 255 * 127 * 2 does not fit. So:
 * - int8: the two activation terms are joined into one int16, 256 hi + lo (|.| <= 32639), and
 *   the biased weights are widened to int16 (vpmovzxbw straight from memory); vpmaddwd then
 *   gives exact int32 pair sums, equal to (dot(w, hi) << 8) + dot(w, lo), in two instructions
 *   per 16 weights and activation row. Two separate byte terms took 36 instructions per 64
 *   weights and two rows where this takes 22.
 * - int4: the nibbles (0-15) are vpmaddubsw's unsigned operand: a pair is at most
 *   2 * 15 * 128 = 3840, so four pairs of nibbles add up in 16 bits before one vpmaddwd widens
 *   them. The high nibbles are shifted down first (AVX-512 multiplies them in place as 16 q,
 *   which would saturate here); the integer sums are the same, and so, lane for lane, is the
 *   float work after them: int4 gives AVX-512's bits. */
#include "../../int_kernels.h"
#ifdef MB_ARCH_AVX2
#include <immintrin.h>
#include <omp.h>
#include <stdlib.h>

const char *mb_int_arch(void) { return "avx2"; }
int mb_has_vnni(void) { return 1; }

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* Eight floats summed in one fixed order (halves, pairs, neighbours). */
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline int hsum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

/* Eight int32 to eight int8, saturating (as vpmovsdb does). */
static inline void store8_i8(int8_t *p, __m256i v) {
    __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64((__m128i *)p, _mm_packs_epi16(w, w));
}

static inline __m256 abs8(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }

#define ROUND(v) _mm256_round_ps((v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

/* The two int8 terms of each block of QB, joined: x16 = 256 hi + lo, (M, K) int16; sx the block
 * scales / 256; corr the bias's share of each row (see int_kernels.h). */
static void quantize_rows(const float *x, int M, int K, int16_t *x16, float *sx, float *corr) {
    int blocks = K / QB;
    const __m256 lim = _mm256_set1_ps(127.f), nlim = _mm256_set1_ps(-127.f), k256 = _mm256_set1_ps(256.f);
    for (int m = 0; m < M; m++) {
        double c = 0.0;
        for (int b = 0; b < blocks; b++) {
            const float *xb = x + (size_t)m * K + (size_t)b * QB;
            int16_t *o = x16 + (size_t)m * K + (size_t)b * QB;
            __m256 amax = _mm256_setzero_ps();
            for (int i = 0; i < QB; i += 8) amax = _mm256_max_ps(amax, abs8(_mm256_loadu_ps(xb + i)));
            float a = hmax8(amax), s = a / 127.f;
            /* Blocks below 1e-30 count as zero: 127 / a would overflow to inf, and hi to NaN. */
            __m256 inv = _mm256_set1_ps(a > 1e-30f ? 127.f / a : 0.f);
            __m256i sum = _mm256_setzero_si256();
            for (int i = 0; i < QB; i += 8) {
                __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xb + i), inv);
                __m256 h = ROUND(t);
                __m256 l = _mm256_min_ps(_mm256_max_ps(ROUND(_mm256_mul_ps(_mm256_sub_ps(t, h), k256)), nlim), lim);
                /* hi saturates to int8 as the byte terms of the other instruction sets do */
                __m256i hi = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(h), _mm256_set1_epi32(127)),
                                              _mm256_set1_epi32(-128));
                __m256i v = _mm256_add_epi32(_mm256_slli_epi32(hi, 8), _mm256_cvtps_epi32(l));
                sum = _mm256_add_epi32(sum, v);
                __m128i p = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
                _mm_storeu_si128((__m128i *)(o + i), p);
            }
            sx[(size_t)m * blocks + b] = s / 256.f;
            c += 128.0 * (s / 256.0) * hsum8i(sum);
        }
        corr[m] = (float)c;
    }
}

/* One weight row (biased bytes) against activation rows x0 and x1 (x1 may be x0): the block sums
 * scaled and added in block order, then summed across lanes in hsum8's order. */
static inline void i8_row(const uint8_t *wr, const int16_t *x0, const int16_t *x1, const float *s0,
                          const float *s1, int blocks, int fetch, float *out0, float *out1) {
    __m256 f0 = _mm256_setzero_ps(), f1 = f0;
    for (int b = 0; b < blocks; b++) {
        const uint8_t *wb = wr + (size_t)b * QB;
        if (fetch) _mm_prefetch((const char *)(wb + SEQ_AHEAD), _MM_HINT_T1);
        const int16_t *a = x0 + (size_t)b * QB, *c = x1 + (size_t)b * QB;
        __m256i t0 = _mm256_setzero_si256(), t1 = t0;
        for (int i = 0; i < QB; i += 16) {
            __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(wb + i)));
            t0 = _mm256_add_epi32(t0, _mm256_madd_epi16(w, _mm256_loadu_si256((const __m256i *)(a + i))));
            t1 = _mm256_add_epi32(t1, _mm256_madd_epi16(w, _mm256_loadu_si256((const __m256i *)(c + i))));
        }
        f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t0), _mm256_set1_ps(s0[b]), f0);
        f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t1), _mm256_set1_ps(s1[b]), f1);
    }
    *out0 = hsum8(f0);
    *out1 = hsum8(f1);
}

/* A thread's rows are read start to end, one sequential stream fetched SEQ_AHEAD bytes ahead;
 * each row meets the activation rows two at a time (it stays in L1 between pairs), so a row's
 * result does not depend on how many activation rows share the call. */
int mb_gemv_i8_vnni(const float *x, int M, int K, const uint8_t *w, const float *scale, const float *bias,
                    float *y, int N) {
    int blocks = K / QB;
    int16_t *x16 = malloc(sizeof(int16_t) * (size_t)M * K);
    float *sx = malloc(sizeof(float) * ((size_t)M * blocks + M));
    if (!x16 || !sx) { free(x16); free(sx); return -1; }
    float *corr = sx + (size_t)M * blocks;
    quantize_rows(x, M, K, x16, sx, corr);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *wr = w + (size_t)n * K;
        for (int m = 0; m < M; m += 2) {
            int m1 = m + 1 < M ? m + 1 : m;
            float v0, v1;
            i8_row(wr, x16 + (size_t)m * K, x16 + (size_t)m1 * K, sx + (size_t)m * blocks,
                   sx + (size_t)m1 * blocks, blocks, m == 0, &v0, &v1);
            y[(size_t)m * N + n] = int8_out(v0, corr[m], scale, bias, n);
            if (m1 != m) y[(size_t)m1 * N + n] = int8_out(v1, corr[m1], scale, bias, n);
        }
    }
    free(x16);
    free(sx);
    return 0;
}

void mb_i4_quantize_block(const float *x, int8_t *xq, float *sx, int32_t *sq) {
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < I4_QB; i += 8) amax = _mm256_max_ps(amax, abs8(_mm256_loadu_ps(x + i)));
    float a = hmax8(amax);
    __m256 inv = _mm256_set1_ps(a > 1e-30f ? 127.f / a : 0.f);
    __m256i sum = _mm256_setzero_si256();
    for (int i = 0; i < I4_QB; i += 8) {
        __m256i q = _mm256_cvtps_epi32(ROUND(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv)));
        q = _mm256_max_epi32(_mm256_min_epi32(q, _mm256_set1_epi32(127)), _mm256_set1_epi32(-128));
        sum = _mm256_add_epi32(sum, q);
        store8_i8(xq + i, q);
    }
    *sx = a / 127.f;
    *sq = hsum8i(sum);
}

/* Half a tile (eight rows: h = 0 or 1) of one block against activation rows a and c (c may be a):
 * their integer sums, the nibbles taken out once for both, four vector pairs of nibbles added in
 * 16 bits (at most 4 * 2 * 3840 < 2^15) between widenings. */
static inline void i4_half(const uint8_t *p, int h, const int8_t *a, const int8_t *c, __m256i *ta, __m256i *tc) {
    const __m256i lo4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256i t0 = _mm256_setzero_si256(), t1 = t0;
    for (int j0 = 0; j0 < 16; j0 += 4) {
        __m256i s0 = _mm256_setzero_si256(), s1 = s0;
        for (int j = j0; j < j0 + 4; j++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(p + 64 * j + 32 * h));
            __m256i vl = _mm256_and_si256(v, lo4), vh = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
            int32_t al, ah, cl, ch;
            memcpy(&al, a + 8 * j, 4);
            memcpy(&ah, a + 8 * j + 4, 4);
            memcpy(&cl, c + 8 * j, 4);
            memcpy(&ch, c + 8 * j + 4, 4);
            s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(vl, _mm256_set1_epi32(al)));
            s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(vh, _mm256_set1_epi32(ah)));
            s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(vl, _mm256_set1_epi32(cl)));
            s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(vh, _mm256_set1_epi32(ch)));
        }
        t0 = _mm256_add_epi32(t0, _mm256_madd_epi16(s0, ones));
        t1 = _mm256_add_epi32(t1, _mm256_madd_epi16(s1, ones));
    }
    *ta = t0;
    *tc = t1;
}

/* A block's integer sums to the row's float sum: the zero point taken off, then d s added in,
 * lane for lane as every implementation does it. */
static inline __m256 i4_scale(__m256i it, __m256 d, __m256i z, int32_t q, float s, __m256 f) {
    it = _mm256_sub_epi32(it, _mm256_mullo_epi32(z, _mm256_set1_epi32(q)));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(it), _mm256_mul_ps(d, _mm256_set1_ps(s)), f);
}

void mb_i4_tile(const int8_t *a, const int8_t *c, const float *sa, const float *sc, const int32_t *qa,
                const int32_t *qc, int blocks, const uint8_t *wt, int fetch, float *out_a, float *out_c) {
    __m256 fa[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, fc[2] = {fa[0], fa[0]};
    for (int b = 0; b < blocks; b++) {
        const uint8_t *p = wt + (size_t)b * I4_TB;
        if (fetch)
            for (int i = 0; i < I4_TB; i += 64) _mm_prefetch((const char *)(p + I4_AHEAD * I4_TB + i), _MM_HINT_T1);
        for (int h = 0; h < 2; h++) {
            __m256i ta, tc;
            i4_half(p, h, a + (size_t)b * I4_QB, c + (size_t)b * I4_QB, &ta, &tc);
            __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + I4_D_AT + 16 * h)));
            __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + I4_Z_AT + 8 * h)));
            fa[h] = i4_scale(ta, d, z, qa[b], sa[b], fa[h]);
            fc[h] = i4_scale(tc, d, z, qc[b], sc[b], fc[h]);
        }
    }
    for (int h = 0; h < 2; h++) {
        _mm256_storeu_ps(out_a + 8 * h, fa[h]);
        _mm256_storeu_ps(out_c + 8 * h, fc[h]);
    }
}

#endif
