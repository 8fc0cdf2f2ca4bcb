"""Find and load ``libedgead_plugins.so`` (TensorRT plugin ``PadimMahalanobis`` v1, namespace "").

Loading the library with ctypes (RTLD_GLOBAL) runs its static ``REGISTER_TENSORRT_PLUGIN`` registrar, so it
must happen before an ONNX file is parsed or a plugin engine is deserialized. Search order: the ``path``
argument, ``$EDGEAD_PLUGIN_LIB``, ``cpp_bindings/build/``, ``build/``, then the system loader path.
Torch-free; never imports tensorrt itself (``is_registered`` takes the module).
"""
import ctypes

from edgead.errors import BackendError
from edgead.runtime import native_lib

LIBRARY_NAME = "libedgead_plugins.so"
ENV_VAR = "EDGEAD_PLUGIN_LIB"
PLUGIN_NAME = "PadimMahalanobis"
PLUGIN_VERSION = "1"
_loaded = {}


def candidate_paths(path=None):
    """Ordered places to look for the plugin library (explicit path only, when given)."""
    return native_lib.candidate_paths(LIBRARY_NAME, ENV_VAR, ("cpp_bindings/build", "build"), path)


def find_plugin_library(path=None):
    """First existing candidate path, or None."""
    return native_lib.first_existing(candidate_paths(path))


def load_plugin_library(path=None):
    """Load the plugin library once (RTLD_GLOBAL); returns the path loaded.

    Raises:
        BackendError: not found, or the dynamic loader refuses it (missing libnvinfer / libcudart, other
        TensorRT major version).
    """
    found = find_plugin_library(path)
    if found is None:
        raise BackendError("{} not found (looked in: {}); build it on this device with `make native` (CMake in "
                           "cpp_bindings/, needs TensorRT) or pass --plugin-lib / set {}".format(
                               LIBRARY_NAME, ", ".join(candidate_paths(path)), ENV_VAR))
    if found in _loaded:
        return found
    try:
        _loaded[found] = ctypes.CDLL(found, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise BackendError("{}: cannot load the TensorRT plugin library ({}); it must be built against the "
                           "TensorRT installed here".format(found, exc))
    return found


def is_registered(trt):
    """True when the ``tensorrt`` module's plugin registry has PadimMahalanobis v1 in namespace ""."""
    registry = trt.get_plugin_registry()
    for getter in ("get_creator", "get_plugin_creator"):
        fn = getattr(registry, getter, None)
        if fn is None:
            continue
        try:
            if fn(PLUGIN_NAME, PLUGIN_VERSION, "") is not None:
                return True
        except Exception:  # noqa: BLE001 - older bindings raise on unknown names
            pass
    for attr in ("all_creators", "plugin_creator_list"):
        for creator in getattr(registry, attr, None) or []:
            if getattr(creator, "name", None) == PLUGIN_NAME and getattr(creator, "plugin_version", None) == PLUGIN_VERSION:
                return True
    return False


def needs_plugin(model_info):
    """True when an exported model's metadata says its Mahalanobis step is the plugin node."""
    return (model_info.get("export") or {}).get("mahalanobis") == "plugin"
