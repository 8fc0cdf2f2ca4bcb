// edgead: CPU reference of the PaDiM Mahalanobis kernel (same arithmetic: fp32 accumulation row by row),
// plus the host-only helpers of the C ABI. Builds with any C++11 compiler and no CUDA (EDGEAD_CPU_ONLY),
// so CI can test the packed-triangle index math and the fp16 decoding without a GPU.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#ifndef EDGEAD_CPU_ONLY
#define EDGEAD_CPU_ONLY
#endif
#include "edgead/padim_mahalanobis.h"
#include "half_bits.h"

using edgead::half_bits_to_float;


extern "C" EDGEAD_API int edgead_padim_mahalanobis_cpu(const float* x, const float* mean, const void* w_packed,
                                                       int w_is_half, float* out, int N, int D, int P) {
    if (x == nullptr || mean == nullptr || w_packed == nullptr || out == nullptr) return EDGEAD_ERR_INVALID_ARGUMENT;
    if (N < 1 || D < 1 || P < 1 || D > EDGEAD_MAX_DIM) return EDGEAD_ERR_INVALID_ARGUMENT;
    const size_t tri = (size_t)D * (D + 1) / 2;
    std::vector<float> centred((size_t)D);
    std::vector<float> row((size_t)D);
    for (int p = 0; p < P; ++p) {
        for (int n = 0; n < N; ++n) {
            for (int d = 0; d < D; ++d)
                centred[d] = x[((size_t)n * D + d) * P + p] - mean[(size_t)p * D + d];
            float sum_sq = 0.f;
            for (int i = 0; i < D; ++i) {
                const size_t start = (size_t)p * tri + (size_t)i * (i + 1) / 2;  // row i of W_p
                float acc = 0.f;
                for (int j = 0; j <= i; ++j) {
                    const float w = w_is_half ? half_bits_to_float(static_cast<const uint16_t*>(w_packed)[start + j])
                                              : static_cast<const float*>(w_packed)[start + j];
                    acc += w * centred[j];
                }
                sum_sq += acc * acc;
            }
            out[(size_t)n * P + p] = std::sqrt(sum_sq);
        }
    }
    return EDGEAD_OK;
}

extern "C" EDGEAD_API const char* edgead_status_string(int status) {
    switch (status) {
        case EDGEAD_OK: return "ok";
        case EDGEAD_ERR_INVALID_ARGUMENT:
            return "invalid argument (null pointer, N/D/P < 1, or D larger than the kernel supports)";
        case EDGEAD_ERR_CUDA: return "CUDA kernel launch failed";
        default: return "unknown status";
    }
}

extern "C" EDGEAD_API int edgead_kernels_abi_version(void) { return EDGEAD_KERNELS_ABI_VERSION; }
