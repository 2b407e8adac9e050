/* The integer kernels: int8 and int4 products on integer dot products, one implementation per
 * instruction set side by side (arch/x86/avx512.c, arch/x86/avx2.c, arch/arm/neon.c,
 * arch/none.c), exactly one of which is compiled in, chosen here from the compiler's target
 * macros. model/kernels/gemv.py builds with -march=native (or the -march a test names), so the choice
 * follows what the CPU reports.
 *
 * Every implementation does the same integer arithmetic, described below, so the integer sums
 * are the same everywhere; the float work after them is the implementation's own. Within one
 * build each (weight row, activation row) result is computed in one fixed order whatever the
 * batch, so a row comes out bit for bit the same alone, guided or among variations.
 */
#ifndef MB_INT_KERNELS_H
#define MB_INT_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include "vec.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(HAVE_VSUM16)
#define MB_ARCH_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MB_ARCH_AVX2 1
#elif defined(__aarch64__) && defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
#define MB_ARCH_NEON 1
#else
#define MB_ARCH_NONE 1
#endif

/* int8. The activations are split into two int8 terms per block of QB inputs:
 * x ~ s * (hi + lo / 256), s = the block's max |x| / 127, so they keep about 15 bits (the
 * weights' own rounding dominates the error, as in the float kernel). A block's integer sum is
 * (dot(w, hi) << 8) + dot(w, lo) in one int32 (at most 4 * 255 * 127 * 257 < 2^31 per lane).
 * The weights are stored biased as unsigned (q + 128, the unsigned operand of vpdpbusd), so that
 * AVX512-VNNI reads them as they are; the bias adds 128 * sum(x) per block, the same for every
 * output row, taken off once per row of x (`corr`). Instruction sets whose dot products want a
 * signed weight flip the top bit back in a register (q = w ^ 0x80) and have no correction.
 * Block scales keep an outlier's damage to its own 64 inputs. */
#define QB 64

/* How far ahead (bytes) a sequential sweep over weight rows fetches into L2 (prefetcht1): 16 KB
 * read at 1.05-1.2x a plain read's time, 4-8 KB at 1.1-1.45x, with the VM's memory speed
 * moving between 30 and 46 GB/s (AMD EPYC; BENCHMARKS.md). */
#ifndef SEQ_AHEAD
#define SEQ_AHEAD 16384
#endif

/* int4, w = d (q - z) in blocks of 128 inputs with a float16 step d and a zero point z (0-15)
 * per row and block.
 *
 * Layout: rows in tiles of I4_TILE = 16, one contiguous stream per tile, block after block. A
 * tile's block is I4_TB = 1088 bytes: sixteen 64-byte vectors of q, then the sixteen rows' d
 * (float16), their z (bytes) and 16 bytes of padding, so that on a 64-byte-aligned weight (as the
 * arena and PyTorch make them) every vector load is one cache line.
 * In vector j, the 32-bit lane i holds row i's inputs 8j..8j+3 in its four low nibbles and
 * 8j+4..8j+7 in its high nibbles. A tile of fewer rows (the last, where N is not a multiple of
 * 16) is padded with zero rows.
 *
 * Why lanes are rows: one dot-product instruction then advances many rows by four inputs each
 * against one broadcast activation word, so a block's dot products stay in integer lanes, one
 * per row, and the step, the zero point and the activation's scale are applied once per block to
 * all the rows of a vector, with no horizontal sums. A layout with lanes along the inputs (one
 * row's block in 67 bytes) spent most of its instructions on each row's per-block scale and ran
 * from memory at 17.5 GB/s where a plain read ran at 24 (BENCHMARKS.md).
 *
 * The activations get one int8 term per block (s = max |x| / 127): int4 weights round 16 times
 * coarser than that, so a second term, as int8 has, bought nothing measurable on the trained
 * proxy. With integer sums S = sum q xq and Q = sum xq over a block, the block adds
 * d s (S - z Q), exactly the integer dot product of (q - z) and xq, then scaled. Because every
 * lane is one row and the float steps per lane are the same, int4 gives the same bits on every
 * instruction set. */
#define I4_QB 128
#define I4_TILE 16
#define I4_TB 1088
#define I4_D_AT 1024 /* the sixteen steps (float16) in a tile's block, after the sixteen vectors of q */
#define I4_Z_AT 1056 /* the sixteen zero points (bytes) */
/* The ranges the quantiser tries for a block: [s lo, s hi] for s = 1 - j / I4_SHRINK_DIV,
 * j < I4_SHRINKS (1 down to 0.7). A block of 128 Gaussian or Student-t weights does best at
 * s = 0.8-1.0 and never below 0.8; the rest covers trained weights' outliers. */
#define I4_SHRINKS 13
#define I4_SHRINK_DIV 40.f
#define I4_LANES 16 /* running sums of a block's squared error (int4.c i4_block) */
/* Blocks a tile's stream is fetched ahead, into L2: one sequential stream per thread, fetched
 * four blocks ahead, read at 1.10-1.27x a plain read's time where fetching two blocks ahead into
 * L1 took 1.28-1.30x and the hardware prefetcher alone 1.65x (Intel Xeon, the 96 products of
 * musicgen-small's layers, alternated in one process; BENCHMARKS.md). */
#define I4_AHEAD 4

/* Which implementation is built in: "avx512-vnni", "avx2", "neon-dotprod" or "none". */
const char *mb_int_arch(void);
/* 1 where an implementation is built in (the int8 "vnni" layout and int4 run in C), else 0. */
int mb_has_vnni(void);
int mb_gemv_i8_vnni(const float *x, int M, int K, const uint8_t *w, const float *scale, const float *bias,
                    float *y, int N);
int mb_gemv_i4(const float *x, int M, int K, const uint8_t *w, float *y, int N);

/* int4's two steps that differ by instruction set (arch/), called by its one product driver,
 * mb_gemv_i4 (int4.c). One block of 128 activations to int8 terms xq, its scale sx and the sum
 * of its terms sq. */
void mb_i4_quantize_block(const float *x, int8_t *xq, float *sx, int32_t *sq);
/* One tile's I4_TILE rows against activation rows a and c (c = a where there is no second), their
 * scales and sums, into out_a and out_c (I4_TILE floats each, padding rows included); with
 * `fetch`, the tile's stream is fetched I4_AHEAD blocks ahead (the first pass over a tile). */
void mb_i4_tile(const int8_t *a, const int8_t *c, const float *sa, const float *sc, const int32_t *qa,
                const int32_t *qc, int blocks, const uint8_t *wt, int fetch, float *out_a, float *out_c);

/* An output of an int8 kernel from its block-scaled sum. fmaf, not `* scale + bias`: the compiler
 * fuses that or not depending on how it vectorises each loop, and a row must come out the same
 * whatever it is batched with. */
static inline float int8_out(float sum, float corr, const float *scale, const float *bias, int n) {
    float v = sum - corr;
    return bias ? fmaf(v, scale[n], bias[n]) : v * scale[n];
}


#endif
