// edgead: fused PaDiM Mahalanobis distance on the GPU (see include/edgead/padim_mahalanobis.h).
//
// One thread block (8 warps) per patch p. The block
//   1. stages the centred embeddings c[b, d] = x[n0+b, d, p] - mean[p, d] of a batch tile of NB images
//      in shared memory (the packed triangle is then streamed once per tile, i.e. once per batch for N <= 8);
//   2. streams the packed row-major triangle of W_p: warp w takes rows i = w, w + 8, ...; lane l reads
//      columns j = l, l + 32, ... of the row (consecutive lanes -> consecutive addresses: every warp load
//      is one fully used 64 B (fp16) / 128 B (fp32) segment), U loads in flight per lane, cache-streaming
//      loads (__ldcs: the statistics are touched once, keep L2 for the embeddings);
//   3. accumulates y_i[b] = sum_j W(i, j) c[b, j] in fp32 registers, reduces it over the warp with
//      shuffles and adds y_i[b]^2 to a per-warp sum of squares;
//   4. reduces the 8 per-warp sums in shared memory and writes out[n, p] = sqrt(sum).
// Reads per patch: T*sizeof(W) + 4D (mean) + 4ND (x) bytes, i.e. the statistics once per batch tile.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "edgead/padim_mahalanobis.h"

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxBatchTile = 8;
constexpr size_t kSharedBudget = 48 * 1024;  // default dynamic shared-memory limit, every arch

__device__ __forceinline__ float load_streaming(const float* ptr) { return __ldcs(ptr); }

__device__ __forceinline__ float load_streaming(const __half* ptr) {
    const unsigned short bits = __ldcs(reinterpret_cast<const unsigned short*>(ptr));
    return __half2float(__ushort_as_half(bits));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// WT: float or __half storage of the whitening. NB: batch tile (images per pass over the triangle).
// U: loads in flight per lane per row step.
template <typename WT, int NB, int U>
__global__ void __launch_bounds__(kThreads) padim_mahalanobis_kernel(
    const float* __restrict__ x, const float* __restrict__ mean, const WT* __restrict__ w_packed,
    float* __restrict__ out, int N, int D, int P) {
    extern __shared__ float shared[];
    float* centred = shared;                         // [NB, D]
    float* partial = shared + (size_t)NB * D;        // [kWarps, NB]
    const int p = blockIdx.x;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const size_t tri = (size_t)D * (D + 1) / 2;
    const WT* wp = w_packed + (size_t)p * tri;
    const float* mp = mean + (size_t)p * D;

    for (int n0 = 0; n0 < N; n0 += NB) {
        const int nb = min(NB, N - n0);
        for (int idx = threadIdx.x; idx < NB * D; idx += kThreads) {
            const int b = idx / D;
            const int d = idx - b * D;
            float v = 0.f;
            if (b < nb) v = __ldg(x + ((size_t)(n0 + b) * D + d) * P + p) - __ldg(mp + d);
            centred[idx] = v;
        }
        __syncthreads();

        float sum_sq[NB];
#pragma unroll
        for (int b = 0; b < NB; ++b) sum_sq[b] = 0.f;

        for (int i = warp; i < D; i += kWarps) {
            const WT* row = wp + (size_t)i * (i + 1) / 2;
            const int len = i + 1;
            float acc[NB];
#pragma unroll
            for (int b = 0; b < NB; ++b) acc[b] = 0.f;
            for (int j0 = lane; j0 < len; j0 += 32 * U) {
                float wv[U];
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const int j = j0 + 32 * u;
                    wv[u] = j < len ? load_streaming(row + j) : 0.f;
                }
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const int j = j0 + 32 * u;
                    if (j < len) {
#pragma unroll
                        for (int b = 0; b < NB; ++b) acc[b] = fmaf(wv[u], centred[b * D + j], acc[b]);
                    }
                }
            }
#pragma unroll
            for (int b = 0; b < NB; ++b) {
                const float y = warp_sum(acc[b]);  // every lane holds the row's dot product
                sum_sq[b] = fmaf(y, y, sum_sq[b]);
            }
        }
        if (lane == 0) {
#pragma unroll
            for (int b = 0; b < NB; ++b) partial[warp * NB + b] = sum_sq[b];
        }
        __syncthreads();
        if (threadIdx.x < nb) {
            float s = 0.f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) s += partial[w * NB + threadIdx.x];
            out[(size_t)(n0 + threadIdx.x) * P + p] = sqrtf(s);
        }
        __syncthreads();  // centred/partial are rewritten by the next batch tile
    }
}

constexpr size_t shared_bytes(int nb, int dim) { return ((size_t)nb * dim + (size_t)kWarps * nb) * sizeof(float); }
static_assert(shared_bytes(1, EDGEAD_MAX_DIM) <= kSharedBudget, "EDGEAD_MAX_DIM must fit the shared-memory budget");
static_assert(shared_bytes(1, EDGEAD_MAX_DIM + 1) > kSharedBudget, "EDGEAD_MAX_DIM must be the largest D that fits");

template <typename WT, int NB>
cudaError_t launch_tile(const float* x, const float* mean, const WT* w, float* out, int N, int D, int P,
                        cudaStream_t stream) {
    constexpr int U = sizeof(WT) == 2 ? 8 : 4;  // 512 B of the triangle in flight per warp
    // cudaLaunchKernel returns the status of this launch only. `<<<>>>` + cudaGetLastError() would also report
    // (and clear) an earlier non-sticky error left by someone else's work on the context, e.g. TensorRT's.
    void* args[] = {&x, &mean, &w, &out, &N, &D, &P};
    return cudaLaunchKernel(reinterpret_cast<const void*>(&padim_mahalanobis_kernel<WT, NB, U>), dim3(P),
                            dim3(kThreads), args, shared_bytes(NB, D), stream);
}

template <typename WT>
cudaError_t launch(const float* x, const float* mean, const WT* w, float* out, int N, int D, int P,
                   cudaStream_t stream) {
    int nb = 1;
    while (nb < N && nb < kMaxBatchTile) nb <<= 1;
    while (nb > 1 && shared_bytes(nb, D) > kSharedBudget) nb >>= 1;
    switch (nb) {
        case 8: return launch_tile<WT, 8>(x, mean, w, out, N, D, P, stream);
        case 4: return launch_tile<WT, 4>(x, mean, w, out, N, D, P, stream);
        case 2: return launch_tile<WT, 2>(x, mean, w, out, N, D, P, stream);
        default: return launch_tile<WT, 1>(x, mean, w, out, N, D, P, stream);
    }
}

}  // namespace

extern "C" EDGEAD_API int edgead_padim_mahalanobis(const float* x, const float* mean, const void* w_packed,
                                                   int w_is_half, float* out, int N, int D, int P,
                                                   cudaStream_t stream) {
    if (x == nullptr || mean == nullptr || w_packed == nullptr || out == nullptr) return EDGEAD_ERR_INVALID_ARGUMENT;
    if (N < 1 || D < 1 || P < 1 || D > EDGEAD_MAX_DIM || shared_bytes(1, D) > kSharedBudget)
        return EDGEAD_ERR_INVALID_ARGUMENT;
    const cudaError_t err =
        w_is_half ? launch(x, mean, static_cast<const __half*>(w_packed), out, N, D, P, stream)
                  : launch(x, mean, static_cast<const float*>(w_packed), out, N, D, P, stream);
    return err == cudaSuccess ? EDGEAD_OK : EDGEAD_ERR_CUDA;
}
