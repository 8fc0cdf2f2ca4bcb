"""Inference engines behind one interface (see ``base.Engine``).

``open_engine(path)`` picks ONNX Runtime for ``.onnx`` files and native TensorRT for ``.engine`` / ``.plan``.
"""
from edgead.runtime.engines.base import Engine, open_engine  # noqa: F401
