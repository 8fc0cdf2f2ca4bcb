"""The engine interface every backend implements (Polygraphy-style runner).

An engine takes uint8 RGB frames ``[N, H, W, 3]`` (already resized to the model's input size)
and returns ``anomaly_map`` float32 ``[N, 1, H, W]`` and ``score`` float32 ``[N]``.
Backends load lazily: importing this module never imports onnxruntime or tensorrt.
"""
import os

from edgead.errors import ModelFileError


class Engine(object):
    """Base class. Subclasses set ``backend`` and implement ``infer`` and ``info``."""

    backend = "abstract"

    #: dict parsed from the model's ``edgead`` metadata (model.json + export settings)
    model_info = None
    #: (N or None for dynamic, H, W, 3)
    input_shape = None

    def infer(self, frames):
        """Run one batch. frames: uint8 ``[N, H, W, 3]`` RGB. Returns (map ``[N,1,H,W]`` f32, score ``[N]`` f32)."""
        raise NotImplementedError

    def info(self):
        """Backend, providers, device and library versions, as a JSON-able dict."""
        raise NotImplementedError

    def close(self):
        """Release device resources (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_engine(path, backend="auto", **options):
    """Open ``path`` with the requested backend.

    backend: ``auto`` (by file extension), ``onnxruntime`` or ``tensorrt``.
    options: backend-specific, e.g. ``providers=("cpu",)`` / ``threads=2`` for ONNX Runtime,
    ``plugin_lib=...`` for TensorRT.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError("{}: model file not found".format(path))
    ext = os.path.splitext(path)[1].lower()
    if backend == "auto":
        backend = "tensorrt" if ext in (".engine", ".plan", ".trt") else "onnxruntime"
    if backend in ("onnxruntime", "ort"):
        from edgead.runtime.engines.ort_engine import OrtEngine

        return OrtEngine(path, **options)
    if backend in ("tensorrt", "trt"):
        from edgead.runtime.engines.tensorrt_engine import TensorRTEngine

        return TensorRTEngine(path, **options)
    raise ModelFileError("{}: unknown backend {!r} (use auto, onnxruntime or tensorrt)".format(path, backend))
