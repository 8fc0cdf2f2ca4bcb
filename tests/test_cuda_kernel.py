"""PaDiM Mahalanobis kernel: CPU reference (C++ via ctypes, numpy float64), nvcc compile checks, GPU parity.

Reference: ``tests/cuda_reference.py`` (float64). Tolerances: fp32 storage rtol 2e-5 (fp32 accumulation over
D <= 550 terms), fp16 storage compared against the float64 distance of the *fp16-rounded* weights (same
bound), and fp16 vs fp32 storage within 3e-3 relative (storage rounding only). GPU tests are marked ``gpu``.
"""
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import cuda_reference as ref
from edgead import packing
from edgead.errors import BackendError
from edgead.runtime import cuda_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = os.path.join(ROOT, "cpp_bindings")
KERNEL_SRC = os.path.join(NATIVE, "src", "padim_mahalanobis.cu")
REF_SRC = os.path.join(NATIVE, "src", "padim_mahalanobis_ref.cpp")
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
CXX = shutil.which("g++") or shutil.which("c++")


# --- index math and the numpy reference ------------------------------------------------------------------

@pytest.mark.parametrize("dim", [1, 2, 5, 17])
def test_packing_index_math(dim):
    rows, cols = np.tril_indices(dim)
    assert np.array_equal(ref.packed_index(rows, cols), np.arange(ref.packed_length(dim)))
    dense = np.tril(np.random.default_rng(dim).standard_normal((3, dim, dim)))
    packed = ref.pack(dense)
    assert np.array_equal(packed, packing.pack_lower(dense))  # the package's packing agrees with ours
    assert np.array_equal(ref.unpack(packed, dim), dense)
    assert np.array_equal(packing.unpack_lower(packed), dense)


def test_reference_equals_mahalanobis_of_spd_covariance():
    rng = np.random.default_rng(1)
    n, dim, num_patches = 3, 12, 5
    sigma, w_packed = ref.spd_whitening(num_patches, dim, rng)
    mean = rng.standard_normal((num_patches, dim))
    x = rng.standard_normal((n, dim, num_patches)) + mean.T[None]
    got = ref.distance_f64(x, mean, w_packed, patch_chunk=2)
    for p in range(num_patches):
        centred = x[:, :, p] - mean[p]                                        # [N, D]
        expected = np.sqrt(np.einsum("nd,nd->n", centred, np.linalg.solve(sigma[p], centred.T).T))
        np.testing.assert_allclose(got[:, p], expected, rtol=1e-10)
    # negative control: the same triangle packed column by column (a classic layout bug) gives other distances
    rows, cols = np.triu_indices(dim)
    column_major = ref.unpack(w_packed, dim).transpose(0, 2, 1)[:, rows, cols]
    assert not np.allclose(ref.distance_f64(x, mean, column_major), got, rtol=1e-3)


# --- C++ CPU reference through the ctypes binding ----------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_lib(cpu_reference_lib):
    """The C++ CPU reference without CUDA (conftest.cpu_reference_lib)."""
    return cpu_reference_lib


@pytest.mark.parametrize("n,dim,num_patches", [(3, 37, 11), (1, 100, 4), (2, 550, 2), (8, 1, 3)])
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_cpp_reference_matches_float64(cpu_lib, n, dim, num_patches, half):
    x, mean, w = ref.random_problem(n, dim, num_patches, seed=dim + n)
    w_store = w.astype(np.float16) if half else w
    got = cuda_kernel.padim_mahalanobis_cpu(x, mean, w_store, lib=cpu_lib)
    assert got.dtype == np.float32 and got.shape == (n, num_patches)
    np.testing.assert_allclose(got, ref.distance_f64(x, mean, w_store), rtol=2e-5, atol=1e-6)


def test_fp16_storage_error_is_bounded(cpu_lib):
    x, mean, w = ref.random_problem(4, 100, 6, seed=7)
    exact = ref.distance_f64(x, mean, w)
    got = cuda_kernel.padim_mahalanobis_cpu(x, mean, w.astype(np.float16), lib=cpu_lib)
    rel = np.abs(got - exact) / exact
    assert rel.max() < 3e-3
    assert rel.max() > 1e-6  # the fp16 path really used rounded weights


@pytest.mark.parametrize("value", [1.0, -2.5, 6.103515625e-05, 5.960464477539063e-08, 65504.0, 0.333])
def test_cpp_half_decoding_is_exact(cpu_lib, value):
    """D = 1: distance = |w * (x - mean)| with x - mean = 1, so the output is the decoded half exactly."""
    w = np.array([[value]], np.float16)
    got = cuda_kernel.padim_mahalanobis_cpu(np.ones((1, 1, 1), np.float32), np.zeros((1, 1), np.float32), w,
                                            lib=cpu_lib)
    assert got[0, 0] == abs(float(w[0, 0]))


def test_cpp_reference_rejects_bad_shapes(cpu_lib):
    with pytest.raises(BackendError, match="invalid argument"):
        cuda_kernel.padim_mahalanobis_cpu(np.zeros((1, 0, 2), np.float32), np.zeros((2, 0), np.float32),
                                          np.zeros((2, 0), np.float32), lib=cpu_lib)


def test_cpu_only_library_refuses_gpu_launch(cpu_lib):
    with pytest.raises(BackendError, match="without CUDA"):
        cuda_kernel.padim_mahalanobis_raw(0, 0, 0, False, 0, 1, 1, 1, lib=cpu_lib)


def test_max_dim_is_one_constant(cpu_lib):
    """EDGEAD_MAX_DIM (header) == cuda_kernel.MAX_DIM (exporter) == the shared-memory bound of the GPU kernel:
    (D + 8 warps) float32 in 48 KiB. The CPU reference takes exactly up to it and refuses one more."""
    header = open(os.path.join(NATIVE, "include", "edgead", "padim_mahalanobis.h")).read()
    defined = [int(v) for v in re.findall(r"#define EDGEAD_MAX_DIM (\d+)", header)]
    assert defined == [cuda_kernel.MAX_DIM] == [12280]
    assert (cuda_kernel.MAX_DIM + 8) * 4 <= 48 * 1024 < (cuda_kernel.MAX_DIM + 1 + 8) * 4
    for text in (open(os.path.join(NATIVE, "README.md")).read(), open(os.path.join(ROOT, "docs", "tensorrt.md")).read()):
        for number in re.findall(r"(?:\bup to|\b1\.\.)\s*`?(\d{1,2},?\d{3})\b", text):
            assert int(number.replace(",", "")) == cuda_kernel.MAX_DIM, "docs quote another maximum D: " + number
    dim = cuda_kernel.MAX_DIM
    x = np.zeros((1, dim, 1), np.float32)
    x[0, -1, 0] = 2.0
    w = np.zeros((1, dim * (dim + 1) // 2), np.float16)
    w[0, -1] = 1.5  # W[D-1, D-1]: the very last packed entry
    got = cuda_kernel.padim_mahalanobis_cpu(x, np.zeros((1, dim), np.float32), w, lib=cpu_lib)
    assert got[0, 0] == 3.0
    with pytest.raises(BackendError, match="invalid argument"):
        cuda_kernel.padim_mahalanobis_cpu(np.zeros((1, dim + 1, 1), np.float32), np.zeros((1, dim + 1), np.float32),
                                          np.zeros((1, 1), np.float32), lib=cpu_lib)


def test_launcher_reports_its_own_launch_status_only():
    """The launcher returns cudaLaunchKernel's status; `<<<>>>` + cudaGetLastError() would also report (and clear)
    an earlier non-sticky error left by TensorRT's own work on the context. (Run-time check: the gpu test below.)"""
    source = open(KERNEL_SRC).read()
    code = re.sub(r"//[^\n]*", "", source)
    assert "cudaGetLastError" not in code and "cudaPeekAtLastError" not in code
    assert "<<<" not in code
    assert code.count("cudaLaunchKernel(") == 1


# --- loader errors --------------------------------------------------------------------------------------

def test_loader_without_library_gives_backend_error(tmp_path, monkeypatch):
    missing = str(tmp_path / "nowhere" / "libedgead_kernels.so")
    with pytest.raises(BackendError, match="not found.*make native"):
        cuda_kernel.load_library(missing)
    monkeypatch.setenv(cuda_kernel.ENV_VAR, missing)
    assert cuda_kernel.candidate_paths()[0] == missing


def test_loader_rejects_garbage_library(tmp_path):
    bogus = tmp_path / "libedgead_kernels.so"
    bogus.write_bytes(b"not an ELF file")
    with pytest.raises(BackendError, match="cannot load"):
        cuda_kernel.load_library(str(bogus))


def test_device_pointer_accepts_int_and_array_interface():
    class Fake(object):
        __cuda_array_interface__ = {"data": (1234, False), "shape": (1,), "typestr": "<f4", "version": 3}

    assert cuda_kernel.device_pointer(99) == 99
    assert cuda_kernel.device_pointer(Fake()) == 1234
    with pytest.raises(TypeError):
        cuda_kernel.device_pointer("x")


# --- nvcc compile-only ------------------------------------------------------------------------------------

@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_nvcc_builds_kernel_library_for_sm87_and_sm90(tmp_path):
    """Device code for Orin (sm_87) and Hopper (sm_90 + PTX) and the host launcher, linked into a shared lib."""
    out = str(tmp_path / "libedgead_kernels.so")
    cmd = [NVCC, "-std=c++17", "-O3", "-I" + os.path.join(NATIVE, "include"), "-I" + os.path.join(NATIVE, "src"),
           "-Xcompiler", "-fPIC", "-shared",
           "-gencode", "arch=compute_87,code=sm_87", "-gencode", "arch=compute_90,code=[sm_90,compute_90]",
           "-Xptxas", "-warn-spills", KERNEL_SRC, REF_SRC, "-o", out]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    log = proc.stdout.decode()
    assert proc.returncode == 0, log[-3000:]
    assert "spill" not in log.lower(), log[-3000:]
    symbols = subprocess.run(["nm", "-D", "--defined-only", out], stdout=subprocess.PIPE).stdout.decode()
    for name in ("edgead_padim_mahalanobis", "edgead_padim_mahalanobis_cpu", "edgead_status_string"):
        assert " T " + name in symbols


# --- GPU parity (skips without CUDA) ---------------------------------------------------------------------

def _cuda_available():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.fixture(scope="module")
def gpu_lib(tmp_path_factory):
    """The kernel library: $EDGEAD_KERNEL_LIB / cpp_bindings/build, else built here for this GPU (-arch=native)."""
    if not _cuda_available():
        pytest.skip("no CUDA GPU")
    try:
        lib = cuda_kernel.load_library()
        if hasattr(lib, "edgead_padim_mahalanobis"):
            return lib
    except BackendError:
        pass
    if NVCC is None:
        pytest.skip("no kernel library and no nvcc to build one")
    out = str(tmp_path_factory.mktemp("gpu") / "libedgead_kernels.so")
    proc = subprocess.run([NVCC, "-std=c++17", "-O3", "-arch=native", "-I" + os.path.join(NATIVE, "include"),
                           "-I" + os.path.join(NATIVE, "src"),
                           "-Xcompiler", "-fPIC", "-shared", KERNEL_SRC, REF_SRC, "-o", out],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout.decode()[-3000:]
    return cuda_kernel.load_library(out)


def _gpu_reference_f64(x, mean, w_packed, chunk=256):
    """float64 distance on the GPU in patch chunks (torch), for sizes the numpy reference is too slow for."""
    import torch

    n, dim, num_patches = x.shape
    chunk = max(1, min(chunk, int(2e9 // (dim * dim * 8))))  # dense float64 blocks of at most ~2 GB
    index = torch.as_tensor(packing.dense_gather_index(dim), device=x.device)  # [D, D], T above the diagonal
    out = torch.empty((n, num_patches), dtype=torch.float64, device=x.device)
    for start in range(0, num_patches, chunk):
        stop = min(start + chunk, num_patches)
        padded = torch.nn.functional.pad(w_packed[start:stop].double(), (0, 1))
        dense = padded[:, index]                                               # [p, D, D]
        centred = x[:, :, start:stop].double().permute(2, 1, 0) - mean[start:stop, :, None].double()
        out[:, start:stop] = torch.linalg.vector_norm(torch.bmm(dense, centred), dim=1).T
    return out


GPU_CASES = [(1, 550, 4096, True), (1, 550, 4096, False), (8, 550, 1024, True), (4, 550, 512, False),
             (3, 100, 4096, True), (5, 24, 777, False), (12, 64, 100, True), (2, 1, 33, False),
             (7, 33, 257, True), (1, 1100, 64, False), (8, 200, 4096, False),
             (1, cuda_kernel.MAX_DIM, 3, True), (3, cuda_kernel.MAX_DIM, 2, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,dim,num_patches,half", GPU_CASES,
                         ids=["N{}-D{}-P{}-{}".format(n, d, p, "fp16" if h else "fp32") for n, d, p, h in GPU_CASES])
def test_gpu_kernel_matches_float64_reference(gpu_lib, n, dim, num_patches, half):
    import torch

    gen = torch.Generator(device="cuda").manual_seed(dim * 131 + num_patches + n)
    mean = torch.randn((num_patches, dim), device="cuda", generator=gen)
    x = (mean.T[None] + torch.randn((n, dim, num_patches), device="cuda", generator=gen)).contiguous()
    tri = dim * (dim + 1) // 2
    w = torch.randn((num_patches, tri), device="cuda", generator=gen) / dim ** 0.5
    w = w.half() if half else w
    out = torch.full((n, num_patches), float("nan"), device="cuda")  # poisoned: every entry must be written
    cuda_kernel.padim_mahalanobis(x, mean, w, out, stream=torch.cuda.current_stream().cuda_stream, lib=gpu_lib)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "kernel left {} outputs unwritten".format(int((~torch.isfinite(out)).sum()))
    expected = _gpu_reference_f64(x, mean, w)
    rel = ((out.double() - expected).abs() / expected.clamp_min(1e-12)).max().item()
    tolerance = 2e-5 * max(1.0, (dim / 550) ** 0.5)  # fp32 accumulation over D terms (as gpu_check's grid)
    assert rel < tolerance, "max relative error {:.3g} > {:.3g}".format(rel, tolerance)


@pytest.mark.gpu
def test_gpu_kernel_rejects_bad_arguments(gpu_lib):
    with pytest.raises(BackendError, match="invalid argument"):
        cuda_kernel.padim_mahalanobis_raw(0, 0, 0, False, 0, 1, 4, 4, lib=gpu_lib)


@pytest.mark.gpu
def test_gpu_kernel_refuses_dim_above_max(gpu_lib):
    import torch

    dim = cuda_kernel.MAX_DIM + 1
    x = torch.zeros((1, dim, 1), device="cuda")
    with pytest.raises(BackendError, match="invalid argument"):
        cuda_kernel.padim_mahalanobis_raw(x, x, x, False, x, 1, dim, 1, lib=gpu_lib)


@pytest.fixture(scope="module")
def shared_cudart_lib(tmp_path_factory):
    """The kernel library linked against the shared libcudart (``-cudart shared``) plus the very libcudart it uses
    (opened by its soname, which returns the copy already loaded for the library; torch may carry another copy with
    its own error state), so a test can leave an error where the launcher would see it."""
    import ctypes

    if not _cuda_available():
        pytest.skip("no CUDA GPU")
    if NVCC is None:
        pytest.skip("no nvcc")
    out = str(tmp_path_factory.mktemp("shared_cudart") / "libedgead_kernels.so")
    proc = subprocess.run([NVCC, "-std=c++17", "-O3", "-arch=native", "-cudart", "shared",
                           "-I" + os.path.join(NATIVE, "include"), "-I" + os.path.join(NATIVE, "src"),
                           "-Xcompiler", "-fPIC", "-shared", KERNEL_SRC, REF_SRC, "-o", out],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout.decode()[-3000:]
    lib = cuda_kernel.load_library(out)
    needed = subprocess.run(["ldd", out], stdout=subprocess.PIPE).stdout.decode()
    match = re.search(r"(libcudart\.so[.0-9]*) => (\S+)", needed)
    assert match, needed
    cudart = ctypes.CDLL(match.group(1))  # by soname: the handle the kernel library itself resolved
    with open("/proc/self/maps") as maps:
        mapped = {line.split()[-1] for line in maps if "libcudart" in line}
    assert os.path.realpath(match.group(2)) in {os.path.realpath(m) for m in mapped}, mapped
    cudart.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
    return lib, cudart


@pytest.mark.gpu
def test_gpu_launch_neither_reports_nor_clears_an_earlier_error(shared_cudart_lib):
    """An earlier non-sticky error (a failed cudaMalloc, as TensorRT's allocator may leave) is not the kernel's:
    the launch succeeds and the error is still there for its owner to read. Everything torch does happens before
    the error is planted or after it is read back, so torch never sees it."""
    import ctypes

    import torch

    lib, cudart = shared_cudart_lib
    x = torch.ones((2, 8, 4), device="cuda")
    mean = torch.zeros((4, 8), device="cuda")
    w = torch.zeros((4, 36), device="cuda")
    w[:, 0] = 1.0  # W[0, 0] = 1: distance = |x[0] - mean[0]| = 1
    out = torch.full((2, 4), float("nan"), device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    torch.cuda.synchronize()
    assert cudart.cudaGetLastError() == 0  # start clean
    pointer = ctypes.c_void_p()
    assert cudart.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(1 << 62)) == 2  # cudaErrorMemoryAllocation
    cuda_kernel.padim_mahalanobis(x, mean, w, out, stream=stream, lib=lib)  # raises if the launch reported it
    pending = cudart.cudaGetLastError()
    after = cudart.cudaGetLastError()
    torch.cuda.synchronize()
    assert pending == 2  # still pending after the launch: the launcher neither reported nor consumed it
    assert after == 0
    assert torch.equal(out, torch.ones((2, 4), device="cuda"))
