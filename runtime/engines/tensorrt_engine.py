"""Native TensorRT engine behind ``base.Engine``: one stream, pinned host buffers, CUDA-event timing.

``TensorRTEngine(path, plugin_lib=None, device=0)`` opens ``model.engine`` plus its sidecar
``model.engine.json`` (metadata + ``tensorrt`` build info) and runs
``infer(frames uint8 [N, H, W, 3]) -> (anomaly_map f32 [N, 1, H, W], score f32 [N])`` for any N
(fixed-batch engines run in chunks, the last one padded; dynamic-batch engines up to their profile max).

CUDA memory, streams and events go through the CUDA runtime library (``libcudart``, always present where
TensorRT is) via ctypes, so no cuda-python/pycuda wheel is needed on JetPack. TensorRT 10 and 11 run with
``execute_async_v3`` (named tensor addresses, ``set_input_shape``, ``get_tensor_profile_shape``), 8.5/8.6 with
``execute_async_v2`` (binding list, ``set_binding_shape``, ``get_profile_shape``; the binding API is gone in 10).
``tensorrt`` is imported lazily; torch never.
"""
import ctypes
import ctypes.util
import hashlib
import os

import numpy as np

from edgead.errors import BackendError, ModelFileError
from edgead.runtime import modelinfo, tensorrt_plugin
from edgead.runtime.engines.base import Engine

_CUDART_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so.10.2")
_MEMCPY_H2D, _MEMCPY_D2H = 1, 2
_HOST_ALLOC_DEFAULT = 0
_ATTR_CC_MAJOR, _ATTR_CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor/Minor


def import_tensorrt(what):
    """``import tensorrt`` or BackendError naming ``what`` (the file that needed it)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendError("{}: the TensorRT Python bindings are not installed ({}); on Jetson install JetPack's "
                           "python3-libnvinfer, on x86 `pip install tensorrt`".format(what, exc))
    return trt


def tensorrt_major(trt):
    """Major version of the imported tensorrt module (int)."""
    return int(str(trt.__version__).split(".")[0])


class CudaRuntime(object):
    """The handful of CUDA runtime calls the engine needs, over ctypes (device ``device``)."""

    def __init__(self, device=0):
        lib = None
        names = list(_CUDART_NAMES)
        found = ctypes.util.find_library("cudart")
        if found:
            names.insert(0, found)
        for name in names:
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if lib is None:
            raise BackendError("the CUDA runtime library (libcudart) was not found; add the CUDA lib folder "
                               "(e.g. /usr/local/cuda/lib64) to LD_LIBRARY_PATH")
        self.lib = lib
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                        ctypes.c_void_p]
        lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        lib.cudaHostAlloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
        lib.cudaFree.argtypes = [ctypes.c_void_p]
        lib.cudaFreeHost.argtypes = [ctypes.c_void_p]
        lib.cudaEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cudaEventElapsedTime.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_void_p]
        lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        lib.cudaStreamDestroy.argtypes = [ctypes.c_void_p]
        lib.cudaGetDeviceCount.argtypes = [ctypes.POINTER(ctypes.c_int)]
        lib.cudaEventDestroy.argtypes = [ctypes.c_void_p]
        self.device = int(device)
        self.check(lib.cudaSetDevice(self.device), "cudaSetDevice({})".format(self.device))

    def check(self, status, what):
        """Raise BackendError when a CUDA call returned non-zero."""
        if status != 0:
            text = self.lib.cudaGetErrorString(status)
            raise BackendError("CUDA error in {}: {} ({})".format(what, text.decode() if text else "?", status))

    def malloc(self, nbytes):
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), max(int(nbytes), 1)), "cudaMalloc")
        return ptr.value

    def free(self, ptr):
        """cudaFree of a pointer from ``malloc`` (None / 0: nothing to do)."""
        if ptr:
            self.check(self.lib.cudaFree(ptr), "cudaFree")

    def device_count(self):
        """Number of CUDA devices the runtime sees (0 when the driver reports none)."""
        count = ctypes.c_int(0)
        status = self.lib.cudaGetDeviceCount(ctypes.byref(count))
        return int(count.value) if status == 0 else 0

    def host_array(self, shape, dtype):
        """Pinned host memory as a numpy array; returns (pointer, array)."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaHostAlloc(ctypes.byref(ptr), max(nbytes, 1), _HOST_ALLOC_DEFAULT), "cudaHostAlloc")
        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(ptr.value)
        return ptr.value, np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def stream(self):
        handle = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(handle)), "cudaStreamCreate")
        return handle.value or 0

    def event(self):
        handle = ctypes.c_void_p()
        self.check(self.lib.cudaEventCreate(ctypes.byref(handle)), "cudaEventCreate")
        return handle.value

    def copy_async(self, dst, src, nbytes, kind, stream):
        self.check(self.lib.cudaMemcpyAsync(dst, src, int(nbytes), kind, stream), "cudaMemcpyAsync")

    def copy_to_device(self, dst, host_array):
        """Host -> device copy of a contiguous numpy array, complete on the device when this returns.

        ``cudaMemcpy`` from pageable memory may return once the data is staged, before the DMA lands; a consumer
        on another (non-blocking) stream, such as TensorRT's calibration, could then read a partial batch. So the
        device is synchronized after the copy."""
        self.check(self.lib.cudaMemcpy(dst, host_array.ctypes.data, host_array.nbytes, _MEMCPY_H2D), "cudaMemcpy")
        self.check(self.lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")

    def record(self, event, stream):
        self.check(self.lib.cudaEventRecord(event, stream), "cudaEventRecord")

    def elapsed_ms(self, start, stop):
        value = ctypes.c_float()
        self.check(self.lib.cudaEventElapsedTime(ctypes.byref(value), start, stop), "cudaEventElapsedTime")
        return float(value.value)

    def synchronize(self, stream):
        self.check(self.lib.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def device_name(self):
        """Name of the device from the CUDA driver (``cuDeviceGetName``), e.g. 'NVIDIA H100 80GB HBM3', 'Orin'."""
        return cuda_device_name(self.device)

    def compute_capability(self):
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, self.device), "attribute")
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, self.device), "attribute")
        return "{}.{}".format(major.value, minor.value)


def cuda_device_status(device=0):
    """``(True, "GPU name")`` when libcudart loads and CUDA device ``device`` can be selected, else
    ``(False, reason)``. The runtime's own ctypes path: what TensorRT engines here will use (no torch)."""
    try:
        cuda = CudaRuntime(device)
        count = cuda.device_count()
    except BackendError as exc:
        return False, str(exc)
    if count <= int(device):
        return False, "CUDA sees {} device(s), no device {}".format(count, device)
    return True, cuda.device_name() or "CUDA device {}".format(device)


def cuda_device_name(device=0):
    """GPU name from the CUDA driver (libcuda), or None when there is no driver/GPU. Same string at build and run."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            drv = ctypes.CDLL(name)
            break
        except OSError:
            drv = None
    if drv is None or drv.cuInit(0) != 0:
        return None
    handle = ctypes.c_int()
    buf = ctypes.create_string_buffer(256)
    if drv.cuDeviceGet(ctypes.byref(handle), int(device)) != 0 or drv.cuDeviceGetName(buf, 256, handle) != 0:
        return None
    return buf.value.decode(errors="replace").strip() or None


class _Tensor(object):
    """One engine I/O tensor: name, binding index, input flag, shape (-1 = dynamic), numpy dtype."""

    def __init__(self, name, index, is_input, shape, dtype):
        self.name, self.index, self.is_input = name, index, is_input
        self.shape, self.dtype = tuple(int(v) for v in shape), np.dtype(dtype)
        self.device = None
        self.host_ptr, self.host = None, None


def describe_io(trt, engine):
    """List of ``_Tensor`` for the engine's inputs and outputs (TensorRT 10 names API, or 8.x bindings)."""
    tensors = []
    if hasattr(engine, "num_io_tensors") and tensorrt_major(trt) >= 10:
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            tensors.append(_Tensor(name, i, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                                   engine.get_tensor_shape(name), trt.nptype(engine.get_tensor_dtype(name))))
    else:
        for i in range(engine.num_bindings):
            tensors.append(_Tensor(engine.get_binding_name(i), i, engine.binding_is_input(i),
                                   engine.get_binding_shape(i), trt.nptype(engine.get_binding_dtype(i))))
    return tensors


def check_sidecar_matches(path, info, trt_version, gpu_name):
    """ModelFileError when the sidecar says the engine was built with another TensorRT version or GPU."""
    built = info.get("tensorrt") or {}
    version = built.get("version")
    if version and str(version) != str(trt_version):
        raise ModelFileError("{}: engine was built with TensorRT {} but this is TensorRT {}; rebuild it here with "
                             "`edgead build model.onnx -o {}`".format(path, version, trt_version, path))
    gpu = built.get("gpu")
    if gpu and gpu_name and str(gpu) != str(gpu_name):
        raise ModelFileError("{}: engine was built for GPU '{}' but this is '{}'; TensorRT engines are specific to "
                             "the GPU: rebuild it here with `edgead build`".format(path, gpu, gpu_name))


class TensorRTEngine(Engine):
    """A serialized TensorRT engine (+ ``.json`` sidecar) run on one CUDA stream.

    Args:
        path: ``.engine`` / ``.plan`` file built by ``edgead build`` (sidecar next to it).
        plugin_lib: path of ``libedgead_plugins.so`` (default: searched, loaded when the model needs it).
        device: CUDA device index.
        check_gpu: refuse an engine whose sidecar names another GPU (default True).
    """

    backend = "tensorrt"

    def __init__(self, path, plugin_lib=None, device=0, check_gpu=True):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise ModelFileError("{}: engine file not found".format(self.path))
        if os.path.getsize(self.path) == 0:
            raise ModelFileError("{}: engine file is empty (0 bytes)".format(self.path))
        with open(self.path, "rb") as fh:
            blob = fh.read()  # read once: the metadata entry is chosen by the hash of these very bytes
        self.model_info = modelinfo.load_engine_info(self.path, hashlib.sha256(blob).hexdigest())
        self._buffers_ready = False
        trt = import_tensorrt(self.path)
        self._trt = trt
        self._major = tensorrt_major(trt)
        check_sidecar_matches(self.path, self.model_info, trt.__version__, None)
        self.plugin_lib = None
        if plugin_lib or tensorrt_plugin.needs_plugin(self.model_info):
            self.plugin_lib = tensorrt_plugin.load_plugin_library(plugin_lib)
        self._cuda = CudaRuntime(device)
        self.gpu = self._cuda.device_name()
        check_sidecar_matches(self.path, self.model_info, trt.__version__, self.gpu if check_gpu else None)
        self._logger = trt.Logger(trt.Logger.WARNING)
        if hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(self._logger, "")
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            hint = " or the PadimMahalanobis plugin library was not loaded" if self.plugin_lib is None else ""
            raise ModelFileError("{}: TensorRT {} cannot deserialize this engine (corrupt file, built with another "
                                 "TensorRT version or GPU{}); rebuild it here with `edgead build`".format(
                                     self.path, trt.__version__, hint))
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError("{}: cannot create a TensorRT execution context (out of GPU memory?)".format(self.path))
        self._setup_io()

    # --- setup ---------------------------------------------------------------------------------------
    def _setup_io(self):
        tensors = describe_io(self._trt, self.engine)
        inputs = [t for t in tensors if t.is_input]
        by_name = {t.name: t for t in tensors}
        height, width = modelinfo.input_hw(self.model_info)
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or tuple(inputs[0].shape[1:]) != (height, width, 3):
            raise ModelFileError("{}: expected one input [N, {}, {}, 3], engine has {}".format(
                self.path, height, width, [(t.name, t.shape) for t in inputs]))
        for name in ("anomaly_map", "score"):
            if name not in by_name or by_name[name].is_input:
                raise ModelFileError("{}: output {!r} missing (tensors: {})".format(self.path, name, list(by_name)))
        self.input = inputs[0]
        self.outputs = [by_name["anomaly_map"], by_name["score"]]
        self.tensors = tensors
        batch = self.input.shape[0]
        self.dynamic = batch < 0
        if self.dynamic:
            self.max_batch = int(self._profile_max()[0])
            self.batch = None
        else:
            self.max_batch = self.batch = batch
        self.input_shape = (self.batch, height, width, 3)
        self._stream = self._cuda.stream()
        self._events = [self._cuda.event() for _ in range(4)]
        for tensor in tensors:
            shape = tuple(self.max_batch if (k == 0 and v < 0) else v for k, v in enumerate(tensor.shape))
            if any(v < 0 for v in shape):
                raise ModelFileError("{}: tensor {} has dynamic dims other than the batch: {}".format(
                    self.path, tensor.name, tensor.shape))
            tensor.max_shape = shape
            tensor.device = self._cuda.malloc(int(np.prod(shape)) * tensor.dtype.itemsize)
            tensor.host_ptr, tensor.host = self._cuda.host_array(shape, tensor.dtype)
        if self._major >= 10:
            for tensor in tensors:
                self.context.set_tensor_address(tensor.name, tensor.device)
        self._bindings = [0] * len(tensors)
        for tensor in tensors:
            self._bindings[tensor.index] = tensor.device
        self._buffers_ready = True
        self.last_timings = {}

    def _profile_max(self):
        if self._major >= 10:
            return tuple(self.engine.get_tensor_profile_shape(self.input.name, 0)[2])
        return tuple(self.engine.get_profile_shape(0, self.input.index)[2])

    # --- inference -----------------------------------------------------------------------------------
    def infer(self, frames):
        """frames: uint8 ``[N, H, W, 3]`` RGB. Returns (map ``[N,1,H,W]`` f32, score ``[N]`` f32)."""
        frames = np.asarray(frames)
        _, height, width, _ = self.input_shape
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[1:] != (height, width, 3) or frames.dtype != np.uint8:
            raise ValueError("frames must be uint8 [N, {}, {}, 3], got {} {}".format(
                height, width, frames.dtype, frames.shape))
        if len(frames) == 0:
            return np.zeros((0, 1, height, width), np.float32), np.zeros((0,), np.float32)
        maps, scores = [], []
        for start in range(0, len(frames), self.max_batch):
            chunk = frames[start:start + self.max_batch]
            amap, score = self._run(chunk)
            maps.append(amap)
            scores.append(score)
        if len(maps) == 1:
            return maps[0], scores[0]
        return np.concatenate(maps), np.concatenate(scores)

    def _run(self, chunk):
        real = len(chunk)
        batch = real if self.dynamic else self.batch
        if real < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - real, axis=0)])
        shape = (batch,) + tuple(self.input.max_shape[1:])
        if self.dynamic:
            if self._major >= 10:
                ok = self.context.set_input_shape(self.input.name, shape)
            else:
                ok = self.context.set_binding_shape(self.input.index, shape)
            if ok is False:
                raise BackendError("{}: TensorRT refused input shape {} (profile max batch {})".format(
                    self.path, shape, self.max_batch))
        host_in = self.input.host.reshape(-1)[:int(np.prod(shape))].reshape(shape)
        host_in[...] = chunk  # uint8 -> engine input dtype (uint8, or float32 for TensorRT 8.5 exports)
        cuda, stream, ev = self._cuda, self._stream, self._events
        cuda.record(ev[0], stream)
        cuda.copy_async(self.input.device, self.input.host_ptr, host_in.nbytes, _MEMCPY_H2D, stream)
        cuda.record(ev[1], stream)
        if self._major >= 10:
            ok = self.context.execute_async_v3(stream)
        else:
            ok = self.context.execute_async_v2(self._bindings, stream)
        if not ok:
            raise BackendError("{}: TensorRT enqueue failed (see the TensorRT log above)".format(self.path))
        cuda.record(ev[2], stream)
        results = []
        for tensor in self.outputs:
            out_shape = (batch,) + tuple(tensor.max_shape[1:])
            nbytes = int(np.prod(out_shape)) * tensor.dtype.itemsize
            cuda.copy_async(tensor.host_ptr, tensor.device, nbytes, _MEMCPY_D2H, stream)
            results.append((tensor, out_shape))
        cuda.record(ev[3], stream)
        cuda.synchronize(stream)
        self.last_timings = {"h2d_ms": cuda.elapsed_ms(ev[0], ev[1]), "compute_ms": cuda.elapsed_ms(ev[1], ev[2]),
                             "d2h_ms": cuda.elapsed_ms(ev[2], ev[3])}
        arrays = []
        for tensor, out_shape in results:
            flat = tensor.host.reshape(-1)[:int(np.prod(out_shape))]
            arrays.append(np.array(flat, np.float32).reshape(out_shape)[:real])
        amap, score = arrays
        return amap.reshape(real, 1, amap.shape[-2], amap.shape[-1]), score.reshape(real)

    def info(self):
        """dict: backend, model, TensorRT version, GPU, compute capability, batch, plugin library, last timings."""
        built = self.model_info.get("tensorrt") or {}
        return {
            "backend": self.backend,
            "model": self.path,
            "tensorrt": self._trt.__version__,
            "execute": "execute_async_v3" if self._major >= 10 else "execute_async_v2",
            "gpu": self.gpu,
            "compute_capability": self._cuda.compute_capability(),
            "batch": self.batch if self.batch is not None else "dynamic",
            "max_batch": self.max_batch,
            "input_dtype": self.input.dtype.name,
            "input_shape": list(self.input_shape),
            "fp16": built.get("fp16"),
            "int8": built.get("int8"),
            "strongly_typed": built.get("strongly_typed"),
            "tf32": built.get("tf32"),
            "plugin_lib": self.plugin_lib,
            "last_timings_ms": dict(self.last_timings),
        }

    def close(self):
        if not getattr(self, "_buffers_ready", False):
            return
        self._buffers_ready = False
        self.context = None
        self.engine = None
        lib = self._cuda.lib
        lib.cudaStreamSynchronize(self._stream)
        for tensor in self.tensors:
            lib.cudaFree(tensor.device)
            tensor.host = None
            lib.cudaFreeHost(tensor.host_ptr)
        for event in self._events:
            lib.cudaEventDestroy(event)
        lib.cudaStreamDestroy(self._stream)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
