"""Where edgead looks for its native libraries (kernel, TensorRT plugin, ONNX Runtime op libraries)."""
import ctypes.util
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def candidate_paths(library_file, env_var, folders, path=None):
    """Ordered places to look for ``library_file``: the explicit ``path`` alone when given, else
    ``$env_var``, ``<repo>/<folder>/<library_file>`` for each folder, then the system loader's find."""
    if path:
        return [os.fspath(path)]
    found = []
    if os.environ.get(env_var):
        found.append(os.environ[env_var])
    for folder in folders:
        found.append(os.path.join(REPO_ROOT, folder, library_file))
    system = ctypes.util.find_library(library_file[3:].split(".so")[0])
    if system:
        found.append(system)
    return found


def first_existing(candidates):
    """First of ``candidates`` that exists (a bare name from the system loader counts), or None."""
    for candidate in candidates:
        if os.sep not in candidate or os.path.exists(candidate):
            return candidate
    return None
