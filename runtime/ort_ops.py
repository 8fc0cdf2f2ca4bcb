"""Find ``libedgead_ort.so``: the ONNX Runtime custom-op library for ``edgead::PadimMahalanobis`` (CPU).

With it, a ``--mahalanobis plugin`` export runs on ONNX Runtime's CPU execution provider: the node reads
the packed fp16 whitening directly (cpp_bindings/ort/, built by ``make ort-ops``: ONNX Runtime headers from
``ORT_INCLUDE=...`` or, without it, fetched from Debian by scripts/fetch_ort_headers.sh).
Search order: the ``path`` argument, ``$EDGEAD_ORT_OPS_LIB``, ``build/ort/``, ``cpp_bindings/build/``,
then the system loader path. Torch-free; registering it is done by the ONNX Runtime engine.
"""
from edgead.runtime import native_lib

LIBRARY_NAME = "libedgead_ort.so"
ENV_VAR = "EDGEAD_ORT_OPS_LIB"


def candidate_paths(path=None):
    """Ordered places to look for the custom-op library (the explicit path only, when given)."""
    return native_lib.candidate_paths(LIBRARY_NAME, ENV_VAR, ("build/ort", "cpp_bindings/build"), path)


def find_ort_ops_library(path=None):
    """First existing candidate path, or None."""
    return native_lib.first_existing(candidate_paths(path))


def missing_library_hint(path=None):
    """One sentence for errors about a plugin-flavour model that ONNX Runtime cannot run."""
    return ("the graph has the edgead::PadimMahalanobis node: build {} with `make ort-ops` (it fetches Debian's "
            "ONNX Runtime headers; on JetPack add ORT_INCLUDE=<include/ of your ONNX Runtime build>; looked in: {}; "
            "or set {}), run it with TensorRT, or export with --mahalanobis onnx".format(
                LIBRARY_NAME, ", ".join(candidate_paths(path)), ENV_VAR))
