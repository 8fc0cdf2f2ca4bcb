"""ONNX Runtime engine: CPU, CUDA or TensorRT execution provider behind ``base.Engine``.

``OrtEngine(path, providers=("cpu",), threads=None)``; ``infer(frames uint8 [N, H, W, 3])`` ->
``(anomaly_map f32 [N, 1, H, W], score f32 [N])`` for any N: a model exported with a fixed batch B
is run in chunks of B (the last chunk padded with copies of its last frame, the padding dropped);
a dynamic-batch model gets the whole array at once. onnxruntime is imported here, never by ``base``.
"""
import os

import numpy as np

from edgead import atomic
from edgead.errors import BackendError, ModelFileError
from edgead.runtime import modelinfo
from edgead.runtime import ort_ops as ort_ops_lib
from edgead.runtime.engines.base import Engine

#: flag name -> onnxruntime execution provider name
PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def parse_providers(providers, available):
    """``"cuda,cpu"`` / ``("tensorrt",)`` / ``"auto"`` -> list of ORT provider names (CPU appended last).

    ``auto``: CUDA when the installed onnxruntime has it, else CPU (TensorRT EP is opt-in because its
    first run builds an engine for minutes). Raises BackendError for unknown or unavailable providers.
    """
    if isinstance(providers, str):
        providers = [p for p in providers.replace(" ", "").split(",") if p]
    flags = [str(p).lower() for p in (providers or ["cpu"])]
    if flags == ["auto"]:
        flags = ["cuda"] if PROVIDER_NAMES["cuda"] in available else ["cpu"]
    names = []
    for flag in flags:
        if flag not in PROVIDER_NAMES:
            raise BackendError("unknown execution provider {!r} (use {})".format(flag, ", ".join(PROVIDER_NAMES)))
        name = PROVIDER_NAMES[flag]
        if name not in available:
            raise BackendError(
                "execution provider {!r} ({}) is not available in this onnxruntime (has: {}); install "
                "onnxruntime-gpu (on Jetson: the wheel for your JetPack from the Jetson Zoo) or use "
                "--providers cpu".format(flag, name, ", ".join(available)))
        if name not in names:
            names.append(name)
    if PROVIDER_NAMES["cpu"] not in names:
        names.append(PROVIDER_NAMES["cpu"])  # fallback for nodes the GPU providers do not take
    return names


class OrtEngine(Engine):
    """An .onnx model in an ``onnxruntime.InferenceSession``.

    Args:
        path: .onnx file with ``edgead`` metadata.
        providers: flags ``cpu`` / ``cuda`` / ``tensorrt`` (sequence or comma string) or ``auto``.
        threads: intra-op threads (None = onnxruntime default, all cores).
        trt_fp16: TensorRT EP: allow fp16 kernels. trt_cache_dir: TensorRT EP engine cache folder.
        optimization: ``all`` (default), ``extended``, ``basic`` or ``disable`` graph optimizations.
        ort_ops: path of ``libedgead_ort.so`` (the CPU ``edgead::PadimMahalanobis`` op for plugin-flavour
            graphs); None = search (``edgead.runtime.ort_ops``), registered only when found.
    """

    backend = "onnxruntime"

    def __init__(self, path, providers=("cpu",), threads=None, trt_fp16=False, trt_cache_dir=None,
                 optimization="all", ort_ops=None):
        import onnxruntime as ort

        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise ModelFileError("{}: model file not found".format(self.path))
        self._ort = ort
        available = ort.get_available_providers()
        names = parse_providers(providers, available)
        self.requested_providers = list(names)
        opts = ort.SessionOptions()
        if threads is not None:
            if int(threads) < 1:
                raise BackendError("{}: --threads must be >= 1, got {}".format(self.path, threads))
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        self.threads = threads
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        opts.graph_optimization_level = levels[optimization]
        self.custom_ops, ops_problem = self._register_custom_ops(opts, ort_ops)
        provider_list = []
        for name in names:
            if name == PROVIDER_NAMES["tensorrt"]:
                trt_opts = {"trt_fp16_enable": bool(trt_fp16)}
                if trt_cache_dir:
                    trt_opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=os.fspath(trt_cache_dir))
                provider_list.append((name, trt_opts))
            else:
                provider_list.append(name)
        try:
            with atomic.reading_folder_of(self.path):
                self.session = ort.InferenceSession(self.path, sess_options=opts, providers=provider_list)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = ""
            if "PadimMahalanobis" in str(exc):
                hint = " ({})".format(ops_problem or ort_ops_lib.missing_library_hint(ort_ops))
            raise ModelFileError("{}: onnxruntime cannot load the model: {}{}".format(self.path, first, hint))
        active = self.session.get_providers()
        for name in names:
            if name not in active:
                raise BackendError("{}: onnxruntime did not activate {} (active: {}); check the CUDA/cuDNN/"
                                   "TensorRT libraries it needs".format(self.path, name, ", ".join(active)))
        self.providers = active
        self.model_info = modelinfo.model_info_from_session(self.session, self.path)
        self._check_io()

    def _register_custom_ops(self, opts, ort_ops):
        """Register libedgead_ort.so when found. Returns (path or None, problem text or None)."""
        found = ort_ops_lib.find_ort_ops_library(ort_ops)
        if found is None:
            if ort_ops:
                raise BackendError("{}: custom-op library not found".format(ort_ops))
            return None, None
        try:
            opts.register_custom_ops_library(found)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if ort_ops:
                raise BackendError("{}: onnxruntime cannot register the custom-op library: {}".format(found, text))
            return None, "{} could not be registered: {}".format(found, text)
        return found, None

    def _check_io(self):
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise ModelFileError("{}: expected one input 'image', found {}".format(
                self.path, [i.name for i in inputs]))
        inp = inputs[0]
        shape = list(inp.shape)
        height, width = modelinfo.input_hw(self.model_info)
        if len(shape) != 4 or shape[1:] != [height, width, 3]:
            raise ModelFileError("{}: input {} has shape {}, expected [N, {}, {}, 3] (from the metadata)".format(
                self.path, inp.name, shape, height, width))
        if inp.type not in ("tensor(uint8)", "tensor(float)"):
            raise ModelFileError("{}: input {} has type {}, expected uint8 or float32".format(
                self.path, inp.name, inp.type))
        out_names = [o.name for o in outputs]
        for name in ("anomaly_map", "score"):
            if name not in out_names:
                raise ModelFileError("{}: output {!r} missing (outputs: {})".format(self.path, name, out_names))
        self.input_name = inp.name
        self.input_dtype = np.uint8 if inp.type == "tensor(uint8)" else np.float32
        batch = shape[0]
        self.batch = batch if isinstance(batch, int) and batch > 0 else None
        self.input_shape = (self.batch, height, width, 3)

    def infer(self, frames):
        """frames: uint8 ``[N, H, W, 3]`` RGB at the model size. Returns (map ``[N,1,H,W]`` f32, score ``[N]`` f32)."""
        frames = np.asarray(frames)
        _, height, width, _ = self.input_shape
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[1:] != (height, width, 3):
            raise ValueError("frames must be [N, {}, {}, 3], got {}".format(height, width, frames.shape))
        if frames.dtype != np.uint8:
            raise ValueError("frames must be uint8, got {}".format(frames.dtype))
        n = len(frames)
        if n == 0:
            return np.zeros((0, 1, height, width), np.float32), np.zeros((0,), np.float32)
        if self.batch is None:
            return self._run(frames)
        maps, scores = [], []
        for start in range(0, n, self.batch):
            chunk = frames[start:start + self.batch]
            real = len(chunk)
            if real < self.batch:
                pad = np.repeat(chunk[-1:], self.batch - real, axis=0)
                chunk = np.concatenate([chunk, pad])
            amap, score = self._run(chunk)
            maps.append(amap[:real])
            scores.append(score[:real])
        if len(maps) == 1:
            return maps[0], scores[0]
        return np.concatenate(maps), np.concatenate(scores)

    def _run(self, frames):
        feed = np.ascontiguousarray(frames, dtype=self.input_dtype)
        amap, score = self.session.run(["anomaly_map", "score"], {self.input_name: feed})
        n = len(frames)
        return (np.asarray(amap, np.float32).reshape(n, 1, amap.shape[-2], amap.shape[-1]),
                np.asarray(score, np.float32).reshape(n))

    def info(self):
        """dict: backend, model, providers (active), onnxruntime version, threads, batch, device names."""
        from edgead.runtime import report

        gpu = None
        if any(p != PROVIDER_NAMES["cpu"] for p in self.providers):
            gpu = report.gpu_name()
        return {
            "backend": self.backend,
            "model": self.path,
            "providers": list(self.providers),
            "onnxruntime": self._ort.__version__,
            "threads": self.threads,
            "custom_ops": self.custom_ops,
            "batch": self.batch if self.batch is not None else "dynamic",
            "input_dtype": np.dtype(self.input_dtype).name,
            "input_shape": list(self.input_shape),
            "cpu": report.cpu_model(),
            "gpu": gpu,
        }

    def close(self):
        self.session = None
