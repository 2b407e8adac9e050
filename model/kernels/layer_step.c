/* One decoder layer's decode step (one new token per row) in one call: the same arithmetic as
 * model/decode/decoder.py's DecoderLayer.forward with n == 1, float32 throughout.
 *
 * Why: with the products at memory speed (gemv.c), a step's remaining cost was some forty
 * small PyTorch ops per layer (norms, views, cache writes, attention, GELU, residuals), each
 * a few to eighty microseconds of dispatch and threading for a few kilobytes of work. Here
 * they are plain loops between the products; attention is model/attention.c's.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "kernels.h"
#include "vec.h"

/* One linear: its weight format and tensors. */
typedef struct {
    int kind;
    const void *w;
    const float *scale;
} mb_linear;

typedef struct {
    int rows, d, heads, ffn, max_len, cross_len;
    float eps;
    const float *ln_self_w, *ln_self_b, *ln_cross_w, *ln_cross_b, *ln_ff_w, *ln_ff_b;
    mb_linear qkv, out, cross_q, cross_out, fc1, fc2;
    int kv; /* the self-attention cache's format (MB_KV_*, kernels.h) */
} mb_layer;

/* Two passes, LANES at a time: d is whole 64-blocks wherever the C step runs (model/decode/layer_step.py). */
static void layer_norm(const float *x, const float *w, const float *b, float eps, int rows, int d, float *y) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * d;
        float *yr = y + (size_t)r * d;
        vf s = (vf){0}, q = (vf){0};
        for (int i = 0; i < d; i += LANES) s += vload(xr + i);
        float mean = vsum(s) / d;
        for (int i = 0; i < d; i += LANES) { vf c = vload(xr + i) - mean; q += c * c; }
        float var = vsum(q) / d;
        float inv = 1.0f / sqrtf(var + eps);
        for (int i = 0; i < d; i++) yr[i] = (xr[i] - mean) * inv * w[i] + b[i];
    }
}

/* The exact (erf) GELU in place, LANES at a time. */
void mb_gelu(float *x, long n) {
    long i = 0;
    for (; i + LANES <= n; i += LANES) {
        vf v = vload(x + i);
        vstore(x + i, 0.5f * v * (1.0f + verf(v * 0.70710678118654752f)));
    }
    for (; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
}

static int product(const mb_linear *l, const float *x, int rows, int k, float *y, int n) {
    return mb_product(l->kind, x, rows, k, l->w, l->scale, y, n);
}

/* One key or value vector as int8 and its scale: scale = max|x| / 127 and q = x / scale rounded
 * to nearest even, clamped to [-127, 127], the same float32 operations as model/decode/decoder.py's
 * `quantize_kv`, so the C step and the eager path store the same bytes. An all-zero vector stores
 * scale 0; a vector with a NaN stores scale NaN and zeros (PyTorch's max propagates NaN), so a
 * broken activation spreads through attention the same way on both paths. */
static void quantize_vector(const float *x, int n, int8_t *q, float *scale) {
    int j = 0, nan = 0;
    float top = 0.f;
    if (n % LANES == 0) { /* LANES at a time: the same values (an IEEE division is one rounding either way) */
        vf t = (vf){0};
        vi bad = (vi){0};
        for (; j < n; j += LANES) {
            vf v = vload(x + j), a = (vf)((vi)v & 0x7fffffff);
            bad |= (vi)(v != v);
            t = vselect(a > t, a, t);
        }
        for (int i = 0; i < LANES; i++) top = fmaxf(top, t[i]), nan |= bad[i] != 0;
    } else {
        for (; j < n; j++) top = fmaxf(top, fabsf(x[j])), nan |= x[j] != x[j];
    }
    float s = nan ? NAN : top / 127.f;
    *scale = s;
    if (nan || s == 0.f) {
        memset(q, 0, (size_t)n);
        return;
    }
    j = 0;
    const vf lo = vsplat(-127.f), hi = vsplat(127.f);
    if (n % LANES == 0) {
        const vf magic = vsplat(12582912.f); /* 1.5 * 2^23: adding it rounds to nearest even, |v| <= 127 */
        for (; j < n; j += LANES) {
            vf v = vload(x + j) / vsplat(s);
            v = vselect(v < lo, lo, vselect(v > hi, hi, v)); /* a denormal scale can overshoot 127 */
            v = (v + magic) - magic;
            for (int i = 0; i < LANES; i++) q[j + i] = (int8_t)v[i];
        }
    }
    for (; j < n; j++) q[j] = (int8_t)nearbyintf(fminf(fmaxf(x[j] / s, -127.f), 127.f));
}

/* `quantize_vector` over n vectors of `width` (model/decode/decoder.py's quantize_kv, byte for byte):
 * for the folded cross-attention keys and values, made once per conditioning. */
void mb_quantize_kv(const float *x, long n, int width, int8_t *q, float *scale) {
#pragma omp parallel for schedule(static)
    for (long i = 0; i < n; i++) quantize_vector(x + i * width, width, q + i * width, scale + i);
}

/* The text's folded keys and values for one layer's cross-attention (mb_cross_folded). */
typedef struct {
    const void *m, *u;
    const float *ms, *us;
    int fmt;
    const int *slot;
} mb_folded;

/* x (rows, d) is updated in place. The new token's key and value go to column `pos` of
 * kcache/vcache (rows, heads, max_len, hd) in format L->kv, int8's scales to kscale/vscale
 * (rows, heads, max_len), and attention reads columns [0, pos]. Cross-attention
 * (skipped when ck is NULL) reads ck/cv (rows, heads, cross_len, hd) under cmask (rows, cross_len),
 * or, where `folded` is given, its folded keys and values instead of the q and out projections.
 * Returns 0, or -1 when scratch memory could not be had (x is then partly updated: the caller
 * passes a copy and discards it). */
static int layer_step(const mb_layer *L, float *x, void *kcache, void *vcache, float *kscale, float *vscale, int pos,
                      const float *ck, const float *cv, const uint8_t *cmask, const mb_folded *folded) {
    int rows = L->rows, d = L->d, heads = L->heads, hd = d / heads, ffn = L->ffn;
    int keys = pos + 1, widest = keys > L->cross_len ? keys : L->cross_len;
    size_t need = (size_t)rows * (d + 3 * d + d + d + ffn) + (size_t)mb_attend_scratch(rows, heads, widest);
    float *h = malloc(sizeof(float) * need);
    if (!h) return -1;
    float *qkv = h + (size_t)rows * d, *a = qkv + (size_t)rows * 3 * d, *o = a + (size_t)rows * d;
    float *f = o + (size_t)rows * d, *scores = f + (size_t)rows * ffn;

    layer_norm(x, L->ln_self_w, L->ln_self_b, L->eps, rows, d, h);
    if (product(&L->qkv, h, rows, d, qkv, 3 * d)) goto fail;
    for (int r = 0; r < rows; r++)
        for (int hh = 0; hh < heads; hh++) {
            size_t key = ((size_t)r * heads + hh) * L->max_len + pos, at = key * hd;
            const float *k = qkv + (size_t)r * 3 * d + d + (size_t)hh * hd, *v = k + d;
            if (L->kv == MB_KV_I8) {
                quantize_vector(k, hd, (int8_t *)kcache + at, kscale + key);
                quantize_vector(v, hd, (int8_t *)vcache + at, vscale + key);
            } else if (L->kv == MB_KV_BF16) {
                for (int j = 0; j < hd; j++) {
                    ((uint16_t *)kcache)[at + j] = to_bf16(k[j]);
                    ((uint16_t *)vcache)[at + j] = to_bf16(v[j]);
                }
            } else {
                memcpy((float *)kcache + at, k, sizeof(float) * hd);
                memcpy((float *)vcache + at, v, sizeof(float) * hd);
            }
        }
    mb_attend(qkv, 3 * d, kcache, vcache, kscale, vscale, L->kv, L->max_len, keys, NULL, rows, heads, hd, a, d,
              scores);
    if (product(&L->out, a, rows, d, o, d)) goto fail;
    for (size_t i = 0; i < (size_t)rows * d; i++) x[i] += o[i];

    if (folded || ck) {
        layer_norm(x, L->ln_cross_w, L->ln_cross_b, L->eps, rows, d, h);
        if (folded) {
            mb_cross_folded(h, rows, d, heads, L->cross_len, folded->m, folded->u, folded->ms, folded->us,
                            folded->fmt, folded->slot, cmask, o, scores);
        } else {
            if (product(&L->cross_q, h, rows, d, qkv, d)) goto fail;
            mb_attend(qkv, d, ck, cv, NULL, NULL, MB_KV_F32, L->cross_len, L->cross_len, cmask, rows, heads, hd,
                      a, d, scores);
            if (product(&L->cross_out, a, rows, d, o, d)) goto fail;
        }
        for (size_t i = 0; i < (size_t)rows * d; i++) x[i] += o[i];
    }

    layer_norm(x, L->ln_ff_w, L->ln_ff_b, L->eps, rows, d, h);
    if (product(&L->fc1, h, rows, d, f, ffn)) goto fail;
    mb_gelu(f, (long)rows * ffn);
    if (product(&L->fc2, f, rows, ffn, o, d)) goto fail;
    for (size_t i = 0; i < (size_t)rows * d; i++) x[i] += o[i];
    free(h);
    return 0;
fail:
    free(h);
    return -1;
}

int mb_layer_step(const mb_layer *L, float *x, void *kcache, void *vcache, float *kscale, float *vscale, int pos,
                  const float *ck, const float *cv, const uint8_t *cmask) {
    return layer_step(L, x, kcache, vcache, kscale, vscale, pos, ck, cv, cmask, NULL);
}

/* A whole decode step after the embeddings: every layer's step, then the final layer norm and
 * the heads, in one call. Layer l's cache is kcache/vcache + l * cache_layer elements (format
 * kv), int8's scales kscale/vscale + l * cache_layer / hd, its cross keys/values
 * ck/cv + l * cross_layer floats. x (rows, d) is
 * updated in place; logits (rows, heads_n) are written. Where fm is given, cross-attention reads
 * the folded keys fm/values fu (f_layer elements a layer, format ffmt, int8's scales fms/fus) by
 * `slot` instead (mb_cross_folded). Why: per layer, the Python around a C
 * call (module call, checks, views, ctypes) cost more than the layer norms it wraps. Returns 0,
 * or -1 when scratch memory could not be had (x and logits are then partly written). */
int mb_decoder_step(const mb_layer *layers, int n_layers, int rows, int max_len, int cross_len, int kv,
                    float *x, void *kcache, void *vcache, float *kscale, float *vscale, size_t cache_layer, int pos,
                    const float *ck, const float *cv, size_t cross_layer, const uint8_t *cmask,
                    const float *ln_w, const float *ln_b, const mb_linear *heads, int heads_n, float *logits,
                    const void *fm, const void *fu, const float *fms, const float *fus, int ffmt, size_t f_layer,
                    const int *slot) {
    size_t item = mb_kv_bytes(kv);
    size_t per_scale = cache_layer / (layers[0].d / layers[0].heads);
    for (int l = 0; l < n_layers; l++) {
        mb_layer L = layers[l];
        L.rows = rows, L.max_len = max_len, L.cross_len = cross_len, L.kv = kv;
        size_t at = (size_t)l * cache_layer * item;
        float *ks = kscale ? kscale + (size_t)l * per_scale : NULL, *vs = vscale ? vscale + (size_t)l * per_scale : NULL;
        size_t fat = (size_t)l * f_layer, fbytes = fat * mb_kv_bytes(ffmt), fscales = fat / layers[0].d;
        mb_folded folded = {fm ? (const char *)fm + fbytes : NULL, fu ? (const char *)fu + fbytes : NULL,
                            fms ? fms + fscales : NULL, fus ? fus + fscales : NULL, ffmt, slot};
        if (layer_step(&L, x, (char *)kcache + at, (char *)vcache + at, ks, vs, pos,
                       ck ? ck + (size_t)l * cross_layer : NULL, cv ? cv + (size_t)l * cross_layer : NULL, cmask,
                       fm ? &folded : NULL))
            return -1;
    }
    int d = layers[0].d;
    float *h = malloc(sizeof(float) * (size_t)rows * d);
    if (!h) return -1;
    layer_norm(x, ln_w, ln_b, layers[0].eps, rows, d, h);
    int rc = product(heads, h, rows, d, logits, heads_n);
    free(h);
    return rc ? -1 : 0;
}
