/*
 * edgead: PaDiM Mahalanobis distance with packed lower-triangular whitening (C ABI).
 *
 * Shapes (docs/CONTRACTS.md):
 *   x        [N, D, P] float32, device memory (embedding, p = y*w + x)
 *   mean     [P, D]    float32, device memory
 *   w_packed [P, T]    float16 (w_is_half != 0) or float32, device memory, T = D(D+1)/2,
 *                      row-major lower triangle: W_p(i, j), j <= i, at i*(i+1)/2 + j
 *   out      [N, P]    float32, device memory
 *   out[n, p] = || W_p (x[n, :, p] - mean[p, :]) ||_2   (fp32 accumulation, not squared)
 *
 * The launcher is asynchronous on `stream` and returns an EdgeadStatus (0 = ok).
 * Define EDGEAD_CPU_ONLY before including to use only the CPU reference (no CUDA headers).
 */
#ifndef EDGEAD_PADIM_MAHALANOBIS_H
#define EDGEAD_PADIM_MAHALANOBIS_H

#ifndef EDGEAD_CPU_ONLY
#include <cuda_runtime_api.h>
#endif

#if defined(_WIN32)
#define EDGEAD_API __declspec(dllexport)
#else
#define EDGEAD_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes returned by the launchers. */
enum EdgeadStatus {
    EDGEAD_OK = 0,
    EDGEAD_ERR_INVALID_ARGUMENT = 1, /* N, D or P < 1, null pointer, D too large */
    EDGEAD_ERR_CUDA = 2              /* the kernel launch itself failed (bad configuration, no device) */
};

/* ABI version of this header; bump on any signature change. */
#define EDGEAD_KERNELS_ABI_VERSION 1

/* Largest supported embedding dimension D, for every kernel, the TensorRT plugin, the ONNX Runtime op and the
 * exporter (edgead.runtime.cuda_kernel.MAX_DIM mirrors it; a test keeps the two equal). The GPU kernel stages
 * one centred vector plus 8 per-warp partial sums in the default 48 KiB of shared memory:
 * (D + 8) * 4 bytes <= 49152  <=>  D <= 12280. */
#define EDGEAD_MAX_DIM 12280

#ifndef EDGEAD_CPU_ONLY
/* GPU launcher: see the header comment for shapes. Asynchronous; 0 = launched. */
EDGEAD_API int edgead_padim_mahalanobis(const float* x, const float* mean, const void* w_packed, int w_is_half,
                                        float* out, int N, int D, int P, cudaStream_t stream);
#endif

/* CPU reference with the same arithmetic (fp32 accumulation, row by row), host memory. 0 = ok.
 * The half-precision whitening is given as IEEE binary16 bit patterns (uint16). */
EDGEAD_API int edgead_padim_mahalanobis_cpu(const float* x, const float* mean, const void* w_packed, int w_is_half,
                                            float* out, int N, int D, int P);

/* Human-readable text of a status code (static string). */
EDGEAD_API const char* edgead_status_string(int status);

/* EDGEAD_KERNELS_ABI_VERSION of the built library. */
EDGEAD_API int edgead_kernels_abi_version(void);

#ifdef __cplusplus
}
#endif

#endif /* EDGEAD_PADIM_MAHALANOBIS_H */
