"""Compute only the chosen channels in the deepest block of the backbone (export-time optimisation).

PaDiM keeps ``D`` of the concatenated channels; the deepest stage's output feeds nothing but the
embedding, so its last block's final conv + BN (+ the residual add) only need the chosen output
channels. For ResNet18 at 256x256 with D = 100 that removes ~80 % of ``layer3.1.conv2``.

The parameters are sliced inside ``forward`` (constant-folded by the ONNX exporter), so the module's
state dict keys and shapes stay those of the full backbone. Results equal the full block's chosen
channels up to float summation order (~1e-6 relative), which is why fit and the torch reference run
the unpruned block and only the exported graph uses this.
"""
import copy
import types

import torch
import torch.nn.functional as F
from torch import nn


def _conv(conv, x, keep):
    bias = conv.bias.index_select(0, keep) if conv.bias is not None else None
    return F.conv2d(x, conv.weight.index_select(0, keep), bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _bn(bn, x, keep):
    x = F.batch_norm(x, bn.running_mean.index_select(0, keep), bn.running_var.index_select(0, keep),
                     bn.weight.index_select(0, keep), bn.bias.index_select(0, keep), False, 0.0, bn.eps)
    for extra in ("drop", "act"):  # timm BatchNormAct2d
        module = getattr(bn, extra, None)
        if module is not None:
            x = module(x)
    return x


def _identity(module):
    return module is None or isinstance(module, nn.Identity)


def _resnet_basic_forward(self, x):
    keep = self.keep_channels
    shortcut = x
    x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
    x = _bn(self.bn2, _conv(self.conv2, x, keep), keep)
    return self.act2(x + shortcut.index_select(1, keep))


def _resnet_bottleneck_forward(self, x):
    keep = self.keep_channels
    shortcut = x
    x = self.act1(self.bn1(self.conv1(x)))
    x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
    x = _bn(self.bn3, _conv(self.conv3, x, keep), keep)
    return self.act3(x + shortcut.index_select(1, keep))


def _inverted_residual_forward(self, x):
    keep = self.keep_channels
    shortcut = x
    x = self.aa(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x)))))
    x = _bn(self.bn3, _conv(self.conv_pwl, self.se(x), keep), keep)
    return x + shortcut.index_select(1, keep) if self.has_skip else x


def _prunable(block):
    """The pruned forward for ``block``, or None when its structure is not one we know exactly."""
    name = type(block).__name__
    plain = lambda conv: type(conv) is nn.Conv2d  # noqa: E731  (no 'same'-padding wrappers)
    if name == "BasicBlock" and _identity(block.downsample) and block.se is None and _identity(block.drop_path) \
            and plain(block.conv2):
        return _resnet_basic_forward
    if name == "Bottleneck" and _identity(block.downsample) and block.se is None and _identity(block.drop_path) \
            and plain(block.conv3):
        return _resnet_bottleneck_forward
    if name == "InvertedResidual" and getattr(block, "conv_s2d", None) is None and plain(block.conv_pwl) \
            and _identity(block.drop_path):
        return _inverted_residual_forward
    return None


def _last_block(extractor):
    """(parent Sequential, index) of the block that produces the deepest returned feature map."""
    module_name = extractor.feature_info.get_dicts()[-1]["module"]  # 'layer3' or 'blocks.4'
    stage = extractor
    for part in module_name.split("."):
        stage = getattr(stage, part) if not part.isdigit() else stage[int(part)]
    if isinstance(stage, nn.Sequential) and len(stage):
        return stage, len(stage) - 1
    return None, None


def prune_deepest_block(extractor, local_indices):
    """Copy of ``extractor`` whose deepest block outputs only ``local_indices`` (sorted) channels, in order.

    Returns ``(extractor_copy, pruned)``; when the block's structure is unknown the original extractor
    is returned unchanged with ``pruned = False``.
    """
    parent, index = _last_block(extractor)
    if parent is None or len(local_indices) == 0:
        return extractor, False
    forward = _prunable(parent[index])
    if forward is None:
        return extractor, False
    pruned = copy.deepcopy(extractor)
    parent, index = _last_block(pruned)
    block = parent[index]
    block.register_buffer("keep_channels", torch.as_tensor(local_indices, dtype=torch.long), persistent=False)
    block.forward = types.MethodType(forward, block)
    return pruned, True
