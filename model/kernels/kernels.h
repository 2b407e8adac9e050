/* What model/gemv.c offers model/layer_step.c: one product of any weight format. */
#ifndef MB_KERNELS_H
#define MB_KERNELS_H

/* Weight formats: float32, bfloat16, int8 (one scale per row), int8 biased to uint8 for
 * integer dot products, int4 in blocks of 128 with a float16 step and a zero point each, stored
 * with the data (gemv.c; no separate scale). */
enum { MB_F32 = 0, MB_BF16 = 1, MB_I8 = 2, MB_I8_VNNI = 3, MB_I4 = 4 };

/* y[M,N] = x[M,K] . W[N,K]^T, float32 activations; `scale` for the int8 formats, else NULL.
 * Returns 0, or nonzero (y unwritten) when scratch memory could not be had or the format is not
 * built here. */
int mb_product(int kind, const float *x, int M, int K, const void *w, const float *scale, float *y, int N);

/* Cached key/value formats: float32, bfloat16, int8 with one float32 scale per key (and value)
 * vector (x = q * scale, scale = max|x| / 127). */
enum { MB_KV_F32 = 0, MB_KV_BF16 = 1, MB_KV_I8 = 2 };

/* Bytes of one cached element in format `kv`. */
static inline unsigned mb_kv_bytes(int kv) { return kv == MB_KV_I8 ? 1 : kv == MB_KV_BF16 ? 2 : 4; }

/* Decode-step attention (attention.c): for each row r and head h, softmax(q . K^T / sqrt(hd),
 * masked) . V over keys [0, n), into a[r, h*hd:(h+1)*hd]. K, V are (rows, heads, stride, hd) in
 * format `kv`; for int8, KS, VS (rows, heads, stride) are their scales (else NULL); mask
 * (rows, n) or NULL; `scores` holds mb_attend_scratch(rows, heads, n) floats. */
void mb_attend(const float *q, int q_stride, const void *K, const void *V, const float *KS, const float *VS,
               int kv, int stride, int n, const unsigned char *mask, int rows, int heads, int hd, float *a,
               int a_stride, float *scores);
int mb_attend_scratch(int rows, int heads, int n);

/* Cross-attention with its projections folded into the text's keys and values (attention.c,
 * model/decode/cross_fold.py): out[r] = sum over heads h and keys j of
 * softmax_j(x[r] . M[h, j] / sqrt(d / heads), masked) U[h, j], where M[h, j] = W_q,h^T k_hj and
 * U[h, j] = W_o,h v_hj are d wide, (slots, heads, n, d) in format `fmt` (MB_KV_*; int8 with
 * scales MS, US (slots, heads, n), else NULL). Row r reads slot slot[r]; slot < 0 (all-zero keys
 * and values) gives zeros. `s` holds heads * n floats. */
void mb_cross_folded(const float *x, int rows, int d, int heads, int n, const void *M, const void *U,
                     const float *MS, const float *US, int fmt, const int *slot, const unsigned char *mask,
                     float *out, float *s);

#endif
