/* No integer kernels on this instruction set: int8 runs the widening kernel (gemv.c) and int4
 * PyTorch's packed kernel (model/decode/quant.py; mb_gemv_i4 in int4.c answers -2), and model/kernels/gemv.py says so at load. */
#include "../int_kernels.h"
#ifdef MB_ARCH_NONE

const char *mb_int_arch(void) { return "none"; }
int mb_has_vnni(void) { return 0; }

int mb_gemv_i8_vnni(const float *x, int M, int K, const uint8_t *w, const float *scale, const float *bias,
                    float *y, int N) {
    (void)x; (void)M; (void)K; (void)w; (void)scale; (void)bias; (void)y; (void)N;
    return -2;
}

#endif
