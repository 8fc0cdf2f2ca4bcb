"""ctypes binding of ``libedgead_kernels.so``: the fused PaDiM Mahalanobis CUDA kernel (and its CPU reference).

C ABI (``cpp_bindings/include/edgead/padim_mahalanobis.h``, docs/CONTRACTS.md)::

    x [N, D, P] f32, mean [P, D] f32, w_packed [P, T] f16|f32 (T = D(D+1)/2), out [N, P] f32
    out[n, p] = || W_p (x[n, :, p] - mean[p]) ||_2

Buffers are passed as raw device pointers (ints) or as objects exposing them: ``tensor.data_ptr()``
(torch), ``__cuda_array_interface__`` (CuPy, Numba). This module never imports torch or CuPy.
The library is searched in: the ``path`` argument, ``$EDGEAD_KERNEL_LIB``, ``cpp_bindings/build/``,
``build/cuda/`` (``make cuda-check``), then the system loader path.
"""
import ctypes
import os

from edgead.errors import BackendError
from edgead.runtime import native_lib

LIBRARY_NAME = "libedgead_kernels.so"
ENV_VAR = "EDGEAD_KERNEL_LIB"
ABI_VERSION = 1
#: Largest embedding dimension D of every native kernel, the TensorRT plugin and the ONNX Runtime op: the GPU
#: kernel stages (D + 8) float32 in 48 KiB of shared memory. Mirrors ``EDGEAD_MAX_DIM`` in
#: ``cpp_bindings/include/edgead/padim_mahalanobis.h`` (a test keeps them equal); the exporter checks it.
MAX_DIM = 12280
_cache = {}


def candidate_paths(path=None):
    """Ordered list of places to look for the kernel library (explicit path first)."""
    return native_lib.candidate_paths(LIBRARY_NAME, ENV_VAR, ("cpp_bindings/build", "build/cuda", "build"), path)


def load_library(path=None):
    """Load (once) and type the kernel library; returns the ``ctypes.CDLL``.

    Raises:
        BackendError: library not found, not loadable (e.g. no libcudart) or built for another ABI.
    """
    tried = candidate_paths(path)
    for candidate in tried:
        if candidate in _cache:
            return _cache[candidate]
        if os.sep in candidate and not os.path.exists(candidate):
            continue
        try:
            lib = ctypes.CDLL(candidate)
        except OSError as exc:
            raise BackendError("{}: cannot load the edgead CUDA kernel library ({}); is the CUDA runtime "
                               "(libcudart) on LD_LIBRARY_PATH?".format(candidate, exc))
        _declare(lib, candidate)
        _cache[candidate] = lib
        return lib
    raise BackendError("{} not found (looked in: {}); build it with `make native` (CMake, cpp_bindings/) or set "
                       "{}=/path/to/{}".format(LIBRARY_NAME, ", ".join(tried) or "nowhere", ENV_VAR, LIBRARY_NAME))


def _declare(lib, path):
    try:
        lib.edgead_kernels_abi_version.restype = ctypes.c_int
        lib.edgead_status_string.restype = ctypes.c_char_p
        lib.edgead_status_string.argtypes = [ctypes.c_int]
        lib.edgead_padim_mahalanobis_cpu.restype = ctypes.c_int
        lib.edgead_padim_mahalanobis_cpu.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                                     ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    except AttributeError as exc:
        raise BackendError("{}: not an edgead kernel library ({})".format(path, exc))
    version = lib.edgead_kernels_abi_version()
    if version != ABI_VERSION:
        raise BackendError("{}: kernel ABI version {} but this edgead expects {}; rebuild cpp_bindings".format(
            path, version, ABI_VERSION))
    if hasattr(lib, "edgead_padim_mahalanobis"):  # absent in a CPU-only build of the reference
        lib.edgead_padim_mahalanobis.restype = ctypes.c_int
        lib.edgead_padim_mahalanobis.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                                 ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                                 ctypes.c_void_p]


def device_pointer(buffer):
    """Raw device address of ``buffer``: an int, a torch tensor (``data_ptr()``) or a ``__cuda_array_interface__``."""
    if isinstance(buffer, int):
        return buffer
    if hasattr(buffer, "data_ptr"):
        return int(buffer.data_ptr())
    if hasattr(buffer, "__cuda_array_interface__"):
        return int(buffer.__cuda_array_interface__["data"][0])
    raise TypeError("expected a device pointer (int), a torch CUDA tensor or a __cuda_array_interface__ object, "
                    "got {}".format(type(buffer).__name__))


def _status_text(lib, status):
    text = lib.edgead_status_string(status)
    return text.decode() if text else "status {}".format(status)


def padim_mahalanobis_raw(x, mean, w_packed, w_is_half, out, n, dim, num_patches, stream=0, lib=None):
    """Launch the kernel on raw device pointers (asynchronous on ``stream``, a ``cudaStream_t`` as int).

    x ``[N, D, P]`` f32, mean ``[P, D]`` f32, w_packed ``[P, D(D+1)/2]`` f16 (``w_is_half``) or f32,
    out ``[N, P]`` f32 (written). Raises BackendError when the launcher refuses the arguments.
    """
    lib = lib or load_library()
    if not hasattr(lib, "edgead_padim_mahalanobis"):
        raise BackendError("the loaded {} was built without CUDA (CPU reference only)".format(LIBRARY_NAME))
    status = lib.edgead_padim_mahalanobis(device_pointer(x), device_pointer(mean), device_pointer(w_packed),
                                          1 if w_is_half else 0, device_pointer(out), int(n), int(dim),
                                          int(num_patches), ctypes.c_void_p(int(stream or 0)))
    if status != 0:
        raise BackendError("edgead_padim_mahalanobis(N={}, D={}, P={}) failed: {}".format(
            n, dim, num_patches, _status_text(lib, status)))


def _dtype_name(array):
    return str(getattr(array, "dtype", "")).replace("torch.", "")


def padim_mahalanobis(x, mean, w_packed, out, stream=0, lib=None):
    """Shape-checked launch on device arrays (torch CUDA tensors, CuPy arrays), all C-contiguous.

    x ``[N, D, P]`` float32, mean ``[P, D]`` float32, w_packed ``[P, T]`` float16 or float32,
    out ``[N, P]`` float32 (preallocated, written asynchronously on ``stream``). Returns ``out``.
    """
    n, dim, num_patches = (int(v) for v in x.shape)
    tri = dim * (dim + 1) // 2
    expected = {"mean": (num_patches, dim), "w_packed": (num_patches, tri), "out": (n, num_patches)}
    for name, array in (("mean", mean), ("w_packed", w_packed), ("out", out)):
        if tuple(int(v) for v in array.shape) != expected[name]:
            raise ValueError("{} has shape {}, expected {}".format(name, tuple(array.shape), expected[name]))
    for name, array in (("x", x), ("mean", mean), ("out", out)):
        if _dtype_name(array) != "float32":
            raise ValueError("{} must be float32, got {}".format(name, _dtype_name(array)))
    w_dtype = _dtype_name(w_packed)
    if w_dtype not in ("float16", "float32"):
        raise ValueError("w_packed must be float16 or float32, got {}".format(w_dtype))
    for name, array in (("x", x), ("mean", mean), ("w_packed", w_packed), ("out", out)):
        contiguous = getattr(array, "is_contiguous", None)
        if contiguous is not None and not contiguous():
            raise ValueError("{} must be contiguous".format(name))
    padim_mahalanobis_raw(x, mean, w_packed, w_dtype == "float16", out, n, dim, num_patches, stream, lib)
    return out


def padim_mahalanobis_cpu(x, mean, w_packed, lib=None):
    """The library's CPU reference on numpy arrays (same fp32 arithmetic as the kernel).

    x ``[N, D, P]`` float32, mean ``[P, D]`` float32, w_packed ``[P, T]`` float16/float32 -> ``[N, P]`` float32.
    """
    import numpy as np

    lib = lib or load_library()
    x = np.ascontiguousarray(x, np.float32)
    mean = np.ascontiguousarray(mean, np.float32)
    is_half = np.asarray(w_packed).dtype == np.float16
    w = np.ascontiguousarray(w_packed, np.float16 if is_half else np.float32)
    n, dim, num_patches = x.shape
    out = np.full((n, num_patches), np.nan, np.float32)
    status = lib.edgead_padim_mahalanobis_cpu(x.ctypes.data, mean.ctypes.data, w.ctypes.data, int(is_half),
                                              out.ctypes.data, n, dim, num_patches)
    if status != 0:
        raise BackendError("edgead_padim_mahalanobis_cpu(N={}, D={}, P={}) failed: {}".format(
            n, dim, num_patches, _status_text(lib, status)))
    return out
