/* The integer kernels on ARM64 with NEON and the dot-product extension (Apple M1 and later,
 * Graviton 2 and later, Cortex-A76 and later): sdot does four s8 x s8 products and their sum
 * into an int32 lane. The arithmetic and the layouts are int_kernels.h's.
 * - int8: the biased weights get their top bit flipped back (q = w ^ 0x80, signed), so the block
 *   sum is dot(q, hi) << 8 + dot(q, lo) with no bias to take off.
 * - int4: a 64-byte vector of the layout is four 16-byte registers of four rows each; the
 *   nibbles (0-15) are valid signed bytes, and sdot's lane form picks each activation word out
 *   of one 16-byte load. The integer sums and the float work per lane are AVX-512's: the same
 *   bits. */
#include "../../int_kernels.h"
#ifdef MB_ARCH_NEON
#include <arm_neon.h>
#include <omp.h>
#include <stdlib.h>

const char *mb_int_arch(void) { return "neon-dotprod"; }
int mb_has_vnni(void) { return 1; }

/* |x| <= 127 per block; hi then lo bytes per block of QB, as int_kernels.h describes. */
static void quantize_rows(const float *x, int M, int K, int8_t *xq, float *sx) {
    int blocks = K / QB;
    const float32x4_t lim = vdupq_n_f32(127.f), nlim = vdupq_n_f32(-127.f);
    for (int m = 0; m < M; m++)
        for (int b = 0; b < blocks; b++) {
            const float *xb = x + (size_t)m * K + (size_t)b * QB;
            int8_t *hq = xq + ((size_t)m * blocks + b) * 2 * QB, *lq = hq + QB;
            float32x4_t amax = vdupq_n_f32(0.f);
            for (int i = 0; i < QB; i += 4) amax = vmaxq_f32(amax, vabsq_f32(vld1q_f32(xb + i)));
            float a = vmaxvq_f32(amax), s = a / 127.f;
            float32x4_t inv = vdupq_n_f32(a > 1e-30f ? 127.f / a : 0.f);
            for (int i = 0; i < QB; i += 8) {
                int16x8_t h16, l16;
                int32x4_t hh[2], ll[2];
                for (int u = 0; u < 2; u++) {
                    float32x4_t t = vmulq_f32(vld1q_f32(xb + i + 4 * u), inv);
                    float32x4_t h = vrndnq_f32(t);
                    float32x4_t l = vrndnq_f32(vmulq_f32(vsubq_f32(t, h), vdupq_n_f32(256.f)));
                    l = vminq_f32(vmaxq_f32(l, nlim), lim);
                    hh[u] = vcvtq_s32_f32(h);
                    ll[u] = vcvtq_s32_f32(l);
                }
                h16 = vcombine_s16(vqmovn_s32(hh[0]), vqmovn_s32(hh[1]));
                l16 = vcombine_s16(vqmovn_s32(ll[0]), vqmovn_s32(ll[1]));
                vst1_s8(hq + i, vqmovn_s16(h16));
                vst1_s8(lq + i, vqmovn_s16(l16));
            }
            sx[(size_t)m * blocks + b] = s / 256.f;
        }
}

/* One weight row against activation rows x0 and x1 (x1 may be x0); block sums scaled and added in
 * block order, then summed across lanes in vaddvq's fixed order. */
static inline void i8_row(const uint8_t *wr, const int8_t *x0, const int8_t *x1, const float *s0,
                          const float *s1, int blocks, float *out0, float *out1) {
    const uint8x16_t flip = vdupq_n_u8(0x80);
    float32x4_t f0 = vdupq_n_f32(0.f), f1 = f0;
    for (int b = 0; b < blocks; b++) {
        const uint8_t *wb = wr + (size_t)b * QB;
        const int8_t *a = x0 + (size_t)b * 2 * QB, *c = x1 + (size_t)b * 2 * QB;
        int32x4_t h0 = vdupq_n_s32(0), l0 = h0, h1 = h0, l1 = h0;
        for (int i = 0; i < QB; i += 16) {
            int8x16_t q = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(wb + i), flip));
            h0 = vdotq_s32(h0, q, vld1q_s8(a + i));
            l0 = vdotq_s32(l0, q, vld1q_s8(a + QB + i));
            h1 = vdotq_s32(h1, q, vld1q_s8(c + i));
            l1 = vdotq_s32(l1, q, vld1q_s8(c + QB + i));
        }
        f0 = vfmaq_f32(f0, vcvtq_f32_s32(vaddq_s32(vshlq_n_s32(h0, 8), l0)), vdupq_n_f32(s0[b]));
        f1 = vfmaq_f32(f1, vcvtq_f32_s32(vaddq_s32(vshlq_n_s32(h1, 8), l1)), vdupq_n_f32(s1[b]));
    }
    *out0 = vaddvq_f32(f0);
    *out1 = vaddvq_f32(f1);
}

int mb_gemv_i8_vnni(const float *x, int M, int K, const uint8_t *w, const float *scale, const float *bias,
                    float *y, int N) {
    int blocks = K / QB;
    int8_t *xq = malloc((size_t)M * K * 2);
    float *sx = malloc(sizeof(float) * (size_t)M * blocks);
    if (!xq || !sx) { free(xq); free(sx); return -1; }
    quantize_rows(x, M, K, xq, sx);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *wr = w + (size_t)n * K;
        for (int m = 0; m < M; m += 2) {
            int m1 = m + 1 < M ? m + 1 : m;
            float v0, v1;
            i8_row(wr, xq + (size_t)m * K * 2, xq + (size_t)m1 * K * 2, sx + (size_t)m * blocks,
                   sx + (size_t)m1 * blocks, blocks, &v0, &v1);
            y[(size_t)m * N + n] = int8_out(v0, 0.f, scale, bias, n);
            if (m1 != m) y[(size_t)m1 * N + n] = int8_out(v1, 0.f, scale, bias, n);
        }
    }
    free(xq);
    free(sx);
    return 0;
}

void mb_i4_quantize_block(const float *x, int8_t *xq, float *sx, int32_t *sq) {
    float32x4_t amax = vdupq_n_f32(0.f);
    for (int i = 0; i < I4_QB; i += 4) amax = vmaxq_f32(amax, vabsq_f32(vld1q_f32(x + i)));
    float a = vmaxvq_f32(amax);
    float32x4_t inv = vdupq_n_f32(a > 1e-30f ? 127.f / a : 0.f);
    int32x4_t sum = vdupq_n_s32(0);
    for (int i = 0; i < I4_QB; i += 8) {
        int32x4_t q0 = vcvtq_s32_f32(vrndnq_f32(vmulq_f32(vld1q_f32(x + i), inv)));
        int32x4_t q1 = vcvtq_s32_f32(vrndnq_f32(vmulq_f32(vld1q_f32(x + i + 4), inv)));
        int8x8_t q = vqmovn_s16(vcombine_s16(vqmovn_s32(q0), vqmovn_s32(q1)));
        vst1_s8(xq + i, q);
        int16x8_t q16 = vmovl_s8(q);
        sum = vaddq_s32(sum, vaddq_s32(vmovl_s16(vget_low_s16(q16)), vmovl_s16(vget_high_s16(q16))));
    }
    *sx = a / 127.f;
    *sq = vaddvq_s32(sum);
}

/* One activation row against a tile: a 16-byte register holds four rows, so the tile's sums are four
 * accumulators. The second row of a pair reads the tile again from cache. */
static void i4_tile_row(const int8_t *a, const float *sa, const int32_t *qa, int blocks, const uint8_t *wt,
                        int fetch, float *out) {
    const uint8x16_t lo4 = vdupq_n_u8(0x0f);
    float32x4_t f[4] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
    for (int b = 0; b < blocks; b++) {
        const uint8_t *p = wt + (size_t)b * I4_TB;
        if (fetch)
            for (int i = 0; i < I4_TB; i += 64) __builtin_prefetch(p + I4_AHEAD * I4_TB + i, 0, 2);
        const int8_t *ab = a + (size_t)b * I4_QB;
        for (int g = 0; g < 4; g++) { /* rows 4g..4g+3 */
            int32x4_t acc = vdupq_n_s32(0);
            for (int j = 0; j < 16; j += 2) {
                /* activation words: lo(j), hi(j), lo(j+1), hi(j+1) */
                int8x16_t xa = vld1q_s8(ab + 8 * j);
                uint8x16_t v = vld1q_u8(p + 64 * j + 16 * g), u = vld1q_u8(p + 64 * (j + 1) + 16 * g);
                acc = vdotq_laneq_s32(acc, vreinterpretq_s8_u8(vandq_u8(v, lo4)), xa, 0);
                acc = vdotq_laneq_s32(acc, vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), xa, 1);
                acc = vdotq_laneq_s32(acc, vreinterpretq_s8_u8(vandq_u8(u, lo4)), xa, 2);
                acc = vdotq_laneq_s32(acc, vreinterpretq_s8_u8(vshrq_n_u8(u, 4)), xa, 3);
            }
            __fp16 dh[4];
            memcpy(dh, p + I4_D_AT + 8 * g, 8);
            float32x4_t d = vcvt_f32_f16(vld1_f16(dh));
            uint8_t zb[4];
            memcpy(zb, p + I4_Z_AT + 4 * g, 4);
            int32x4_t z = {zb[0], zb[1], zb[2], zb[3]};
            acc = vsubq_s32(acc, vmulq_n_s32(z, qa[b]));
            f[g] = vfmaq_f32(f[g], vcvtq_f32_s32(acc), vmulq_n_f32(d, sa[b]));
        }
    }
    for (int g = 0; g < 4; g++) vst1q_f32(out + 4 * g, f[g]);
}

void mb_i4_tile(const int8_t *a, const int8_t *c, const float *sa, const float *sc, const int32_t *qa,
                const int32_t *qc, int blocks, const uint8_t *wt, int fetch, float *out_a, float *out_c) {
    i4_tile_row(a, sa, qa, blocks, wt, fetch, out_a);
    if (c != a) i4_tile_row(c, sc, qc, blocks, wt, 0, out_c);
}

#endif
