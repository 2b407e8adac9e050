/* int4 in portable C: its layout (int_kernels.h) from float32 rows and back, the same bytes on
 * every instruction set, so a weight cache or a take made on one CPU means the same on another;
 * and the product's driver around the instruction set's own steps (arch/).
 * _Float16 (GCC 12+, Clang) rounds to nearest even, as the F16C instruction does. */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "int_kernels.h"

/* One block of I4_QB weights at the range [s lo, s hi] (lo = min(w, 0), hi = max(w, 0)):
 * d = s (hi - lo) / 15 rounded to float16, z = round-half-even(-s lo / d) and
 * q = round-half-even(w / d) + z, both clamped to [0, 15] (d = 0, an all-zero block: every q and
 * z 0). Returns the squared error of d (q - z) against w: each term squared in float (d (q - z)
 * is exact there, so a fused multiply-add rounds the difference as separate steps do), summed in
 * double in I4_LANES running sums, input k into sum k % I4_LANES in order, then the sums in
 * order: a sum a vector unit keeps, and one model.decode.quant._int4_at repeats to the bit. */
static double i4_block(const float *wb, float lo, float hi, float s, float *q, _Float16 *dh, float *z) {
    *dh = (_Float16)(s * (hi - lo) / 15.f); /* no product before a sum, so no fused multiply-add */
    float d = (float)*dh, inv = d > 0.f ? 1.f / d : 0.f, zf = nearbyintf(-(s * lo) * inv);
    zf = zf < 0.f ? 0.f : zf > 15.f ? 15.f : zf;
    *z = zf;
    for (int k = 0; k < I4_QB; k++) {
        float v = nearbyintf(wb[k] * inv) + zf;
        q[k] = v < 0.f ? 0.f : v > 15.f ? 15.f : v;
    }
    double acc[I4_LANES] = {0.0}, err = 0.0;
    for (int c = 0; c < I4_QB; c += I4_LANES)
        for (int l = 0; l < I4_LANES; l++) {
            float e = (q[c + l] - zf) * d - wb[c + l];
            acc[l] += (double)(e * e);
        }
    for (int l = 0; l < I4_LANES; l++) err += acc[l];
    return err;
}

/* model.decode.quant.quantize_int4's arithmetic: per block, the range [min(w, 0), max(w, 0)]
 * shrunk by each factor of I4_SHRINKS in turn, keeping the one whose d (q - z) is nearest w in
 * squared error (the first on a tie). `out` holds mb_i4_bytes(N, K) bytes; padding rows and
 * bytes are written as zeros. */
void mb_quantize_i4(const float *w, int N, int K, uint8_t *out) {
    int blocks = K / I4_QB, tiles = (N + I4_TILE - 1) / I4_TILE;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < tiles; t++)
        for (int b = 0; b < blocks; b++) {
            uint8_t *o = out + ((size_t)t * blocks + b) * I4_TB;
            memset(o, 0, I4_TB);
            for (int i = 0; i < I4_TILE && t * I4_TILE + i < N; i++) {
                const float *wb = w + (size_t)(t * I4_TILE + i) * K + (size_t)b * I4_QB;
                float mn = 0.f, mx = 0.f;
                for (int k = 0; k < I4_QB; k++) {
                    mn = wb[k] < mn ? wb[k] : mn;
                    mx = wb[k] > mx ? wb[k] : mx;
                }
                float q[I4_QB], qs[I4_QB], z, zs;
                _Float16 dh, dhs;
                double best = i4_block(wb, mn, mx, 1.f, q, &dh, &z);
                for (int j = 1; j < I4_SHRINKS && best > 0.0; j++) {
                    double err = i4_block(wb, mn, mx, 1.f - (float)j / I4_SHRINK_DIV, qs, &dhs, &zs);
                    if (err < best) {
                        best = err, dh = dhs, z = zs;
                        memcpy(q, qs, sizeof q);
                    }
                }
                for (int j = 0; j < 16; j++)
                    for (int c = 0; c < 4; c++) o[64 * j + 4 * i + c] = (uint8_t)((int)q[8 * j + c] | ((int)q[8 * j + 4 + c] << 4));
                memcpy(o + I4_D_AT + 2 * i, &dh, 2);
                o[I4_Z_AT + i] = (uint8_t)z;
            }
        }
}

/* The layout back to float32 rows, d (q - z) (K a multiple of 128): for a prefill's one matmul,
 * where PyTorch's unpacking took 35 ms for a 4096 x 1024 weight. */
void mb_dequantize_i4(const uint8_t *w, int N, int K, float *out) {
    int blocks = K / I4_QB, tiles = (N + I4_TILE - 1) / I4_TILE;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < tiles; t++)
        for (int i = 0; i < I4_TILE && t * I4_TILE + i < N; i++)
            for (int b = 0; b < blocks; b++) {
                const uint8_t *p = w + ((size_t)t * blocks + b) * I4_TB;
                _Float16 dh;
                memcpy(&dh, p + I4_D_AT + 2 * i, 2);
                float d = (float)dh;
                int z = p[I4_Z_AT + i];
                float *o = out + (size_t)(t * I4_TILE + i) * K + (size_t)b * I4_QB;
                for (int j = 0; j < 16; j++)
                    for (int c = 0; c < 4; c++) {
                        uint8_t v = p[64 * j + 4 * i + c];
                        o[8 * j + c] = (float)((v & 15) - z) * d;
                        o[8 * j + 4 + c] = (float)((v >> 4) - z) * d;
                    }
            }
}

/* y (M, N) = x (M, K) . W^T for a `mb_quantize_i4` weight: the activations quantised once, then
 * tiles split over the threads, each tile met by the activation rows two at a time, so a row's
 * result does not depend on what it is batched with. Returns 0; -1 without scratch memory; -2
 * where no implementation is built in (the caller runs PyTorch's kernel). */
int mb_gemv_i4(const float *x, int M, int K, const uint8_t *w, float *y, int N) {
#ifdef MB_ARCH_NONE
    (void)x; (void)M; (void)K; (void)w; (void)y; (void)N;
    return -2;
#else
    int blocks = K / I4_QB, tiles = (N + I4_TILE - 1) / I4_TILE;
    int8_t *xq = malloc((size_t)M * K);
    float *sx = malloc(sizeof(float) * (size_t)M * blocks * 2);
    if (!xq || !sx) { free(xq); free(sx); return -1; }
    int32_t *sq = (int32_t *)(sx + (size_t)M * blocks);
    for (int m = 0; m < M; m++)
        for (int b = 0; b < blocks; b++) {
            size_t at = (size_t)m * K + (size_t)b * I4_QB, s = (size_t)m * blocks + b;
            mb_i4_quantize_block(x + at, xq + at, sx + s, sq + s);
        }
#pragma omp parallel for schedule(static)
    for (int t = 0; t < tiles; t++) {
        int n = t * I4_TILE, nt = N - n < I4_TILE ? N - n : I4_TILE;
        const uint8_t *wt = w + (size_t)t * blocks * I4_TB;
        for (int m = 0; m < M; m += 2) {
            int m1 = m + 1 < M ? m + 1 : m;
            size_t a = (size_t)m * blocks, c = (size_t)m1 * blocks;
            float oa[I4_TILE], oc[I4_TILE];
            mb_i4_tile(xq + a * I4_QB, xq + c * I4_QB, sx + a, sx + c, sq + a, sq + c, blocks, wt, m == 0, oa, oc);
            memcpy(y + (size_t)m * N + n, oa, sizeof(float) * (size_t)nt);
            if (m1 != m) memcpy(y + (size_t)m1 * N + n, oc, sizeof(float) * (size_t)nt);
        }
    }
    free(xq);
    free(sx);
    return 0;
#endif
}
