/* The decode kernels' vector type and the few vector functions they share (gemv.c, attention.c,
 * layer_step.c).
 *
 * Written with GCC's generic vectors so that one source serves AVX-512, AVX2 and NEON: the
 * width is the machine's (LANES floats), set by -march=native at build time. exp and erf are
 * our own polynomials because the scalar libm calls, one element at a time, were what a layer
 * step spent its time on outside the products (attention's softmax, GELU; measured, docs/engine.md).
 */
#ifndef MB_VEC_H
#define MB_VEC_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX2__) || defined(__ARM_NEON)
#define LANES 8
#else
#define LANES 4
#endif

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf vsplat(float x) { return (vf){0} + x; }

typedef uint16_t vh __attribute__((vector_size(LANES * 2)));

/* bfloat16 is float32's top half: widening is a shift. */
static inline vf vload_bf16(const uint16_t *p) {
    vh h; memcpy(&h, p, sizeof h);
    vi bits = __builtin_convertvector(h, vi) << 16;
    vf f; memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f; memcpy(&f, &u, sizeof f);
    return f;
}

/* float32 -> bfloat16 rounded to nearest even, as PyTorch converts (NaN stays NaN). */
static inline uint16_t to_bf16(float x) {
    uint32_t u; memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

typedef int8_t vb __attribute__((vector_size(LANES)));

/* Byte widening by intrinsics where there are some: GCC's generic int8 vectors go through
 * general registers one byte at a time (measured 8x slower on AVX-512). */
static inline vf widen_i8(const int8_t *p) {
#if LANES == 16 && defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif LANES == 8 && defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    vb b; memcpy(&b, p, sizeof b);
    return __builtin_convertvector(__builtin_convertvector(b, vi), vf);
#endif
}

/* Lanes of `a` where `m` is set (all ones), else of `b`. */
static inline vf vselect(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

static inline float vsum(vf v) {
#if LANES == 16 && defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
#endif
}

#if LANES == 16 && defined(__AVX512F__)
#define HAVE_VSUM16 1
/* Sixteen vsum()s at once: lane i of the result is vsum(v[i]), bit for bit (the same pairing as
 * _mm512_reduce_add_ps: halves, quarters, pairs, neighbours), in 30 shuffles and 15 adds where
 * sixteen separate reductions take 64 shuffles and 64 adds. Why: the int8 product ends each tile
 * of 1024-wide rows with sixteen such sums (gemv.c). Slot s takes v[4 (s mod 4) + s / 4], the
 * order in which the last two levels leave the sums in lane order. */
static inline vf vsum16(const vf v[16]) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) {
        int s0 = 2 * i, s1 = 2 * i + 1;
        __m512 x = (__m512)v[4 * (s0 & 3) + (s0 >> 2)], y = (__m512)v[4 * (s1 & 3) + (s1 >> 2)];
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
    }
    for (int i = 0; i < 4; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++) {
        __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
        c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    return (vf)_mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}
#endif

/* e^x to about 2 ulp (Cody-Waite reduction to |r| <= ln2/2, degree-6 polynomial); 0 below
 * -87.3 (so -inf, a masked score, gives exactly 0), clamped above 88.3. */
static inline vf vexp(vf x) {
    vi under = x < vsplat(-87.33654f);
    x = vselect(x > vsplat(88.3762626647949f), vsplat(88.3762626647949f), x);
    x = vselect(under, vsplat(0.f), x);
    const vf magic = vsplat(12582912.f); /* 1.5 * 2^23: adding it rounds to an integer */
    vf t = x * 1.44269504088896341f + magic;
    vf n = t - magic;
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = vsplat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    vf y = p * (r * r) + r + 1.f;
    vi bits = ((vi)t - 0x4B400000 + 127) << 23; /* 2^n from the integer in t's low mantissa bits */
    y = y * (vf)bits;
    return vselect(under, vsplat(0.f), y);
}

/* erf(x) to 1.5e-7 absolute (Abramowitz and Stegun 7.1.26), for the exact (erf) GELU. */
static inline vf verf(vf x) {
    vi sign = (vi)x & ((vi){0} + INT32_MIN);
    vf a = (vf)((vi)x ^ sign);
    vf t = 1.f / (1.f + 0.3275911f * a);
    vf p = vsplat(1.061405429f);
    p = p * t - 1.453152027f;
    p = p * t + 1.421413741f;
    p = p * t - 0.284496736f;
    p = p * t + 0.254829592f;
    vf y = 1.f - p * t * vexp(-(a * a));
    return (vf)((vi)y ^ sign);
}

#endif
