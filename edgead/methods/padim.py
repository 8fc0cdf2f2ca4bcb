"""PaDiM behind the method seam: per-patch Gaussians of a random channel subset, Mahalanobis distance.

Fit: ``edgead.fit.PadimFitter`` (streamed float64 sums, leave-one-out thresholds); bundle:
``edgead.bundle.PadimBundle`` (``padim.mean [P, D]``, ``padim.whitening_packed [P, T]``); torch scoring model:
``edgead.model.PadimModel``; ONNX head: ``edgead.exporters.onnx_head`` (flavours ``onnx`` and ``plugin``).
Imports nothing heavy at module level (see ``edgead.methods.base``).
"""
import os

from edgead.methods import register_method
from edgead.methods.base import Method

MEAN_KEY = "padim.mean"
WHITENING_KEY = "padim.whitening_packed"


@register_method
class PadimMethod(Method):
    """PaDiM (Defard et al., 2020)."""

    name = "padim"
    title = "PaDiM"
    fit_options = {}
    export_flavours = ("onnx", "plugin")
    default_folds = "n"
    lazy_tensors = (WHITENING_KEY,)

    def make_fitter(self, backbone, weights, input_hw, dim, seed, batch_size, max_memory, **options):
        from edgead.fit import PadimFitter

        return PadimFitter(backbone, weights, input_hw, dim, seed, batch_size, max_memory)

    def assemble(self, folder, config, tensors, weights_path):
        """The statistics' presence, shapes (model.json's grid and D) and finiteness, then the shared backbone
        checks; a ``PadimBundle``."""
        import torch

        from edgead import packing
        from edgead.bundle import PadimBundle, all_finite, check_backbone
        from edgead.errors import BundleError

        for key in (MEAN_KEY, WHITENING_KEY):
            if key not in tensors:
                raise BundleError("{}: tensor {} missing".format(weights_path, key))
        grid_h, grid_w = config["embedding"]["grid"]
        num_patches, dim = grid_h * grid_w, len(config["embedding"]["channel_indices"])
        mean, whitening = tensors[MEAN_KEY], tensors[WHITENING_KEY]
        if tuple(mean.shape) != (num_patches, dim):
            raise BundleError("{}: padim.mean has shape {}, model.json implies {}".format(
                weights_path, tuple(mean.shape), (num_patches, dim)))
        if tuple(whitening.shape) != (num_patches, packing.packed_length(dim)):
            raise BundleError("{}: padim.whitening_packed has shape {}, model.json implies {}".format(
                weights_path, tuple(whitening.shape), (num_patches, packing.packed_length(dim))))
        if not (torch.isfinite(mean).all() and all_finite(whitening)):
            raise BundleError("{}: statistics contain NaN or Inf".format(weights_path))
        backbone_state = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
        bundle = PadimBundle(config, backbone_state, mean, whitening, path=os.fspath(folder))
        check_backbone(bundle, folder, weights_path)
        return bundle

    def build_onnx_head(self, bundle, embedding, flavour, precision, map_name, score_name, blocks=None, **options):
        """The Mahalanobis head of ``exporters.onnx_head`` (standard ops or the ``PadimMahalanobis`` plugin node),
        its packed whitening streamed from the bundle (``PadimBundle.iter_whitening_rows``)."""
        from edgead.exporters import onnx_head, streaming

        whitening = streaming.FunctionRows(bundle.whitening_shape, bundle.iter_whitening_rows)
        return onnx_head.build_head_streamed(embedding, bundle.config, bundle.mean.numpy(), whitening, flavour,
                                             precision, map_name, score_name, blocks)
