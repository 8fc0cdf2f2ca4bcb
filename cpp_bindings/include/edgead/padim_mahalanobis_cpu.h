/*
 * edgead: fast CPU PaDiM Mahalanobis (C ABI), the kernel of the ONNX Runtime custom op
 * edgead::PadimMahalanobis (cpp_bindings/ort/). Shapes and result as edgead_padim_mahalanobis_cpu in
 * padim_mahalanobis.h (host memory), restricted to patches [p_begin, p_end) so callers can split the
 * patch axis across threads: out[n, p] is written only for p in that range. 0 = ok.
 * Vector code (AVX-512 or AVX2+F16C on x86, portable elsewhere) is picked at run time.
 */
#ifndef EDGEAD_PADIM_MAHALANOBIS_CPU_H
#define EDGEAD_PADIM_MAHALANOBIS_CPU_H

#ifndef EDGEAD_API
#define EDGEAD_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

EDGEAD_API int edgead_padim_mahalanobis_cpu_range(const float* x, const float* mean, const void* w_packed,
                                                  int w_is_half, float* out, int N, int D, int P, int p_begin,
                                                  int p_end);

/* "avx512", "avx2" or "portable": the code path this CPU runs. */
EDGEAD_API const char* edgead_cpu_kernel_isa(void);

/* Force a code path ("avx512", "avx2", "portable" or "auto"), for tests and benchmarks; not thread-safe
 * with running kernels. 0 = ok, nonzero = this CPU cannot run it (nothing changed). */
EDGEAD_API int edgead_cpu_kernel_set_isa(const char* isa);

#ifdef __cplusplus
}
#endif

#endif /* EDGEAD_PADIM_MAHALANOBIS_CPU_H */
