"""The ``edgead`` metadata dict of an exported model: read, validate, derive thresholds.

Sources of the dict (docs/CONTRACTS.md, "model.json and ONNX metadata_props"):

- ``model.onnx``: ``metadata_props["edgead"]`` (JSON). Read either from an open ONNX Runtime
  session (``session.get_modelmeta().custom_metadata_map``) or, without building a session, by
  scanning the top level of the ONNX protobuf (works for plugin-flavour graphs that the CPU
  provider cannot load, and needs neither ``onnx`` nor ``onnxruntime``).
- ``model.engine`` / ``.plan`` / ``.trt``: the JSON sidecar ``model.engine.json`` next to it.

Every problem raises ``edgead.errors.ModelFileError`` naming the file. Torch-free.
"""
import os

from edgead.errors import ModelFileError
from edgead.runtime import engine_files, schema

METADATA_KEY = "edgead"
SUPPORTED_FORMAT_VERSIONS = schema.SUPPORTED_FORMAT_VERSIONS
RESIZE_MODES = ("area", "bilinear", "nearest")
ENGINE_EXTENSIONS = (".engine", ".plan", ".trt")

#: ONNX ModelProto field number of ``metadata_props`` (repeated StringStringEntryProto).
_MODEL_PROTO_METADATA_FIELD = 14


def sidecar_path(engine_path):
    """``model.engine`` -> ``model.engine.json``."""
    return os.fspath(engine_path) + ".json"


def load_model_info(path):
    """Validated metadata dict of ``path`` (.onnx, .engine/.plan/.trt with sidecar, or a .json).

    Raises:
        ModelFileError: missing file, no ``edgead`` metadata, bad JSON or missing/invalid keys.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError("{}: model file not found".format(path))
    ext = os.path.splitext(path)[1].lower()
    if ext in ENGINE_EXTENSIONS:
        return load_engine_info(path)
    if ext == ".json":
        return _load_json_file(path)
    raw = read_onnx_metadata_raw(path)
    return parse_metadata(raw, path)


def load_engine_info(path, engine_sha256=None):
    """Validated metadata of a TensorRT engine: the sidecar entry whose ``engine_sha256`` matches the engine
    (``engine_files``: a rebuild killed half-way). engine_sha256: digest of the bytes the caller loads."""
    sidecar = sidecar_path(path)
    if not os.path.exists(sidecar):
        raise ModelFileError("{}: TensorRT engine has no metadata sidecar {} (copy it next to the engine, "
                             "or rebuild with `edgead build`)".format(path, sidecar))
    selected = engine_files.select_engine_info(path, _load_json_file(sidecar), engine_sha256)
    return validate_model_info(selected, sidecar)


def model_info_from_session(session, path):
    """Validated metadata dict from an ``onnxruntime.InferenceSession`` of ``path``."""
    meta = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        raise ModelFileError("{}: ONNX model has no '{}' metadata (export it with `edgead export`)".format(
            path, METADATA_KEY))
    return parse_metadata(meta[METADATA_KEY], path)


def _load_json_file(path):
    try:
        with open(path, "rb") as fh:
            text = fh.read()  # bytes: parse_metadata reports non-UTF-8 content as a ModelFileError
    except OSError as exc:
        raise ModelFileError("{}: cannot read ({})".format(path, exc))
    return parse_metadata(text, path)


def parse_metadata(text, path):
    """JSON text (or UTF-8 bytes) -> validated dict; ``path`` only names the file in errors.

    Raises ModelFileError (one line naming ``path``) for anything else: bad JSON, non-UTF-8 bytes, deep
    nesting, NaN/Infinity, or a dict that breaks the schema (see ``validate_model_info``).
    """
    info = schema.loads(text, path, ModelFileError,
                        invalid="{where}: '" + METADATA_KEY + "' metadata is not valid JSON ({detail})")
    validate_model_info(info, path)
    return info


def validate_model_info(info, path):
    """Validate against the ``metadata`` entry of ``runtime/schemas/model.schema.json`` plus the cross-field
    checks (``edgead.runtime.schema.validate``); fill ``input.resize`` default ``area`` and
    ``calibration`` default null. Returns ``info``; ModelFileError names ``path`` and the JSON path."""
    schema.validate(info, "metadata", path, ModelFileError)
    info["input"].setdefault("resize", "area")
    info.setdefault("calibration", None)
    return info


def input_hw(info):
    """(H, W) model input size in pixels."""
    return int(info["input"]["height"]), int(info["input"]["width"])


def thresholds(info):
    """Decision thresholds and heatmap range from ``info["calibration"]``.

    Returns dict (floats in anomaly-map units, or None when unknown):
        ``image_threshold``: score above it = anomalous frame (``calibration.image_threshold``);
        ``pixel_threshold``: map above it = anomalous pixel, used for boxes (``pixel_threshold``,
        else the image threshold);
        ``vmin`` / ``vmax``: heatmap colour range (``score_min`` / ``score_max``; None means
        per-frame min/max);
        ``source``: where they came from (``normal-oos``, ``validation``, ... or None).

    The in-sample ``train_p995`` that edgead 0.1 stored is never used as a threshold: training
    images score themselves too low, so it flags normal frames (see ``model_warnings``).
    """
    cal = info.get("calibration") or {}

    def num(key):
        value = cal.get(key)
        return None if value is None else float(value)

    image_threshold = num("image_threshold")
    pixel_threshold = num("pixel_threshold")
    if pixel_threshold is None:
        pixel_threshold = image_threshold
    return {"image_threshold": image_threshold, "pixel_threshold": pixel_threshold,
            "vmin": num("score_min"), "vmax": num("score_max"), "source": cal.get("source")}


def model_warnings(info):
    """One-line warnings about a model exported by an older edgead (list of str, empty when none)."""
    found = []
    cal = info.get("calibration") or {}
    if cal.get("image_threshold") is None and cal.get("train_p995") is not None:
        found.append("the model's only threshold is the in-sample train_p995 of an older edgead, which flags "
                     "normal frames; it is ignored (refit with `edgead fit` for out-of-sample thresholds)")
    backbone = info.get("backbone") or {}
    if backbone.get("name") == "efficientnet_lite0" and "arch" not in backbone:
        found.append("exported from a bundle fitted with edgead 0.1's efficientnet_lite0 network (symmetric "
                     "padding, not the TF network its weights need): maps are offset and less accurate; refit "
                     "and export again")
    return found


#: provenance ``method`` of out-of-sample thresholds -> how the normal scores were obtained, as a pair of templates
#: (without, with the number of scored images ``{n}``); ``{folds}``: the provenance's folds, else ``k``. A
#: ``normal-oos`` calibration with another method reads as K-fold.
_OUT_OF_SAMPLE = {
    "padim-leave-one-out": ("leave-one-out out-of-sample scores of the training normal images",
                            "leave-one-out out-of-sample scores of {n} normal images"),
    "padim-leave-fold-out": ("{folds}-fold out-of-sample scores of the training normal images",
                             "{folds}-fold out-of-sample scores of {n} normal images"),
    "patchcore-leave-fold-out": ("{folds}-fold out-of-sample scores of the training normal images, each fold against "
                                 "a memory bank built without it",
                                 "{folds}-fold out-of-sample scores of {n} normal images, each fold against a "
                                 "memory bank built without it"),
    "cflow-held-out-fold": ("scores of a held-out fold (1 of {folds}) of the training normal images, which the flows "
                            "were not trained on (their training stopped on it)",
                            "scores of {n} held-out normal images (1 of {folds} folds), which the flows were not "
                            "trained on (their training stopped on it)"),
}


def describe_thresholds(info):
    """One line saying where the thresholds of a model come from.

    info: the model's metadata / model.json dict (``calibration`` and ``calibration_provenance``).
    Missing provenance fields are left out of the sentence, never guessed.
    """
    calibration = info.get("calibration") or {}
    if calibration.get("image_threshold") is None:
        return ("no image threshold: frames are not classified (thresholds come from `edgead fit` on varied good "
                "images, `fit --val` or `eval --calibrate`)")
    prov = info.get("calibration_provenance") or {}
    image = calibration["image_threshold"]
    pixel = calibration.get("pixel_threshold")
    head = "image threshold {:.4g}, pixel threshold {:.4g}".format(image, image if pixel is None else pixel)
    method = prov.get("method")
    if calibration.get("source") == "normal-oos" or method in _OUT_OF_SAMPLE:
        n = prov["n_normal"] if prov.get("n_normal") is not None else None
        folds = prov["folds"] if prov.get("folds") is not None else "k"
        template = _OUT_OF_SAMPLE.get(method, _OUT_OF_SAMPLE["padim-leave-fold-out"])
        text = "{}: {}".format(head, template[n is not None].format(n=n, folds=folds))
        if prov.get("quantile") is not None:
            text += ", quantile {}".format(prov["quantile"])
        if prov.get("rank") is not None and prov.get("n_normal") is not None:
            resolved = "" if prov["rank"] < prov["n_normal"] else ", the largest: too few images to resolve it"
            text += " (rank {}/{}{})".format(prov["rank"], prov["n_normal"], resolved)
        if prov.get("expected_fpr") is not None:
            text += "; expected false-positive rate {:.1%}".format(prov["expected_fpr"])
            if prov.get("fpr_upper95") is not None:
                text += " (95% upper bound {:.1%})".format(prov["fpr_upper95"])
        return text
    if calibration.get("source") == "validation" or method == "validation-f1max":
        counts = ""
        if prov.get("n_good") is not None and prov.get("n_defect") is not None:
            counts = " ({} good, {} defective{})".format(
                prov["n_good"], prov["n_defect"], ", " + prov["data"] if prov.get("data") else "")
        return "{}: F1-max on labelled validation images{}".format(head, counts)
    return "{}: source {}".format(head, calibration.get("source") or "unknown")


# --- minimal protobuf reader: top-level ModelProto.metadata_props, without onnx/onnxruntime ---------

def _varint(buf, pos):
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf):
    """Yield (field_number, wire_type, value) of one protobuf message; len-delimited values are memoryviews."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("truncated field {}".format(field))
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise ValueError("unsupported wire type {}".format(wire))
        yield field, wire, value


def read_onnx_metadata_raw(path):
    """The ``edgead`` metadata string of an .onnx file (protobuf scan, graph not parsed)."""
    try:
        with open(path, "rb") as fh:
            buf = memoryview(fh.read())
    except OSError as exc:
        raise ModelFileError("{}: cannot read ({})".format(path, exc))
    if len(buf) == 0:
        raise ModelFileError("{}: file is empty (0 bytes)".format(path))
    try:
        for field, wire, value in _fields(buf):
            if field == _MODEL_PROTO_METADATA_FIELD and wire == 2:
                entry = {f: bytes(v).decode("utf-8") for f, w, v in _fields(value) if w == 2}
                if entry.get(1) == METADATA_KEY:
                    return entry.get(2, "")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError("{}: not a valid ONNX file ({})".format(path, exc))
    raise ModelFileError("{}: ONNX model has no '{}' metadata (export it with `edgead export`)".format(
        path, METADATA_KEY))
