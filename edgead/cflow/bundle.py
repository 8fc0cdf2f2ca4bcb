"""The CFLOW bundle: the truncated backbone and each scale's decoder, ``cflow.scale{l}.block{b}.<name>`` (float32,
the permutation int64; ``edgead.cflow.flow.BLOCK_TENSORS``), the architecture in model.json ``cflow``."""
import os

import numpy as np
import torch

from edgead.bundle import Bundle, check_backbone, check_precision
from edgead.cflow import flow
from edgead.errors import BundleError

def tensor_key(scale, block, name):
    return "cflow.scale{}.block{}.{}".format(scale, block, name)


class CflowBundle(Bundle):
    """A fitted CFLOW detector. scale_blocks: per scale, per block, ``{name: numpy array}`` (``BLOCK_TENSORS``)."""

    def __init__(self, config, backbone_state, scale_blocks, path=None, storage_precision="fp32"):
        super().__init__(config, backbone_state, path)
        self.scale_blocks = scale_blocks
        #: ``fp16``: the head's matrices rounded as an fp16 export stores them (``with_storage_precision``)
        self.storage_precision = check_precision(storage_precision)

    def __repr__(self):
        return "CflowBundle({!r}, backbone {}, {} scales x {} blocks)".format(
            self.path, (self.config.get("backbone") or {}).get("name"), len(self.scale_blocks),
            len(self.scale_blocks[0]) if self.scale_blocks else 0)

    def tensors_to_save(self):
        return {tensor_key(s, b, name): torch.from_numpy(np.ascontiguousarray(value))
                for s, blocks in enumerate(self.scale_blocks) for b, block in enumerate(blocks)
                for name, value in block.items()}

    def frame_embedding(self, prune_deepest=False):
        """uint8 frames -> flat multi-scale patch rows ``[N, T]`` (``prune_deepest`` is ignored)."""
        from edgead.cflow.fit import frame_embedding

        return frame_embedding(self.config, self.feature_extractor())

    def head(self):
        """The ``CflowHead`` of this bundle's decoders."""
        from edgead.cflow.fit import make_head

        return make_head(self.config, self.scale_blocks, precision=self.storage_precision)

    def model(self):
        from edgead.model import DetectorModel

        return DetectorModel(self.frame_embedding(), self.head()).eval()

    def with_storage_precision(self, precision):
        """This bundle with its head's matrices rounded as an export of ``precision`` stores them
        (``flow.with_storage_precision``: fp16 rounds the compiled subnet matrices, not the stored tensors)."""
        if check_precision(precision) == self.storage_precision:
            return self
        return CflowBundle(self.config, self.backbone_state, self.scale_blocks, self.path, precision)


def assemble(folder, config, tensors, weights_path):
    """Check the weights file's tensors against model.json (BundleError naming ``weights_path``) -> CflowBundle."""
    cfg = config["cflow"]
    channels = config["backbone"]["channels"]
    if len(cfg["scale_grids"]) != len(channels) or len(cfg["reference_log_likelihood"]) != len(channels):
        raise BundleError("{}: cflow.scale_grids and cflow.reference_log_likelihood need one entry per backbone "
                          "stage ({})".format(os.path.join(folder, "model.json"), len(channels)))
    scale_blocks = []
    for s, c in enumerate(channels):
        shapes = flow.block_shapes(c, cfg["condition_dim"])
        blocks = []
        for b in range(int(cfg["coupling_blocks"])):
            block = {}
            for name in flow.BLOCK_TENSORS:
                key = tensor_key(s, b, name)
                if key not in tensors:
                    raise BundleError("{}: tensor {} missing".format(weights_path, key))
                value = tensors[key]
                expected_dtype = torch.int64 if name == "permutation" else torch.float32
                if tuple(value.shape) != shapes[name] or value.dtype != expected_dtype:
                    raise BundleError("{}: {} is {} {}, model.json implies {} {}".format(
                        weights_path, key, str(value.dtype).replace("torch.", ""), tuple(value.shape),
                        str(expected_dtype).replace("torch.", ""), shapes[name]))
                array = value.numpy()
                if name == "permutation":
                    if not np.array_equal(np.sort(array), np.arange(c)):
                        raise BundleError("{}: {} is not a permutation of 0..{}".format(weights_path, key, c - 1))
                elif not np.isfinite(array).all():
                    raise BundleError("{}: {} contains NaN or Inf".format(weights_path, key))
                block[name] = array
            blocks.append(block)
        scale_blocks.append(blocks)
    extra = sorted(k for k in tensors if k.startswith("cflow.")
                   and k not in {tensor_key(s, b, n) for s in range(len(channels))
                                 for b in range(int(cfg["coupling_blocks"])) for n in flow.BLOCK_TENSORS})
    if extra:
        raise BundleError("{}: tensor {} is not part of a {}-block model".format(weights_path, extra[0],
                                                                                cfg["coupling_blocks"]))
    backbone_state = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    bundle = CflowBundle(config, backbone_state, scale_blocks, path=os.fspath(folder))
    check_backbone(bundle, folder, weights_path)
    return bundle
