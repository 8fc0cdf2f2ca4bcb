"""A TensorRT engine and its JSON sidecar, written and read as one pair.

``model.engine`` (TensorRT's bytes, which cannot carry our metadata) and ``model.engine.json`` (the
edgead metadata plus ``engine_sha256``) are two files, so replacing both cannot be one rename. Instead
the sidecar describes both generations while the engine is swapped:

1. the new sidecar, holding the old one under ``previous``, is renamed into place;
2. the new engine is renamed into place;
3. the sidecar is rewritten without ``previous``.

``engine_info`` hashes the engine and returns the sidecar entry whose ``engine_sha256`` matches, so a
process killed after any step leaves the old pair or the new pair loadable, never an engine run with
another model's thresholds. Sidecars from before ``engine_sha256`` existed are read as they are.
Torch-free, Python 3.8.
"""
import hashlib
import json
import os

from edgead import atomic
from edgead.errors import ModelFileError

PREVIOUS_KEY = "previous"


def sha256_file(path):
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(engine_path):
    """``model.engine`` -> ``model.engine.json``."""
    return os.fspath(engine_path) + ".json"


def _read_json(path):
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None


def write_engine_pair(engine_path, engine_bytes, info):
    """Replace ``engine_path`` and its sidecar by ``engine_bytes`` and ``info`` (a JSON-able dict), so that a
    kill at any step leaves a matching pair (see module doc). Returns the sidecar dict written."""
    engine_path = os.fspath(engine_path)
    side = sidecar_path(engine_path)
    sidecar = dict(info)
    sidecar.pop(PREVIOUS_KEY, None)
    sidecar["engine_sha256"] = hashlib.sha256(engine_bytes).hexdigest()
    old = _read_json(side) if os.path.exists(engine_path) else None
    if isinstance(old, dict) and isinstance(old.get("engine_sha256"), str):
        old.pop(PREVIOUS_KEY, None)
        atomic.write_text(side, json.dumps(dict(sidecar, **{PREVIOUS_KEY: old}), indent=2, allow_nan=False))
        atomic.fault_point("engine.sidecar-with-previous")
    atomic.write_bytes(engine_path, engine_bytes)
    atomic.fault_point("engine.engine-written")
    atomic.write_text(side, json.dumps(sidecar, indent=2, allow_nan=False))
    return sidecar


def select_engine_info(engine_path, sidecar):
    """The entry of a parsed sidecar that describes the engine file now at ``engine_path``.

    Raises ModelFileError when neither the sidecar nor its ``previous`` entry matches the engine's hash.
    """
    expected = sidecar.get("engine_sha256") if isinstance(sidecar, dict) else None
    if expected is None:
        return sidecar  # built before edgead recorded the hash
    actual = sha256_file(engine_path)
    if actual == expected:
        found = dict(sidecar)
        found.pop(PREVIOUS_KEY, None)
        return found
    previous = sidecar.get(PREVIOUS_KEY)
    if isinstance(previous, dict) and previous.get("engine_sha256") == actual:
        return previous
    raise ModelFileError("{}: the engine does not match its sidecar {} (copied without it, or replaced by another "
                         "build); rebuild with `edgead build` or copy both files".format(
                             engine_path, sidecar_path(engine_path)))
