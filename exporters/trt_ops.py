"""The ONNX ops our graphs may use: every one is supported by the TensorRT ONNX parser from 8.5 on.

Source: onnx-tensorrt ``docs/operators.md`` (TensorRT 8.4/8.5/8.6/10.x support matrices). Only the
subset edgead can emit (from timm backbones + our head) is listed, with the restrictions we rely on.
``check_graph`` keeps exported graphs inside this list (a test runs it on every flavour).

Notes for TensorRT:
- ``uint8`` network inputs need TensorRT >= 8.6 and must feed a ``Cast`` directly (our graph starts
  with Cast). For TensorRT 8.5 (JetPack 5.0/5.1) export with ``--input-dtype float32``.
- ``Conv`` weights must be initializers; ``Resize`` uses ``linear``/``nearest`` with ``half_pixel`` or
  ``asymmetric`` coordinates; ``Gather`` indices are int64 (initializers, or computed: PatchCore; cast down to int32 by the parser).
- ``TopK`` (PatchCore's score) takes K from an initializer, K <= 3840; ``GatherND`` with ``batch_dims`` needs
  TensorRT >= 8.2 (every JetPack 5/6 release has it).
- ``edgead::PadimMahalanobis`` is not an ONNX op: the parser maps it to our plugin by op_type once
  ``libedgead_plugins.so`` is loaded.
"""

TENSORRT_OPS = {
    # op: restriction we rely on (None = none)
    "Add": None, "Sum": None, "Sub": None, "Mul": None, "Div": None, "Sqrt": None, "Relu": None, "Clip": None,
    "HardSigmoid": None, "HardSwish": "TensorRT >= 8.5 (opset 14)", "Sigmoid": None,
    "BatchNormalization": None, "Cast": "TensorRT types only", "Concat": None, "Constant": None,
    "Conv": "2-D, weights are initializers", "MaxPool": "2-D, no Indices output",
    "AveragePool": "2-D", "GlobalAveragePool": None, "Gather": "int64 indices (the parser casts them to int32)",
    "Identity": None, "MatMul": None, "Gemm": None, "Flatten": None, "Reshape": None,
    "Transpose": None, "Squeeze": "axes are constants", "Unsqueeze": "axes are constants",
    "Shape": None, "Split": None, "Slice": "axes are initializers", "Pad": "constant mode",
    "Resize": "modes linear/nearest, half_pixel or asymmetric coordinates",
    "ReduceMax": None, "ReduceMean": None, "ReduceSum": None, "ReduceSumSquare": None,
    # PatchCore's nearest-neighbour head (edgead.exporters.patchcore_head)
    "ReduceMin": None, "Min": None, "Max": None, "Softmax": "opset >= 13 (one axis)", "Less": None,
    "Where": None,
    "TopK": "K is an initializer, at most {}".format(3840),
    "GatherND": "TensorRT >= 8.2 (batch_dims maps to nbElementWiseDims)",
    # CFLOW's coupling blocks (edgead.exporters.cflow_head)
    "Tanh": None, "Exp": None, "Expand": "shape input computed from Shape (the batch) or constant",
    # int8 exports (edgead.exporters.int8, --int8-target tensorrt): explicit quantisation
    "QuantizeLinear": "int8, zero point 0 (explicit quantisation)",
    "DequantizeLinear": "int8, zero point 0 (explicit quantisation)",
}
#: Largest K of a TensorRT TopK layer (ITopKLayer; 3840 in TensorRT 8.5-10)
TOPK_MAX_K = 3840

PLUGIN_OPS = {("edgead", "PadimMahalanobis")}
RESIZE_COORDINATE_MODES = {"half_pixel", "pytorch_half_pixel", "asymmetric", "align_corners"}


def check_graph(model):
    """List of human-readable problems that would stop the TensorRT ONNX parser (empty = fine)."""
    from onnx import TensorProto, numpy_helper

    problems = []
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    not_int8 = {}  # Q/DQ type -> node names: one line for all of them (an onnxruntime-target int8 export has dozens)
    for node in model.graph.node:
        domain = node.domain or ""
        if domain not in ("", "ai.onnx"):
            if (domain, node.op_type) not in PLUGIN_OPS:
                problems.append("{}: custom op {}::{} has no TensorRT plugin".format(node.name, domain, node.op_type))
            continue
        if node.op_type not in TENSORRT_OPS:
            problems.append("{}: op {} is not in the TensorRT-supported list".format(node.name, node.op_type))
        if node.op_type == "Conv" and node.input[1] not in initializers and not (
                producers.get(node.input[1]) is not None and producers[node.input[1]].op_type == "DequantizeLinear"
                and producers[node.input[1]].input[0] in initializers):
            problems.append("{}: Conv weights must be an initializer (or its DequantizeLinear)".format(node.name))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero = initializers.get(node.input[2]) if len(node.input) > 2 else None
            quantized = zero if zero is not None else (
                initializers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None)
            if quantized is not None and quantized.data_type != TensorProto.INT8:
                not_int8.setdefault(TensorProto.DataType.Name(quantized.data_type).lower(), []).append(node.name)
            elif zero is not None and numpy_helper.to_array(zero).any():
                problems.append("{}: {} zero point is not 0 (TensorRT takes symmetric int8)".format(
                    node.name, node.op_type))
        if node.op_type == "TopK":
            k = initializers.get(node.input[1]) if len(node.input) > 1 else None
            if k is None:
                problems.append("{}: TopK's K must be an initializer".format(node.name))
            elif int(numpy_helper.to_array(k).reshape(-1)[0]) > TOPK_MAX_K:
                problems.append("{}: TopK K = {} exceeds TensorRT's {}".format(
                    node.name, int(numpy_helper.to_array(k).reshape(-1)[0]), TOPK_MAX_K))
        if node.op_type == "Resize":
            attrs = {a.name: a for a in node.attribute}
            mode = attrs["coordinate_transformation_mode"].s.decode() if "coordinate_transformation_mode" in attrs else "half_pixel"
            if mode not in RESIZE_COORDINATE_MODES:
                problems.append("{}: Resize coordinate mode {} unsupported".format(node.name, mode))
        if node.op_type == "Pad":
            attrs = {a.name: a for a in node.attribute}
            if "mode" in attrs and attrs["mode"].s.decode() != "constant":
                problems.append("{}: only constant Pad is portable to TensorRT 8.5".format(node.name))
    if not_int8:
        names = [name for group in not_int8.values() for name in group]
        problems.append("{} QuantizeLinear/DequantizeLinear nodes of {} (first: {}): TensorRT's explicit quantisation "
                        "takes int8 only (export with --int8-target tensorrt)".format(
                            len(names), ", ".join(sorted(not_int8)), names[0]))
    for graph_input in model.graph.input:
        if graph_input.type.tensor_type.elem_type == TensorProto.UINT8:
            consumers = [n for n in model.graph.node if graph_input.name in n.input]
            if any(n.op_type != "Cast" for n in consumers):
                problems.append("input {}: uint8 input must feed a Cast directly".format(graph_input.name))
    return problems
