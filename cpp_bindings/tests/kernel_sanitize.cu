// edgead: standalone driver of edgead_padim_mahalanobis for compute-sanitizer (memcheck, racecheck, synccheck,
// initcheck). No Python, no torch: the only kernels in the sanitizer's report are ours.
//
// For each case (N, D, P, whitening dtype) it fills x [N, D, P], mean [P, D] and the packed triangle
// w [P, D(D+1)/2] with seeded pseudo-random values, poisons out [N, P] with NaN (0xff bytes), launches the kernel on
// a non-default stream, and compares every output against the library's CPU reference
// edgead_padim_mahalanobis_cpu (same fp32 arithmetic, other summation order):
//     |gpu - cpu| <= rtol(D) * |cpu|,  rtol(D) = 2e-5 * max(1, sqrt(D / 550))   (fp32 accumulation, ~sqrt(D))
// It then checks that the launcher refuses bad arguments (D = EDGEAD_MAX_DIM + 1, N = 0, null pointer) without
// launching anything.
//
// Build (benchmarks/gpu_check.py does this, one static cudart, line info for the report):
//   nvcc -std=c++17 -O2 -lineinfo -Icpp_bindings/include -Icpp_bindings/src -arch=sm_90
//        cpp_bindings/tests/kernel_sanitize.cu cpp_bindings/src/padim_mahalanobis.cu
//        cpp_bindings/src/padim_mahalanobis_ref.cpp -o build/gpu_check/kernel_sanitize
// Run:
//   kernel_sanitize [--small] [N,D,P,fp16|fp32 ...]    (no case given: the built-in list; --small drops D >= 6000)
//   compute-sanitizer --tool memcheck --leak-check full --error-exitcode 86 build/gpu_check/kernel_sanitize
// Exit status: 0 all cases match and every refusal held, 1 mismatch / unwritten output / CUDA error,
//              2 no CUDA device or bad usage.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>
#include <vector>

#include "edgead/padim_mahalanobis.h"

namespace {

struct Case {
    int n, d, p;
    bool half;
};

// Small cases: N not a multiple of the batch tile (8), D not a multiple of 32 (lane tails), D < 32, both dtypes,
// several patches (one block each), N > 8 (two tiles).
const Case kSmallCases[] = {
    {1, 1, 3, false},  {2, 1, 2, true},   {3, 7, 5, true},    {9, 33, 4, false}, {12, 100, 3, true},
    {5, 550, 2, true}, {2, 550, 2, false}, {8, 64, 3, false}, {13, 37, 2, true},
};
// Large cases: the batch tile shrinks to fit 48 KiB of shared memory (D = 6000: tile 2, N = 3 -> 2 + 1), and the
// largest supported D (tile 1, the whole shared-memory budget).
const Case kLargeCases[] = {
    {3, 6000, 1, true},
    {2, EDGEAD_MAX_DIM, 1, false},
};

bool g_cuda_failed = false;

bool check_cuda(cudaError_t err, const char* what) {
    if (err == cudaSuccess) return true;
    std::printf("kernel_sanitize: CUDA error %s (%s) at %s\n", cudaGetErrorName(err), cudaGetErrorString(err), what);
    g_cuda_failed = true;
    return false;
}

#define CUDA_OK(expr) check_cuda((expr), #expr)

// xorshift64*: deterministic across compilers and platforms.
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
    float uniform() {  // (-1, 1)
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        const uint64_t v = s * 0x2545F4914F6CDD1Dull;
        return (float)((double)(v >> 11) * (2.0 / 9007199254740992.0) - 1.0);
    }
};

double rtol_for(int dim) { return 2e-5 * std::fmax(1.0, std::sqrt(dim / 550.0)); }

const char* dtype_name(bool half) { return half ? "fp16" : "fp32"; }

// One case; returns true when every output matches the CPU reference.
bool run_case(const Case& c, cudaStream_t stream) {
    const size_t tri = (size_t)c.d * (c.d + 1) / 2;
    const size_t nx = (size_t)c.n * c.d * c.p, nmean = (size_t)c.p * c.d, nw = (size_t)c.p * tri,
                 nout = (size_t)c.n * c.p;
    Rng rng(((uint64_t)c.n * 1000003u + (uint64_t)c.d) * 1000003u + (uint64_t)c.p * 2u + (c.half ? 1u : 0u));
    std::vector<float> x(nx), mean(nmean), w32(c.half ? 0 : nw), gpu(nout), cpu(nout);
    std::vector<__half> w16(c.half ? nw : 0);
    for (size_t i = 0; i < nmean; ++i) mean[i] = 2.f * rng.uniform();
    for (int n = 0; n < c.n; ++n)
        for (int d = 0; d < c.d; ++d)
            for (int p = 0; p < c.p; ++p)
                x[((size_t)n * c.d + d) * c.p + p] = mean[(size_t)p * c.d + d] + rng.uniform();
    const float scale = 1.f / std::sqrt((float)c.d);
    for (size_t i = 0; i < nw; ++i) {
        const float v = rng.uniform() * scale;
        if (c.half) w16[i] = __float2half_rn(v);
        else w32[i] = v;
    }
    const void* w_host = c.half ? (const void*)w16.data() : (const void*)w32.data();
    const size_t w_bytes = nw * (c.half ? sizeof(__half) : sizeof(float));

    float *dx = nullptr, *dmean = nullptr, *dout = nullptr;
    void* dw = nullptr;
    bool ok = CUDA_OK(cudaMalloc(&dx, nx * sizeof(float))) && CUDA_OK(cudaMalloc(&dmean, nmean * sizeof(float))) &&
              CUDA_OK(cudaMalloc(&dw, w_bytes)) && CUDA_OK(cudaMalloc(&dout, nout * sizeof(float))) &&
              CUDA_OK(cudaMemcpyAsync(dx, x.data(), nx * sizeof(float), cudaMemcpyHostToDevice, stream)) &&
              CUDA_OK(cudaMemcpyAsync(dmean, mean.data(), nmean * sizeof(float), cudaMemcpyHostToDevice, stream)) &&
              CUDA_OK(cudaMemcpyAsync(dw, w_host, w_bytes, cudaMemcpyHostToDevice, stream)) &&
              CUDA_OK(cudaMemsetAsync(dout, 0xff, nout * sizeof(float), stream));  // NaN: every entry must be written
    if (ok) {
        const int status = edgead_padim_mahalanobis(dx, dmean, dw, c.half ? 1 : 0, dout, c.n, c.d, c.p, stream);
        if (status != EDGEAD_OK) {
            std::printf("kernel_sanitize: N=%d D=%d P=%d %s: launcher returned %d (%s)\n", c.n, c.d, c.p,
                        dtype_name(c.half), status, edgead_status_string(status));
            ok = false;
        }
    }
    ok = ok && CUDA_OK(cudaMemcpyAsync(gpu.data(), dout, nout * sizeof(float), cudaMemcpyDeviceToHost, stream)) &&
         CUDA_OK(cudaStreamSynchronize(stream));
    cudaFree(dx);
    cudaFree(dmean);
    cudaFree(dw);
    cudaFree(dout);
    if (!ok) return false;

    const int status = edgead_padim_mahalanobis_cpu(x.data(), mean.data(), w_host, c.half ? 1 : 0, cpu.data(), c.n,
                                                    c.d, c.p);
    if (status != EDGEAD_OK) {
        std::printf("kernel_sanitize: CPU reference returned %d (%s)\n", status, edgead_status_string(status));
        return false;
    }
    const double rtol = rtol_for(c.d);
    double max_rel = 0.0;
    size_t bad = 0, unwritten = 0;
    for (size_t i = 0; i < nout; ++i) {
        if (!std::isfinite(gpu[i])) {
            ++unwritten;
            continue;
        }
        const double rel = std::fabs((double)gpu[i] - (double)cpu[i]) / std::fmax(std::fabs((double)cpu[i]), 1e-12);
        if (rel > max_rel) max_rel = rel;
        if (rel > rtol) ++bad;
    }
    const bool match = bad == 0 && unwritten == 0;
    std::printf("kernel_sanitize: N=%d D=%d P=%d %s max_rel=%.3e rtol=%.1e %s", c.n, c.d, c.p, dtype_name(c.half),
                max_rel, rtol, match ? "ok\n" : "MISMATCH");
    if (!match) std::printf(" (%zu outside rtol, %zu non-finite of %zu)\n", bad, unwritten, nout);
    return match;
}

// The launcher must refuse bad arguments with EDGEAD_ERR_INVALID_ARGUMENT before launching anything.
bool run_refusals(cudaStream_t stream) {
    float* buf = nullptr;
    if (!CUDA_OK(cudaMalloc(&buf, 64 * sizeof(float)))) return false;
    struct Refusal {
        const char* what;
        int n, d, p;
        bool null_x;
    } const refusals[] = {
        {"D = EDGEAD_MAX_DIM + 1", 1, EDGEAD_MAX_DIM + 1, 1, false},
        {"N = 0", 0, 4, 1, false},
        {"P = 0", 1, 4, 0, false},
        {"x = NULL", 1, 4, 1, true},
    };
    bool ok = true;
    for (const Refusal& r : refusals) {
        const int status = edgead_padim_mahalanobis(r.null_x ? nullptr : buf, buf, buf, 0, buf, r.n, r.d, r.p, stream);
        if (status != EDGEAD_ERR_INVALID_ARGUMENT) {
            std::printf("kernel_sanitize: %s: launcher returned %d, expected %d (invalid argument)\n", r.what, status,
                        (int)EDGEAD_ERR_INVALID_ARGUMENT);
            ok = false;
        }
    }
    ok = CUDA_OK(cudaStreamSynchronize(stream)) && ok;
    cudaFree(buf);
    return ok;
}

bool parse_case(const char* text, Case* c) {
    char dtype[8] = {0};
    if (std::sscanf(text, "%d,%d,%d,%7s", &c->n, &c->d, &c->p, dtype) != 4) return false;
    if (std::strcmp(dtype, "fp16") != 0 && std::strcmp(dtype, "fp32") != 0) return false;
    c->half = std::strcmp(dtype, "fp16") == 0;
    return c->n >= 1 && c->d >= 1 && c->d <= EDGEAD_MAX_DIM && c->p >= 1;
}

}  // namespace

int main(int argc, char** argv) {
    std::vector<Case> cases;
    bool small = false;
    for (int i = 1; i < argc; ++i) {
        Case c;
        if (std::strcmp(argv[i], "--small") == 0) {
            small = true;
        } else if (parse_case(argv[i], &c)) {
            cases.push_back(c);
        } else {
            std::printf("kernel_sanitize: bad argument '%s'; usage: kernel_sanitize [--small] [N,D,P,fp16|fp32 ...] "
                        "(1 <= D <= %d)\n", argv[i], EDGEAD_MAX_DIM);
            return 2;
        }
    }
    if (cases.empty()) {
        cases.assign(std::begin(kSmallCases), std::end(kSmallCases));
        if (!small) cases.insert(cases.end(), std::begin(kLargeCases), std::end(kLargeCases));
    }
    int devices = 0;
    const cudaError_t err = cudaGetDeviceCount(&devices);
    if (err != cudaSuccess || devices < 1) {
        std::printf("kernel_sanitize: no CUDA device (%s)\n",
                    err != cudaSuccess ? cudaGetErrorString(err) : "cudaGetDeviceCount found none");
        return 2;
    }
    cudaStream_t stream = nullptr;
    if (!CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking))) return 1;
    int failed = 0;
    for (const Case& c : cases) {
        if (!run_case(c, stream)) ++failed;
        if (g_cuda_failed) break;  // a sticky error poisons the context: the remaining cases would fail alike
    }
    const bool refusals_ok = !g_cuda_failed && run_refusals(stream);
    cudaStreamDestroy(stream);
    const bool clean = CUDA_OK(cudaDeviceSynchronize()) && !g_cuda_failed;
    cudaDeviceReset();  // flushes the sanitizer's leak accounting
    if (failed == 0 && refusals_ok && clean) {
        std::printf("kernel_sanitize: OK (%zu cases, 4 refusals)\n", cases.size());
        return 0;
    }
    std::printf("kernel_sanitize: FAILED (%d of %zu cases%s%s)\n", failed, cases.size(),
                refusals_ok ? "" : ", a refusal did not hold", clean ? "" : ", CUDA error");
    return 1;
}
