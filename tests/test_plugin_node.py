"""The exported ``edgead::PadimMahalanobis`` node: attributes the TensorRT plugin and the ONNX Runtime op rely on.

``whitening_dtype`` must be the ONNX type of the stored statistics (the plugin accepts input 2 only in that type),
``dim``/``num_patches`` the shapes of the initializers, and D is bounded by the kernels' ``MAX_DIM`` at export time.
"""
import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgead.cli import cli
from edgead.errors import ExportError
from edgead.exporters import onnx_export, onnx_head, plugin_substitute
from edgead.runtime import cuda_kernel


def _plugin_node(model):
    nodes = [n for n in model.graph.node if n.op_type == onnx_head.PLUGIN_OP]
    assert len(nodes) == 1 and nodes[0].domain == "edgead"
    return nodes[0]


@pytest.mark.parametrize("precision,code,dtype", [("fp16", TensorProto.FLOAT16, np.float16),
                                                  ("fp32", TensorProto.FLOAT, np.float32)])
def test_node_records_the_stored_dtype_and_shapes(tiny_bundle, precision, code, dtype):
    model = onnx_export.build_onnx(tiny_bundle, "plugin", precision, "dynamic")
    node = _plugin_node(model)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inits = {t.name: t for t in model.graph.initializer}
    mean, packed = inits[node.input[1]], inits[node.input[2]]
    dim = tiny_bundle.mean.shape[1]
    num_patches = tiny_bundle.mean.shape[0]
    assert attrs == {"plugin_version": b"1", "plugin_namespace": b"", "dim": dim, "num_patches": num_patches,
                     "whitening_dtype": code}
    assert packed.data_type == code and mean.data_type == TensorProto.FLOAT
    assert list(packed.dims) == [num_patches, dim * (dim + 1) // 2] and list(mean.dims) == [num_patches, dim]
    stored = numpy_helper.to_array(packed)
    assert stored.dtype == dtype
    np.testing.assert_array_equal(stored, tiny_bundle.whitening_packed.numpy().astype(dtype))


def test_substituted_standard_ops_ignore_the_attribute(tiny_bundle):
    model = plugin_substitute.substitute_plugin(onnx_export.build_onnx(tiny_bundle, "plugin", "fp16", 1))
    assert not plugin_substitute.has_plugin(model)


def test_dim_bound_is_checked_at_export(tiny_bundle, monkeypatch):
    onnx_head.check_plugin_dim(cuda_kernel.MAX_DIM)
    with pytest.raises(ExportError, match="D=12281 is outside 1..12280"):
        onnx_head.check_plugin_dim(cuda_kernel.MAX_DIM + 1)
    monkeypatch.setattr(onnx_head, "MAX_DIM", 16)  # the tiny bundle has D = 24
    with pytest.raises(ExportError, match="D=24 is outside 1..16.*--mahalanobis onnx"):
        onnx_export.build_onnx(tiny_bundle, "plugin", "fp16", 1)
    assert onnx_export.build_onnx(tiny_bundle, "onnx", "fp16", 1).graph.node  # standard ops have no such bound


def test_cli_export_refuses_too_large_dim_in_one_line(tiny_bundle, tmp_path, monkeypatch):
    bundle_dir = str(tmp_path / "m.edgead")
    tiny_bundle.save(bundle_dir)
    monkeypatch.setattr(onnx_head, "MAX_DIM", 16)
    out = tmp_path / "m.onnx"
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    result = runner.invoke(cli, ["export", bundle_dir, "-o", str(out), "--mahalanobis", "plugin"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgead: error:") and "D=24" in lines[0], result.stderr
    assert not out.exists()
