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

Streamed initializers (``write_model(..., sources=...)``, ``edgead.exporters.streaming``): placeholder tensors
whose bytes come chunk by chunk from a source, never whole in memory: into the data file as above, or, inline,
into the .onnx by protobuf framing (``_write_framed``), checked through a temp file holding the graph with those
tensors referenced as external data inside the written .onnx (``_check_framed``).

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
from edgead.exporters import streaming
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


def estimate_model_bytes(model, sources=None):
    """Serialized size of ``model`` in bytes, estimated without serializing it (upb's ``ByteSize`` would build
    the whole string, and fails above 2 GiB): initializers of 1 MiB and more count their data bytes (dims x
    item size) plus 64 bytes per dim and name; everything else is measured exactly, plus 8 bytes per entry of
    framing. Tensors already stored externally count only their proto. sources: ``{name: TensorSource}`` of
    placeholder initializers (``streaming``), counted with the bytes their source will give them."""
    graph = model.graph
    sources = sources or {}
    total = 4096
    for tensor in graph.initializer:
        nbytes = tensor_nbytes(tensor)
        if tensor.name in sources:
            total += tensor.ByteSize() + sources[tensor.name].nbytes + 16
        elif nbytes < _EXACT_SIZE_BELOW or external_data_helper.uses_external_data(tensor):
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


def _goes_external(tensor, sources=None):
    if sources and tensor.name in sources:
        return sources[tensor.name].nbytes >= INLINE_LIMIT
    return (tensor.HasField("raw_data") and not external_data_helper.uses_external_data(tensor)
            and tensor.data_type != TensorProto.STRING and tensor_nbytes(tensor) >= INLINE_LIMIT)


def _point_at(tensor, location, offset, length):
    """``external_data_helper.set_external_data`` for a tensor that may hold no ``raw_data`` (a placeholder)."""
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", int(offset)), ("length", int(length))):
        entry = tensor.external_data.add()
        entry.key = key
        entry.value = str(value)


def write_model(model, out_path, mode="auto", check=True, sources=None):
    """Write ``model`` to ``out_path`` (see module doc). Returns the data file name, or None when inline.

    mode: ``auto`` | ``always`` | ``never`` (``wants_external``); ``always`` on a model without a tensor of
    1 KiB or more writes no data file. check: run ``onnx.checker`` (on the bytes when inline, through the
    temp file when external) before the switch. With external data the big initializers of ``model`` are
    changed in place to point at the data file (``raw_data`` cleared); load them back with
    ``onnx.load_external_data_for_model(model, folder)``. A failure leaves no new file behind.

    sources: ``{initializer name: streaming.TensorSource}`` for placeholder initializers of ``model`` (name,
    dims, type, no data: ``onnx_export.build_onnx_streamed``). Their bytes are streamed chunk by chunk, never
    held whole: into the data file, or, inline, into the .onnx by protobuf framing (``_write_framed``; the
    placeholders stay without data in ``model``), which is then checked as the graph with those tensors
    referenced where they lie in the written temp file (``onnx.checker`` reading the whole file would need
    twice its size in memory).
    """
    out_path = os.fspath(out_path)
    sources = streaming.check_sources(model, sources)
    external = wants_external(mode, estimate_model_bytes(model, sources), out_path)
    if external and not any(_goes_external(t, sources) for t in model.graph.initializer):
        external = False
    if external:  # placeholders under INLINE_LIMIT stay in the .onnx: give them their (few) bytes now
        small = {name: s for name, s in sources.items() if not s.nbytes >= INLINE_LIMIT}
        streaming.materialize(model, small)
        sources = {name: s for name, s in sources.items() if name not in small}
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    with atomic.locked(folder):  # one export of this folder at a time; readers hold it shared while loading
        atomic.remove_stale_temps(_temp_target(out_path))
        if external:
            data_name, created = _write_data_file(model, out_path, sources)
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
                    del blob
                    if check:
                        check_onnx(tmp)  # through the file: it names the data file, renamed into place already
            except BaseException:
                if created:  # nothing names it: a failed export leaves no new file
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(folder, data_name))
                raise
        elif sources:
            data_name = None
            with atomic.atomic_path(out_path) as tmp:
                placements = _write_framed(model, sources, tmp)
                if check:
                    _check_framed(model, tmp, placements, out_path)
        else:
            data_name = None
            blob = model.SerializeToString()
            if check:
                check_onnx(blob)
            atomic.write_bytes(out_path, blob)
        atomic.fault_point("onnx_export.switched")
        remove_stale_data(out_path, keep=data_name)
    return data_name


def _write_chunks(fh, digest, source):
    """Write ``source``'s chunks to ``fh`` (and ``digest``, when given); ValueError unless exactly ``nbytes``."""
    written = 0
    for chunk in source.chunks():
        fh.write(chunk)
        if digest is not None:
            digest.update(chunk)
        written += len(chunk)
        if written > source.nbytes:
            break
    if written != source.nbytes:
        raise ValueError("tensor source gave {} bytes, its dims and type say {}".format(written, source.nbytes))
    return written


def _write_framed(model, sources, path):
    """Write ``model`` to ``path`` with the placeholders' bytes streamed from ``sources``; returns
    ``[(name, offset, length)]`` of each streamed tensor's raw bytes in the file.

    Layout: the model serialized without its initializers from the first placeholder on (the *tail*), then one
    more ``graph`` field (ModelProto field 7) holding the tail in order as ``initializer`` entries (GraphProto
    field 5), each placeholder written as its own fields followed by ``raw_data`` (TensorProto field 9) with the
    bytes streamed in. Protobuf merges a message field that occurs twice (repeated fields concatenate), so
    parsing gives the very model ``streaming.materialize`` would have built, initializer order included.
    """
    graph = model.graph
    names = [t.name for t in graph.initializer]
    first = min(names.index(name) for name in sources)
    tail = [graph.initializer[i] for i in range(first, len(names))]
    saved = [t.SerializeToString() for t in tail]  # placeholders and small tensors: cheap
    entries = []  # (name, bytes before the raw data, source or None)
    for tensor, blob in zip(tail, saved):
        source = sources.get(tensor.name)
        entries.append((tensor.name, streaming.framed_tensor_head(tensor, source.nbytes) if source else blob, source))
    del tail
    sizes = [len(head) + (source.nbytes if source else 0) for _, head, source in entries]
    graph_bytes = sum(len(streaming.length_delimited(streaming.GRAPH_INITIALIZER_FIELD, size)) + size
                      for size in sizes)
    del graph.initializer[first:]
    try:
        rest = model.SerializeToString()
    finally:
        for blob in saved:  # the model is left as it came
            graph.initializer.add().ParseFromString(blob)
    placements = []
    with open(path, "wb") as fh:
        fh.write(rest)
        position = len(rest)
        del rest
        prefix = streaming.length_delimited(streaming.MODEL_GRAPH_FIELD, graph_bytes)
        fh.write(prefix)
        position += len(prefix)
        for (name, head, source), size in zip(entries, sizes):
            prefix = streaming.length_delimited(streaming.GRAPH_INITIALIZER_FIELD, size) + head
            fh.write(prefix)
            position += len(prefix)
            if source is not None:
                placements.append((name, position, source.nbytes))
                position += _write_chunks(fh, None, source)
        fh.flush()
        os.fsync(fh.fileno())
        if fh.tell() != position:
            raise ExportError("{}: wrote {} bytes, expected {}".format(path, fh.tell(), position))
    return placements


def _check_framed(model, path, placements, out_path):
    """``onnx.checker`` (full check) for an inline model written to ``path`` by ``_write_framed``, without
    reading its big tensors: the graph is checked as a small model whose placeholders name their bytes inside
    ``path`` as external data (location, offset, length), written to a temp file of ``out_path`` next to it and
    checked through that."""
    by_name = {t.name: t for t in model.graph.initializer}
    try:
        for name, offset, length in placements:
            _point_at(by_name[name], os.path.basename(path), offset, length)
        with atomic.temp_path(out_path) as skeleton:
            with open(skeleton, "wb") as fh:
                fh.write(model.SerializeToString())
            check_onnx(skeleton)
    finally:
        for name, _, _ in placements:
            tensor = by_name[name]
            del tensor.external_data[:]
            tensor.ClearField("data_location")


def _write_data_file(model, out_path, sources=None):
    """Stream the big initializers to a temp file (hashing as it goes), rename it to its content-addressed
    name, then point the tensors at it. Returns (name, created: False when an identical file was there).
    Placeholders named in ``sources`` get their bytes from their source, chunk by chunk."""
    sources = sources or {}
    folder = os.path.dirname(os.path.abspath(out_path))
    tensors = [t for t in model.graph.initializer if _goes_external(t, sources)]
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
                if tensor.name in sources:
                    length = _write_chunks(fh, digest, sources[tensor.name])
                else:
                    raw = tensor.raw_data  # one copy of this tensor at a time, never of the whole model
                    view = memoryview(raw)
                    for start in range(0, len(view), _CHUNK):
                        chunk = view[start:start + _CHUNK]
                        fh.write(chunk)
                        digest.update(chunk)
                    length = len(view)
                    del view, raw
                placements.append((tensor, position, length))
                position += length
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
        _point_at(tensor, name, offset, length)
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
