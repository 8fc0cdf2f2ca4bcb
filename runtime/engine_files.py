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
    """The sidecar as a dict, or None when it is missing or not strict JSON (no NaN)."""
    def no_constants(name):
        raise ValueError(name)

    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh, parse_constant=no_constants)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None


def write_engine_pair(engine_path, engine_bytes, info):
    """Replace ``engine_path`` and its sidecar by ``engine_bytes`` and ``info`` (a JSON-able dict), so that a
    kill at any step leaves a matching pair (see module doc). Returns the sidecar dict written.

    ``previous`` is the entry that describes the engine on disk now (hashed, so a sidecar from before
    ``engine_sha256``, or one left by an interrupted rebuild, still yields the right entry); an engine
    that matches nothing gets no ``previous``: it was not loadable before either.
    """
    engine_path = os.fspath(engine_path)
    side = sidecar_path(engine_path)
    sidecar = dict(info)
    sidecar.pop(PREVIOUS_KEY, None)
    sidecar["engine_sha256"] = hashlib.sha256(engine_bytes).hexdigest()
    text = json.dumps(sidecar, indent=2, allow_nan=False)  # before any write: ValueError leaves the old pair
    previous = None
    old = _read_json(side) if os.path.isfile(engine_path) else None
    if isinstance(old, dict):
        current = sha256_file(engine_path)
        try:
            previous = dict(select_engine_info(engine_path, old, current))
        except ModelFileError:
            previous = None
        if previous is not None:
            previous["engine_sha256"] = current
    atomic.write_text(side, json.dumps(dict(sidecar, **{PREVIOUS_KEY: previous}), indent=2, allow_nan=False))
    atomic.fault_point("engine.sidecar-with-previous")
    atomic.write_bytes(engine_path, engine_bytes)
    atomic.fault_point("engine.engine-written")
    atomic.write_text(side, text)
    return sidecar


def select_engine_info(engine_path, sidecar, engine_sha256=None):
    """The entry of a parsed sidecar that describes the engine at ``engine_path``.

    engine_sha256: hex digest of the engine bytes the caller will deserialize (hash once, read once, so
    a rebuild between the two cannot pair them with the wrong entry); default: hash the file now.
    Raises ModelFileError when neither the sidecar nor its ``previous`` entry matches.
    """
    if not isinstance(sidecar, dict):
        return sidecar
    expected = sidecar.get("engine_sha256")
    previous = sidecar.get(PREVIOUS_KEY)
    if expected is None and previous is None:
        return sidecar  # built before edgead recorded the hash
    actual = engine_sha256 if engine_sha256 is not None else sha256_file(engine_path)
    if actual == expected:
        found = dict(sidecar)
        found.pop(PREVIOUS_KEY, None)
        return found
    if isinstance(previous, dict) and previous.get("engine_sha256") == actual:
        return previous
    raise ModelFileError("{}: the engine does not match its sidecar {} (copied without it, or replaced by another "
                         "build); rebuild with `edgead build` or copy both files".format(
                             engine_path, sidecar_path(engine_path)))
