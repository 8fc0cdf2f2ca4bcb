"""Bundle -> one ONNX graph: uint8 frames ``[N, H, W, 3]`` -> ``anomaly_map [N, 1, H, W]``, ``score [N]``.

The front end (normalisation, truncated backbone, the method's embedding) is the very module used by fit
(``bundle.export_front_end()``), traced by ``torch.onnx.export``; the head is appended as hand-written ops by
the method the bundle names (``Method.build_onnx_head``, looked up in ``edgead.methods``; PaDiM:
``onnx_head``). The model.json dict plus export settings go to ``metadata_props["edgead"]`` so a runtime
needs only the .onnx file (plus, for a model over the inline limit, the external data file next to it:
``external_data``).
"""
import io
import json
import warnings

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from edgead.bundle import FORMAT_VERSION
from edgead.errors import ExportError
from edgead.exporters import external_data as external_data_lib
from edgead.exporters import streaming
from edgead.methods import get_method
from edgead.runtime import schema

OPSET = 17
INPUT_NAME = "image"
OUTPUT_MAP = "anomaly_map"
OUTPUT_SCORE = "score"
#: ``fp16`` / ``fp32``: storage of the method's statistics; ``int8``: QDQ front end + refitted statistics
PRECISIONS = ("fp16", "fp32", "int8")


def parse_batch(batch):
    """``1`` / ``N`` (int or digit string) or ``"dynamic"`` -> int or ``"dynamic"``."""
    if isinstance(batch, str) and batch.strip().lower() == "dynamic":
        return "dynamic"
    try:
        value = int(batch)
    except (TypeError, ValueError):
        raise ExportError("--batch must be a positive integer or 'dynamic', not {!r}".format(batch))
    if value < 1:
        raise ExportError("--batch must be >= 1, got {}".format(value))
    return value


def _export_front_end(frame_embedding, input_hw, batch, input_dtype):
    """torch.onnx.export of the front end (``bundle.export_front_end()``) -> onnx.ModelProto with input ``image``,
    output ``embedding``."""
    height, width = input_hw
    dtype = {"uint8": torch.uint8, "float32": torch.float32}[input_dtype]
    dummy = torch.zeros((1 if batch == "dynamic" else batch, height, width, 3), dtype=dtype)
    dynamic_axes = {INPUT_NAME: {0: "N"}, "embedding": {0: "N"}} if batch == "dynamic" else None
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            frame_embedding, (dummy,), buffer, input_names=[INPUT_NAME], output_names=["embedding"],
            opset_version=OPSET, dynamic_axes=dynamic_axes, do_constant_folding=True, dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


class Int8Options:
    """What ``--precision int8`` needs (``edgead.exporters.int8``): frames uint8 ``[N, H, W, 3]`` good images
    at the model input size (calibration and refit); target ``onnxruntime`` | ``tensorrt``; calibration
    ``minmax`` | ``percentile``; statistics ``fp16`` | ``fp32`` storage of the refitted statistics; folds /
    quantile / seed of the refitted out-of-sample thresholds. After the build: ``refitted`` (the PadimBundle
    of the refitted statistics, what the exported head holds) and ``warnings``."""

    def __init__(self, frames, target="onnxruntime", calibration="minmax", statistics="fp16",
                 folds=None, quantile=None, seed=0):
        from edgead import thresholds

        self.frames, self.target, self.calibration, self.statistics = frames, target, calibration, statistics
        self.folds = thresholds.DEFAULT_FOLDS if folds is None else folds
        self.quantile = thresholds.DEFAULT_QUANTILE if quantile is None else quantile
        self.seed = seed
        self.refitted, self.warnings = None, []


def build_onnx(bundle, mahalanobis="onnx", precision="fp16", batch=1, input_dtype="uint8", blocks=None, check=True,
               int8=None):
    """Build the full ModelProto for ``bundle`` (an ``edgead.bundle.Bundle``, any method). Writes nothing.

    mahalanobis: the head flavour, one of the method's ``export_flavours`` (PaDiM: ``onnx`` | ``plugin``; an
    ExportError for another); precision: ``fp16`` | ``fp32`` storage of the method's large statistics (PaDiM: the
    whitening; the mean stays fp32); batch: ``1``, ``N`` or ``"dynamic"``; input_dtype: ``uint8`` (default) or
    ``float32`` (pixel values 0..255, for TensorRT 8.5 which has no uint8 inputs); blocks: PaDiM's row blocks
    of the standard-op Mahalanobis (None = ``onnx_head.default_blocks``; other methods ignore it).
    check: run the full ``onnx.checker`` in memory, which only models below ``external_data.THRESHOLD_BYTES``
    can take (one protobuf string); larger ones are checked through the file ``export_onnx`` writes.

    The model holds every byte in memory (the statistics included): ``build_onnx_streamed`` and
    ``streaming.materialize``, the one implementation ``export_onnx`` streams from instead.
    """
    model, sources = build_onnx_streamed(bundle, mahalanobis, precision, batch, input_dtype, blocks, int8)
    streaming.materialize(model, sources)
    if check and external_data_lib.estimate_model_bytes(model) <= external_data_lib.THRESHOLD_BYTES:
        external_data_lib.check_onnx(model)
    return model


def build_onnx_streamed(bundle, mahalanobis="onnx", precision="fp16", batch=1, input_dtype="uint8", blocks=None,
                        int8=None):
    """``(model, sources)``: the ModelProto of ``build_onnx`` with the method's streamed initializers (PaDiM: the
    packed whitening) as placeholders (name, dims, type, no data) and ``sources`` = ``{name:
    streaming.TensorSource}``, which read the bundle's statistics block by block (``PadimBundle.iter_whitening_rows``:
    a lazy bundle reads its weights file) and convert each block to the stored type. Nothing is checked or written
    here. Front end: ``bundle.export_front_end()``; head: ``Method.build_onnx_head`` of the bundle's method.
    precision ``int8`` (PaDiM): ``int8`` is an ``Int8Options``; the front end is QDQ-quantised and the head holds
    statistics refitted on its features (``edgead.exporters.int8``)."""
    batch = parse_batch(batch)
    if input_dtype not in ("uint8", "float32"):
        raise ExportError("input dtype must be uint8 or float32, not {!r}".format(input_dtype))
    cfg = bundle.config
    method = get_method(cfg["method"])
    if mahalanobis not in method.export_flavours:
        raise ExportError("--mahalanobis {}: {} models export only the {} flavour{}".format(
            mahalanobis, method.name, " or ".join(method.export_flavours),
            "s" if len(method.export_flavours) > 1 else ""))
    if precision not in PRECISIONS:
        raise ExportError("--precision must be one of {}, not {!r}".format(", ".join(PRECISIONS), precision))
    if (precision == "int8") != (int8 is not None):
        raise ExportError("--precision int8 needs calibration images (--calib), and only int8 takes them")
    export = {"mahalanobis": mahalanobis, "precision": precision, "batch": batch, "opset": OPSET,
              "input_dtype": input_dtype}
    meta = dict(cfg)
    meta.setdefault("format_version", FORMAT_VERSION)  # a bundle fitted in memory gets it only when saved
    meta["export"] = export
    meta_text = metadata_text(meta, bundle.path)  # before the long trace: a bad bundle stops here
    height, width = bundle.input_hw
    head_bundle, head_precision = bundle, precision
    if precision == "int8":
        model, head_bundle, export["quantization"] = _int8_front_end(bundle, batch, input_dtype, mahalanobis, int8)
        head_precision = export["statistics"] = int8.statistics
        meta = dict(head_bundle.config, format_version=meta["format_version"], export=export)
        meta_text = metadata_text(meta, bundle.path)
    else:
        with torch.no_grad():
            model = _export_front_end(bundle.export_front_end(), (height, width), batch, input_dtype)
    nodes, initializers, sources = method.build_onnx_head(
        head_bundle, "embedding", mahalanobis, head_precision, OUTPUT_MAP, OUTPUT_SCORE, blocks=blocks)
    graph = model.graph
    graph.node.extend(nodes)
    for tensor in initializers:  # not extend(): upb copies by serializing, which fails for a tensor over 2 GiB
        graph.initializer.add().CopyFrom(tensor)
    del graph.output[:]
    n_dim = "N" if batch == "dynamic" else batch
    graph.output.extend([
        helper.make_tensor_value_info(OUTPUT_MAP, TensorProto.FLOAT, [n_dim, 1, height, width]),
        helper.make_tensor_value_info(OUTPUT_SCORE, TensorProto.FLOAT, [n_dim]),
    ])
    graph.name = "edgead_{}_{}".format(method.name, cfg["backbone"]["name"])
    imported = {opset.domain for opset in model.opset_import}
    for domain in sorted({node.domain for node in nodes if node.domain} - imported):  # e.g. the plugin's "edgead"
        model.opset_import.append(helper.make_opsetid(domain, 1))
    del model.metadata_props[:]
    helper.set_model_props(model, {"edgead": meta_text})
    model.producer_name = "edgead"
    model.doc_string = "edgead {} ({}, {}x{}): uint8 RGB [N,H,W,3] -> anomaly_map, score".format(
        method.display_name, cfg["backbone"]["name"], height, width)
    return model, sources


def _int8_front_end(bundle, batch, input_dtype, mahalanobis, options):
    """(quantised front end pinned to ``batch``, refitted PadimBundle, quantisation record) for ``Int8Options``."""
    from edgead.exporters import int8

    int8.check_options(bundle, options.target, options.calibration, mahalanobis)
    if options.statistics not in ("fp16", "fp32"):
        raise ExportError("int8 statistics storage must be fp16 or fp32, not {!r}".format(options.statistics))
    frames = int8.check_frames(options.frames, bundle.input_hw)
    with torch.no_grad():
        front_end = _export_front_end(bundle.export_front_end(), bundle.input_hw, "dynamic", input_dtype)
    quantized, record = int8.quantize_front_end(front_end, frames, options.target, options.calibration, input_dtype)
    embed = int8.session_embedder(int8.front_end_session(quantized), input_dtype)
    options.refitted, options.warnings = int8.refit_statistics(
        bundle, embed, frames, options.folds, options.quantile, options.seed)
    record["refit_images"] = int(len(frames))
    return int8.pin_batch(quantized, batch), options.refitted, record


def metadata_text(meta, bundle_path=None):
    """The ``edgead`` metadata JSON, checked exactly as the runtime will read it (the ``metadata`` entry of
    ``runtime/schemas/model.schema.json`` plus the cross-field checks), so a bad bundle never produces a
    model file. Raises ExportError (one line: the bundle and the JSON path)."""
    where = "{} (ONNX metadata)".format(bundle_path or "bundle")
    try:
        text = json.dumps(meta)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ExportError("{}: cannot be written as JSON ({})".format(where, str(exc).splitlines()[0]))
    schema.validate(schema.loads(text, where, ExportError), "metadata", where, ExportError)
    return text


def export_onnx(bundle, out_path, mahalanobis="onnx", precision="fp16", batch=1, input_dtype="uint8", blocks=None,
                external_data="auto", int8=None):
    """Build, check and write ``out_path``, switching from any model there in one rename. Returns the ModelProto.

    external_data: ``auto`` (tensors of 1 KiB and more go to ``<out name>.<sha16>.data`` next to the .onnx
    when the model would exceed ``external_data.THRESHOLD_BYTES``, 1.8 GiB), ``always`` or ``never`` (an
    ExportError for a model that large). With external data the returned model's large initializers name
    the data file instead of holding their bytes (``external_data.external_locations(model)``); inline, the
    packed whitening initializer holds none either (its bytes went to the file).
    See ``edgead.exporters.external_data`` for the files and the steps.

    Memory: the packed whitening is never held whole, neither as float32 nor in its stored type: it is
    read from the bundle block by block (``load_bundle(..., lazy_statistics=True)`` keeps it on disk),
    converted per block and streamed into the file (``streaming``, ``external_data.write_model``).
    """
    external_data_lib.check_mode(external_data)  # before the long trace
    model, sources = build_onnx_streamed(bundle, mahalanobis, precision, batch, input_dtype, blocks, int8)
    external_data_lib.write_model(model, out_path, external_data, check=True, sources=sources)
    return model


def read_metadata(model):
    """The ``edgead`` metadata dict of an onnx.ModelProto."""
    for prop in model.metadata_props:
        if prop.key == "edgead":
            return json.loads(prop.value)
    raise ExportError("model has no 'edgead' metadata_props entry")


def graph_op_types(model):
    """Sorted list of (domain, op_type) pairs used by the graph."""
    return sorted({(node.domain or "", node.op_type) for node in model.graph.node})


def initializer_bytes(model):
    """Total bytes of all initializers (what dominates the file size)."""
    return int(sum(np.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                   for t in model.graph.initializer))
