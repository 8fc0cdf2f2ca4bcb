"""ONNX export: checker, TensorRT op list, metadata, and parity with the torch model on ONNX Runtime.

Reference: the bundle's torch PadimModel (itself tested against float64 numpy in test_padim.py).
Tolerances: fp32 export <= 1e-4 relative to the map range (the issue's bar); fp16 whitening storage
vs a torch model holding the same fp16-rounded statistics <= 1e-4; vs full fp32 statistics <= 2e-2.
"""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgead.exporters import compare as cmp
from edgead.exporters import onnx_export, plugin_substitute, trt_ops
from edgead.exporters.onnx_head import PLUGIN_OP

from conftest import random_frames


def _session(model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def frames():
    f = random_frames(3, seed=21)
    f[1, 10:25, 30:50] = (250, 20, 20)
    return f


@pytest.mark.parametrize("batch", [1, 3, "dynamic"])
def test_fp32_export_matches_torch(tiny_bundle, frames, batch):
    model = onnx_export.build_onnx(tiny_bundle, "onnx", "fp32", batch)
    ref_maps, ref_scores = cmp.torch_outputs(tiny_bundle, frames)
    session = _session(model)
    if batch == 1:
        outs = [session.run(None, {"image": frames[i:i + 1]}) for i in range(3)]
        maps, scores = np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
    else:
        maps, scores = session.run(None, {"image": frames})
    assert maps.shape == (3, 1, 64, 64) and scores.shape == (3,) and maps.dtype == np.float32
    assert _rel(maps, ref_maps) <= 1e-4
    assert _rel(scores, ref_scores) <= 1e-4


def test_dynamic_batch_accepts_any_n(tiny_bundle, frames):
    session = _session(onnx_export.build_onnx(tiny_bundle, "onnx", "fp32", "dynamic"))
    assert session.run(None, {"image": frames[:2]})[0].shape[0] == 2
    assert session.get_inputs()[0].type == "tensor(uint8)"


def test_fp16_storage_matches_fp16_rounded_torch(tiny_bundle, frames):
    model = onnx_export.build_onnx(tiny_bundle, "onnx", "fp16", 3)
    maps, scores = _session(model).run(None, {"image": frames})
    ref16 = cmp.torch_outputs(tiny_bundle, frames, "fp16")
    ref32 = cmp.torch_outputs(tiny_bundle, frames)
    assert _rel(maps, ref16[0]) <= 1e-4
    assert _rel(maps, ref32[0]) <= 2e-2
    fp32_size = onnx_export.initializer_bytes(onnx_export.build_onnx(tiny_bundle, "onnx", "fp32", 3))
    assert onnx_export.initializer_bytes(model) < fp32_size


def test_graph_passes_full_checker_and_tensorrt_op_list(tiny_bundle):
    for flavour in ("onnx", "plugin"):
        model = onnx_export.build_onnx(tiny_bundle, flavour, "fp16", 1)
        onnx.checker.check_model(model, full_check=True)
        assert trt_ops.check_graph(model) == []
        assert model.opset_import[0].version == 17


def test_op_list_check_catches_unsupported_ops(tiny_bundle):
    model = onnx_export.build_onnx(tiny_bundle, "onnx", "fp32", 1)
    model.graph.node[-1].op_type = "NonZero"
    assert any("NonZero" in p for p in trt_ops.check_graph(model))


def test_metadata_carries_model_json_and_export_settings(tiny_bundle):
    model = onnx_export.build_onnx(tiny_bundle, "plugin", "fp16", "dynamic")
    meta = json.loads({p.key: p.value for p in model.metadata_props}["edgead"])
    assert meta["embedding"]["channel_indices"] == tiny_bundle.config["embedding"]["channel_indices"]
    assert meta["export"] == {"mahalanobis": "plugin", "precision": "fp16", "batch": "dynamic", "opset": 17,
                              "input_dtype": "uint8"}


def test_plugin_node_contract(tiny_bundle):
    model = onnx_export.build_onnx(tiny_bundle, "plugin", "fp16", 1)
    nodes = [n for n in model.graph.node if n.op_type == PLUGIN_OP]
    assert len(nodes) == 1 and nodes[0].domain == "edgead"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["plugin_version"] == b"1" and attrs["dim"] == 24 and attrs["num_patches"] == 256
    inits = {t.name: t for t in model.graph.initializer}
    mean, packed = inits[nodes[0].input[1]], inits[nodes[0].input[2]]
    assert list(mean.dims) == [256, 24] and mean.data_type == onnx.TensorProto.FLOAT
    assert list(packed.dims) == [256, 300] and packed.data_type == onnx.TensorProto.FLOAT16
    # the dense whitening is not in the plugin graph: only the packed triangle travels
    assert onnx_export.initializer_bytes(model) < onnx_export.initializer_bytes(
        onnx_export.build_onnx(tiny_bundle, "onnx", "fp16", 1)) + 1


def test_plugin_flavour_on_cpu_via_substitution(tiny_bundle, frames):
    """The plugin graph, with its node swapped for standard ops, equals the onnx flavour and torch."""
    plugin_model = onnx_export.build_onnx(tiny_bundle, "plugin", "fp32", 3)
    with pytest.raises(Exception, match="PadimMahalanobis"):
        _session(plugin_model)  # ONNX Runtime has no PadimMahalanobis kernel
    substituted = plugin_substitute.substitute_plugin(plugin_model)
    assert not plugin_substitute.has_plugin(substituted)
    onnx.checker.check_model(substituted, full_check=True)
    maps, scores = _session(substituted).run(None, {"image": frames})
    onnx_maps, _ = _session(onnx_export.build_onnx(tiny_bundle, "onnx", "fp32", 3)).run(None, {"image": frames})
    assert np.array_equal(maps, onnx_maps)
    assert _rel(maps, cmp.torch_outputs(tiny_bundle, frames)[0]) <= 1e-4


def test_plugin_semantics_numpy(tiny_bundle, frames):
    """What the plugin node must compute, in float64 numpy from its own inputs, equals the graph's distance."""
    from edgead import packing

    model = onnx_export.build_onnx(tiny_bundle, "plugin", "fp32", 3)
    node = next(n for n in model.graph.node if n.op_type == PLUGIN_OP)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    with torch.no_grad():
        emb = tiny_bundle.frame_embedding()(torch.from_numpy(frames)).flatten(2).double().numpy()  # [N, D, P]
    dense = packing.unpack_lower(inits[node.input[2]].astype(np.float64))  # [P, D, D]
    centred = emb.transpose(2, 0, 1) - inits[node.input[1]][:, None, :]
    expected = np.sqrt((np.einsum("pnd,ped->pne", centred, dense) ** 2).sum(-1)).T  # [N, P]
    substituted = plugin_substitute.substitute_plugin(model)
    substituted.graph.output.append(onnx.helper.make_tensor_value_info("head/distance", onnx.TensorProto.FLOAT, None))
    distance = _session(substituted).run(["head/distance"], {"image": frames})[0]
    np.testing.assert_allclose(distance, expected, rtol=1e-4)


def test_float32_input_variant_for_tensorrt_85(tiny_bundle, frames):
    model = onnx_export.build_onnx(tiny_bundle, "onnx", "fp32", 3, input_dtype="float32")
    session = _session(model)
    assert session.get_inputs()[0].type == "tensor(float)"
    maps, _ = session.run(None, {"image": frames.astype(np.float32)})
    assert _rel(maps, cmp.torch_outputs(tiny_bundle, frames)[0]) <= 1e-4


def test_export_writes_atomically(tiny_bundle, tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    onnx_export.export_onnx(tiny_bundle, out, "onnx", "fp16", 1)
    before = out.read_bytes()
    # the build both build_onnx and export_onnx (streaming) go through
    monkeypatch.setattr(onnx_export, "build_onnx_streamed", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        onnx_export.export_onnx(tiny_bundle, out, "onnx", "fp32", 1)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize("blocks", [1, 3, 24])
def test_row_block_count_does_not_change_the_result(tiny_bundle, frames, blocks):
    ref = _session(onnx_export.build_onnx(tiny_bundle, "onnx", "fp32", 3, blocks=2)).run(None, {"image": frames})[0]
    out = _session(onnx_export.build_onnx(tiny_bundle, "onnx", "fp32", 3, blocks=blocks)).run(None, {"image": frames})[0]
    assert _rel(out, ref) <= 1e-5
