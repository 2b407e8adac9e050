/* Top-k sampling's support in one pass per row, for the CPU sampler (model/decode/sampling.py).
 *
 * Why: the race that draws a token needs only the k candidates, in a fixed order. In PyTorch,
 * finding them (topk, the threshold, the tie check, a sort into token order, a gather) took
 * about 140 us of a step's 4 x 2048 logits on two cores; here the threshold is found by bisection
 * over the floats' order-preserving integer keys and one scan collects the candidates, and the
 * values are copied, not computed, so the candidates are exactly PyTorch's. Rows whose width is
 * not a whole number of vectors go to the caller's PyTorch path.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "vec.h"

typedef uint32_t vu __attribute__((vector_size(LANES * 4)));

/* A float's bits as an unsigned key in the same order (NaN excluded by the caller). */
static inline uint32_t key_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}

/* The largest key t with at least k keys >= t: the k-th largest key, found by bisecting the key
 * space (32 counts of n compares, LANES at a time) instead of a selection whose compares the
 * branch predictor keeps missing (18 us a 2048-wide row here, measured). n is a multiple of LANES. */
static uint32_t kth_largest_key(const uint32_t *keys, int n, int k) {
    uint32_t lo = 0, hi = 0xffffffffu; /* count(>= lo) >= k holds; the answer is in [lo, hi] */
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2 + 1;
        vu t = (vu){0} + mid, c = (vu){0};
        for (int j = 0; j < n; j += LANES) {
            vu v;
            memcpy(&v, keys + j, sizeof v);
            c += (vu)(v >= t) & 1;
        }
        uint32_t count = 0;
        for (int i = 0; i < LANES; i++) count += c[i];
        if (count >= (uint32_t)k) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* For each row of x (rows, n): the indices (increasing) and values of its k largest values.
 * Returns 0, or 1 where some row has a NaN or a tie at its k-th value (more than k values at or
 * above it), which the caller samples on its full path; -1 without scratch memory. */
int mb_top_k_support(const float *x, int rows, int n, int k, int64_t *index, float *values) {
    if (k < 1 || k > n || n % LANES) return 1;
    uint32_t *keys = malloc(sizeof(uint32_t) * (size_t)n);
    if (!keys) return -1;
    int rc = 0;
    for (int r = 0; r < rows && rc == 0; r++) {
        const float *row = x + (size_t)r * n;
        for (int j = 0; j < n; j++) {
            if (row[j] != row[j]) { rc = 1; break; }
            keys[j] = key_of(row[j] + 0.0f); /* -0 as +0: they compare equal as floats */
        }
        if (rc) break;
        uint32_t kth = kth_largest_key(keys, n, k);
        int count = 0;
        for (int j = 0; j < n; j++) {
            if (keys[j] < kth) continue;
            if (count == k) { rc = 1; break; }
            index[(size_t)r * k + count] = j;
            values[(size_t)r * k + count] = row[j];
            count++;
        }
    }
    free(keys);
    return rc;
}
