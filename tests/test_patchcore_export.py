"""PatchCore export: ONNX parity with the torch model (fp32 and fp16 bank), any batch, the TensorRT op list,
and the chunked nearest-neighbour blocks."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import TINY_HW, random_frames
from edgead.exporters import patchcore_head, trt_ops
from edgead.exporters.onnx_export import build_onnx, read_metadata
from edgead.patchcore.fit import fit_patchcore
from edgead.patchcore.model import PatchcoreHead


TRAIN = random_frames(10, seed=1)


@pytest.fixture(scope="module")
def bundle():
    return fit_patchcore([TRAIN], backbone="resnet18", weights="random", input_hw=TINY_HW, dim=200,
                         coreset_ratio=0.3, folds=0)


def _run(model, frames, per_frame):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    if per_frame:
        outs = [session.run(None, {"image": frames[i:i + 1]}) for i in range(len(frames))]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
    return session.run(None, {"image": frames})


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("batch", [1, 3, "dynamic"])
def test_onnx_matches_torch(bundle, precision, batch):
    """ONNX Runtime vs the torch model with the bank stored as the export stores it: <= 1e-4 relative (the issue's
    bar; measured ~3e-6). fp16 vs the fp32 torch model: the bank's rounding, still within 1e-3."""
    frames = random_frames(3, seed=4)
    frames[1, 10:30, 30:50] = (255, 0, 255)
    model = build_onnx(bundle, "onnx", precision, batch)
    maps, scores = _run(model, frames, per_frame=batch == 1)
    with torch.no_grad():
        ref_maps, ref_scores = bundle.with_storage_precision(precision).model()(torch.from_numpy(frames))
    assert np.abs(maps - ref_maps.numpy()).max() <= 1e-4 * np.abs(ref_maps.numpy()).max()
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-4)
    assert int(np.argmax(scores)) == 1
    with torch.no_grad():
        fp32_maps, _ = bundle.model()(torch.from_numpy(frames))
    assert np.abs(maps - fp32_maps.numpy()).max() <= 1e-3 * np.abs(fp32_maps.numpy()).max()


def test_dynamic_batch_takes_any_batch(bundle):
    model = build_onnx(bundle, "onnx", "fp16", "dynamic")
    frames = random_frames(4, seed=6)
    whole_maps, whole_scores = _run(model, frames, per_frame=False)
    for n in (1, 2, 4):
        maps, scores = _run(model, frames[:n], per_frame=False)
        assert maps.shape == (n, 1) + TINY_HW and scores.shape == (n,)
        np.testing.assert_allclose(scores, whole_scores[:n], rtol=1e-5)


def test_graph_is_inside_the_tensorrt_op_list_with_an_fp16_bank(bundle):
    model = build_onnx(bundle, "onnx", "fp16", 1)
    assert trt_ops.check_graph(model) == []
    banks = [t for t in model.graph.initializer if t.name == "head/memory_bank"]
    assert len(banks) == 1 and banks[0].data_type == onnx.TensorProto.FLOAT16
    assert tuple(banks[0].dims) == tuple(bundle.memory_bank.shape)
    meta = read_metadata(model)
    assert meta["method"] == "patchcore" and meta["patchcore"]["coreset_size"] == bundle.memory_bank.shape[0]


def test_nearest_neighbour_blocks_stay_within_the_chunk_budget(bundle):
    """With a budget of 50 bank entries per 64-patch block, the graph has ceil(M / 50) MatMul + ReduceMin blocks
    whose outputs are [N, P, <= 50], and still equals the torch head run in one block."""
    cfg = bundle.config
    size, dim = bundle.memory_bank.shape
    grid = cfg["embedding"]["grid"]
    chunk_bytes = 4 * grid[0] * grid[1] * 50
    nodes, initializers = patchcore_head.build_head("embedding", cfg, bundle.memory_bank.numpy(), "fp32",
                                                    chunk_bytes=chunk_bytes)
    graph = onnx.helper.make_graph(
        nodes, "head", [onnx.helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, [2, dim] + grid)],
        [onnx.helper.make_tensor_value_info("anomaly_map", onnx.TensorProto.FLOAT, None),
         onnx.helper.make_tensor_value_info("score", onnx.TensorProto.FLOAT, None)], initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    blocks = [n.output[0] for n in nodes if n.op_type == "MatMul" and n.output[0].startswith("head/offsets")]
    assert len(blocks) == -(-size // 50)
    for name in blocks:
        assert shapes[name][:2] == [2, grid[0] * grid[1]] and shapes[name][2] <= 50
    emb = torch.randn(2, dim, *grid, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    maps, scores = session.run(None, {"embedding": emb.numpy()})
    with torch.no_grad():
        ref_maps, ref_scores = PatchcoreHead(bundle.memory_bank, TINY_HW, cfg["postprocess"]["blur_sigma"], grid,
                                             cfg["patchcore"]["neighbors"])(emb)
    np.testing.assert_allclose(maps, ref_maps.numpy(), rtol=0, atol=1e-5 * np.abs(ref_maps.numpy()).max())
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-5)


def test_plugin_flavour_is_refused_in_one_line(bundle):
    from edgead.errors import ExportError

    with pytest.raises(ExportError, match="patchcore") as info:
        build_onnx(bundle, "plugin", "fp16", 1)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_matches_torch_on_the_training_frames(bundle, precision):
    """Patches the bank holds have distance ~0: computed directly (not by the cancelling |x|^2 - 2x.m + |m|^2, which
    turned float32 rounding into 2e-3 relative differences between torch and ONNX Runtime here)."""
    model = build_onnx(bundle, "onnx", precision, "dynamic")
    maps, scores = _run(model, TRAIN, per_frame=False)
    with torch.no_grad():
        ref_maps, ref_scores = bundle.with_storage_precision(precision).model()(torch.from_numpy(TRAIN))
    assert np.abs(maps - ref_maps.numpy()).max() <= 1e-4 * np.abs(ref_maps.numpy()).max()
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-4, atol=1e-4 * np.abs(ref_scores.numpy()).max())


def test_an_fp16_bank_that_would_overflow_is_refused(bundle):
    from edgead.errors import ExportError

    with pytest.raises(ExportError, match="--precision fp32"):
        patchcore_head.build_head("embedding", bundle.config, bundle.memory_bank.numpy() * 1e5, "fp16")


def test_trt_check_flags_a_topk_whose_k_is_not_a_constant_or_too_large(bundle):
    model = build_onnx(bundle, "onnx", "fp16", 1)
    topk = next(n for n in model.graph.node if n.op_type == "TopK")
    k_init = next(t for t in model.graph.initializer if t.name == topk.input[1])
    k_init.CopyFrom(onnx.numpy_helper.from_array(np.array([5000], np.int64), k_init.name))
    assert any("exceeds TensorRT's 3840" in p for p in trt_ops.check_graph(model))
    topk.input[1] = "head/worst_score"  # a computed tensor
    assert any("TopK's K must be an initializer" in p for p in trt_ops.check_graph(model))
