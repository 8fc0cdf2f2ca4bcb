"""PatchCore behind the method seam: a coreset memory bank of locally aware patch features, nearest-neighbour
distance, the paper's score reweighting.

Fit: ``edgead.patchcore.fit.PatchcoreFitter``; bundle: ``edgead.patchcore.bundle.PatchcoreBundle``
(``patchcore.memory_bank [M, D]``); torch scoring model: ``edgead.model.DetectorModel`` with ``edgead.patchcore.model.PatchcoreHead``; ONNX head:
``edgead.exporters.patchcore_head`` (standard ops only). Imports nothing heavy at module level.
"""
from edgead.methods import register_method
from edgead.methods.base import Method


@register_method
class PatchcoreMethod(Method):
    """PatchCore (Roth et al., CVPR 2022)."""

    name = "patchcore"
    title = "PatchCore"
    fit_options = {
        "coreset_ratio": "Fraction of the training patches kept in the memory bank: a number in (0, 1] "
                         "or auto (default: 10%, at most 50000 entries unless that is below 1%).",
        "neighbors": "b of the image-score reweighting (default 9, the paper's; 1: the largest patch "
                     "distance).",
    }
    export_flavours = ("onnx",)
    default_folds = 5
    lazy_tensors = ()

    def parse_fit_options(self, options):
        """``--coreset-ratio`` / ``--neighbors`` strings -> values (one-line ConfigError), before any work."""
        from edgead.patchcore.fit import parse_coreset_ratio, parse_neighbors

        parsers = {"coreset_ratio": parse_coreset_ratio, "neighbors": parse_neighbors}
        return {key: parsers[key](value) for key, value in options.items()}

    def make_fitter(self, backbone, weights, input_hw, dim, seed, batch_size, max_memory, **options):
        from edgead.patchcore.fit import PatchcoreFitter

        return PatchcoreFitter(backbone, weights, input_hw, dim, seed, batch_size, max_memory, **options)

    def assemble(self, folder, config, tensors, weights_path):
        from edgead.patchcore.bundle import assemble

        return assemble(folder, config, tensors, weights_path)

    def build_onnx_head(self, bundle, embedding, flavour, precision, map_name, score_name, **options):
        from edgead.exporters import patchcore_head

        nodes, initializers = patchcore_head.build_head(embedding, bundle.config, bundle.memory_bank.numpy(),
                                                        precision, map_name, score_name)
        return nodes, initializers, {}
