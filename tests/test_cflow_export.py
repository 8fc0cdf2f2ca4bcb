"""CFLOW's exported graph: parity with the torch model on ONNX Runtime (fp32 <= 1e-4 relative; fp16 storage against
the torch model with the same rounding), the fp16 accuracy loss against fp32, TensorRT op list, any batch, and the
runtime reading it unchanged."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import TINY_HW, random_frames
from edgead.cflow.fit import fit_cflow
from edgead.exporters import trt_ops
from edgead.exporters.onnx_export import build_onnx, export_onnx, graph_op_types, read_metadata


@pytest.fixture(scope="module")
def bundle():
    frames = random_frames(16, seed=7)
    bundle = fit_cflow([frames[:8], frames[8:]], backbone="resnet18", weights="random", input_hw=TINY_HW, folds=4,
                       quantile=0.9, epochs=2, fiber_batch=64, coupling_blocks=2)
    # references at each scale's median likelihood of the test frames, so the maps are not saturated
    with torch.no_grad():
        flat = bundle.frame_embedding()(torch.from_numpy(random_frames(4, seed=8)))
        likelihoods = bundle.head().log_likelihoods(flat)
    bundle.config["cflow"]["reference_log_likelihood"] = [float(torch.median(v)) for v in likelihoods]
    return bundle


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _relative(got, expected):
    return float(np.abs(got - expected).max() / max(1e-12, float(np.abs(expected).max())))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_matches_the_torch_model(bundle, precision):
    """ONNX Runtime vs torch with the same storage rounding: max |error| / max |map| <= 1e-4, same for scores."""
    frames = random_frames(3, seed=9)
    outputs = _session(build_onnx(bundle, precision=precision, batch=3)).run(None, {"image": frames})
    with torch.no_grad():
        amap, score = bundle.with_storage_precision(precision).model()(torch.from_numpy(frames))
    spread = float(amap.max() - amap.min())
    assert spread > 0.5  # the maps are not flat: the comparison sees every part of the head
    assert _relative(outputs[0], amap.numpy()) <= 1e-4 and _relative(outputs[1], score.numpy()) <= 1e-4


def test_fp16_storage_costs_little_accuracy(bundle):
    """fp16 storage of the subnet matrices vs the fp32 model: map and score within 5e-3 (the map spans [0, 3]; measured:
    ~1e-3), on frames the flows never saw."""
    frames = random_frames(4, seed=10)
    fp16 = _session(build_onnx(bundle, precision="fp16", batch=4)).run(None, {"image": frames})
    with torch.no_grad():
        amap, score = bundle.model()(torch.from_numpy(frames))
    assert np.abs(fp16[0] - amap.numpy()).max() <= 5e-3 and np.abs(fp16[1] - score.numpy()).max() <= 5e-3


def test_graph_is_standard_ops_in_the_tensorrt_list_and_fp16_is_smaller(bundle):
    fp32, fp16 = build_onnx(bundle, precision="fp32"), build_onnx(bundle, precision="fp16")
    assert trt_ops.check_graph(fp32) == [] and trt_ops.check_graph(fp16) == []
    ops = {op for _, op in graph_op_types(fp16)}
    assert {"Tanh", "Exp", "Gather", "ReduceSumSquare"} <= ops and all(domain == "" for domain, _ in
                                                                       graph_op_types(fp16))
    def head_bytes(model):
        return sum(len(t.raw_data) for t in model.graph.initializer if t.name.startswith("head/"))

    assert head_bytes(fp16) < 0.6 * head_bytes(fp32)  # the subnet matrices are most of the head
    meta = read_metadata(fp16)
    assert meta["method"] == "cflow" and meta["cflow"]["coupling_blocks"] == 2
    assert meta["calibration_provenance"]["method"] == "cflow-held-out-fold"


def test_dynamic_batch_scores_each_frame_as_alone(bundle):
    frames = random_frames(3, seed=11)
    session = _session(build_onnx(bundle, precision="fp32", batch="dynamic"))
    together = session.run(None, {"image": frames})
    for i in range(3):
        alone = session.run(None, {"image": frames[i:i + 1]})
        np.testing.assert_allclose(alone[0][0], together[0][i], rtol=0, atol=1e-5)
        np.testing.assert_allclose(alone[1][0], together[1][i], rtol=0, atol=1e-5)


def test_the_position_terms_are_folded_at_load_not_stored(bundle):
    """The file holds [H, K] condition weights and one [K, P] encoding per scale; ONNX Runtime folds q at load."""
    model = build_onnx(bundle, precision="fp32")
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    assert shapes["head/scale0_encoding"] == (128, 64) and shapes["head/scale0_block0_condition_weight"] == (384, 128)
    assert not any(name.endswith("position_bias") for name in shapes)


def test_runtime_reads_a_cflow_export(bundle, tmp_path):
    from edgead.runtime import modelinfo

    path = str(tmp_path / "m.onnx")
    export_onnx(bundle, path, precision="fp16", batch=1)
    info = modelinfo.load_model_info(path)  # the torch-free reader edgead run uses
    assert info["method"] == "cflow" and modelinfo.input_hw(info) == TINY_HW
    text = modelinfo.describe_thresholds(info)
    assert "held-out normal images" in text and "flows were not trained on" in text
