"""The PatchCore head as ONNX nodes: embedding ``[N, D, h, w]`` -> ``anomaly_map [N, 1, H, W]``, ``score [N]``.

Mirrors ``edgead.patchcore.model.PatchcoreHead`` op for op, with ops from the TensorRT parser's list
(``edgead.exporters.trt_ops``). The memory bank is one initializer ``[M, D]`` (fp16 by default, ``--precision``);
a constant subgraph (Cast, Transpose, ReduceSumSquare, Concat, Slice: folded once at load by ONNX Runtime and
TensorRT) turns it into the augmented bank ``[D + 1, M]`` = (``m^T`` over ``|m|^2``), cut in blocks of
``chunk`` entries. Patch rows become ``[-2 x, 1]`` (a Pad), so each block is one MatMul giving
``|m|^2 - 2 x.m`` ``[N, P, chunk]`` (at most ``CHUNK_BYTES`` per image), which ranks the entries, followed at once
by a TopK(1) (value and index); Less/Where/Min join the blocks (a later block wins only where strictly closer).
The patch distance ``[N, P]`` is ``|x - m|`` of the nearest entry, computed directly (Gather, Sub,
ReduceSumSquare, Sqrt): the expanded form cancels for patches the bank holds.

Score: TopK(1) over the patches gives ``s*`` and its patch; GatherND (batch_dims 1) its row ``x*`` and its
nearest entry ``m*``; TopK(b) over ``m*``'s bank offsets the support; Gather,
ReduceSumSquare, Sqrt and Softmax the weight ``1 - softmax(|x* - n_j|)[0]``. Any batch size works (nothing
depends on N but the shapes).
"""
import numpy as np
from onnx import TensorProto, helper

from edgead import blur
from edgead.errors import ExportError
from edgead.exporters.onnx_head import _GraphBuilder
from edgead.patchcore.model import CHUNK_BYTES, bank_chunk


#: Largest finite float16
FP16_MAX = 65504.0


def _int64(values):
    return np.array(values, np.int64)


def _pad_minus_two_x_one(builder, rows, name, rank):
    """rows ``[..., D]`` of rank ``rank`` -> ``[..., D + 1]`` = ``[-2 x, 1]`` (Mul, then a constant Pad of 1.0)."""
    scaled = builder.node("Mul", [rows, builder.const(name + "_minus_two", np.array(-2.0, np.float32))],
                          name + "_scaled")
    pads = [0] * rank + [0] * (rank - 1) + [1]
    return builder.node("Pad", [scaled, builder.const(name + "_pads", _int64(pads)),
                                builder.const(name + "_one", np.array(1.0, np.float32))], name + "_augmented",
                        mode="constant")


def build_head(embedding, config, bank, precision="fp16", map_name="anomaly_map", score_name="score",
               chunk_bytes=CHUNK_BYTES):
    """``(nodes, initializers)`` from ``embedding`` (name of ``[N, D, h, w]``) to ``map_name`` and ``score_name``.

    bank: the memory bank ``[M, D]`` float32 (numpy); precision: ``fp16`` | ``fp32`` storage of it.
    """
    if precision not in ("fp32", "fp16"):
        raise ValueError("precision must be 'fp32' or 'fp16', not {!r}".format(precision))
    builder = _GraphBuilder("head/")
    bank = np.ascontiguousarray(bank, np.float32)
    if precision == "fp16" and bank.size and float(np.abs(bank).max()) > FP16_MAX:
        raise ExportError("the memory bank holds values up to {:.4g}, beyond float16's {}; export with --precision "
                          "fp32".format(float(np.abs(bank).max()), FP16_MAX))
    size, dim = bank.shape
    grid_h, grid_w = config["embedding"]["grid"]
    height, width = config["input"]["height"], config["input"]["width"]
    num_patches = grid_h * grid_w
    neighbors = max(1, min(int(config["patchcore"]["neighbors"]), size))

    # the bank, augmented and cut into blocks: constants only (folded at load)
    stored = builder.const("memory_bank", bank.astype(np.float16 if precision == "fp16" else np.float32))
    bank32 = builder.node("Cast", [stored], "memory_bank_f32", to=TensorProto.FLOAT) if precision == "fp16" else stored
    bank_t = builder.node("Transpose", [bank32], "memory_bank_t", perm=[1, 0])  # [D, M]
    norms = builder.node("ReduceSumSquare", [bank32], "memory_bank_norms", axes=[1], keepdims=1)  # [M, 1]
    norms_row = builder.node("Transpose", [norms], "memory_bank_norms_row", perm=[1, 0])  # [1, M]
    bank_aug = builder.node("Concat", [bank_t, norms_row], "memory_bank_augmented", axis=0)  # [D + 1, M]

    # patch distances [N, P]
    flat = builder.node("Reshape", [embedding, builder.const("flat_shape", _int64([0, dim, num_patches]))],
                        "embedding_flat")
    rows = builder.node("Transpose", [flat], "rows", perm=[0, 2, 1])  # [N, P, D]
    rows_aug = _pad_minus_two_x_one(builder, rows, "rows", 3)  # [N, P, D + 1]
    chunk = bank_chunk(num_patches, chunk_bytes)
    k1 = builder.const("k1", _int64([1]))
    axis1, axis2 = builder.const("axis1", _int64([1])), builder.const("axis2", _int64([2]))
    best_value = best_index = None
    for i, start in enumerate(range(0, size, chunk)):
        block = builder.node("Slice", [bank_aug, builder.const("block%d_start" % i, _int64([start])),
                                       builder.const("block%d_end" % i, _int64([min(size, start + chunk)])),
                                       axis1], "bank_block%d" % i)
        product = builder.node("MatMul", [rows_aug, block], "offsets%d" % i)  # [N, P, chunk]
        value3, index3 = builder.prefix + "nearest_offset%d_3d" % i, builder.prefix + "nearest%d_3d" % i
        builder.nodes.append(helper.make_node("TopK", [product, k1], [value3, index3], name=index3, axis=2, largest=0,
                                              sorted=1))  # [N, P, 1] each
        value = builder.node("Squeeze", [value3, axis2], "nearest_offset%d" % i)  # [N, P]
        index = builder.node("Squeeze", [index3, axis2], "nearest%d_local" % i)
        if start:
            index = builder.node("Add", [index, builder.const("block%d_first" % i, _int64(start))], "nearest%d" % i)
        if best_value is None:
            best_value, best_index = value, index
        else:  # a later block wins only where strictly closer (exact ties: the lower index, as in torch)
            closer = builder.node("Less", [value, best_value], "closer%d" % i)
            best_index = builder.node("Where", [closer, index, best_index], "best_index%d" % i)
            best_value = builder.node("Min", [value, best_value], "best_offset%d" % i)
    nearest_rows = builder.node("Gather", [bank32, best_index], "nearest_rows", axis=0)  # [N, P, D]
    gaps = builder.node("Sub", [nearest_rows, rows], "nearest_gaps")
    squared = builder.node("ReduceSumSquare", [gaps], "distance_squared", axes=[2], keepdims=0)  # [N, P]
    distance = builder.node("Sqrt", [squared], "distance")  # [N, P]: |x - m| of the nearest entry, computed directly

    # the map: bilinear upsample + blur as two matrices (edgead.blur), as for PaDiM
    sigma = config["postprocess"]["blur_sigma"]
    grid_map = builder.node("Reshape", [distance, builder.const("grid_shape", _int64([0, 1, grid_h, grid_w]))],
                            "distance_map")
    rows_op = builder.const("upsample_blur_rows", blur.upsample_blur_matrix(height, grid_h, sigma).astype(np.float32))
    cols_op_t = builder.const("upsample_blur_cols_t",
                              blur.upsample_blur_matrix(width, grid_w, sigma).T.astype(np.float32))
    blurred_rows = builder.node("MatMul", [rows_op, grid_map], "blurred_rows")
    builder.nodes.append(helper.make_node("MatMul", [blurred_rows, cols_op_t], [map_name], name="head/blurred"))

    # the image score
    if neighbors == 1:
        builder.nodes.append(helper.make_node("ReduceMax", [distance], [score_name], name="head/score", axes=[1],
                                              keepdims=0))
        return builder.nodes, builder.initializers
    worst_name, where_name = builder.prefix + "worst", builder.prefix + "worst_patch"
    builder.nodes.append(helper.make_node("TopK", [distance, k1], [worst_name, where_name], name=worst_name,
                                          axis=1, largest=1, sorted=1))  # [N, 1] each
    worst = builder.node("Squeeze", [worst_name, axis1], "worst_score")  # s* [N]
    worst_row = builder.node("GatherND", [rows, where_name], "worst_row", batch_dims=1)  # x* [N, D]
    nearest_flat = builder.node("GatherND", [best_index, where_name], "nearest_entry", batch_dims=1)  # m* [N]
    entry = builder.node("Gather", [bank32, nearest_flat], "nearest_entry_row", axis=0)  # m* [N, D]
    entry_offsets = builder.node("MatMul", [_pad_minus_two_x_one(builder, entry, "entry", 2), bank_aug],
                                 "entry_offsets")  # [N, M]
    support_values, support_index = builder.prefix + "support_offsets", builder.prefix + "support"
    builder.nodes.append(helper.make_node(
        "TopK", [entry_offsets, builder.const("k_neighbors", _int64([neighbors]))], [support_values, support_index],
        name=support_index, axis=1, largest=0, sorted=1))  # [N, b]
    support_rows = builder.node("Gather", [bank32, support_index], "support_rows", axis=0)  # [N, b, D]
    gaps = builder.node("Sub", [support_rows, builder.node("Unsqueeze", [worst_row, axis1], "worst_row_3d")],
                        "support_gaps")
    support_sq = builder.node("ReduceSumSquare", [gaps], "support_squared", axes=[2], keepdims=0)  # [N, b]
    support_distance = builder.node("Sqrt", [builder.node("Relu", [support_sq], "support_squared_clamped")],
                                    "support_distance")
    softmax = builder.node("Softmax", [support_distance], "support_softmax", axis=1)
    first = builder.node("Slice", [softmax, builder.const("first_start", _int64([0])),
                                   builder.const("first_end", _int64([1])), axis1], "nearest_softmax")  # [N, 1]
    weight = builder.node("Sub", [builder.const("one", np.array(1.0, np.float32)),
                                  builder.node("Squeeze", [first, axis1], "nearest_softmax_flat")], "weight")
    builder.nodes.append(helper.make_node("Mul", [weight, worst], [score_name], name="head/score"))
    return builder.nodes, builder.initializers
