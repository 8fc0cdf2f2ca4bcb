"""The PaDiM head as ONNX nodes: embedding ``[N, D, h, w]`` -> ``anomaly_map [N, 1, H, W]``, ``score [N]``.

Mirrors ``edgead.model.PadimHead`` op for op, with only TensorRT-parser-friendly standard ops
(see ``edgead.exporters.trt_ops``). The Mahalanobis step comes in two flavours:

- ``onnx``: standard ops. The file stores what the batched MatMuls read: the dense transposed row
  blocks of the lower-triangular ``W`` (``[P, r1, r1 - r0]`` each, only the triangle's prefix columns),
  fp32 as they are, fp16 behind one Cast each that ONNX Runtime and TensorRT constant-fold at load.
  Nothing else is materialised: the earlier layout (packed ``[P, T]`` + Cast/Concat/Gather, folded at
  load) briefly held the fp32 packed copy, its padded copy and the blocks together, which put ONNX
  Runtime's peak RSS at load above anomalib's (471 vs 285 MB for ResNet18, D = 100).
- ``plugin``: one ``edgead::PadimMahalanobis`` node (our CUDA kernel in TensorRT, our CPU kernel in
  ONNX Runtime through ``libedgead_ort.so``) taking
  ``(embedding [N, D, P], mean [P, D], whitening_packed [P, T])`` -> ``distance [N, P]``.

The packed whitening is the one large tensor (2.48 GB fp32 for wide_resnet50_2): it is taken as rows
(``edgead.exporters.streaming``: an array, or a bundle's row stream) and, in a streamed build
(``build_head_streamed``), enters the graph as a placeholder whose bytes a ``TensorSource`` yields chunk by
chunk (fp16 converted per chunk), so the export never holds a copy of it.
"""
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from edgead import blur, packing
from edgead.errors import ExportError
from edgead.exporters import streaming
from edgead.runtime.cuda_kernel import MAX_DIM

PLUGIN_DOMAIN = "edgead"
PLUGIN_OP = "PadimMahalanobis"
PLUGIN_VERSION = "1"


class _GraphBuilder:
    """Collects nodes and initializers with unique, readable names.

    stream: large row tensors (``rows_const``) stay placeholders, their ``TensorSource`` in ``sources``
    (``{name: source}``); otherwise they get their bytes at once (the same bytes).
    """

    def __init__(self, prefix, stream=False):
        self.prefix = prefix
        self.stream = stream
        self.nodes = []
        self.initializers = []
        self.sources = {}

    def const(self, name, array):
        full = self.prefix + name
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), full))
        return full

    def rows_const(self, name, rows, dtype, dims=None):
        """A ``[rows, cols]`` initializer (or ``dims``, the same bytes) stored as ``dtype`` from ``rows`` (an
        array or a row stream)."""
        full = self.prefix + name
        source = streaming.TensorSource(rows, dtype, dims)
        tensor = streaming.placeholder(full, source)
        if self.stream:
            self.sources[full] = source
        else:
            streaming.fill(tensor, source)
        self.initializers.append(tensor)
        return full

    def node(self, op_type, inputs, name, domain=None, **attrs):
        output = self.prefix + name
        kwargs = {"domain": domain} if domain else {}
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **kwargs, **attrs))
        return output


def default_blocks(dim):
    """Row blocks of the standard-op Mahalanobis for embedding dimension ``dim``: 2 for D <= 150 (the triangle
    stored at 75 % of dense; ResNet18 D = 100 on ONNX Runtime CPU, 2 threads: 2 blocks 11.00 ms a frame,
    3 blocks 11.18, 4 blocks 11.22: smaller MatMuls stream slower and pay per node), then one more per 100
    dimensions up to 8 (WideResNet50 D = 550: 7 blocks, 57 % of dense, where each block is large)."""
    return 2 if dim <= 150 else min(8, 2 + (int(dim) + 49) // 100)


def block_spans(dim, blocks):
    """``[(row_start, row_end), ...]``: ``blocks`` near-equal row blocks of the ``D x D`` triangle."""
    blocks = max(1, min(int(blocks), dim))
    edges = [int(v) for v in np.linspace(0, dim, blocks + 1).round()]
    return list(zip(edges[:-1], edges[1:]))


def block_gather_index(dim, rows, cols):
    """int64 ``[c1 - c0, r1 - r0]``: packed index of ``W[r, c]`` at ``[c - c0, r - r0]`` (``T`` = the
    appended zero where ``c > r``). Gathering it gives the transposed block ``W[r0:r1, c0:c1]ᵀ``."""
    dense_t = packing.dense_gather_index(dim, transpose=True)  # [c, r]
    return np.ascontiguousarray(dense_t[cols[0]:cols[1], rows[0]:rows[1]])


def stored_block_fraction(dim, blocks):
    """Entries the standard-op head stores per patch, as a fraction of the dense ``D x D``."""
    return sum(end * (end - start) for start, end in block_spans(dim, blocks)) / float(dim * dim)


def mahalanobis_standard_ops(builder, embedding_flat, mean, whitening_packed, precision, blocks=None):
    """Standard-op Mahalanobis. embedding_flat ``[N, D, P]`` -> distance name ``[N, P]``.

    mean ``[P, D]`` float32 (numpy), whitening_packed ``[P, T]`` float32 (numpy, or rows: see
    ``edgead.exporters.streaming``). ``W`` is lower triangular, so row block ``i`` (rows ``r0:r1``) of
    ``y = W c`` needs only the prefix ``c[:r1]``: one MatMul ``c[:r1] @ W[r0:r1, :r1]ᵀ`` per row block, and
    ``d² = Σ_i ||y_i||²``. Each block is stored as the MatMul reads it, ``[P, r1, r1 - r0]`` (gathered from
    the packed rows while streaming, ``streaming.GatheredRows``): ``stored_block_fraction`` of dense per
    patch (67 % for 3 blocks), so the memory-bound MatMuls read that much less and a session holds exactly
    one fp32 copy. blocks: None = ``default_blocks(D)``. Also used to replace the plugin node when checking
    the plugin flavour on CPU without ``libedgead_ort.so``.
    """
    num_patches, dim = mean.shape
    blocks = default_blocks(dim) if blocks is None else blocks
    store_dtype = np.float16 if precision == "fp16" else np.float32
    packed_rows = streaming.as_rows(whitening_packed)
    by_patch = builder.node("Transpose", [embedding_flat], "embedding_by_patch", perm=[2, 0, 1])  # [P, N, D]
    mean_name = builder.const("mean", mean.astype(np.float32).reshape(num_patches, 1, dim))
    centred = builder.node("Sub", [by_patch, mean_name], "centred")
    partial = []
    for i, (row_start, row_end) in enumerate(block_spans(dim, blocks)):
        # row block i of y = W c needs only c[:row_end] (W is lower triangular): one [P, row_end, rows] MatMul
        index = block_gather_index(dim, (row_start, row_end), (0, row_end))
        weights_t = builder.rows_const("w%d_t" % i, streaming.GatheredRows(packed_rows, index), store_dtype,
                                       dims=(num_patches,) + index.shape)  # fp16: converted per chunk
        if precision == "fp16":
            weights_t = builder.node("Cast", [weights_t], "w%d_t_f32" % i, to=TensorProto.FLOAT)  # folded at load
        if row_end == dim:
            prefix = centred
        else:
            prefix = builder.node("Slice", [centred, builder.const("start%d" % i, np.array([0], np.int64)),
                                            builder.const("end%d" % i, np.array([row_end], np.int64)),
                                            builder.const("axis%d" % i, np.array([2], np.int64))], "centred_prefix%d" % i)
        row_block = builder.node("MatMul", [prefix, weights_t], "y%d" % i)  # [P, N, rows]
        partial.append(builder.node("ReduceSumSquare", [row_block], "y%d_squared" % i, axes=[2], keepdims=0))
    squared = partial[0] if len(partial) == 1 else builder.node("Sum", partial, "squared_distance")  # [P, N]
    distance = builder.node("Sqrt", [squared], "distance_by_patch")
    return builder.node("Transpose", [distance], "distance", perm=[1, 0])  # [N, P]


#: ``whitening_dtype`` attribute of the plugin node: the ONNX TensorProto type the statistics are stored in.
WHITENING_DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}


def check_plugin_dim(dim):
    """ExportError when ``dim`` exceeds what the native kernels take (``MAX_DIM``, shared memory of the GPU kernel)."""
    if not 1 <= int(dim) <= MAX_DIM:
        raise ExportError("embedding dimension D={} is outside 1..{} that the PadimMahalanobis plugin and kernels "
                          "support; export with --mahalanobis onnx or fit with a smaller --dim".format(dim, MAX_DIM))


def mahalanobis_plugin(builder, embedding_flat, mean, whitening_packed, precision):
    """One ``edgead::PadimMahalanobis`` node. Same inputs/outputs as ``mahalanobis_standard_ops``.

    Attributes: ``dim`` (D), ``num_patches`` (P) and ``whitening_dtype`` (ONNX type of the stored
    ``whitening_packed``: 1 = float32, 10 = float16): the TensorRT plugin takes the statistics only in that type,
    so a builder flag can neither round them to fp16 nor widen them to fp32.
    """
    num_patches, dim = mean.shape
    check_plugin_dim(dim)
    store_dtype = np.float16 if precision == "fp16" else np.float32
    mean_name = builder.const("mean", mean.astype(np.float32))
    packed = builder.rows_const("whitening_packed", whitening_packed, store_dtype)
    return builder.node(
        PLUGIN_OP, [embedding_flat, mean_name, packed], "distance", domain=PLUGIN_DOMAIN,
        plugin_version=PLUGIN_VERSION, plugin_namespace="", dim=int(dim), num_patches=int(num_patches),
        whitening_dtype=int(WHITENING_DTYPES[precision]),
    )


def build_head(embedding, config, mean, whitening_packed, mahalanobis="onnx", precision="fp16",
               map_name="anomaly_map", score_name="score", blocks=None):
    """Nodes + initializers from ``embedding`` (name of ``[N, D, h, w]``) to the two graph outputs.

    Returns ``(nodes, initializers)``; the output tensors are named ``map_name`` and ``score_name``.
    whitening_packed: ``[P, T]`` float32, an array or rows (``edgead.exporters.streaming``).
    """
    builder = _GraphBuilder("head/")
    _build_head(builder, embedding, config, mean, whitening_packed, mahalanobis, precision, map_name, score_name,
                blocks)
    return builder.nodes, builder.initializers


def build_head_streamed(embedding, config, mean, whitening_packed, mahalanobis="onnx", precision="fp16",
                        map_name="anomaly_map", score_name="score", blocks=None):
    """As ``build_head``, but the packed whitening initializer is a placeholder without data: returns
    ``(nodes, initializers, sources)`` with ``sources`` = ``{initializer name: streaming.TensorSource}``, for
    ``external_data.write_model(..., sources=sources)`` or ``streaming.materialize``."""
    builder = _GraphBuilder("head/", stream=True)
    _build_head(builder, embedding, config, mean, whitening_packed, mahalanobis, precision, map_name, score_name,
                blocks)
    return builder.nodes, builder.initializers, builder.sources


def _build_head(builder, embedding, config, mean, whitening_packed, mahalanobis, precision, map_name, score_name,
                blocks):
    if mahalanobis not in ("onnx", "plugin"):
        raise ValueError("mahalanobis must be 'onnx' or 'plugin', not {!r}".format(mahalanobis))
    if precision not in ("fp32", "fp16"):
        raise ValueError("precision must be 'fp32' or 'fp16', not {!r}".format(precision))
    grid_h, grid_w = config["embedding"]["grid"]
    height, width = config["input"]["height"], config["input"]["width"]
    dim = mean.shape[1]
    sigma = config["postprocess"]["blur_sigma"]

    flat = builder.node("Reshape", [embedding, builder.const("flat_shape", np.array([0, dim, grid_h * grid_w], np.int64))],
                        "embedding_flat")
    if mahalanobis == "plugin":
        distance = mahalanobis_plugin(builder, flat, mean, whitening_packed, precision)
    else:
        distance = mahalanobis_standard_ops(builder, flat, mean, whitening_packed, precision, blocks)
    grid_map = builder.node("Reshape", [distance, builder.const("grid_shape", np.array([0, 1, grid_h, grid_w], np.int64))],
                            "distance_map")
    # bilinear upsample + separable reflect Gaussian blur, per axis one [H, h] / [w, W] matrix (edgead.blur)
    rows_op = builder.const("upsample_blur_rows", blur.upsample_blur_matrix(height, grid_h, sigma).astype(np.float32))
    cols_op_t = builder.const("upsample_blur_cols_t", blur.upsample_blur_matrix(width, grid_w, sigma).T.astype(np.float32))
    blurred_rows = builder.node("MatMul", [rows_op, grid_map], "blurred_rows")  # [N, 1, H, w]
    builder.nodes.append(helper.make_node("MatMul", [blurred_rows, cols_op_t], [map_name], name="head/blurred"))
    builder.nodes.append(helper.make_node("ReduceMax", [map_name], [score_name], name="head/score",
                                          axes=[1, 2, 3], keepdims=0))
