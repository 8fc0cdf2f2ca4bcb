// edgead: fast CPU PaDiM Mahalanobis over a patch range (the ONNX Runtime custom op's kernel).
//
// Same contract as edgead_padim_mahalanobis_cpu (include/edgead/padim_mahalanobis.h): x [N, D, P],
// mean [P, D], packed lower-triangular whitening [P, T] (fp16 bits or fp32), out [N, P]. Per patch the
// centred vectors of all N images are gathered once; every whitening row is read once (converted from
// fp16 in registers) and multiplied with all N vectors, so the packed triangle - the only large operand -
// streams from memory exactly once per call. Vector code for AVX-512 and AVX2+F16C is chosen at run time;
// other CPUs (aarch64) use the portable loop. fp32 accumulation; the order of additions differs from the
// row-by-row reference only by float rounding.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EDGEAD_X86 1
#endif

#ifndef EDGEAD_CPU_ONLY
#define EDGEAD_CPU_ONLY
#endif
#include "edgead/padim_mahalanobis.h"
#include "edgead/padim_mahalanobis_cpu.h"
#include "half_bits.h"

// GCC 12 flags the _mm512_undefined_* idiom inside its own intrinsic headers as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

constexpr int kBatchTile = 4;   // images whose centred vectors share one pass over the whitening
constexpr int kPatchTile = 16;  // patches centred together

// ---- portable ----------------------------------------------------------------------------------------
template <bool Half>
void rows_portable(const void* w_patch, const float* centred, int batch, int dim, size_t stride, float* sum_sq) {
    for (int i = 0; i < dim; ++i) {
        const size_t start = (size_t)i * (i + 1) / 2;
        float acc[kBatchTile] = {0.f};
        for (int j = 0; j <= i; ++j) {
            const float w = Half ? edgead::half_bits_to_float(static_cast<const uint16_t*>(w_patch)[start + j])
                                 : static_cast<const float*>(w_patch)[start + j];
            for (int n = 0; n < batch; ++n) acc[n] += w * centred[n * stride + j];
        }
        for (int n = 0; n < batch; ++n) sum_sq[n] += acc[n] * acc[n];
    }
}

#ifdef EDGEAD_X86
#ifndef EDGEAD_PREFETCH
#define EDGEAD_PREFETCH 4096
#endif
#define EDGEAD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,f16c,fma")))
#define EDGEAD_AVX2 __attribute__((target("avx2,f16c,fma")))

// Rows i..i+3 of the packed triangle: lengths (0 past dim: all-zero loads, zero contribution) and starts.
struct RowGroup {
    int len[4];
    size_t start[4];
    int longest;
};

inline RowGroup row_group(int i, int dim) {
    RowGroup g;
    size_t start = (size_t)i * (i + 1) / 2;
    g.longest = 0;
    for (int r = 0; r < 4; ++r) {
        g.len[r] = (i + r < dim) ? i + r + 1 : 0;
        g.start[r] = start;
        start += (size_t)i + r + 1;
        if (g.len[r]) g.longest = g.len[r];
    }
    return g;
}

// The whitening is one linear stream over all patches: prefetch EDGEAD_PREFETCH bytes ahead of this row
// group (prefetches never fault, so running past the last patch is harmless).
inline void prefetch_ahead(const void* w_patch, const RowGroup& g, size_t elem) {
    const char* ahead = static_cast<const char*>(w_patch) + g.start[0] * elem + EDGEAD_PREFETCH;
    const size_t bytes = (g.start[3] + g.len[3] - g.start[0]) * elem;
    for (size_t k = 0; k < bytes; k += 64) _mm_prefetch(ahead + k, _MM_HINT_T0);
}

EDGEAD_AVX2 inline float lane_sum(__m128 v) {
    v = _mm_hadd_ps(v, v);
    return _mm_cvtss_f32(_mm_hadd_ps(v, v));
}


// ---- AVX-512: four rows at a time (independent FMA chains, one load of each centred chunk), masked tails ----
template <bool Half>
EDGEAD_AVX512 inline __m512 load_w16(const void* w, size_t at,
                                                                                     __mmask16 mask) {
    if (Half) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(w) + at));
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(w) + at);
}

EDGEAD_AVX512 inline __mmask16 tail_mask(int len, int j) {
    const int left = len - j;
    return left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
}

// 16 lanes -> 4 partial sums
EDGEAD_AVX512 inline __m128 quarter_sums(__m512 v) {
    const __m256 s = _mm256_add_ps(_mm512_castps512_ps256(v),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// [a0..a15], [b..], [c..], [d..] -> [sum a, sum b, sum c, sum d]
EDGEAD_AVX512 inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const auto half_sum = quarter_sums;
    const __m128 ab = _mm_hadd_ps(half_sum(a), half_sum(b));
    const __m128 cd = _mm_hadd_ps(half_sum(c), half_sum(d));
    return _mm_hadd_ps(ab, cd);
}

// Batch is a template parameter so the 4 x Batch accumulators stay in registers.
template <bool Half, int Batch>
EDGEAD_AVX512 void rows_avx512_fixed(const void* w_patch, const float* centred, int dim, size_t stride,
                                     float* sum_sq) {
    __m128 squares[Batch];
    for (int n = 0; n < Batch; ++n) squares[n] = _mm_setzero_ps();
    for (int i = 0; i < dim; i += 4) {
        const RowGroup g = row_group(i, dim);
        const int len0 = g.len[0], len1 = g.len[1], len2 = g.len[2], len3 = g.len[3], longest = g.longest;
        const size_t s0 = g.start[0], s1 = g.start[1], s2 = g.start[2], s3 = g.start[3];
        prefetch_ahead(w_patch, g, Half ? 2 : 4);
        __m512 acc0[Batch], acc1[Batch], acc2[Batch], acc3[Batch];
        for (int n = 0; n < Batch; ++n)
            acc0[n] = acc1[n] = acc2[n] = acc3[n] = _mm512_setzero_ps();
        for (int j = 0; j < longest; j += 16) {
            const __m512 w0 = load_w16<Half>(w_patch, s0 + j, tail_mask(len0, j));
            const __m512 w1 = load_w16<Half>(w_patch, s1 + j, tail_mask(len1, j));
            const __m512 w2 = load_w16<Half>(w_patch, s2 + j, tail_mask(len2, j));
            const __m512 w3 = load_w16<Half>(w_patch, s3 + j, tail_mask(len3, j));
            const __mmask16 cmask = tail_mask(longest, j);
            for (int n = 0; n < Batch; ++n) {
                const __m512 c = _mm512_maskz_loadu_ps(cmask, centred + n * stride + j);
                acc0[n] = _mm512_fmadd_ps(w0, c, acc0[n]);
                acc1[n] = _mm512_fmadd_ps(w1, c, acc1[n]);
                acc2[n] = _mm512_fmadd_ps(w2, c, acc2[n]);
                acc3[n] = _mm512_fmadd_ps(w3, c, acc3[n]);
            }
        }
        for (int n = 0; n < Batch; ++n) {
            const __m128 y = reduce4(acc0[n], acc1[n], acc2[n], acc3[n]);
            squares[n] = _mm_fmadd_ps(y, y, squares[n]);
        }
    }
    for (int n = 0; n < Batch; ++n) sum_sq[n] += lane_sum(squares[n]);
}

template <bool Half>
EDGEAD_AVX512 void rows_avx512(const void* w_patch, const float* centred, int batch, int dim, size_t stride,
                               float* sum_sq) {
    switch (batch) {
        case 1: rows_avx512_fixed<Half, 1>(w_patch, centred, dim, stride, sum_sq); break;
        case 2: rows_avx512_fixed<Half, 2>(w_patch, centred, dim, stride, sum_sq); break;
        case 3: rows_avx512_fixed<Half, 3>(w_patch, centred, dim, stride, sum_sq); break;
        default: rows_avx512_fixed<Half, 4>(w_patch, centred, dim, stride, sum_sq); break;
    }
}

// ---- AVX2 + F16C + FMA: the same four-row scheme with 8 lanes; tails through a zero-padded stack copy ------

template <bool Half>
EDGEAD_AVX2 inline __m256 load_w8(const void* w, size_t at, int len, int j) {
    const int left = len - j;
    if (left >= 8) {
        if (Half) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + at)));
        return _mm256_loadu_ps(static_cast<const float*>(w) + at);
    }
    if (left <= 0) return _mm256_setzero_ps();
    alignas(32) float tail[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int k = 0; k < left; ++k)
        tail[k] = Half ? _cvtsh_ss(static_cast<const uint16_t*>(w)[at + k]) : static_cast<const float*>(w)[at + k];
    return _mm256_load_ps(tail);
}

EDGEAD_AVX2 inline __m128 quarter_sums8(__m256 v) {
    return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
}

template <bool Half, int Batch>
EDGEAD_AVX2 void rows_avx2_fixed(const void* w_patch, const float* centred, int dim, size_t stride, float* sum_sq) {
    __m128 squares[Batch];
    for (int n = 0; n < Batch; ++n) squares[n] = _mm_setzero_ps();
    for (int i = 0; i < dim; i += 4) {
        const RowGroup g = row_group(i, dim);
        const int len0 = g.len[0], len1 = g.len[1], len2 = g.len[2], len3 = g.len[3], longest = g.longest;
        const size_t s0 = g.start[0], s1 = g.start[1], s2 = g.start[2], s3 = g.start[3];
        prefetch_ahead(w_patch, g, Half ? 2 : 4);
        __m256 acc0[Batch], acc1[Batch], acc2[Batch], acc3[Batch];
        for (int n = 0; n < Batch; ++n) acc0[n] = acc1[n] = acc2[n] = acc3[n] = _mm256_setzero_ps();
        for (int j = 0; j < longest; j += 8) {
            const __m256 w0 = load_w8<Half>(w_patch, s0 + j, len0, j);
            const __m256 w1 = load_w8<Half>(w_patch, s1 + j, len1, j);
            const __m256 w2 = load_w8<Half>(w_patch, s2 + j, len2, j);
            const __m256 w3 = load_w8<Half>(w_patch, s3 + j, len3, j);
            for (int n = 0; n < Batch; ++n) {
                const __m256 c = _mm256_loadu_ps(centred + n * stride + j);  // zero padding past D
                acc0[n] = _mm256_fmadd_ps(w0, c, acc0[n]);
                acc1[n] = _mm256_fmadd_ps(w1, c, acc1[n]);
                acc2[n] = _mm256_fmadd_ps(w2, c, acc2[n]);
                acc3[n] = _mm256_fmadd_ps(w3, c, acc3[n]);
            }
        }
        for (int n = 0; n < Batch; ++n) {
            const __m128 y = _mm_hadd_ps(_mm_hadd_ps(quarter_sums8(acc0[n]), quarter_sums8(acc1[n])),
                                         _mm_hadd_ps(quarter_sums8(acc2[n]), quarter_sums8(acc3[n])));
            squares[n] = _mm_fmadd_ps(y, y, squares[n]);
        }
    }
    for (int n = 0; n < Batch; ++n) sum_sq[n] += lane_sum(squares[n]);
}

template <bool Half>
EDGEAD_AVX2 void rows_avx2(const void* w_patch, const float* centred, int batch, int dim, size_t stride,
                           float* sum_sq) {
    // two images per pass keep the 4 x 2 accumulators in the 16 ymm registers
    for (int n = 0; n < batch; n += 2) {
        if (batch - n >= 2) rows_avx2_fixed<Half, 2>(w_patch, centred + n * stride, dim, stride, sum_sq + n);
        else rows_avx2_fixed<Half, 1>(w_patch, centred + n * stride, dim, stride, sum_sq + n);
    }
}
#endif

using RowsFn = void (*)(const void*, const float*, int, int, size_t, float*);

struct Dispatch {
    RowsFn half;
    RowsFn single;
    const char* isa;
};

bool cpu_has(const char* isa) {
#ifdef EDGEAD_X86
    __builtin_cpu_init();
    if (std::strcmp(isa, "avx512") == 0)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
    if (std::strcmp(isa, "avx2") == 0)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
    return std::strcmp(isa, "portable") == 0;
}

Dispatch by_name(const char* isa) {
#ifdef EDGEAD_X86
    if (std::strcmp(isa, "avx512") == 0) return {rows_avx512<true>, rows_avx512<false>, "avx512"};
    if (std::strcmp(isa, "avx2") == 0) return {rows_avx2<true>, rows_avx2<false>, "avx2"};
#endif
    (void)isa;
    return {rows_portable<true>, rows_portable<false>, "portable"};
}

Dispatch& dispatch() {
    static Dispatch chosen = by_name(cpu_has("avx512") ? "avx512" : cpu_has("avx2") ? "avx2" : "portable");
    return chosen;
}

}  // namespace

extern "C" EDGEAD_API int edgead_padim_mahalanobis_cpu_range(const float* x, const float* mean, const void* w_packed,
                                                             int w_is_half, float* out, int N, int D, int P,
                                                             int p_begin, int p_end) {
    if (x == nullptr || mean == nullptr || w_packed == nullptr || out == nullptr) return EDGEAD_ERR_INVALID_ARGUMENT;
    if (N < 1 || D < 1 || P < 1 || D > EDGEAD_MAX_DIM) return EDGEAD_ERR_INVALID_ARGUMENT;
    if (p_begin < 0 || p_end > P || p_begin > p_end) return EDGEAD_ERR_INVALID_ARGUMENT;
    const size_t tri = (size_t)D * (D + 1) / 2;
    const size_t elem = w_is_half ? sizeof(uint16_t) : sizeof(float);
    const size_t stride = ((size_t)D + 15) & ~(size_t)15;  // 64-byte rows of the centred tile
    const size_t image_stride = stride * kPatchTile;
    const RowsFn rows = w_is_half ? dispatch().half : dispatch().single;
    // centred[n][q][d] for the kPatchTile patches of a tile: x is read in contiguous runs of patches (a
    // per-patch gather strides by P floats, which aliases one cache set for power-of-two P)
    thread_local std::vector<float> centred;
    if (centred.size() < image_stride * N) centred.assign(image_stride * N, 0.f);
    for (int p0 = p_begin; p0 < p_end; p0 += kPatchTile) {
        const int tile = (p_end - p0 < kPatchTile) ? p_end - p0 : kPatchTile;
        for (int n = 0; n < N; ++n) {
            float* cn = centred.data() + n * image_stride;
            for (int d = 0; d < D; ++d) {
                const float* xd = x + ((size_t)n * D + d) * P + p0;
                for (int q = 0; q < tile; ++q) cn[q * stride + d] = xd[q] - mean[(size_t)(p0 + q) * D + d];
            }
            for (int q = 0; q < tile; ++q)
                for (size_t d = (size_t)D; d < stride; ++d) cn[q * stride + d] = 0.f;
        }
        for (int q = 0; q < tile; ++q) {
            const int p = p0 + q;
            const void* w_patch = static_cast<const char*>(w_packed) + (size_t)p * tri * elem;
            for (int n0 = 0; n0 < N; n0 += kBatchTile) {
                const int batch = (N - n0 < kBatchTile) ? N - n0 : kBatchTile;
                float sum_sq[kBatchTile] = {0.f};
                rows(w_patch, centred.data() + n0 * image_stride + q * stride, batch, D, image_stride, sum_sq);
                for (int n = 0; n < batch; ++n) out[(size_t)(n0 + n) * P + p] = std::sqrt(sum_sq[n]);
            }
        }
    }
    return EDGEAD_OK;
}

extern "C" EDGEAD_API const char* edgead_cpu_kernel_isa(void) { return dispatch().isa; }

extern "C" EDGEAD_API int edgead_cpu_kernel_set_isa(const char* isa) {
    if (isa == nullptr) return EDGEAD_ERR_INVALID_ARGUMENT;
    if (std::strcmp(isa, "auto") == 0) isa = cpu_has("avx512") ? "avx512" : cpu_has("avx2") ? "avx2" : "portable";
    if (!cpu_has(isa)) return EDGEAD_ERR_INVALID_ARGUMENT;
    dispatch() = by_name(isa);
    return EDGEAD_OK;
}
