"""Swap the ``edgead::PadimMahalanobis`` plugin node for its standard-op equivalent.

Lets a plugin-flavour .onnx run where the TensorRT plugin is not available (ONNX Runtime on a CPU),
and lets tests check the plugin graph on CPU. Torch-free (numpy + onnx).
"""
import onnx
from onnx import helper, numpy_helper

from edgead.exporters import onnx_head


def has_plugin(model):
    """True when ``model`` contains a PadimMahalanobis node."""
    return any(n.op_type == onnx_head.PLUGIN_OP and n.domain == onnx_head.PLUGIN_DOMAIN for n in model.graph.node)


def substitute_plugin(model):
    """Return a copy of ``model`` whose plugin node is replaced by standard ops computing the same distance."""
    copied = onnx.ModelProto()
    copied.CopyFrom(model)  # not FromString(SerializeToString()): that fails for models over 2 GiB
    model = copied
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    new_nodes = []
    used = set()
    for node in graph.node:
        if node.op_type != onnx_head.PLUGIN_OP or node.domain != onnx_head.PLUGIN_DOMAIN:
            new_nodes.append(node)
            continue
        embedding, mean_name, packed_name = node.input
        mean = numpy_helper.to_array(initializers[mean_name])
        packed = numpy_helper.to_array(initializers[packed_name])
        precision = "fp16" if packed.dtype.name == "float16" else "fp32"
        builder = onnx_head._GraphBuilder(node.name + "/standard/")
        distance = onnx_head.mahalanobis_standard_ops(builder, embedding, mean, packed.astype("float32"), precision)
        new_nodes.extend(builder.nodes)
        new_nodes.append(helper.make_node("Identity", [distance], [node.output[0]], name=node.name + "/out"))
        graph.initializer.extend(builder.initializers)
        used.update([mean_name, packed_name])
    del graph.node[:]
    graph.node.extend(new_nodes)
    still_used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name not in used or t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    kept_opsets = [o for o in model.opset_import if o.domain != onnx_head.PLUGIN_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept_opsets)
    return model
