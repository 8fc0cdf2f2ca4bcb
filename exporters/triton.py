"""Triton Inference Server model repository entries: ``edgead export --triton REPO`` (ONNX, onnxruntime backend)
and ``edgead build --triton REPO`` (TensorRT plan, built on the serving GPU).

One entry (``REPO/<name>/``, written by ``RepositoryEntry``)::

    config.pbtxt            Triton's ModelConfig (text protobuf), below
    <version>/model.onnx    (+ model.onnx.<sha16>.data for a model over 1.8 GiB) | <version>/model.plan (+ .json sidecar)
    libedgead_ort.so        plugin flavour on onnxruntime: our custom-op library, named by model_operations
    libedgead_plugins.so    plugin flavour as a TensorRT plan: load it into tritonserver (README.md says how)
    edgead.json             the model's edgead metadata (thresholds, provenance, input size) + a "triton" record
    README.md               what the entry is, how to serve it, where the thresholds are

config.pbtxt: ``platform`` / ``backend`` (``onnxruntime_onnx`` / ``onnxruntime`` or ``tensorrt_plan`` /
``tensorrt``), ``max_batch_size`` > 0 (the graph's batch dimension must be dynamic: Triton forms the batches),
per-item ``dims`` read from the model file's graph (``graph_io``, a protobuf scan that needs neither onnx nor
the file's size in memory): ``image`` ``[H, W, 3]`` TYPE_UINT8 (TYPE_FP32 for ``--input-dtype float32``),
``anomaly_map`` ``[1, H, W]`` TYPE_FP32 and ``score``, which is ``[N]`` in the graph, i.e. nothing per item: Triton
needs a non-empty ``dims``, so ``dims: [ 1 ]`` with ``reshape: { shape: [ ] }`` (Triton's model_configuration.md,
"Reshape"); clients receive ``score`` as ``[N, 1]``. ``dynamic_batching { max_queue_delay_microseconds }``,
``instance_group``, ``model_warmup`` (zeros at batch 1 and at ``max_batch_size``), ``model_operations``
(onnxruntime plugin flavour) and ``parameters`` ``edgead.*`` (string values: model identity and thresholds, so a
client reads them with ``get_model_config``). Triton returns raw scores; the client compares ``score`` with
``edgead.image_threshold``.

Checks: after writing, config.pbtxt is parsed with Triton's own ``ModelConfig`` protobuf from ``tritonclient``
(``edgead[triton]``) when installed, and its names, data types, dims, reshape, warm-up and op libraries are
compared with the graph; without tritonclient the same comparison runs on what was rendered and the summary says
``validated: None``.

Writing (DESIGN.md: every output switches as a whole; nothing replaces what edgead did not write without
``--force``): the entry is built in a hidden staging folder ``.<REPO name>.<name>.<random>.tmp`` next to REPO
(not inside it: tritonserver treats every sub-folder of REPO as a model, hidden or not, and fails to start on
one it cannot load), on the same file system; inside REPO only when REPO is a mount point or its parent is not
writable (then ``warnings`` says so). Every file and folder is fsynced, then under an ``flock`` on REPO the
staging folder is renamed into place (new entry) or swapped with the old one in one ``renameat2(RENAME_EXCHANGE)``
(Linux >= 3.15; ext4, xfs, btrfs, tmpfs), after which the old entry is removed. Where the file system cannot
exchange (NFS, CIFS) it is two renames, old aside to ``....old`` then new into place; a crash between them
leaves no entry and the next write puts the ``.old`` one back first. Leftovers of killed writers (unlocked
staging folders) are removed by the next write of the same entry. An entry is ours when its edgead.json has
``triton.written_by`` = ``edgead ...``. Fault points: ``triton.staged``, ``triton.moved-aside`` (fallback),
``triton.swapped``.

Torch-free; ``onnx`` is not needed (the graph is scanned), ``tritonclient`` is optional.
"""
import contextlib
import ctypes
import errno
import hashlib
import importlib
import json
import os
import posixpath
import re
import shutil
import tempfile

from edgead import __version__, atomic
from edgead.errors import ConfigError, ExportError

try:
    import fcntl
except ImportError:  # pragma: no cover - not Linux/macOS
    fcntl = None

CONFIG_NAME = "config.pbtxt"
MARKER_NAME = "edgead.json"
README_NAME = "README.md"
DEFAULT_MAX_BATCH = 8
DEFAULT_QUEUE_DELAY_US = 2000
WRITTEN_BY = "edgead " + __version__
#: kind -> (platform, backend, model file name)
KINDS = {"onnx": ("onnxruntime_onnx", "onnxruntime", "model.onnx"),
         "plan": ("tensorrt_plan", "tensorrt", "model.plan")}
INSTANCE_KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
#: ONNX TensorProto element type -> Triton data type
ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16",
                  6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64",
                  12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16"}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
_MAX_MARKER_BYTES = 16 << 20
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _read_umask():
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_DIR_MODE = 0o777 & ~_read_umask()


class TritonOptions(object):
    """What ``--triton*`` asks for. repo: the repository folder; name: the model (folder) name, None = derived
    from the source path; version: the version folder; max_batch: ``max_batch_size``; queue_delay_us: dynamic
    batching's ``max_queue_delay_microseconds``; instance: ``gpu`` | ``cpu``; instance_count: instances per
    device; server_repo: REPO's path as tritonserver sees it (e.g. ``/models`` in its container; default REPO's
    absolute path here), used for ``op_library_filename`` and in README.md; force: replace a folder edgead did
    not write."""

    def __init__(self, repo, name=None, version=1, max_batch=DEFAULT_MAX_BATCH, queue_delay_us=DEFAULT_QUEUE_DELAY_US,
                 instance="gpu", instance_count=1, server_repo=None, force=False):
        self.repo, self.name, self.version, self.max_batch = repo, name, version, max_batch
        self.queue_delay_us, self.instance, self.instance_count = queue_delay_us, instance, instance_count
        self.server_repo, self.force = server_repo, force


def default_name(path):
    """A Triton model name from a bundle / model path: ``bottle.edgead`` -> ``bottle``, ``m v2.onnx`` -> ``m_v2``."""
    base = os.path.basename(os.path.normpath(os.path.abspath(os.fspath(path))))
    for suffix in (".edgead", ".onnx", ".plan", ".engine"):
        if base.lower().endswith(suffix) and len(base) > len(suffix):
            base = base[:-len(suffix)]
            break
    name = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9_.-]", "_", base)).lstrip(".-")[:200]
    return name or "edgead_model"


def check_name(name):
    """A folder name tritonserver accepts as a model name (letters, digits, ``_ . -``; no ``..``)."""
    if not _NAME.match(name or "") or ".." in name:
        raise ConfigError("--triton-name {!r}: a Triton model name is 1-200 letters, digits, '_', '.' or '-', not "
                          "starting with '.' or '-' and without '..'".format(name))
    return name


def check_options(opts):
    """ConfigError (one line) for options that cannot make an entry."""
    if not opts.repo:
        raise ConfigError("--triton needs a repository folder")
    for label, value, low in (("--triton-version", opts.version, 1), ("--triton-max-batch", opts.max_batch, 1),
                              ("--triton-queue-delay-us", opts.queue_delay_us, 0),
                              ("--triton-instance-count", opts.instance_count, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError("{} must be an integer >= {}, got {!r}".format(label, low, value))
    if opts.instance not in INSTANCE_KINDS:
        raise ConfigError("--triton-instance must be gpu or cpu, not {!r}".format(opts.instance))
    if opts.server_repo is not None and (not posixpath.isabs(opts.server_repo) or
                                         any(ord(c) < 0x20 for c in opts.server_repo)):
        raise ConfigError("--triton-server-repo {!r}: the repository's absolute path as tritonserver sees it, e.g. "
                          "/models".format(opts.server_repo))


# ---- the graph's inputs and outputs, scanned from the file --------------------------------------------------

def _buf_varint(buf, pos):
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _buf_fields(buf):
    """(field, wire type, int | bytes) of one serialized protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _buf_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _buf_varint(buf, pos)
        elif wire == 2:
            length, pos = _buf_varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated field")
            value, pos = bytes(buf[pos:pos + length]), pos + length
        elif wire in (1, 5):
            pos, value = pos + (8 if wire == 1 else 4), None
        else:
            raise ValueError("unsupported wire type {}".format(wire))
        yield field, wire, value


def _file_varint(fh):
    result = shift = 0
    while True:
        byte = fh.read(1)
        if not byte or shift > 63:
            raise ValueError("truncated varint")
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7


def _file_fields(fh, end):
    """(field, wire, int | (offset, length)) of the message in ``fh`` up to ``end``; length-delimited fields are
    skipped by seeking (an initializer's bytes are never read)."""
    while fh.tell() < end:
        key = _file_varint(fh)
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, _file_varint(fh)
        elif wire == 2:
            length = _file_varint(fh)
            start = fh.tell()
            if start + length > end:
                raise ValueError("truncated field")
            yield field, wire, (start, length)
            fh.seek(start + length)
        elif wire in (1, 5):
            fh.seek(8 if wire == 1 else 4, os.SEEK_CUR)
        else:
            raise ValueError("unsupported wire type {}".format(wire))


def _value_info(buf):
    """ValueInfoProto -> {"name", "elem_type", "dims"}; dims: list of int | None (symbolic/unknown), or None
    (no shape)."""
    out = {"name": None, "elem_type": None, "dims": None}
    for field, wire, value in _buf_fields(buf):
        if field == 1 and wire == 2:
            out["name"] = value.decode("utf-8")
        elif field == 2 and wire == 2:  # TypeProto
            for f_type, w_type, tensor in _buf_fields(value):
                if f_type != 1 or w_type != 2:  # tensor_type
                    continue
                for f_tensor, w_tensor, item in _buf_fields(tensor):
                    if f_tensor == 1 and w_tensor == 0:
                        out["elem_type"] = item
                    elif f_tensor == 2 and w_tensor == 2:  # TensorShapeProto
                        dims = []
                        for f_shape, w_shape, dim in _buf_fields(item):
                            if f_shape == 1 and w_shape == 2:
                                size = None
                                for f_dim, w_dim, dim_value in _buf_fields(dim):
                                    if f_dim == 1 and w_dim == 0 and dim_value < (1 << 63):
                                        size = int(dim_value)
                                dims.append(size)
                        out["dims"] = dims
    return out


def graph_io(path):
    """``{"inputs": [...], "outputs": [...]}`` of the ONNX file ``path`` (each ``{"name", "elem_type", "dims"}``,
    dims ``None`` where symbolic), read by scanning the protobuf: the initializers are skipped by seeking, and a
    model split over several ``graph`` fields (edgead's streamed inline export) is merged as parsers merge it."""
    path = os.fspath(path)
    found = {"inputs": [], "outputs": []}
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            for field, wire, value in _file_fields(fh, size):
                if field != 7 or wire != 2:  # ModelProto.graph
                    continue
                start, length = value
                fh.seek(start)
                for g_field, g_wire, g_value in _file_fields(fh, start + length):
                    if g_field in (11, 12) and g_wire == 2:  # GraphProto.input / output
                        here = fh.tell()
                        fh.seek(g_value[0])
                        found["inputs" if g_field == 11 else "outputs"].append(_value_info(fh.read(g_value[1])))
                        fh.seek(here)
    except OSError as exc:
        raise ExportError("{}: cannot read the model ({})".format(path, exc.strerror or exc))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError("{}: not a readable ONNX file ({})".format(path, exc))
    if not found["inputs"] or not found["outputs"]:
        raise ExportError("{}: the ONNX graph declares no inputs or no outputs".format(path))
    return found


def require_dynamic_batch(io, path):
    """ExportError unless every input and output of the graph has a symbolic first (batch) dimension."""
    for tensor in io["inputs"] + io["outputs"]:
        dims = tensor["dims"]
        if not dims:
            raise ExportError("{}: graph tensor '{}' has no shape; Triton needs [batch, ...]".format(path, tensor["name"]))
        if dims[0] is not None:
            raise ExportError("{}: graph tensor '{}' has a fixed batch of {}; a Triton entry needs a dynamic batch "
                              "dimension (Triton forms the batches): export with --batch dynamic".format(
                                  path, tensor["name"], dims[0]))


# ---- config.pbtxt ---------------------------------------------------------------------------------------------

def _tensor(tensor, path):
    if tensor["elem_type"] not in ONNX_TO_TRITON:
        raise ExportError("{}: graph tensor '{}' has ONNX element type {}, which Triton has no type for".format(
            path, tensor["name"], tensor["elem_type"]))
    per_item = [-1 if d is None else d for d in tensor["dims"][1:]]
    spec = {"name": tensor["name"], "data_type": ONNX_TO_TRITON[tensor["elem_type"]], "dims": per_item,
            "reshape": None}
    if not per_item:  # [N] in the graph: Triton needs non-empty dims, so [1] reshaped to [] for the backend
        spec["dims"], spec["reshape"] = [1], []
    return spec


def model_parameters(info, model_sha256):
    """``parameters`` of config.pbtxt: ``edgead.*`` -> string (identity, input, thresholds; None left out)."""
    calibration = info.get("calibration") or {}
    export = info.get("export") or {}
    built = info.get("tensorrt") or {}
    params = {
        "edgead.method": info.get("method"),
        "edgead.backbone": (info.get("backbone") or {}).get("name"),
        "edgead.input_height": str(info["input"]["height"]),
        "edgead.input_width": str(info["input"]["width"]),
        "edgead.channel_order": info["input"].get("channel_order", "RGB"),
        "edgead.resize": info["input"].get("resize", "area"),
        "edgead.edgead_version": info.get("edgead_version"),
        "edgead.weights_sha256": info.get("weights_sha256"),
        "edgead.model_sha256": model_sha256,
        "edgead.mahalanobis": export.get("mahalanobis"),
        "edgead.precision": export.get("precision"),
        "edgead.tensorrt_version": built.get("version"),
        "edgead.calibration_source": calibration.get("source"),
    }
    for key in ("image_threshold", "pixel_threshold", "score_min", "score_max"):
        if calibration.get(key) is not None:
            params["edgead." + key] = repr(float(calibration[key]))  # repr: the float round-trips exactly
    return {key: str(value) for key, value in params.items() if value is not None}


def config_spec(name, kind, io, info, opts, max_batch, libraries, model_sha256, path):
    """Everything config.pbtxt says, as a dict (``render_config`` writes it, ``validate_config`` checks it)."""
    platform, backend, filename = KINDS[kind]
    require_dynamic_batch(io, path)
    inputs = [_tensor(t, path) for t in io["inputs"]]
    warmup = []
    for batch in sorted({1, max_batch}):
        warmup.append({"name": "zeros_batch_{}".format(batch), "batch_size": batch,
                       "inputs": {t["name"]: {"data_type": t["data_type"], "dims": t["dims"]} for t in inputs}})
    return {
        "name": name, "platform": platform, "backend": backend, "max_batch_size": int(max_batch),
        "default_model_filename": filename, "inputs": inputs, "outputs": [_tensor(t, path) for t in io["outputs"]],
        "max_queue_delay_microseconds": int(opts.queue_delay_us),
        "instance_group": {"count": int(opts.instance_count),
                           "kind": INSTANCE_KINDS["gpu" if kind == "plan" else opts.instance]},
        "warmup": warmup, "op_libraries": list(libraries), "parameters": model_parameters(info, model_sha256),
    }


def _quote(text):
    """A protobuf text-format string literal (UTF-8 kept, quotes / backslashes / control characters escaped)."""
    out = []
    for char in str(text):
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append("\\{:03o}".format(ord(char)))
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _dims(dims):
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]" if dims else "[ ]"


def render_config(spec, comments=()):
    """config.pbtxt text of ``spec`` with ``comments`` (lines) on top."""
    lines = ["# " + "".join(c if ord(c) >= 0x20 else "?" for c in line) if line else "#" for line in comments]
    lines += ["name: " + _quote(spec["name"]), "platform: " + _quote(spec["platform"]),
              "backend: " + _quote(spec["backend"]), "max_batch_size: {}".format(spec["max_batch_size"]),
              "default_model_filename: " + _quote(spec["default_model_filename"])]
    for section, key in (("input", "inputs"), ("output", "outputs")):
        blocks = []
        for tensor in spec[key]:
            block = ["  {", "    name: " + _quote(tensor["name"]), "    data_type: " + tensor["data_type"],
                     "    dims: " + _dims(tensor["dims"])]
            if tensor["reshape"] is not None:
                block.append("    reshape: { shape: " + _dims(tensor["reshape"]) + " }")
            blocks.append("\n".join(block + ["  }"]))
        lines.append(section + " [\n" + ",\n".join(blocks) + "\n]")
    lines.append("dynamic_batching {{\n  max_queue_delay_microseconds: {}\n}}".format(
        spec["max_queue_delay_microseconds"]))
    group = spec["instance_group"]
    lines.append("instance_group [\n  {{\n    count: {}\n    kind: {}\n  }}\n]".format(group["count"], group["kind"]))
    blocks = []
    for warm in spec["warmup"]:
        block = ["  {", "    name: " + _quote(warm["name"]), "    batch_size: {}".format(warm["batch_size"])]
        for name, tensor in warm["inputs"].items():
            block += ["    inputs {", "      key: " + _quote(name), "      value {",
                      "        data_type: " + tensor["data_type"], "        dims: " + _dims(tensor["dims"]),
                      "        zero_data: true", "      }", "    }"]
        blocks.append("\n".join(block + ["  }"]))
    lines.append("model_warmup [\n" + ",\n".join(blocks) + "\n]")
    if spec["op_libraries"]:
        lines.append("model_operations {\n  op_library_filename: [ " +
                     ", ".join(_quote(p) for p in spec["op_libraries"]) + " ]\n}")
    for key, value in sorted(spec["parameters"].items()):
        lines.append("parameters {{\n  key: {}\n  value {{ string_value: {} }}\n}}".format(_quote(key), _quote(value)))
    return "\n".join(lines) + "\n"


def _model_config_pb2():
    """Triton's ModelConfig protobuf module from tritonclient, or None when it is not installed."""
    try:
        return importlib.import_module("tritonclient.grpc.model_config_pb2")
    except ImportError:
        return None


def _tritonclient_version():
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - Python < 3.8
        return "?"
    try:
        return metadata.version("tritonclient")
    except Exception:  # noqa: BLE001 - any packaging oddity: the version is only reported
        return "?"


def _from_proto(config, pb2):
    """The parts of a parsed ``ModelConfig`` that ``_check_config`` compares, in ``config_spec``'s shape."""
    def tensors(items):
        return [{"name": t.name, "data_type": pb2.DataType.Name(t.data_type), "dims": list(t.dims),
                 "reshape": list(t.reshape.shape) if t.HasField("reshape") else None} for t in items]

    return {
        "name": config.name, "platform": config.platform, "backend": config.backend,
        "max_batch_size": config.max_batch_size, "default_model_filename": config.default_model_filename,
        "inputs": tensors(config.input), "outputs": tensors(config.output),
        "dynamic_batching": config.HasField("dynamic_batching"),
        "max_queue_delay_microseconds": config.dynamic_batching.max_queue_delay_microseconds,
        "instance_group": [{"count": g.count, "kind": pb2.ModelInstanceGroup.Kind.Name(g.kind)}
                           for g in config.instance_group],
        "warmup": [{"name": w.name, "batch_size": w.batch_size,
                    "inputs": {k: {"data_type": pb2.DataType.Name(v.data_type), "dims": list(v.dims),
                                   "zero_data": v.zero_data} for k, v in w.inputs.items()}}
                   for w in config.model_warmup],
        "op_libraries": list(config.model_operations.op_library_filename),
        "parameters": {k: v.string_value for k, v in config.parameters.items()},
    }


def _check_config(found, spec, io, where):
    """ExportError (one line) where the config (parsed, or as rendered) disagrees with the graph or the spec."""
    def fail(text):
        raise ExportError("{}: {}".format(where, text))

    for key in ("name", "platform", "backend", "default_model_filename"):
        if found[key] != spec[key]:
            fail("{} is {!r}, expected {!r}".format(key, found[key], spec[key]))
    if found["max_batch_size"] < 1:
        fail("max_batch_size must be >= 1 for dynamic batching, got {}".format(found["max_batch_size"]))
    if not found.get("dynamic_batching", True):
        fail("has no dynamic_batching")
    for section, key in (("input", "inputs"), ("output", "outputs")):
        graph = {t["name"]: t for t in io[key]}
        names = [t["name"] for t in found[key]]
        if sorted(names) != sorted(graph) or len(set(names)) != len(names):
            fail("{} names {} differ from the graph's {}".format(section, names, sorted(graph)))
        for tensor in found[key]:
            expected = _tensor(graph[tensor["name"]], where)
            for field in ("data_type", "dims", "reshape"):
                if tensor[field] != expected[field]:
                    fail("{} '{}' {} {} does not match the graph's {} (graph shape {})".format(
                        section, tensor["name"], field, tensor[field], expected[field], graph[tensor["name"]]["dims"]))
    inputs = {t["name"]: t for t in found["inputs"]}
    for warm in found["warmup"]:
        if not 1 <= warm["batch_size"] <= found["max_batch_size"]:
            fail("model_warmup '{}' batch_size {} is outside 1..max_batch_size".format(warm["name"], warm["batch_size"]))
        if sorted(warm["inputs"]) != sorted(inputs):
            fail("model_warmup '{}' feeds {}, the model takes {}".format(warm["name"], sorted(warm["inputs"]),
                                                                        sorted(inputs)))
        for name, tensor in warm["inputs"].items():
            if tensor["data_type"] != inputs[name]["data_type"] or tensor["dims"] != inputs[name]["dims"]:
                fail("model_warmup '{}' input '{}' is {} {}, the input is {} {}".format(
                    warm["name"], name, tensor["data_type"], tensor["dims"], inputs[name]["data_type"],
                    inputs[name]["dims"]))
    if found["op_libraries"] != spec["op_libraries"]:
        fail("model_operations {} differ from {}".format(found["op_libraries"], spec["op_libraries"]))
    if found["parameters"] != spec["parameters"]:
        fail("parameters differ from the model's metadata")


def validate_config(text, spec, io, where):
    """Parse ``text`` with Triton's ``ModelConfig`` (tritonclient) and compare it with the graph ``io`` and
    ``spec``. Returns the tritonclient version used, or None when tritonclient is not installed (then the
    rendered ``spec`` is compared with the graph instead). ExportError (one line) on any problem."""
    pb2 = _model_config_pb2()
    if pb2 is None:
        found = dict(spec, dynamic_batching=True)
        _check_config(found, spec, io, where)
        return None
    from google.protobuf import text_format

    config = pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ExportError("{}: does not parse as Triton's ModelConfig: {}".format(where, " ".join(str(exc).split())))
    found = _from_proto(config, pb2)
    if found["instance_group"] != [spec["instance_group"]]:
        raise ExportError("{}: instance_group {} differs from {}".format(where, found["instance_group"],
                                                                        spec["instance_group"]))
    _check_config(found, spec, io, where)
    return _tritonclient_version()


# ---- the entry on disk ----------------------------------------------------------------------------------------

def read_marker(path):
    """The edgead.json dict of the entry folder ``path``, or None when there is none that edgead wrote."""
    marker = os.path.join(os.fspath(path), MARKER_NAME)
    try:
        if os.path.islink(marker) or os.path.getsize(marker) > _MAX_MARKER_BYTES:
            return None
        with open(marker, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    triton = data.get("triton") if isinstance(data, dict) else None
    if not isinstance(triton, dict) or not str(triton.get("written_by", "")).startswith("edgead"):
        return None
    return data


def is_edgead_entry(path):
    """True when ``path`` is a folder (not a link) holding an edgead.json that ``RepositoryEntry`` wrote."""
    path = os.fspath(path)
    return os.path.isdir(path) and not os.path.islink(path) and read_marker(path) is not None


def check_target(target, force):
    """``new`` | ``ours`` | ``foreign`` (``force`` only); ConfigError for a path edgead did not write."""
    if not os.path.lexists(target):
        return "new"
    if is_edgead_entry(target):
        return "ours"
    if force:
        return "foreign"
    what = "a folder" if os.path.isdir(target) and not os.path.islink(target) else "a file or link"
    raise ConfigError("{}: {} that edgead did not write (no {} from edgead); --triton will not replace it (pass "
                      "--force to overwrite, or choose another --triton-name)".format(target, what, MARKER_NAME))


def ort_ops_library():
    """Path of ``libedgead_ort.so`` for a plugin-flavour entry on onnxruntime; ExportError (one line) without it."""
    from edgead.runtime import ort_ops

    found = ort_ops.find_ort_ops_library()
    if found is None or os.sep not in found or not os.path.isfile(found):
        raise ExportError("--triton with --mahalanobis plugin ships {} in the entry, but {}".format(
            ort_ops.LIBRARY_NAME, ort_ops.missing_library_hint()))
    return found


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_file(path, data):
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _copy_file(src, dst, mode=None):
    shutil.copyfile(src, dst)
    if mode is not None:
        os.chmod(dst, mode)
    atomic.fsync_path(dst)


def _fsync_tree(root):
    for folder, _subdirs, files in os.walk(root):
        for name in files:
            atomic.fsync_path(os.path.join(folder, name))
        atomic.fsync_path(folder)


def _remove_tree(path):
    if os.path.islink(path) or not os.path.isdir(path):
        os.remove(path)
    else:
        shutil.rmtree(path)


def _rename_exchange(a, b):
    """Swap the paths ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where this system
    or file system cannot (then the caller falls back to two renames)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _is_locked(path):
    """True when another process holds an flock on ``path`` (a live writer's staging folder)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)
    return False


class RepositoryEntry(object):
    """Writes ``REPO/<name>/`` as a whole (see module doc)::

        entry = RepositoryEntry(opts, "onnx", default="bottle")  # checks: ConfigError before any long work
        with entry:
            export_onnx(bundle, entry.model_path, ...)            # or entry.add_model_file(existing.onnx)
            summary = entry.commit(metadata, libraries=[...])     # config, edgead.json, README, check, switch

    Leaving the block without ``commit`` (an exception) removes the staging folder; the old entry is untouched.
    """

    def __init__(self, opts, kind, default=None):
        check_options(opts)
        if kind not in KINDS:
            raise ConfigError("unknown Triton entry kind {!r}".format(kind))
        self.opts, self.kind = opts, kind
        self.name = check_name(opts.name if opts.name is not None else (default or "edgead_model"))
        self.repo = os.path.abspath(os.fspath(opts.repo))
        self.target = os.path.join(self.repo, self.name)
        self.server_repo = opts.server_repo or self.repo
        self.warnings = []
        self.staging = None
        self._stack = None
        self._committed = False
        if os.path.lexists(self.repo) and not os.path.isdir(self.repo):
            raise ConfigError("{}: --triton must name a folder (the model repository); this is a file".format(self.repo))
        existing = self.repo if os.path.isdir(self.repo) else os.path.dirname(self.repo)
        if not os.path.isdir(existing):
            raise ConfigError("{}: --triton folder's parent {} does not exist".format(self.repo, existing))
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError("{}: --triton: cannot write in {} (permission denied)".format(self.repo, existing))
        check_target(self.target, opts.force)

    # -- paths
    @property
    def version_dir(self):
        return os.path.join(self.staging, str(self.opts.version))

    @property
    def model_path(self):
        """Where the model file goes while the entry is staged (``<staging>/<version>/model.onnx|plan``)."""
        return os.path.join(self.version_dir, KINDS[self.kind][2])

    def _prefix(self):
        return ".{}.{}.".format(os.path.basename(self.repo), self.name)

    def _staging_parent(self):
        """REPO's parent when it is writable and on REPO's file system, else REPO itself (with a warning)."""
        parent = os.path.dirname(self.repo)
        try:
            same = os.stat(parent).st_dev == os.stat(self.repo).st_dev
        except OSError:
            same = False
        if same and os.access(parent, os.W_OK | os.X_OK):
            return parent
        self.warnings.append("staging the entry inside {} ({}): a crash mid-write can leave {}*.tmp there, which "
                             "tritonserver would try to load; the next --triton write of this model removes it".format(
                                 self.repo, "its parent is another file system" if not same else
                                 "its parent is not writable", self._prefix()))
        return self.repo

    def _leftovers(self):
        """(path, suffix) of staging / set-aside folders of this entry left by killed writers (unlocked)."""
        pattern = re.compile(re.escape(self._prefix()) + r"[a-z0-9_]{8}\.(tmp|old)$")
        found = []
        for place in sorted({os.path.dirname(self.repo), self.repo}):
            try:
                names = os.listdir(place)
            except OSError:
                continue
            for name in names:
                match = pattern.match(name)
                path = os.path.join(place, name)
                if match and path != self.staging and not _is_locked(path):
                    found.append((path, match.group(1)))
        return found

    # -- staging
    def __enter__(self):
        os.makedirs(self.repo, exist_ok=True)
        stack = contextlib.ExitStack()
        try:
            self.staging = tempfile.mkdtemp(prefix=self._prefix(), suffix=".tmp", dir=self._staging_parent())
            stack.callback(self._discard)
            os.chmod(self.staging, _DIR_MODE)  # mkdtemp makes 0700: tritonserver may run as another user
            stack.enter_context(atomic.locked(self.staging))  # a live writer's staging is never cleaned up
            os.makedirs(self.version_dir, mode=_DIR_MODE)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def _discard(self):
        if not self._committed and self.staging and os.path.lexists(self.staging):
            with contextlib.suppress(OSError):
                _remove_tree(self.staging)

    def __exit__(self, *exc):
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        return False

    def add_model_file(self, src, data_files=(), extra=()):
        """Copy an already written model ``src`` into the entry as its model file; ``data_files``: external data
        files next to it (copied under their own names, which the .onnx names); ``extra``: ``(path, name)`` pairs
        copied into the version folder (an engine's sidecar)."""
        _copy_file(src, self.model_path)
        for path in data_files:
            _copy_file(path, os.path.join(self.version_dir, os.path.basename(path)))
        for path, name in extra:
            _copy_file(path, os.path.join(self.version_dir, name))

    def commit(self, info, libraries=(), graph_source=None, source=None):
        """Finish the entry and switch it into place. info: the model's edgead metadata (ONNX metadata, or an
        engine's sidecar entry); libraries: native libraries the model needs, copied into the entry (onnxruntime:
        named by model_operations; TensorRT plan: the plugin, README.md says how to load it); graph_source: the
        ONNX file whose graph the config is derived from (default the model file itself); source: what the entry
        was made from (for README.md). Returns the summary dict."""
        if self.staging is None or self._committed:
            raise RuntimeError("RepositoryEntry.commit outside its with-block")
        where = os.path.join(self.target, CONFIG_NAME)
        graph_source = graph_source or self.model_path
        io = graph_io(graph_source)
        model_sha256 = _sha256(self.model_path)
        copied = []
        for library in libraries:
            name = os.path.basename(library)
            _copy_file(library, os.path.join(self.staging, name), mode=_DIR_MODE)
            copied.append(name)
        op_libraries = [posixpath.join(self.server_repo, self.name, name) for name in copied] \
            if self.kind == "onnx" else []
        max_batch = self.opts.max_batch
        if self.kind == "plan":
            max_batch = int((info.get("tensorrt") or {}).get("max_batch") or max_batch)
        spec = config_spec(self.name, self.kind, io, info, self.opts, max_batch, op_libraries, model_sha256,
                           graph_source)
        text = render_config(spec, self._comments(spec, info, copied))
        validated = validate_config(text, spec, io, where)
        relative_model = posixpath.join(str(self.opts.version), KINDS[self.kind][2])
        record = {"written_by": WRITTEN_BY, "name": self.name, "version": self.opts.version,
                  "platform": spec["platform"], "backend": spec["backend"], "model_file": relative_model,
                  "model_sha256": model_sha256, "max_batch_size": spec["max_batch_size"],
                  "max_queue_delay_microseconds": spec["max_queue_delay_microseconds"],
                  "instance_group": spec["instance_group"], "libraries": copied, "op_libraries": op_libraries,
                  "server_repository": self.server_repo, "source": source, "config_validated_with":
                      "tritonclient {}".format(validated) if validated else None}
        marker = dict(info, triton=record)
        _write_file(os.path.join(self.staging, CONFIG_NAME), text.encode("utf-8"))
        _write_file(os.path.join(self.staging, MARKER_NAME),
                    (json.dumps(marker, indent=2, allow_nan=False) + "\n").encode("utf-8"))
        _write_file(os.path.join(self.staging, README_NAME), self._readme(spec, info, copied, source).encode("utf-8"))
        _fsync_tree(self.staging)
        atomic.fault_point("triton.staged")
        with atomic.locked(self.repo):
            self._recover_leftovers()
            state = check_target(self.target, self.opts.force)  # again: another writer may have been faster
            self._switch(state)
        return {"repository": self.repo, "name": self.name, "path": self.target, "version": self.opts.version,
                "model_path": os.path.join(self.target, str(self.opts.version), KINDS[self.kind][2]),
                "model_file": relative_model, "platform": spec["platform"], "max_batch_size": spec["max_batch_size"],
                "instance_group": spec["instance_group"], "libraries": copied, "op_libraries": op_libraries,
                "validated": validated, "replaced": state != "new", "warnings": list(self.warnings)}

    def _recover_leftovers(self):
        for path, suffix in self._leftovers():
            if suffix == "old" and not os.path.lexists(self.target) and is_edgead_entry(path):
                os.rename(path, self.target)  # a fallback switch killed between its two renames: put it back
                self.warnings.append("restored {} from {} (left by an interrupted write)".format(self.target, path))
            else:
                with contextlib.suppress(OSError):
                    _remove_tree(path)

    def _switch(self, state):
        parent = os.path.dirname(self.staging)
        if state == "foreign" and (os.path.islink(self.target) or not os.path.isdir(self.target)):
            os.remove(self.target)  # --force over a file or link
            state = "new"
        if state == "new":
            os.rename(self.staging, self.target)
            self._committed = True
            old = None
        elif _rename_exchange(self.staging, self.target):
            self._committed = True
            old = self.staging  # now holds the old entry
        else:
            old = self.staging[:-len(".tmp")] + ".old"
            os.rename(self.target, old)
            atomic.fault_point("triton.moved-aside")
            os.rename(self.staging, self.target)
            self._committed = True
        atomic.fsync_path(self.repo)
        if parent != self.repo:
            atomic.fsync_path(parent)
        atomic.fault_point("triton.swapped")
        if old is not None:
            _remove_tree(old)
        self.staging = None

    # -- texts
    def _comments(self, spec, info, copied):
        height, width = info["input"]["height"], info["input"]["width"]
        first = spec["inputs"][0]
        lines = ["Written by {} (edgead {} --triton); the next --triton write replaces this whole folder, edits "
                 "included.".format(WRITTEN_BY, "build" if self.kind == "plan" else "export"),
                 "Input '{}': {} RGB frames [{}, {}, 3] already resized to {}x{} (HxW); Triton adds the batch "
                 "dimension, up to max_batch_size.".format(first["name"], first["data_type"], height, width, height,
                                                           width),
                 "Outputs: anomaly_map FP32 [1, H, W] and score FP32 [1] (the graph's [N] score, reshaped): raw "
                 "anomaly scores.",
                 "Triton applies no threshold: a frame is anomalous when score > parameters edgead.image_threshold "
                 "(also in edgead.json, calibration)."]
        if self.kind == "plan" and copied:
            plugin = posixpath.join(self.server_repo, self.name, copied[0])
            lines += ["This TensorRT plan needs the edgead plugin ({}, copied next to this file). Load it into the "
                      "server:".format(copied[0]),
                      "  tritonserver --model-repository={} --backend-config=tensorrt,plugins=\"{}\"".format(
                          self.server_repo, plugin),
                      "  or LD_PRELOAD={} tritonserver --model-repository={}".format(plugin, self.server_repo)]
        if self.kind == "plan":
            built = info.get("tensorrt") or {}
            lines.append("Built with TensorRT {} on {}: serve it with the Triton release that ships this TensorRT, on "
                         "this GPU model.".format(built.get("version", "?"), built.get("gpu", "?")))
        if copied and self.kind == "onnx":
            lines.append("model_operations names {} by its path as the server sees it (--triton-server-repo {}).".format(
                copied[0], self.server_repo))
        return lines

    def _readme(self, spec, info, copied, source):
        height, width = info["input"]["height"], info["input"]["width"]
        export = info.get("export") or {}
        calibration = info.get("calibration") or {}
        group = spec["instance_group"]
        image = spec["inputs"][0]
        lines = [
            "# {}: edgead anomaly model for Triton Inference Server".format(self.name), "",
            "Written by {} (`edgead {} --triton`){}. Do not edit: the next `--triton` write of this model replaces "
            "the whole folder.".format(WRITTEN_BY, "build" if self.kind == "plan" else "export",
                                        " from `{}`".format(source) if source else ""), "",
            "- model: {} / {}, input {}x{} RGB, {} statistics, {} Mahalanobis".format(
                info.get("method"), (info.get("backbone") or {}).get("name"), height, width,
                export.get("precision", "?"), export.get("mahalanobis", "?")),
            "- Triton: `{}` ({}), max_batch_size {}, dynamic batching (max queue delay {} us), {} x {}".format(
                spec["platform"], spec["default_model_filename"], spec["max_batch_size"],
                spec["max_queue_delay_microseconds"], group["count"], group["kind"]),
            "- request: `{}` {} `[batch, {}, {}, 3]`, RGB frames resized to {}x{} by the client".format(
                image["name"], image["data_type"], height, width, height, width),
            "- response: `anomaly_map` TYPE_FP32 `[batch, 1, {}, {}]`, `score` TYPE_FP32 `[batch, 1]`: raw anomaly "
            "scores, no threshold applied".format(height, width),
            "- thresholds: image {} (score above it = anomalous frame), pixel {} (map above it = anomalous pixel), "
            "source {}; in `edgead.json` (`calibration`) and in config.pbtxt `parameters` "
            "(`edgead.image_threshold`, read with `client.get_model_config`)".format(
                calibration.get("image_threshold"), calibration.get("pixel_threshold"), calibration.get("source")),
            "", "Serve:", "", "```bash"]
        if self.kind == "plan" and copied:
            plugin = posixpath.join(self.server_repo, self.name, copied[0])
            lines += ["tritonserver --model-repository={} --backend-config=tensorrt,plugins=\"{}\"".format(
                self.server_repo, plugin),
                "# or: LD_PRELOAD={} tritonserver --model-repository={}".format(plugin, self.server_repo)]
        else:
            lines.append("tritonserver --model-repository={}".format(self.server_repo))
        lines += ["```", ""]
        if self.kind == "plan":
            built = info.get("tensorrt") or {}
            lines.append("The plan was built with TensorRT {} on {} (compute capability {}): it runs only under a "
                         "Triton release with that TensorRT version, on that GPU model. Rebuild it with `edgead build "
                         "--triton` on the server otherwise.".format(built.get("version"), built.get("gpu"),
                                                                     built.get("compute_capability")))
            if copied:
                lines.append("The plugin library must be built against the same TensorRT (cpp_bindings/, "
                             "docs/tensorrt.md).")
        elif copied:
            lines.append("`{}` runs the PadimMahalanobis node on the CPU (also in a KIND_GPU instance: ONNX Runtime "
                         "places that node on its CPU provider). model_operations names it as `{}`: the path as the "
                         "server sees it. It was built for this machine's architecture and needs ONNX Runtime >= 1.16 "
                         "in the Triton release.".format(copied[0], spec["op_libraries"][0]))
        return "\n".join(lines) + "\n"
