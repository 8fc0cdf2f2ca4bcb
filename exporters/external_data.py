"""Writing an ONNX model, with its large tensors in an external data file when the model is too large for
one protobuf (2 GiB; an fp32 WideResNet50 export, D = 550 over 4096 patches, is 2.48 GB).

Files (``-o bottle.onnx``):

- ``bottle.onnx``: the graph, the metadata and every tensor under 1 KiB (shape constants, indices).
- ``bottle.onnx.<first 16 hex of the SHA-256 of the data file>.data``, next to it: a 4096-byte header
  (``MAGIC`` then zeros) followed by the raw little-endian bytes of every larger initializer, each at an
  offset that is a multiple of 4096. The .onnx names it in each tensor's ``external_data``
  (``location`` = that relative file name, ``offset``, ``length``), so ONNX Runtime, ``onnx.load`` and
  TensorRT's ``parse_from_file`` find it next to the .onnx, whatever the working directory.

The switch is one rename, as for bundles (``edgead.bundle``): the data file is written to a temp file,
hashed while written, fsynced and renamed to its content-addressed name (a new name: the old .onnx still
names the old data file, which stays); the new .onnx is written atomically (``edgead.atomic``) and
checked by ``onnx.checker`` through its temp path; its rename is the switch. Then data files of this
model that no .onnx in the folder names any more, and temp files of killed exports, are removed. The
folder is ``flock``-ed for the duration (readers, ``OrtEngine``, take a shared lock while loading).
``atomic.fault_point`` marks each step for the crash tests.

A file that already has the content-addressed name is reused when it is byte-identical (a re-export of the
same weights) and otherwise refused (ExportError; never replaced). Clean-up removes only files that have
this model's name pattern *and* start with ``MAGIC``, and never one that another .onnx file in the folder
names (a copy such as ``cp bottle.onnx bottle_v1.onnx`` keeps its data).
"""
import contextlib
import hashlib
import mmap
import os
import re

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper

from edgead import atomic
from edgead.errors import ExportError
from edgead.runtime.engine_files import sha256_file

MODES = ("auto", "always", "never")
#: estimated serialized size above which ``auto`` writes external data: safely below protobuf's hard 2 GiB
#: limit (the estimate is not exact, see ``estimate_model_bytes``). A module global so tests can lower it.
THRESHOLD_BYTES = int(1.8 * (1 << 30))
#: tensors with fewer data bytes stay inside the .onnx
INLINE_LIMIT = 1024
#: every tensor starts at a multiple of this in the data file (page size: ORT and TensorRT can mmap it)
ALIGN = 4096
#: first bytes of every data file edgead writes (padded with zeros to ALIGN): how clean-up tells ours
MAGIC = b"edgead ONNX external data v1\n"
_CHUNK = 64 << 20
_EXACT_SIZE_BELOW = 1 << 20  # tensors smaller than this are measured with ByteSize(), larger ones from dims


def check_mode(mode):
    """``auto`` / ``always`` / ``never``, else ExportError."""
    if mode not in MODES:
        raise ExportError("external data must be one of {}, not {!r}".format(", ".join(MODES), mode))
    return mode


def data_file_name(model_path, digest):
    """``bottle.onnx`` + hex SHA-256 -> ``bottle.onnx.<first 16 hex>.data`` (a name, no folder)."""
    return "{}.{}.data".format(os.path.basename(os.fspath(model_path)), digest[:16])


def data_file_pattern(model_path):
    """Regex of the data file names of ``model_path`` (any digest)."""
    return re.compile(re.escape(os.path.basename(os.fspath(model_path))) + r"\.[0-9a-f]{16}\.data\Z")


def tensor_nbytes(tensor):
    """Bytes of a tensor's data, from its dims and type (no copy of the data is made)."""
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        itemsize = 8
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def estimate_model_bytes(model):
    """Serialized size of ``model`` in bytes, estimated without serializing it (upb's ``ByteSize`` would build
    the whole string, and fails above 2 GiB): initializers of 1 MiB and more count their data bytes (dims x
    item size) plus 64 bytes per dim and name; everything else is measured exactly, plus 8 bytes per entry of
    framing. Tensors already stored externally count only their proto."""
    graph = model.graph
    total = 4096
    for tensor in graph.initializer:
        nbytes = tensor_nbytes(tensor)
        if nbytes < _EXACT_SIZE_BELOW or external_data_helper.uses_external_data(tensor):
            total += tensor.ByteSize() + 8
        else:
            total += nbytes + len(tensor.name.encode("utf-8")) + 64 * (len(tensor.dims) + 1)
    for field in (graph.node, graph.input, graph.output, graph.value_info, graph.sparse_initializer,
                  model.metadata_props, model.opset_import, model.functions):
        total += sum(item.ByteSize() + 8 for item in field)
    return total + len(model.doc_string.encode("utf-8")) + len(graph.doc_string.encode("utf-8"))


def wants_external(mode, estimated_bytes, path="model", threshold=None):
    """True when the model goes to an external data file.

    ``always``: yes; ``auto``: when ``estimated_bytes`` exceeds ``threshold`` (default ``THRESHOLD_BYTES``);
    ``never``: no, and an ExportError (one line naming ``path`` and the size) when it exceeds it.
    """
    check_mode(mode)
    limit = THRESHOLD_BYTES if threshold is None else threshold
    if mode == "always":
        return True
    if estimated_bytes <= limit:
        return False
    if mode == "never":
        raise ExportError("{}: the model is {:.2f} GB, over the {:.2f} GB an .onnx file without external data can "
                          "hold safely (protobuf's limit is 2 GiB); export with --external-data auto".format(
                              path, estimated_bytes / 1e9, limit / 1e9))
    return True


def external_locations(model):
    """Sorted distinct ``location`` values of the main graph's external initializers (data file names)."""
    found = set()
    for tensor in model.graph.initializer:
        if external_data_helper.uses_external_data(tensor):
            found.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(found)


def is_data_file(path):
    """True when ``path`` is a regular file (not a link) that starts with ``MAGIC``: a data file edgead wrote."""
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def check_onnx(model_or_path):
    """``onnx.checker`` (full check) on a ModelProto, its serialized bytes, or a file path (which also checks
    the external data files it names and works above 2 GiB). ExportError with the first line on failure."""
    try:
        onnx.checker.check_model(model_or_path, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError("generated ONNX graph fails onnx.checker: {}".format(
            (str(exc).strip().splitlines() or [type(exc).__name__])[0]))


def _temp_target(out_path):
    """The path whose ``atomic`` temp files hold a data file being written: ``.bottle.onnx.<random>.tmp.data``."""
    return os.fspath(out_path) + ".data"


def _goes_external(tensor):
    return (tensor.HasField("raw_data") and not external_data_helper.uses_external_data(tensor)
            and tensor.data_type != TensorProto.STRING and tensor_nbytes(tensor) >= INLINE_LIMIT)


def write_model(model, out_path, mode="auto", check=True):
    """Write ``model`` to ``out_path`` (see module doc). Returns the data file name, or None when inline.

    mode: ``auto`` | ``always`` | ``never`` (``wants_external``); ``always`` on a model without a tensor of
    1 KiB or more writes no data file. check: run ``onnx.checker`` (on the bytes when inline, through the
    temp file when external) before the switch. With external data the big initializers of ``model`` are
    changed in place to point at the data file (``raw_data`` cleared); load them back with
    ``onnx.load_external_data_for_model(model, folder)``. A failure leaves no new file behind.
    """
    out_path = os.fspath(out_path)
    external = wants_external(mode, estimate_model_bytes(model), out_path)
    if external and not any(_goes_external(t) for t in model.graph.initializer):
        external = False
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    with atomic.locked(folder):  # one export of this folder at a time; readers hold it shared while loading
        atomic.remove_stale_temps(_temp_target(out_path))
        if external:
            data_name, created = _write_data_file(model, out_path)
            try:
                rest = estimate_model_bytes(model)
                if rest > THRESHOLD_BYTES:
                    raise ExportError("{}: the graph without its large tensors is still {:.2f} GB; cannot write "
                                      "it".format(out_path, rest / 1e9))
                blob = model.SerializeToString()
                with atomic.atomic_path(out_path) as tmp:
                    with open(tmp, "wb") as fh:
                        fh.write(blob)
                        fh.flush()
                        os.fsync(fh.fileno())
                    if check:
                        check_onnx(tmp)  # through the file: it names the data file, renamed into place already
            except BaseException:
                if created:  # nothing names it: a failed export leaves no new file
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(folder, data_name))
                raise
        else:
            data_name = None
            blob = model.SerializeToString()
            if check:
                check_onnx(blob)
            atomic.write_bytes(out_path, blob)
        atomic.fault_point("onnx_export.switched")
        remove_stale_data(out_path, keep=data_name)
    return data_name


def _write_data_file(model, out_path):
    """Stream the big initializers to a temp file (hashing as it goes), rename it to its content-addressed
    name, then point the tensors at it. Returns (name, created: False when an identical file was there)."""
    folder = os.path.dirname(os.path.abspath(out_path))
    tensors = [t for t in model.graph.initializer if _goes_external(t)]
    digest = hashlib.sha256()
    placements = []
    with atomic.temp_path(_temp_target(out_path)) as tmp:
        with open(tmp, "wb") as fh:
            header = MAGIC.ljust(ALIGN, b"\0")
            fh.write(header)
            digest.update(header)
            position = len(header)
            for tensor in tensors:
                pad = -position % ALIGN
                if pad:
                    fh.write(b"\0" * pad)
                    digest.update(b"\0" * pad)
                    position += pad
                raw = tensor.raw_data  # one copy of this tensor at a time, never of the whole model
                view = memoryview(raw)
                for start in range(0, len(view), _CHUNK):
                    chunk = view[start:start + _CHUNK]
                    fh.write(chunk)
                    digest.update(chunk)
                placements.append((tensor, position, len(view)))
                position += len(view)
                del view, raw
            fh.flush()
            os.fsync(fh.fileno())
        atomic.set_default_mode(tmp, like=out_path)
        hexdigest = digest.hexdigest()
        name = data_file_name(out_path, hexdigest)
        final = os.path.join(folder, name)
        atomic.fault_point("onnx_export.data-written")
        created = not os.path.lexists(final)
        if created:
            os.replace(tmp, final)  # a new name: the .onnx on disk names another file and still loads
            atomic.fsync_path(folder)
        elif os.path.islink(final) or not os.path.isfile(final) or sha256_file(final) != hexdigest:
            raise ExportError("{}: exists and is not the data this export writes under that name; edgead will not "
                              "replace it (move it away and export again)".format(final))
        atomic.fault_point("onnx_export.data-renamed")
    for tensor, offset, length in placements:
        external_data_helper.set_external_data(tensor, name, offset, length)
        tensor.ClearField("raw_data")
    return name, created


def remove_stale_data(out_path, keep=None):
    """Remove the data files of ``out_path`` other than ``keep`` (those of earlier versions, or of a killed
    export) and their temp files. Only files with this model's name pattern that start with ``MAGIC`` are
    candidates, and one that another ``.onnx`` file in the folder names is kept. Returns the removed paths."""
    out_path = os.fspath(out_path)
    folder = os.path.dirname(os.path.abspath(out_path))
    removed = atomic.remove_stale_temps(_temp_target(out_path))
    pattern = data_file_pattern(out_path)
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    candidates = [n for n in names if pattern.match(n) and n != keep and is_data_file(os.path.join(folder, n))]
    if not candidates:
        return removed
    named = _named_by_other_models(folder, out_path, names, candidates)
    for name in candidates:
        if name not in named:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
    return removed


def _named_by_other_models(folder, out_path, names, candidates):
    """The ``candidates`` whose name occurs in another ``.onnx`` file of ``folder`` (a copy of the model)."""
    own = os.path.realpath(os.path.abspath(out_path))
    needles = {name: name.encode("utf-8") for name in candidates}
    named = set()
    for entry in names:
        path = os.path.join(folder, entry)
        if not entry.lower().endswith(".onnx") or os.path.realpath(path) == own or not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    continue
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    named.update(n for n, needle in needles.items() if n not in named and data.find(needle) != -1)
        except (OSError, ValueError):
            named.update(candidates)  # cannot tell: keep them all
    return named
