"""CFLOW-AD behind the method seam: one conditional normalizing flow per backbone scale, trained by maximum
likelihood on the good images' patch features; anomaly = how unlikely each patch is.

Fit: ``edgead.cflow.fit.CflowFitter``; bundle: ``edgead.cflow.bundle.CflowBundle``; torch scoring model:
``edgead.model.DetectorModel`` with ``edgead.cflow.model.CflowHead``; ONNX head: ``edgead.exporters.cflow_head``
(standard ops only). Imports nothing heavy at module level.
"""
from edgead.methods import register_method
from edgead.methods.base import Method


@register_method
class CflowMethod(Method):
    """CFLOW-AD (Gudovskiy et al., WACV 2022)."""

    name = "cflow"
    title = "CFLOW-AD"
    fit_options = {
        "epochs": "Most training epochs (default 16); training stops earlier when the held-out fold's loss stops "
                  "improving.",
        "fiber_batch": "Patch rows per Adam step (default 256).",
        "coupling_blocks": "Coupling blocks per flow (default 8, the paper's).",
        "learning_rate": "Adam learning rate (default 1e-3; the paper's code: 2e-4 over many more epochs).",
    }
    export_flavours = ("onnx",)
    default_folds = 5
    lazy_tensors = ()

    def parse_fit_options(self, options):
        """``--epochs`` / ``--fiber-batch`` / ``--coupling-blocks`` / ``--learning-rate`` strings -> values."""
        from edgead.cflow import fit

        parsers = {"epochs": fit.parse_epochs, "fiber_batch": fit.parse_fiber_batch,
                   "coupling_blocks": fit.parse_coupling_blocks, "learning_rate": fit.parse_learning_rate}
        return {key: parsers[key](value) for key, value in options.items()}

    def make_fitter(self, backbone, weights, input_hw, dim, seed, batch_size, max_memory, **options):
        from edgead.cflow.fit import CflowFitter

        return CflowFitter(backbone, weights, input_hw, dim, seed, batch_size, max_memory, **options)

    def assemble(self, folder, config, tensors, weights_path):
        from edgead.cflow.bundle import assemble

        return assemble(folder, config, tensors, weights_path)

    def build_onnx_head(self, bundle, embedding, flavour, precision, map_name, score_name, **options):
        from edgead.exporters import cflow_head

        nodes, initializers = cflow_head.build_head(embedding, bundle.config, bundle.scale_blocks, precision,
                                                    map_name, score_name)
        return nodes, initializers, {}
