"""The CFLOW head as ONNX nodes: flat embedding ``[N, T]`` -> ``anomaly_map [N, 1, H, W]``, ``score [N]``.

Mirrors ``edgead.cflow.model.CflowHead`` op for op, with ops from the TensorRT parser's list
(``edgead.exporters.trt_ops``), from the same inference form (``edgead.cflow.flow.compile_decoder``). Per scale:
Slice, Reshape and Transpose take its features out of the embedding as columns ``[C, N P]`` (every patch of every
frame a column); per coupling block three Gemms (the subnet's layers with their biases; ONNX Runtime fuses the
first with its ReLU), Tanh, Exp, Mul, Add, Concat and two Gathers on axis 0 (the next block's halves: whole rows).
The position term ``q^T = condition_weight @ encoding + in_bias`` ``[H, P]`` is a constant subgraph (folded once at
load by ONNX Runtime and TensorRT; the file stores ``[H, K]`` per block and one ``[K, P]`` encoding per scale),
tiled over the batch by Expand + Reshape (folded too for a static batch). The blocks' log-scales are summed once
(Concat + ReduceSum). ``precision`` fp16 stores the subnet matrices as float16 (a Cast at load; everything computes
in float32). Any batch size works.
"""
import numpy as np
from onnx import TensorProto, helper

from edgead import blur
from edgead.cflow import flow
from edgead.cflow.fit import compile_scales
from edgead.cflow.model import scale_layout
from edgead.exporters.onnx_head import _GraphBuilder


def _int64(values):
    return np.array(values, np.int64)


def _matrix(builder, name, array, precision):
    """A float32 matrix initializer, stored as float16 (plus a Cast) for ``precision`` fp16."""
    if precision == "fp16":
        stored = builder.const(name + "_fp16", np.asarray(array, np.float32).astype(np.float16))
        return builder.node("Cast", [stored], name, to=TensorProto.FLOAT)
    return builder.const(name, np.asarray(array, np.float32))


def _column(vector):
    """float32 ``[C] -> [C, 1]`` (broadcasts over the patches of ``[N, C, P]``)."""
    return np.asarray(vector, np.float32).reshape(-1, 1)


def _scalar(builder, name, value):
    return builder.const(name, np.array(value, np.float32))


def build_head(embedding, config, scale_blocks, precision="fp16", map_name="anomaly_map", score_name="score"):
    """``(nodes, initializers)`` from ``embedding`` (name of ``[N, T]``) to ``map_name`` and ``score_name``.

    scale_blocks: the bundle's stored tensors per scale and block (``CflowBundle.scale_blocks``); precision:
    ``fp16`` | ``fp32`` storage of the subnet matrices.
    """
    if precision not in ("fp32", "fp16"):
        raise ValueError("precision must be 'fp32' or 'fp16', not {!r}".format(precision))
    builder = _GraphBuilder("head/")
    cfg = config["cflow"]
    compiled = compile_scales(config, scale_blocks)  # float32; the fp16 rounding happens in _matrix
    grids = [tuple(int(v) for v in g) for g in cfg["scale_grids"]]
    layout = scale_layout([c["channels"] for c in compiled], grids)
    height, width = config["input"]["height"], config["input"]["width"]
    sigma = config["postprocess"]["blur_sigma"]
    axis0, axis1 = builder.const("axis0", _int64([0])), builder.const("axis1", _int64([1]))
    one = _scalar(builder, "one", 1.0)
    half = _scalar(builder, "half", 0.5)
    # N, the frames in the batch, as a 1-element int64 tensor (a constant ONNX Runtime folds for a static batch)
    batch = builder.node("Slice", [builder.node("Shape", [embedding], "embedding_shape"), axis0, axis1, axis0],
                         "batch")
    amap = None
    for i, (scale, (offset, patches, channels), reference) in enumerate(zip(
            compiled, layout, cfg["reference_log_likelihood"])):
        p = "scale%d_" % i
        split = scale["split"]
        hidden_width = scale["blocks"][0]["in_weight"].shape[0]
        flat = builder.node("Slice", [embedding, builder.const(p + "start", _int64([offset])),
                                      builder.const(p + "end", _int64([offset + patches * channels])), axis1],
                            p + "flat")
        features = builder.node("Reshape", [flat, builder.const(p + "shape", _int64([0, channels, patches]))],
                                p + "features")  # [N, C, P]
        columns = builder.node("Reshape", [
            builder.node("Transpose", [features], p + "features_cnp", perm=[1, 0, 2]),
            builder.const(p + "columns_shape", _int64([channels, -1]))], p + "columns")  # [C, N P]
        x1 = builder.node("Slice", [columns, builder.const(p + "zero", _int64([0])),
                                    builder.const(p + "split", _int64([split])), axis0], p + "x1_0")
        x2 = builder.node("Slice", [columns, builder.const(p + "split_start", _int64([split])),
                                    builder.const(p + "channels", _int64([channels])), axis0], p + "x2_0")
        encoding = builder.const(p + "encoding", scale["encoding"])  # [K, P]
        clamp = _scalar(builder, p + "clamp", scale["clamp"])
        # q tiled over the batch, [H, N P]: Expand [H, 1, P] -> [H, N, P], then Reshape
        tiled_shape = builder.node("Concat", [builder.const(p + "hidden_width", _int64([hidden_width])), batch,
                                              builder.const(p + "patches", _int64([patches]))], p + "tiled_shape",
                                   axis=0)
        hidden_columns = builder.const(p + "hidden_columns", _int64([hidden_width, -1]))
        log_scales, out = [], None
        last = len(scale["blocks"]) - 1
        for b, block in enumerate(scale["blocks"]):
            q = "{}block{}_".format(p, b)
            position_bias = builder.node("Add", [
                builder.node("MatMul", [_matrix(builder, q + "condition_weight", block["condition_weight"], precision),
                                        encoding], q + "condition_term"),
                builder.const(q + "in_bias", _column(block["in_bias"]))], q + "position_bias")  # [H, P], constant
            tiled = builder.node("Reshape", [builder.node("Expand", [
                builder.node("Unsqueeze", [position_bias, axis1], q + "position_bias_3d"), tiled_shape],
                q + "position_bias_expanded"), hidden_columns], q + "position_bias_tiled")  # [H, N P]
            hidden = builder.node("Relu", [builder.node("Gemm", [
                _matrix(builder, q + "in_weight", block["in_weight"], precision), x1, tiled], q + "in_sum")],
                q + "hidden")  # [H, N P]
            log_scale = builder.node("Mul", [clamp, builder.node("Tanh", [builder.node("Gemm", [
                _matrix(builder, q + "scale_weight", block["scale_weight"], precision), hidden,
                builder.const(q + "scale_bias", _column(block["scale_bias"]))], q + "scale_sum")], q + "scale_tanh")],
                q + "log_scale")  # [s2, N P]
            shift = builder.node("Gemm", [_matrix(builder, q + "shift_weight", block["shift_weight"], precision),
                                          hidden, builder.const(q + "shift_bias", _column(block["shift_bias"]))],
                                 q + "shift")
            x2 = builder.node("Add", [builder.node("Mul", [x2, builder.node("Exp", [log_scale], q + "scale")],
                                                   q + "scaled"), shift], q + "x2_coupled")
            log_scales.append(log_scale)
            out = builder.node("Add", [builder.node("Mul", [
                builder.node("Concat", [x1, x2], q + "coupled", axis=0), builder.const(q + "gain", _column(block["gain"]))],
                q + "gained"), builder.const(q + "offset", _column(block["offset"]))], q + "out")
            if b != last:  # |z|^2 does not depend on the order: the last permutation is skipped, as in torch
                perm = block["permutation"]
                x1 = builder.node("Gather", [out, builder.const(q + "passive", perm[:split])], q + "x1_next", axis=0)
                x2 = builder.node("Gather", [out, builder.const(q + "active", perm[split:])], q + "x2_next", axis=0)
        log_det = builder.node("ReduceSum", [builder.node("Concat", log_scales, p + "log_scales", axis=0), axis0],
                               p + "log_det", keepdims=0)  # [N P]
        squared = builder.node("ReduceSumSquare", [out], p + "squared", axes=[0], keepdims=0)  # [N P]
        constant = channels * flow.LOG_NORMAL_CONSTANT + scale["log_det_constant"]
        likelihood = builder.node("Div", [
            builder.node("Add", [builder.node("Sub", [log_det, builder.node("Mul", [squared, half], p + "half_squared")],
                                              p + "log_density"), _scalar(builder, p + "constant", constant)],
                         p + "log_likelihood"), _scalar(builder, p + "channels_f", float(channels))],
            p + "log_likelihood_per_dim")
        probability = builder.node("Exp", [builder.node("Sub", [likelihood, _scalar(builder, p + "reference",
                                                                                    float(reference))],
                                                        p + "relative")], p + "probability")
        anomaly = builder.node("Relu", [builder.node("Sub", [one, probability], p + "improbability")], p + "anomaly")
        grid_h, grid_w = grids[i]
        grid_map = builder.node("Reshape", [anomaly, builder.const(p + "grid_shape", _int64([-1, 1, grid_h, grid_w]))],
                                p + "grid_map")
        rows_op = builder.const(p + "upsample_blur_rows",
                                blur.upsample_blur_matrix(height, grid_h, sigma).astype(np.float32))
        cols_op_t = builder.const(p + "upsample_blur_cols_t",
                                  blur.upsample_blur_matrix(width, grid_w, sigma).T.astype(np.float32))
        up = builder.node("MatMul", [builder.node("MatMul", [rows_op, grid_map], p + "blurred_rows"), cols_op_t],
                          p + "blurred")
        amap = up if amap is None else builder.node("Add", [amap, up], p + "map_sum")
    assert builder.nodes[-1].output[0] == amap  # the map's last node (MatMul or Add) writes the graph output
    builder.nodes[-1].output[0] = map_name
    builder.nodes[-1].name = "head/" + map_name
    builder.nodes.append(helper.make_node("ReduceMax", [map_name], [score_name], name="head/score", axes=[1, 2, 3],
                                          keepdims=0))
    return builder.nodes, builder.initializers
