"""One error family for everything a user can get wrong.

Messages name the file (or source) and the problem, and where possible the fix.
The CLI prints them on one line without a traceback and exits with code 2.
Torch-free: the runtime imports this module.
"""


class EdgeadError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""


class BundleError(EdgeadError):
    """A model bundle (model.json + weights.safetensors) is missing, corrupt or inconsistent."""


class DataError(EdgeadError):
    """An image, mask or dataset folder cannot be used."""


class ConfigError(EdgeadError):
    """An option or combination of options is invalid (unknown backbone, bad size, ...)."""


class WeightsError(EdgeadError):
    """Backbone weights cannot be found or do not fit the backbone."""


class ExportError(EdgeadError):
    """Exporting to ONNX or building a TensorRT engine failed."""


class ModelFileError(EdgeadError):
    """An exported model (.onnx / .engine + sidecar) cannot be loaded."""


class BackendError(EdgeadError):
    """An inference backend (ONNX Runtime provider, TensorRT, CUDA, plugin library) is unavailable."""


class SourceError(EdgeadError):
    """A frame source URI cannot be opened or stopped delivering frames."""
