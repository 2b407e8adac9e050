/* Attention for the decode step: one new query per row and head against the cached keys.
 *
 * Why its own vector code: at batch 2 the step's attention reads the whole filled cache
 * (24 layers x 2 rows x 16 heads x 64 x 2 (keys, values) x 4 bytes a position: 590 MB a step at
 * 30 s in float32), and
 * scalar dot products and expf made it compute-bound: 59 ms a step at position 1500 against
 * 24 ms for all the weights' products (measured, docs/engine.md). Here each key costs
 * hd/LANES fused multiply-adds and one lane sum, the softmax's exponentials run LANES at a time
 * (vec.h), and heads run in parallel, so the cost follows the bytes of the cache. The cache
 * may be bfloat16 (half the bytes) or int8 with one scale per key and per value (a quarter, plus
 * 4 bytes each 64; model/decode/precision.py says which precisions keep it so). An int8 key's scale
 * multiplies its dot product once, a value's scale its softmax weight, so int8 costs no more
 * arithmetic per element than bfloat16.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#include "kernels.h"
#include "vec.h"

#define MAX_HD_VECTORS (256 / LANES)
#define HD64 (64 / LANES) /* vectors in a 64-wide head, the width MusicGen uses at every size */

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

/* One vector of a cached key or value, widened to float32 (int8 unscaled: the caller applies
 * the scale); `kv` is a constant at each inlined call, so each format gets its own loop. */
static inline __attribute__((always_inline)) vf load_kv(const void *base, size_t at, int kv) {
    if (kv == MB_KV_I8) return widen_i8((const int8_t *)base + at);
    return kv == MB_KV_BF16 ? vload_bf16((const uint16_t *)base + at) : vload((const float *)base + at);
}

/* Scores, softmax and the weighted sum for one row's head; K, V (n, hd) are that head's keys
 * and values, KS, VS (n) their scales where int8. `s` holds n (rounded up to LANES) floats of
 * scratch. `nv` = hd / LANES: where the caller passes it as a constant (MusicGen's heads are 64
 * wide), the query and the weighted sum stay in registers; as a variable they lived on the stack,
 * and every key's multiply-add waited on a store and a load (measured: a third of attention's
 * time, docs/engine.md). */
static inline __attribute__((always_inline)) void attend_one(const float *q, const void *K, const void *V,
                                                             const float *KS, const float *VS, int kv,
                                                             int n, const uint8_t *mask, int hd, float scale,
                                                             float *out, float *s, int nv) {
    vf qv[MAX_HD_VECTORS], acc[MAX_HD_VECTORS];
    for (int i = 0; i < nv; i++) qv[i] = vload(q + i * LANES) * scale;
    float best = -INFINITY;
    const size_t row_bytes = (size_t)hd * mb_kv_bytes(kv);
    const int ahead = AHEAD * 4 / (int)mb_kv_bytes(kv); /* as many bytes ahead whatever the format */
    int t = 0;
#ifdef HAVE_VSUM16
    if (!mask) { /* sixteen keys a block: their sums leave in one vsum16 instead of sixteen vsum */
        vf top = vsplat(-INFINITY);
        for (; t + LANES <= n; t += LANES) {
            if (t + ahead < n) prefetch_row((const char *)K + (t + ahead) * row_bytes, row_bytes * LANES);
            vf d[LANES];
            for (int j = 0; j < LANES; j++) {
                size_t k = (size_t)(t + j) * hd;
                vf dot = qv[0] * load_kv(K, k, kv);
                for (int i = 1; i < nv; i++) dot += qv[i] * load_kv(K, k + i * LANES, kv);
                d[j] = dot;
            }
            vf sc = vsum16(d);
            if (kv == MB_KV_I8) sc = sc * vload(KS + t);
            vstore(s + t, sc);
            top = vselect(sc > top, sc, top);
        }
        for (int i = 0; i < LANES; i++) best = top[i] > best ? top[i] : best;
    }
#endif
    for (; t < n; t++) {
        if (mask && !mask[t]) { s[t] = -INFINITY; continue; }
        size_t k = (size_t)t * hd;
        if (t + ahead < n) prefetch_row((const char *)K + (t + ahead) * row_bytes, row_bytes);
        vf dot = qv[0] * load_kv(K, k, kv);
        for (int i = 1; i < nv; i++) dot += qv[i] * load_kv(K, k + i * LANES, kv);
        s[t] = kv == MB_KV_I8 ? vsum(dot) * KS[t] : vsum(dot);
        if (s[t] > best) best = s[t];
    }
    for (int i = 0; i < nv; i++) acc[i] = (vf){0};
    if (best == -INFINITY) { /* no key to attend to: zeros (the engine never asks: model.decode.decoder.cross_kv
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
        if (t + ahead < n) prefetch_row((const char *)V + (t + ahead) * row_bytes, row_bytes);
        vf p = vsplat(kv == MB_KV_I8 ? s[t] * VS[t] : s[t]);
        for (int i = 0; i < nv; i++) acc[i] += p * load_kv(V, v + i * LANES, kv);
    }
    float inv = 1.f / vsum(total);
    for (int i = 0; i < nv; i++) vstore(out + i * LANES, acc[i] * inv);
}

/* `attend_one` with the cache format as a constant in each branch (and `nv` as the caller's). */
static inline __attribute__((always_inline)) void attend_format(const float *q, const void *K, const void *V,
                                                                const float *KS, const float *VS, int kv, int n,
                                                                const uint8_t *mask, int hd, float scale, float *out,
                                                                float *s, int nv) {
    if (kv == MB_KV_I8) attend_one(q, K, V, KS, VS, MB_KV_I8, n, mask, hd, scale, out, s, nv);
    else if (kv == MB_KV_BF16) attend_one(q, K, V, 0, 0, MB_KV_BF16, n, mask, hd, scale, out, s, nv);
    else attend_one(q, K, V, 0, 0, MB_KV_F32, n, mask, hd, scale, out, s, nv);
}

/* Element `at` of a cached key or value; int8 times its vector's scale (`scales`, per hd elements). */
static float kv_at(const void *base, const float *scales, size_t at, int hd, int kv) {
    if (kv == MB_KV_I8) return ((const int8_t *)base)[at] * scales[at / hd];
    return kv == MB_KV_BF16 ? from_bf16(((const uint16_t *)base)[at]) : ((const float *)base)[at];
}

static void attend_one_scalar(const float *q, const void *K, const void *V, const float *KS, const float *VS,
                              int kv, int n, const uint8_t *mask, int hd, float scale, float *out, float *s) {
    float best = -INFINITY;
    for (int t = 0; t < n; t++) {
        if (mask && !mask[t]) { s[t] = -INFINITY; continue; }
        float dot = 0.f;
        for (int j = 0; j < hd; j++) dot += q[j] * kv_at(K, KS, (size_t)t * hd + j, hd, kv);
        s[t] = dot * scale;
        if (s[t] > best) best = s[t];
    }
    for (int j = 0; j < hd; j++) out[j] = 0.f;
    if (best == -INFINITY) return;
    float total = 0.f;
    for (int t = 0; t < n; t++) { s[t] = s[t] == -INFINITY ? 0.f : expf(s[t] - best); total += s[t]; }
    for (int t = 0; t < n; t++) {
        float p = s[t] / total;
        for (int j = 0; j < hd; j++) out[j] += p * kv_at(V, VS, (size_t)t * hd + j, hd, kv);
    }
}

int mb_attend_scratch(int rows, int heads, int n) {
    return rows * heads * ((n + LANES - 1) / LANES * LANES);
}

void mb_attend(const float *q, int q_stride, const void *K, const void *V, const float *KS, const float *VS,
               int kv, int stride, int n, const unsigned char *mask, int rows, int heads, int hd, float *a,
               int a_stride, float *scores) {
    float scale = 1.0f / sqrtf((float)hd);
    int vector = hd % LANES == 0 && hd / LANES <= MAX_HD_VECTORS;
    int padded = (n + LANES - 1) / LANES * LANES;
    /* A short cross-attention (a dozen text tokens) is cheaper than waking the other threads. */
#pragma omp parallel for schedule(static) if ((long)rows * heads * n * hd >= 8192)
    for (int rh = 0; rh < rows * heads; rh++) {
        int r = rh / heads, h = rh % heads;
        const float *qh = q + (size_t)r * q_stride + (size_t)h * hd;
        size_t key0 = ((size_t)r * heads + h) * stride, at = key0 * hd, bytes = mb_kv_bytes(kv);
        const char *Kh = (const char *)K + at * bytes, *Vh = (const char *)V + at * bytes;
        const float *KSh = KS ? KS + key0 : 0, *VSh = VS ? VS + key0 : 0;
        const uint8_t *m = mask ? mask + (size_t)r * n : 0;
        float *ah = a + (size_t)r * a_stride + (size_t)h * hd, *s = scores + (size_t)rh * padded;
        if (!vector) attend_one_scalar(qh, Kh, Vh, KSh, VSh, kv, n, m, hd, scale, ah, s);
        else if (hd == HD64 * LANES) attend_format(qh, Kh, Vh, KSh, VSh, kv, n, m, hd, scale, ah, s, HD64);
        else attend_format(qh, Kh, Vh, KSh, VSh, kv, n, m, hd, scale, ah, s, hd / LANES);
    }
}

/* One d-wide dot product of x with a folded key (format `fmt`, a constant at each inlined call). */
static inline __attribute__((always_inline)) float dot_wide(const float *x, const void *M, size_t at, int d, int fmt) {
    vf a0 = (vf){0}, a1 = (vf){0};
    int i = 0;
    for (; i + 2 * LANES <= d; i += 2 * LANES) {
        a0 += vload(x + i) * load_kv(M, at + i, fmt);
        a1 += vload(x + i + LANES) * load_kv(M, at + i + LANES, fmt);
    }
    for (; i < d; i += LANES) a0 += vload(x + i) * load_kv(M, at + i, fmt);
    return vsum(a0 + a1);
}

/* out += p * U's d-wide vector at `at`. */
static inline __attribute__((always_inline)) void axpy_wide(float p, const void *U, size_t at, int d, int fmt,
                                                            float *out) {
    vf pv = vsplat(p);
    for (int i = 0; i < d; i += LANES) vstore(out + i, vload(out + i) + pv * load_kv(U, at + i, fmt));
}

static void scores_folded(const float *x, const void *M, const float *MS, int fmt, size_t first, int t0, int t1,
                          int n, int d, const uint8_t *mask, float scale, float *s, const char *U, size_t u_row,
                          size_t u_bytes, int T) {
    /* While the scores run, this thread's columns of U (read right after) are fetched into L2,
     * spread over the score vectors so that the fetches overlap arithmetic instead of queueing. */
    int u_next = 0, per = t1 > t0 ? (T + (t1 - t0) - 1) / (t1 - t0) : T;
    for (int t = t0; t < t1; t++) {
        for (int e = 0; e < per && u_next < T; e++, u_next++)
            for (size_t i = 0; i < u_bytes; i += 64) __builtin_prefetch(U + (size_t)u_next * u_row + i, 0, 2);
        if (mask && !mask[t % n]) { s[t] = -INFINITY; continue; }
        size_t at = (first + t) * d;
        float dot = fmt == MB_KV_I8 ? dot_wide(x, M, at, d, MB_KV_I8) * MS[first + t]
                    : fmt == MB_KV_BF16 ? dot_wide(x, M, at, d, MB_KV_BF16) : dot_wide(x, M, at, d, MB_KV_F32);
        s[t] = dot * scale;
    }
}

/* out[c0, c1) += sum over vectors t of p[t] * U[t][c0, c1). */
static void sum_folded(const void *U, int fmt, size_t first, int T, int d, int c0, int c1, const float *p,
                       float *out) {
    for (int t = 0; t < T; t++) {
        if (p[t] == 0.f) continue;
        size_t at = (first + t) * d + c0;
        if (fmt == MB_KV_I8) axpy_wide(p[t], U, at, c1 - c0, MB_KV_I8, out + c0);
        else if (fmt == MB_KV_BF16) axpy_wide(p[t], U, at, c1 - c0, MB_KV_BF16, out + c0);
        else axpy_wide(p[t], U, at, c1 - c0, MB_KV_F32, out + c0);
    }
}

/* One head's softmax over its n text keys in place, LANES at a time; masked keys (-inf) get 0,
 * and a head with every key masked gets all zeros. Where `us` is given (int8 values), each weight
 * takes its value's scale. Only keys up to the last unmasked one are summed, all of them through
 * vexp in whole vectors (the last padded with -inf), so that a prompt padded to a longer prompt's
 * width in a batch gets bit for bit the weights it gets alone (a scalar expf tail, and a total
 * whose grouping followed n, gave other tokens beside a longer prompt; docs/engine.md). */
static void softmax_folded(float *sh, int n, const float *us) {
    float best = -INFINITY;
    int live = 0;
    for (int j = 0; j < n; j++) {
        best = sh[j] > best ? sh[j] : best;
        live = sh[j] != -INFINITY ? j + 1 : live;
    }
    if (best == -INFINITY) {
        memset(sh, 0, sizeof(float) * (size_t)n);
        return;
    }
    vf top = vsplat(best), sum = (vf){0};
    int j = 0;
    for (; j + LANES <= live; j += LANES) {
        vf e = vexp(vload(sh + j) - top);
        vstore(sh + j, e);
        sum += e;
    }
    if (j < live) {
        float tail[LANES];
        for (int i = 0; i < LANES; i++) tail[i] = j + i < live ? sh[j + i] : -INFINITY;
        vf e = vexp(vload(tail) - top);
        sum += e;
        vstore(tail, e);
        memcpy(sh + j, tail, sizeof(float) * (size_t)(live - j));
    }
    for (j = live; j < n; j++) sh[j] = 0.f;
    float total = vsum(sum);
    for (j = 0; j < live; j++) sh[j] = us ? sh[j] / total * us[j] : sh[j] / total;
}

void mb_cross_folded(const float *x, int rows, int d, int heads, int n, const void *M, const void *U,
                     const float *MS, const float *US, int fmt, const int *slot, const unsigned char *mask,
                     float *out, float *s) {
    float scale = 1.0f / sqrtf((float)(d / heads));
    int T = heads * n;
    memset(out, 0, sizeof(float) * (size_t)rows * d);
    for (int r = 0; r < rows; r++) {
        if (slot[r] < 0) continue;
        const float *xr = x + (size_t)r * d;
        float *o = out + (size_t)r * d;
        size_t first = (size_t)slot[r] * T;
        const uint8_t *m = mask ? mask + (size_t)r * n : 0;
        /* Each thread takes a contiguous run of the (head, key) vectors: one sequential stream. */
#pragma omp parallel if ((long)T * d >= 65536)
        {
            int nt = omp_get_num_threads(), me = omp_get_thread_num();
            int t0 = (int)((long)T * me / nt), t1 = (int)((long)T * (me + 1) / nt);
            int blocks = d / LANES;
            int c0 = (int)((long)blocks * me / nt) * LANES, c1 = (int)((long)blocks * (me + 1) / nt) * LANES;
            size_t item = mb_kv_bytes(fmt);
            scores_folded(xr, M, MS, fmt, first, t0, t1, n, d, m, scale, s,
                          (const char *)U + ((first * d) + c0) * item, (size_t)d * item, (size_t)(c1 - c0) * item, T);
#pragma omp barrier
#pragma omp single
            for (int h = 0; h < heads; h++) /* softmax over each head's keys; int8 values' scales folded in */
                softmax_folded(s + (size_t)h * n, n, fmt == MB_KV_I8 ? US + first + (size_t)h * n : 0);
            /* the weighted sum: each thread its own columns, every vector in the same order, so
             * the result does not depend on the thread count or timing (renders reproduce) */
            sum_folded(U, fmt, first, T, d, c0, c1, s, o);
        }
    }
}
