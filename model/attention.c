/* Attention for the decode step: one new query per row and head against the cached keys.
 *
 * Why its own vector code: at batch 2 the step's attention reads the whole filled cache
 * (24 layers x 2 rows x 16 heads x 64 x 2 (keys, values) x 4 bytes a position: 590 MB a step at
 * 30 s in float32), and
 * scalar dot products and expf made it compute-bound: 59 ms a step at position 1500 against
 * 24 ms for all the weights' products (measured, docs/engine.md). Here each key costs
 * hd/LANES fused multiply-adds and one lane sum, the softmax's exponentials run LANES at a time
 * (vec.h), and heads run in parallel, so the cost follows the bytes of the cache. The cache
 * may be bfloat16 (half the bytes; model/precision.py says which precisions keep it so).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#include "kernels.h"
#include "vec.h"

#define MAX_HD_VECTORS (256 / LANES)

/* Keys (and values) fetched ahead of use. One head's keys are one sequential stream, and a core
 * following one stream by its hardware prefetcher alone read the cache at 13 GB/s where the
 * weights' products read 24 (musicgen-small, position 1500, Intel Xeon): asking early keeps
 * more lines in flight. */
#ifndef AHEAD
#define AHEAD 16
#endif

static inline __attribute__((always_inline)) void prefetch_row(const char *p, size_t bytes) {
    for (size_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i);
}

/* One vector of a cached key or value: float32, or bfloat16 widened (`bf16` is a constant at
 * each inlined call, so each format gets its own loop). */
static inline __attribute__((always_inline)) vf load_kv(const void *base, size_t at, int bf16) {
    return bf16 ? vload_bf16((const uint16_t *)base + at) : vload((const float *)base + at);
}

/* Scores, softmax and the weighted sum for one row's head; K, V (n, hd) are that head's keys
 * and values. `s` holds n (rounded up to LANES) floats of scratch. */
static inline __attribute__((always_inline)) void attend_one(const float *q, const void *K, const void *V, int bf16,
                                                             int n, const uint8_t *mask, int hd, float scale,
                                                             float *out, float *s) {
    int nv = hd / LANES;
    vf qv[MAX_HD_VECTORS], acc[MAX_HD_VECTORS];
    for (int i = 0; i < nv; i++) qv[i] = vload(q + i * LANES) * scale;
    float best = -INFINITY;
    const size_t row_bytes = (size_t)hd * (bf16 ? 2 : 4);
    for (int t = 0; t < n; t++) {
        if (mask && !mask[t]) { s[t] = -INFINITY; continue; }
        size_t k = (size_t)t * hd;
        if (t + AHEAD < n) prefetch_row((const char *)K + (t + AHEAD) * row_bytes, row_bytes);
        vf dot = qv[0] * load_kv(K, k, bf16);
        for (int i = 1; i < nv; i++) dot += qv[i] * load_kv(K, k + i * LANES, bf16);
        s[t] = vsum(dot);
        if (s[t] > best) best = s[t];
    }
    for (int i = 0; i < nv; i++) acc[i] = (vf){0};
    if (best == -INFINITY) { /* no key to attend to: zeros (the engine never asks: model.decoder.cross_kv
                                opens an unconditional row's mask to every key) */
        for (int i = 0; i < nv; i++) vstore(out + i * LANES, acc[i]);
        return;
    }
    int padded = (n + LANES - 1) / LANES * LANES;
    for (int t = n; t < padded; t++) s[t] = -INFINITY;
    vf total = (vf){0}, top = vsplat(best);
    for (int t = 0; t < padded; t += LANES) {
        vf e = vexp(vload(s + t) - top);
        vstore(s + t, e);
        total += e;
    }
    for (int t = 0; t < n; t++) {
        if (s[t] == 0.f) continue;
        size_t v = (size_t)t * hd;
        if (t + AHEAD < n) prefetch_row((const char *)V + (t + AHEAD) * row_bytes, row_bytes);
        vf p = vsplat(s[t]);
        for (int i = 0; i < nv; i++) acc[i] += p * load_kv(V, v + i * LANES, bf16);
    }
    float inv = 1.f / vsum(total);
    for (int i = 0; i < nv; i++) vstore(out + i * LANES, acc[i] * inv);
}

static float kv_at(const void *base, size_t at, int bf16) {
    return bf16 ? from_bf16(((const uint16_t *)base)[at]) : ((const float *)base)[at];
}

static void attend_one_scalar(const float *q, const void *K, const void *V, int bf16, int n, const uint8_t *mask,
                              int hd, float scale, float *out, float *s) {
    float best = -INFINITY;
    for (int t = 0; t < n; t++) {
        if (mask && !mask[t]) { s[t] = -INFINITY; continue; }
        float dot = 0.f;
        for (int j = 0; j < hd; j++) dot += q[j] * kv_at(K, (size_t)t * hd + j, bf16);
        s[t] = dot * scale;
        if (s[t] > best) best = s[t];
    }
    for (int j = 0; j < hd; j++) out[j] = 0.f;
    if (best == -INFINITY) return;
    float total = 0.f;
    for (int t = 0; t < n; t++) { s[t] = s[t] == -INFINITY ? 0.f : expf(s[t] - best); total += s[t]; }
    for (int t = 0; t < n; t++) {
        float p = s[t] / total;
        for (int j = 0; j < hd; j++) out[j] += p * kv_at(V, (size_t)t * hd + j, bf16);
    }
}

int mb_attend_scratch(int rows, int heads, int n) {
    return rows * heads * ((n + LANES - 1) / LANES * LANES);
}

void mb_attend(const float *q, int q_stride, const void *K, const void *V, int bf16, int stride, int n,
               const unsigned char *mask, int rows, int heads, int hd, float *a, int a_stride, float *scores) {
    float scale = 1.0f / sqrtf((float)hd);
    int vector = hd % LANES == 0 && hd / LANES <= MAX_HD_VECTORS;
    int padded = (n + LANES - 1) / LANES * LANES;
    /* A short cross-attention (a dozen text tokens) is cheaper than waking the other threads. */
#pragma omp parallel for schedule(static) if ((long)rows * heads * n * hd >= 8192)
    for (int rh = 0; rh < rows * heads; rh++) {
        int r = rh / heads, h = rh % heads;
        const float *qh = q + (size_t)r * q_stride + (size_t)h * hd;
        size_t at = ((size_t)r * heads + h) * stride * hd, bytes = bf16 ? 2 : 4;
        const char *Kh = (const char *)K + at * bytes, *Vh = (const char *)V + at * bytes;
        const uint8_t *m = mask ? mask + (size_t)r * n : 0;
        float *ah = a + (size_t)r * a_stride + (size_t)h * hd, *s = scores + (size_t)rh * padded;
        if (!vector) attend_one_scalar(qh, Kh, Vh, bf16, n, m, hd, scale, ah, s);
        else if (bf16) attend_one(qh, Kh, Vh, 1, n, m, hd, scale, ah, s);
        else attend_one(qh, Kh, Vh, 0, n, m, hd, scale, ah, s);
    }
}
