"""Fast CPU PaDiM Mahalanobis kernel (``cpp_bindings/src/padim_mahalanobis_cpu.cpp``, the ONNX Runtime op's
kernel) against the float64 reference, on every code path this CPU can run (AVX-512, AVX2+F16C, portable).

Tolerance: rtol 2e-5 of the largest distance (fp32 accumulation over D <= 550 terms, in a different order
than the reference); fp16 storage is compared against the float64 distance of the fp16-rounded weights.
"""
import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest

import cuda_reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = os.path.join(ROOT, "cpp_bindings")
SOURCES = [os.path.join(NATIVE, "src", "padim_mahalanobis_cpu.cpp"), os.path.join(NATIVE, "src", "padim_mahalanobis_ref.cpp")]
CXX = shutil.which("g++") or shutil.which("c++")
ISAS = ("avx512", "avx2", "portable")


@pytest.fixture(scope="module")
def kernel_lib(tmp_path_factory):
    """The CPU kernel built with g++ -O3 (no CUDA, no onnxruntime headers) and loaded with ctypes."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    out = str(tmp_path_factory.mktemp("cpu_kernel") / "libedgead_cpu.so")
    proc = subprocess.run([CXX, "-std=c++17", "-O3", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-Wno-psabi",
                           "-I" + os.path.join(NATIVE, "include"), "-I" + os.path.join(NATIVE, "src")] + SOURCES +
                          ["-o", out], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=180)
    assert proc.returncode == 0, proc.stdout.decode()[-3000:]
    lib = ctypes.CDLL(out)
    lib.edgead_padim_mahalanobis_cpu_range.restype = ctypes.c_int
    lib.edgead_padim_mahalanobis_cpu_range.argtypes = (
        [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int] * 5)
    lib.edgead_cpu_kernel_isa.restype = ctypes.c_char_p
    lib.edgead_cpu_kernel_set_isa.argtypes = [ctypes.c_char_p]
    lib.edgead_cpu_kernel_set_isa.restype = ctypes.c_int
    yield lib
    lib.edgead_cpu_kernel_set_isa(b"auto")


def _use(lib, isa):
    if lib.edgead_cpu_kernel_set_isa(isa.encode()) != 0:
        pytest.skip("this CPU cannot run the {} path".format(isa))
    assert lib.edgead_cpu_kernel_isa().decode() == isa


def _run(lib, x, mean, w, begin=0, end=None, out=None):
    n, dim, num_patches = x.shape
    end = num_patches if end is None else end
    out = np.full((n, num_patches), np.nan, np.float32) if out is None else out
    status = lib.edgead_padim_mahalanobis_cpu_range(
        x.ctypes.data, mean.ctypes.data, w.ctypes.data, int(w.dtype == np.float16), out.ctypes.data,
        n, dim, num_patches, begin, end)
    return status, out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,dim,num_patches", [(1, 100, 40), (3, 37, 17), (9, 100, 5), (2, 550, 3), (5, 1, 33),
                                               (1, 6, 70)])
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_kernel_matches_float64(kernel_lib, isa, n, dim, num_patches, half):
    _use(kernel_lib, isa)
    x, mean, w = ref.random_problem(n, dim, num_patches, seed=dim * 7 + n)
    w_store = w.astype(np.float16) if half else w
    status, got = _run(kernel_lib, x, mean, w_store)
    assert status == 0
    expected = ref.distance_f64(x, mean, w_store)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


@pytest.mark.parametrize("isa", ISAS)
def test_kernel_writes_only_its_patch_range(kernel_lib, isa):
    """Threads split the patch axis: a call for [begin, end) leaves every other output untouched."""
    _use(kernel_lib, isa)
    x, mean, w = ref.random_problem(3, 24, 50, seed=3)
    status, got = _run(kernel_lib, x, mean, w, begin=7, end=38)
    assert status == 0
    assert np.isnan(got[:, :7]).all() and np.isnan(got[:, 38:]).all()
    expected = ref.distance_f64(x, mean, w)
    np.testing.assert_allclose(got[:, 7:38], expected[:, 7:38], rtol=0, atol=2e-5 * np.abs(expected).max())


def test_code_paths_agree(kernel_lib):
    """Every available path gives the same distances up to fp32 summation order."""
    x, mean, w = ref.random_problem(2, 100, 20, seed=11)
    results = {}
    for isa in ISAS:
        if kernel_lib.edgead_cpu_kernel_set_isa(isa.encode()) == 0:
            results[isa] = _run(kernel_lib, x, mean, w.astype(np.float16))[1]
    assert "portable" in results
    for isa, got in results.items():
        np.testing.assert_allclose(got, results["portable"], rtol=1e-5, err_msg=isa)


def test_kernel_rejects_bad_arguments(kernel_lib):
    x, mean, w = ref.random_problem(1, 8, 4)
    out = np.zeros((1, 4), np.float32)
    lib = kernel_lib
    call = lib.edgead_padim_mahalanobis_cpu_range
    assert call(x.ctypes.data, mean.ctypes.data, w.ctypes.data, 0, out.ctypes.data, 1, 8, 4, 0, 5) != 0  # end > P
    assert call(x.ctypes.data, mean.ctypes.data, w.ctypes.data, 0, out.ctypes.data, 1, 8, 4, 3, 2) != 0  # begin > end
    assert call(x.ctypes.data, mean.ctypes.data, w.ctypes.data, 0, out.ctypes.data, 0, 8, 4, 0, 4) != 0  # N = 0
    assert call(None, mean.ctypes.data, w.ctypes.data, 0, out.ctypes.data, 1, 8, 4, 0, 4) != 0
    assert lib.edgead_cpu_kernel_set_isa(b"sse9") != 0
