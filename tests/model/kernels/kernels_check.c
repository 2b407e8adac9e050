/* The C kernels checked on their own, without Python or PyTorch, so that the same checks run on a
 * machine's own build, on other x86 levels (-march=x86-64-v3, -v2) and on ARM64 under qemu-user
 * (tests/model/test_kernel_arches.py builds and runs this file). Each check compares with the
 * reference arithmetic written out here in plain scalar C, and asks that a row's result be the
 * same bits alone as among other rows. The last line is a checksum of the int4 outputs, which the
 * test compares across instruction sets: int4's arithmetic is the same bits everywhere.
 * Exit status: 0 when every check passed, 1 otherwise (each failure printed). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#include "int_kernels.h"

void mb_quantize_i8(const float *w, int N, int K, int8_t *q, float *scale, int biased);
void mb_quantize_i4(const float *w, int N, int K, uint8_t *out);
void mb_dequantize_i4(const uint8_t *w, int N, int K, float *out);
void mb_gemv_bf16(const float *x, int M, int K, const uint16_t *w, const float *bias, float *y, int N);
void mb_gemv_i8(const float *x, int M, int K, const int8_t *w, const float *scale, const float *bias, float *y, int N);
int mb_top_k_support(const float *x, int rows, int n, int k, int64_t *index, float *values);
int mb_lanes(void);

static int failures;
static uint64_t rng = 0x9E3779B97F4A7C15ull;

static float uniform(void) { /* xorshift64*, in [-1, 1) */
    rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27;
    return (float)((rng * 2685821657736338717ull) >> 40) / (float)(1 << 23) - 1.f;
}

static void fail(const char *what, int n, int m, double got, double want) {
    printf("FAIL %s: row %d, activation row %d: %.9g, expected %.9g\n", what, n, m, got, want);
    failures++;
}

/* The activation quantisers of int_kernels.h, one block at a time, in scalar C. */
static float block_max(const float *x, int len) {
    float a = 0.f;
    for (int i = 0; i < len; i++) a = fabsf(x[i]) > a ? fabsf(x[i]) : a;
    return a;
}

/* int8's reference: sum over blocks of s/256 * (dot(q, 256 hi + lo)), with q the signed weight. */
static double ref_i8(const float *x, const int8_t *q, float scale, int K) {
    double y = 0.0;
    for (int b = 0; b < K / QB; b++) {
        const float *xb = x + b * QB;
        float a = block_max(xb, QB), inv = a > 1e-30f ? 127.f / a : 0.f;
        long long s = 0;
        for (int i = 0; i < QB; i++) {
            float t = xb[i] * inv, h = nearbyintf(t), l = nearbyintf((t - h) * 256.f);
            l = l > 127.f ? 127.f : l < -127.f ? -127.f : l;
            s += (long long)(q[b * QB + i] - (int)0) * (256 * (long long)h + (long long)l);
        }
        y += (double)(a / 127.f / 256.f) * (double)s;
    }
    return y * scale;
}

/* int4's reference: sum over blocks of s * d * dot(q - z, xq), from the dequantised weight w = d (q - z). */
static double ref_i4(const float *x, const float *wdeq, int K) {
    double y = 0.0;
    for (int b = 0; b < K / I4_QB; b++) {
        const float *xb = x + b * I4_QB;
        float a = block_max(xb, I4_QB), inv = a > 1e-30f ? 127.f / a : 0.f;
        double s = 0.0;
        for (int i = 0; i < I4_QB; i++) s += (double)wdeq[b * I4_QB + i] * nearbyintf(xb[i] * inv);
        y += (double)(a / 127.f) * s;
    }
    return y;
}

static double magnitude(const float *x, const float *w, int K) {
    double s = 0.0;
    for (int k = 0; k < K; k++) s += fabs((double)x[k] * w[k]);
    return s;
}

/* A row's result alone must be the same bits as among all M rows. */
static void same_alone(const char *what, const float *all, const float *one, int N, int m) {
    for (int n = 0; n < N; n++)
        if (memcmp(all + (size_t)m * N + n, one + n, sizeof(float)) != 0) fail(what, n, m, one[n], all[(size_t)m * N + n]);
}

#define N 37 /* not a multiple of any tile: the edges run too */
#define K 512
#define MMAX 8

int main(void) {
    static float w[N * K], x[MMAX * K], y[MMAX * N], one[N], wdeq[N * K], bias[N];
    for (int i = 0; i < N * K; i++) w[i] = uniform() * (i % 97 == 0 ? 4.f : 0.25f);
    for (int i = 0; i < MMAX * K; i++) x[i] = uniform() * (i % 61 == 0 ? 8.f : 1.f);
    for (int n = 0; n < N; n++) bias[n] = uniform();
    for (int i = K; i < K + QB; i++) x[i] = 0.f; /* an all-zero block */
    printf("arch %s, lanes %d\n", mb_int_arch(), mb_lanes());
    int integer = mb_has_vnni();

    /* int8, biased layout, on integer products */
    static int8_t q[N * K];
    static float scale[N];
    mb_quantize_i8(w, N, K, q, scale, 1);
    for (int M = 1; integer && M <= MMAX; M++) {
        if (mb_gemv_i8_vnni(x, M, K, (const uint8_t *)q, scale, bias, y, N) != 0) { fail("int8 call", 0, 0, 0, 0); break; }
        for (int m = 0; m < M; m++) {
            mb_gemv_i8_vnni(x + (size_t)m * K, 1, K, (const uint8_t *)q, scale, bias, one, N);
            same_alone("int8 alone vs batched", y, one, N, m);
            for (int n = 0; n < N; n++) {
                int8_t qs[K];
                for (int k = 0; k < K; k++) qs[k] = (int8_t)(q[(size_t)n * K + k] ^ (int8_t)0x80);
                double want = ref_i8(x + (size_t)m * K, qs, scale[n], K) + bias[n];
                double tol = 1e-5 * (magnitude(x + (size_t)m * K, w + (size_t)n * K, K) + 1.0);
                if (fabs(one[n] - want) > tol) fail("int8 vs reference arithmetic", n, m, one[n], want);
            }
        }
    }

    /* int4 on integer products; the dequantised weights give the reference */
    uint64_t sum4 = 1469598103934665603ull;
    static uint8_t q4[((N + I4_TILE - 1) / I4_TILE) * (K / I4_QB) * I4_TB];
    mb_quantize_i4(w, N, K, q4);
    mb_dequantize_i4(q4, N, K, wdeq);
    for (int i = 0; i < N * K; i++) /* within half a step of the weight, or clipped by at most 30% of it */
        if (fabsf(wdeq[i] - w[i]) > 0.6f * (4.f * 2.f / 15.f) + 0.3f * fabsf(w[i])) {
            fail("int4 dequantised", i / K, 0, wdeq[i], w[i]);
            break;
        }
    for (int M = 1; integer && M <= MMAX; M++) {
        if (mb_gemv_i4(x, M, K, q4, y, N) != 0) { fail("int4 call", 0, 0, 0, 0); break; }
        for (int m = 0; m < M; m++) {
            mb_gemv_i4(x + (size_t)m * K, 1, K, q4, one, N);
            same_alone("int4 alone vs batched", y, one, N, m);
            for (int n = 0; n < N; n++) {
                double want = ref_i4(x + (size_t)m * K, wdeq + (size_t)n * K, K);
                double tol = 1e-5 * (magnitude(x + (size_t)m * K, wdeq + (size_t)n * K, K) + 1.0);
                if (fabs(one[n] - want) > tol) fail("int4 vs reference arithmetic", n, m, one[n], want);
            }
        }
        for (int i = 0; i < M * N; i++) { uint32_t u; memcpy(&u, y + i, 4); sum4 = (sum4 ^ u) * 1099511628211ull; }
    }

    /* the widening kernels: int8 (signed) and bfloat16 against float reference */
    static int8_t qs8[N * K];
    static uint16_t wb[N * K];
    mb_quantize_i8(w, N, K, qs8, scale, 0);
    for (int i = 0; i < N * K; i++) { uint32_t u; memcpy(&u, w + i, 4); wb[i] = (uint16_t)(u >> 16); }
    for (int M = 1; M <= MMAX; M++) {
        mb_gemv_i8(x, M, K, qs8, scale, bias, y, N);
        for (int m = 0; m < M; m++) {
            mb_gemv_i8(x + (size_t)m * K, 1, K, qs8, scale, bias, one, N);
            same_alone("int8 (widening) alone vs batched", y, one, N, m);
            for (int n = 0; n < N; n++) {
                double want = bias[n];
                for (int k = 0; k < K; k++) want += (double)qs8[(size_t)n * K + k] * scale[n] * x[(size_t)m * K + k];
                if (fabs(one[n] - want) > 1e-5 * (magnitude(x + (size_t)m * K, w + (size_t)n * K, K) + 1.0))
                    fail("int8 (widening) vs reference", n, m, one[n], want);
            }
        }
        mb_gemv_bf16(x, M, K, wb, bias, y, N);
        for (int m = 0; m < M; m++) {
            mb_gemv_bf16(x + (size_t)m * K, 1, K, wb, bias, one, N);
            same_alone("bfloat16 alone vs batched", y, one, N, m);
            for (int n = 0; n < N; n++) {
                double want = bias[n];
                for (int k = 0; k < K; k++) {
                    uint32_t u = (uint32_t)wb[(size_t)n * K + k] << 16; float f; memcpy(&f, &u, 4);
                    want += (double)f * x[(size_t)m * K + k];
                }
                if (fabs(one[n] - want) > 1e-5 * (magnitude(x + (size_t)m * K, w + (size_t)n * K, K) + 1.0))
                    fail("bfloat16 vs reference", n, m, one[n], want);
            }
        }
    }

    /* attention over a float32 cache: softmax(q . k / sqrt(hd)) . v per head */
    enum { R = 2, H = 2, HD = 64, T = 11 };
    static float qa[R * H * HD], kc[R * H * T * HD], vc[R * H * T * HD], att[R * H * HD];
    for (int i = 0; i < R * H * HD; i++) qa[i] = uniform();
    for (int i = 0; i < R * H * T * HD; i++) { kc[i] = uniform(); vc[i] = uniform(); }
    float *scores = malloc(sizeof(float) * (size_t)mb_attend_scratch(R, H, T));
    mb_attend(qa, H * HD, kc, vc, NULL, NULL, MB_KV_F32, T, T, NULL, R, H, HD, att, H * HD, scores);
    for (int r = 0; r < R; r++)
        for (int h = 0; h < H; h++) {
            double s[T], top = -1e300, total = 0.0;
            for (int t = 0; t < T; t++) {
                s[t] = 0.0;
                for (int j = 0; j < HD; j++)
                    s[t] += (double)qa[(r * H + h) * HD + j] * kc[(((size_t)r * H + h) * T + t) * HD + j];
                s[t] /= sqrt((double)HD);
                top = s[t] > top ? s[t] : top;
            }
            for (int t = 0; t < T; t++) { s[t] = exp(s[t] - top); total += s[t]; }
            for (int j = 0; j < HD; j++) {
                double want = 0.0;
                for (int t = 0; t < T; t++) want += s[t] / total * vc[(((size_t)r * H + h) * T + t) * HD + j];
                if (fabs(att[(r * H + h) * HD + j] - want) > 1e-5) fail("attention vs reference", h * HD + j, r, att[(r * H + h) * HD + j], want);
            }
        }
    free(scores);

    /* top-k: the k largest of a row, in token order */
    enum { TN = 256, TK = 10 };
    static float logits[TN];
    int64_t idx[TK];
    float vals[TK];
    for (int i = 0; i < TN; i++) logits[i] = uniform() * 10.f;
    if (mb_top_k_support(logits, 1, TN, TK, idx, vals) != 0) fail("top-k call", 0, 0, 0, 0);
    else {
        float kth = 1e30f; /* the k-th largest, by selection */
        static float sorted[TN];
        memcpy(sorted, logits, sizeof logits);
        for (int i = 0; i < TK; i++)
            for (int j = i + 1; j < TN; j++)
                if (sorted[j] > sorted[i]) { float t = sorted[i]; sorted[i] = sorted[j]; sorted[j] = t; }
        kth = sorted[TK - 1];
        for (int i = 0, c = 0; i < TN; i++)
            if (logits[i] >= kth) {
                if (c >= TK || idx[c] != i || vals[c] != logits[i]) { fail("top-k support", i, c, c < TK ? (double)idx[c] : -1, i); break; }
                c++;
            }
    }

    printf("int4 checksum %016llx\n", (unsigned long long)sum4);
    printf("%d failures\n", failures);
    return failures ? 1 : 0;
}
