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

/* One decode state's rows in a step: its own cache, position and conditioning. A step over several
 * groups (several jams on one engine) runs every product once over all their rows, the weights
 * read once, and each group's attention over its own cache at its own position.
 *
 * Layer l's cache is k/v + l * cache_layer elements (format kv of the step), int8's scales
 * ks/vs + l * cache_layer / hd; its cross keys/values ck/cv + l * cross_layer floats under cmask
 * (rows, cross_len), or, where fm is given, the folded keys fm/values fu (f_layer elements a layer,
 * format ffmt, int8's scales fms/fus) read by `slot` (mb_cross_folded). ck and fm both NULL: no
 * cross-attention (melody models). */
typedef struct {
    int rows, pos, max_len, cross_len;
    void *k, *v;
    float *ks, *vs;
    size_t cache_layer;
    const float *ck, *cv;
    size_t cross_layer;
    const uint8_t *cmask;
    const void *fm, *fu;
    const float *fms, *fus;
    int ffmt;
    size_t f_layer;
    const int *slot;
} mb_group;

/* Layer `l` of a step over `n` groups: x (their rows, d, in group order) is updated in place. The
 * new tokens' keys and values go to column `pos` of each group's cache and its attention reads
 * columns [0, pos]. Every row's arithmetic is the same whatever other rows the step holds (the
 * products' contract, gemv.c), so a group's result is bit for bit its result alone. Returns 0, or -1
 * when scratch memory could not be had (x is then partly updated: the caller passes a copy and
 * discards it). */
static int layer_step(const mb_layer *L, int l, float *x, const mb_group *g, int n, int kv) {
    int d = L->d, heads = L->heads, hd = d / heads, ffn = L->ffn, rows = 0, widest = 1, projected = 0, crossed = 0;
    for (int i = 0; i < n; i++) {
        rows += g[i].rows;
        if (g[i].pos + 1 > widest) widest = g[i].pos + 1;
        if (g[i].cross_len > widest) widest = g[i].cross_len;
        projected |= g[i].ck != NULL && g[i].fm == NULL;
        crossed |= g[i].ck != NULL || g[i].fm != NULL;
    }
    size_t item = mb_kv_bytes(kv);
    size_t need = (size_t)rows * (d + 3 * d + d + d + ffn) + (size_t)mb_attend_scratch(rows, heads, widest);
    float *h = malloc(sizeof(float) * need);
    if (!h) return -1;
    float *qkv = h + (size_t)rows * d, *a = qkv + (size_t)rows * 3 * d, *o = a + (size_t)rows * d;
    float *f = o + (size_t)rows * d, *scores = f + (size_t)rows * ffn;

    layer_norm(x, L->ln_self_w, L->ln_self_b, L->eps, rows, d, h);
    if (product(&L->qkv, h, rows, d, qkv, 3 * d)) goto fail;
    for (int i = 0, r0 = 0; i < n; r0 += g[i].rows, i++) {
        const mb_group *G = g + i;
        char *kc = (char *)G->k + (size_t)l * G->cache_layer * item, *vc = (char *)G->v + (size_t)l * G->cache_layer * item;
        size_t per_scale = G->cache_layer / hd;
        float *ks = G->ks ? G->ks + (size_t)l * per_scale : NULL, *vs = G->vs ? G->vs + (size_t)l * per_scale : NULL;
        for (int r = 0; r < G->rows; r++)
            for (int hh = 0; hh < heads; hh++) {
                size_t key = ((size_t)r * heads + hh) * G->max_len + G->pos, at = key * hd;
                const float *k = qkv + (size_t)(r0 + r) * 3 * d + d + (size_t)hh * hd, *v = k + d;
                if (kv == MB_KV_I8) {
                    quantize_vector(k, hd, (int8_t *)kc + at, ks + key);
                    quantize_vector(v, hd, (int8_t *)vc + at, vs + key);
                } else if (kv == MB_KV_BF16) {
                    for (int j = 0; j < hd; j++) {
                        ((uint16_t *)kc)[at + j] = to_bf16(k[j]);
                        ((uint16_t *)vc)[at + j] = to_bf16(v[j]);
                    }
                } else {
                    memcpy((float *)kc + at, k, sizeof(float) * hd);
                    memcpy((float *)vc + at, v, sizeof(float) * hd);
                }
            }
        mb_attend(qkv + (size_t)r0 * 3 * d, 3 * d, kc, vc, ks, vs, kv, G->max_len, G->pos + 1, NULL, G->rows, heads,
                  hd, a + (size_t)r0 * d, d, scores);
    }
    if (product(&L->out, a, rows, d, o, d)) goto fail;
    for (size_t i = 0; i < (size_t)rows * d; i++) x[i] += o[i];

    if (crossed) {
        layer_norm(x, L->ln_cross_w, L->ln_cross_b, L->eps, rows, d, h);
        /* The projected groups' queries: one product over every row (a row's result is its own). */
        if (projected && product(&L->cross_q, h, rows, d, qkv, d)) goto fail;
        for (int i = 0, r0 = 0; i < n; r0 += g[i].rows, i++) {
            const mb_group *G = g + i;
            size_t fat = (size_t)l * G->f_layer, fbytes = fat * mb_kv_bytes(G->ffmt), fscales = fat / d;
            if (G->fm) {
                mb_cross_folded(h + (size_t)r0 * d, G->rows, d, heads, G->cross_len, (const char *)G->fm + fbytes,
                                (const char *)G->fu + fbytes, G->fms ? G->fms + fscales : NULL,
                                G->fus ? G->fus + fscales : NULL, G->ffmt, G->slot, G->cmask, o + (size_t)r0 * d,
                                scores);
            } else if (G->ck) {
                size_t at = (size_t)l * G->cross_layer;
                mb_attend(qkv + (size_t)r0 * d, d, G->ck + at, G->cv + at, NULL, NULL, MB_KV_F32, G->cross_len,
                          G->cross_len, G->cmask, G->rows, heads, hd, a + (size_t)r0 * d, d, scores);
            } else {
                memset(o + (size_t)r0 * d, 0, sizeof(float) * (size_t)G->rows * d);
            }
        }
        if (projected) { /* their outputs through the projection, into their own rows of o */
            float *po = qkv + (size_t)rows * d; /* the rest of qkv's scratch: free once the queries are read */
            if (product(&L->cross_out, a, rows, d, po, d)) goto fail;
            for (int i = 0, r0 = 0; i < n; r0 += g[i].rows, i++)
                if (g[i].ck && !g[i].fm)
                    memcpy(o + (size_t)r0 * d, po + (size_t)r0 * d, sizeof(float) * (size_t)g[i].rows * d);
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

/* One layer's step over one cache (model/decode/layer_step.py's FusedLayer): x (rows, d) is updated
 * in place; kcache/vcache (rows, heads, max_len, hd) in format L->kv, int8's scales kscale/vscale;
 * cross-attention (skipped when ck is NULL) reads ck/cv (rows, heads, cross_len, hd) under cmask. */
int mb_layer_step(const mb_layer *L, float *x, void *kcache, void *vcache, float *kscale, float *vscale, int pos,
                  const float *ck, const float *cv, const uint8_t *cmask) {
    mb_group g = {L->rows, pos, L->max_len, ck ? L->cross_len : 0, kcache, vcache, kscale, vscale, 0, ck, cv, 0,
                  cmask, NULL, NULL, NULL, NULL, 0, 0, NULL};
    return layer_step(L, 0, x, &g, 1, L->kv);
}

/* A whole decode step after the embeddings over `n` groups (one decode state each; see mb_group):
 * every layer's step, then the final layer norm and the heads, in one call. x (all the groups' rows,
 * d) is updated in place; logits (rows, heads_n) are written. Why one call: per layer, the Python
 * around a C call (module call, checks, views, ctypes) cost more than the layer norms it wraps.
 * Returns 0, or -1 when scratch memory could not be had (x and logits are then partly written). */
int mb_decoder_steps(const mb_layer *layers, int n_layers, int kv, const mb_group *groups, int n, float *x,
                     const float *ln_w, const float *ln_b, const mb_linear *heads, int heads_n, float *logits) {
    int rows = 0;
    for (int i = 0; i < n; i++) rows += groups[i].rows;
    for (int l = 0; l < n_layers; l++)
        if (layer_step(layers + l, l, x, groups, n, kv)) return -1;
    int d = layers[0].d;
    float *h = malloc(sizeof(float) * (size_t)rows * d);
    if (!h) return -1;
    layer_norm(x, ln_w, ln_b, layers[0].eps, rows, d, h);
    int rc = product(heads, h, rows, d, logits, heads_n);
    free(h);
    return rc ? -1 : 0;
}
