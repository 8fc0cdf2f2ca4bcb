"""The PatchCore bundle: the truncated backbone and the memory bank ``patchcore.memory_bank [M, D]`` float32."""
import os

import torch

from edgead.bundle import Bundle, check_backbone, check_precision
from edgead.errors import BundleError

BANK_KEY = "patchcore.memory_bank"


class PatchcoreBundle(Bundle):
    """A fitted PatchCore detector. memory_bank: ``[M, D]`` float32 tensor (the coreset of the training patches)."""

    def __init__(self, config, backbone_state, memory_bank, path=None):
        super().__init__(config, backbone_state, path)
        self.memory_bank = memory_bank

    def __repr__(self):
        return "PatchcoreBundle({!r}, backbone {}, memory bank {})".format(
            self.path, (self.config.get("backbone") or {}).get("name"), tuple(self.memory_bank.shape))

    def tensors_to_save(self):
        return {BANK_KEY: self.memory_bank.detach().contiguous().to(torch.float32).cpu()}

    def frame_embedding(self, prune_deepest=False):
        """uint8 frames -> locally aware patch features ``[N, D, h, w]`` (``prune_deepest`` is ignored: PatchCore
        reads every channel of its deepest stage)."""
        from edgead.patchcore.fit import frame_embedding

        return frame_embedding(self.config, self.feature_extractor())

    def head(self):
        """The ``PatchcoreHead`` over this bundle's memory bank."""
        from edgead.patchcore.model import PatchcoreHead

        cfg = self.config
        return PatchcoreHead(self.memory_bank, self.input_hw, cfg["postprocess"]["blur_sigma"], cfg["embedding"]["grid"],
                             cfg["patchcore"]["neighbors"])

    def model(self):
        from edgead.model import DetectorModel

        return DetectorModel(self.frame_embedding(), self.head()).eval()

    def with_storage_precision(self, precision):
        """The bank rounded to fp16 as an fp16 export stores it (``fp32``: ``self``)."""
        if check_precision(precision) == "fp32":
            return self
        return PatchcoreBundle(self.config, self.backbone_state, self.memory_bank.to(torch.float16).to(torch.float32),
                               self.path)


def assemble(folder, config, tensors, weights_path):
    """Check the weights file's tensors against model.json (BundleError naming ``weights_path``) -> PatchcoreBundle."""
    if BANK_KEY not in tensors:
        raise BundleError("{}: tensor {} missing".format(weights_path, BANK_KEY))
    bank = tensors[BANK_KEY]
    expected = (int(config["patchcore"]["coreset_size"]), int(config["embedding"]["dim"]))
    if tuple(bank.shape) != expected:
        raise BundleError("{}: {} has shape {}, model.json implies {}".format(
            weights_path, BANK_KEY, tuple(bank.shape), expected))
    if bank.dtype != torch.float32:
        raise BundleError("{}: {} is {}, expected float32".format(weights_path, BANK_KEY, bank.dtype))
    if not bool(torch.isfinite(bank).all()):
        raise BundleError("{}: {} contains NaN or Inf".format(weights_path, BANK_KEY))
    backbone_state = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    bundle = PatchcoreBundle(config, backbone_state, bank, path=os.fspath(folder))
    check_backbone(bundle, folder, weights_path)
    return bundle
