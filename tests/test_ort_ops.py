"""The ONNX Runtime custom op ``edgead::PadimMahalanobis`` (``cpp_bindings/ort/``, ``libedgead_ort.so``).

Needs the library: ``$EDGEAD_ORT_OPS_LIB`` / ``build/ort/libedgead_ort.so`` (``make test`` builds it first with
``make ort-ops``, which fetches the headers from Debian: onnxruntime's pip wheel ships none), or onnxruntime
headers in ``$EDGEAD_ORT_INCLUDE`` to build it here; skipped without either (``EDGEAD_ORT_OPS=skip make test``).
The kernel itself is tested in ``test_cpu_kernel.py`` without them.
Parity: the plugin flavour run by the op vs the standard-op flavour (same graph otherwise) <= 1e-5 relative,
and vs torch <= 1e-4 relative (fp32 whitening).
"""
import os
import subprocess
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import random_frames
from edgead.errors import ModelFileError
from edgead.exporters import compare, onnx_export
from edgead.runtime import ort_ops
from edgead.runtime.engines.ort_engine import OrtEngine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ops_library(tmp_path_factory):
    include = os.environ.get("EDGEAD_ORT_INCLUDE")
    if include:
        out = tmp_path_factory.mktemp("ort_ops")
        proc = subprocess.run(["make", "-s", "ort-ops", "ORT_INCLUDE=" + include, "ORT_BUILD=" + str(out)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        assert proc.returncode == 0, proc.stdout.decode()[-3000:]
        return str(out / ort_ops.LIBRARY_NAME)
    found = ort_ops.find_ort_ops_library()
    if found is None or not os.path.exists(found):
        pytest.skip("no libedgead_ort.so and no EDGEAD_ORT_INCLUDE to build it (onnxruntime headers)")
    return found


@pytest.fixture(scope="module")
def frames():
    f = random_frames(3, seed=5)
    f[2, 20:40, 8:30] = (20, 240, 20)
    return f


def _write(model, path):
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("batch", [1, 3, "dynamic"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_plugin_flavour_runs_on_ort_cpu(tiny_bundle, frames, ops_library, tmp_path, batch, precision):
    plugin = _write(onnx_export.build_onnx(tiny_bundle, "plugin", precision, batch), tmp_path / "plugin.onnx")
    standard = _write(onnx_export.build_onnx(tiny_bundle, "onnx", precision, batch), tmp_path / "onnx.onnx")
    with OrtEngine(plugin, threads=2, ort_ops=ops_library) as engine:
        assert engine.info()["custom_ops"] == ops_library
        maps, scores = engine.infer(frames)
    with OrtEngine(standard, threads=2) as engine:
        ref_maps, ref_scores = engine.infer(frames)
    assert np.abs(maps - ref_maps).max() <= 1e-5 * np.abs(ref_maps).max()
    assert np.abs(scores - ref_scores).max() <= 1e-5 * np.abs(ref_scores).max()
    torch_maps, torch_scores = compare.torch_outputs(tiny_bundle, frames, precision)
    assert np.abs(maps - torch_maps).max() <= 1e-4 * np.abs(torch_maps).max()
    assert np.abs(scores - torch_scores).max() <= 1e-4 * np.abs(torch_scores).max()


def test_engine_registers_the_library_by_itself(tiny_bundle, frames, ops_library, tmp_path, monkeypatch):
    """No ort_ops argument: the engine finds libedgead_ort.so (build/ort/ after `make ort-ops`), registers it and
    runs a plugin-flavour model."""
    if ort_ops.find_ort_ops_library() != ops_library:  # built into a temporary folder from $EDGEAD_ORT_INCLUDE
        monkeypatch.setenv(ort_ops.ENV_VAR, ops_library)
    plugin = _write(onnx_export.build_onnx(tiny_bundle, "plugin", "fp16", 1), tmp_path / "plugin.onnx")
    with OrtEngine(plugin, threads=2) as engine:
        assert engine.info()["custom_ops"] == ops_library
        maps, scores = engine.infer(frames)
    assert maps.shape[0] == scores.shape[0] == len(frames)
    assert np.isfinite(maps).all() and np.isfinite(scores).all()


def test_header_fetch_failure_is_one_line(tmp_path):
    """scripts/fetch_ort_headers.sh with an unreachable Debian mirror: exit 1, one stderr line naming what failed
    and the manual alternative, nothing on stdout (so `make ort-ops` cannot pick up a folder)."""
    env = dict(os.environ, EDGEAD_ORT_HEADERS_DIR=str(tmp_path / "cache"),
               EDGEAD_DEBIAN_MIRROR="http://127.0.0.1:9/debian")  # port 9 (discard): connection refused at once
    start = time.monotonic()
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "fetch_ort_headers.sh")], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 1 and proc.stdout == b"", (proc.returncode, proc.stdout, err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fetch_ort_headers: ") and "ORT_INCLUDE=" in err
    if "not found" not in err and "keyring" not in err:  # apt-get/dpkg-deb/keyring present: the fetch itself failed
        assert "apt-get update from http://127.0.0.1:9/debian trixie failed" in err
    assert not (tmp_path / "cache" / "root").exists()
    assert time.monotonic() - start < 30


def _node_graph(mean_shape, dim=4, patches=6, w_dtype=np.float16, whitening_dtype="match"):
    """One PadimMahalanobis node; ``whitening_dtype``: "match" (the stored type's code), None (no attribute,
    as exports before it existed) or an int code."""
    tri = dim * (dim + 1) // 2
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(mean_shape).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.standard_normal((patches, tri)).astype(w_dtype), "w")]
    attrs = {}
    if whitening_dtype == "match":
        attrs["whitening_dtype"] = TensorProto.FLOAT16 if w_dtype == np.float16 else TensorProto.FLOAT
    elif whitening_dtype is not None:
        attrs["whitening_dtype"] = whitening_dtype
    node = helper.make_node("PadimMahalanobis", ["x", "mean", "w"], ["d"], domain="edgead", dim=dim,
                            num_patches=patches, plugin_version="1", plugin_namespace="", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "D", "P"])],
                              [helper.make_tensor_value_info("d", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgead", 1)])


def _op_session(model, library):
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_node_semantics_match_float64(ops_library):
    model = _node_graph((6, 4), w_dtype=np.float32)
    x = np.random.default_rng(1).standard_normal((2, 4, 6)).astype(np.float32)
    got = _op_session(model, ops_library).run(None, {"x": x})[0]
    mean = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    packed = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)
    rows, cols = np.tril_indices(4)
    expected = np.zeros((2, 6))
    for p in range(6):
        w = np.zeros((4, 4))
        w[rows, cols] = packed[p]
        expected[:, p] = np.linalg.norm((x[:, :, p].astype(np.float64) - mean[p]) @ w.T, axis=1)
    np.testing.assert_allclose(got, expected, rtol=2e-6)


def test_shape_mismatch_is_a_clear_error(ops_library):
    session = _op_session(_node_graph((6, 5)), ops_library)  # mean [P, D+1]
    with pytest.raises(Exception, match=r"edgead::PadimMahalanobis: mean must be \[6, 4\], got \[6, 5\]"):
        session.run(None, {"x": np.zeros((1, 4, 6), np.float32)})
    session = _op_session(_node_graph((6, 4)), ops_library)
    with pytest.raises(Exception, match=r"embedding must be \[N, 4, 6\], got \[1, 4, 5\]"):
        session.run(None, {"x": np.zeros((1, 4, 5), np.float32)})


def test_whitening_dtype_attribute_must_match_the_stored_statistics(ops_library):
    x = np.random.default_rng(2).standard_normal((1, 4, 6)).astype(np.float32)
    expected = _op_session(_node_graph((6, 4), w_dtype=np.float32), ops_library).run(None, {"x": x})[0]
    legacy = _op_session(_node_graph((6, 4), w_dtype=np.float32, whitening_dtype=None), ops_library)
    np.testing.assert_array_equal(legacy.run(None, {"x": x})[0], expected)  # no attribute: the tensor decides
    lying = _op_session(_node_graph((6, 4), w_dtype=np.float32, whitening_dtype=TensorProto.FLOAT16), ops_library)
    with pytest.raises(Exception, match="whitening_packed is float32 but the node's whitening_dtype says float16"):
        lying.run(None, {"x": x})
    with pytest.raises(Exception, match=r"whitening_dtype=3 must be 1 \(float32\) or 10 \(float16\)"):
        _op_session(_node_graph((6, 4), whitening_dtype=3), ops_library).run(None, {"x": x})


def test_plugin_model_without_library_names_the_fix(tiny_bundle, tmp_path, monkeypatch):
    """No library: loading a plugin-flavour model fails with one line that says how to get it."""
    monkeypatch.setattr(ort_ops, "find_ort_ops_library", lambda path=None: None)
    path = _write(onnx_export.build_onnx(tiny_bundle, "plugin", "fp16", 1), tmp_path / "plugin.onnx")
    with pytest.raises(ModelFileError, match="make ort-ops") as info:
        OrtEngine(path)
    assert "plugin.onnx" in str(info.value) and "\n" not in str(info.value)
    assert onnx.load(str(path)).graph.node  # the file itself is fine
