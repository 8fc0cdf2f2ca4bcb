"""Model bundles: a folder with ``model.json`` (config) and ``weights.safetensors`` (tensors). No pickle.

``weights.safetensors`` holds the truncated backbone (``backbone.*``), ``padim.mean [P, D]`` float32 and
``padim.whitening_packed [P, T]`` float32. ``model.json`` records the SHA-256 of the weights file so a
mismatched pair is caught on load. Both files are written atomically (weights first).
"""
import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from edgead import __version__, atomic, backbones, packing
from edgead.embedding import FrameEmbedding, PatchEmbedding, Preprocess
from edgead.errors import BundleError
from edgead.model import PadimHead, PadimModel

FORMAT_VERSION = 1
CONFIG_NAME = "model.json"
WEIGHTS_NAME = "weights.safetensors"
_REQUIRED = {
    "backbone": ("name", "out_indices", "strides", "channels"),
    "input": ("height", "width", "mean", "std"),
    "embedding": ("dim", "grid", "channel_indices"),
    "postprocess": ("blur_sigma",),
}


@dataclass
class PadimBundle:
    """Everything a fitted PaDiM detector is made of.

    config: the model.json dict (see docs/CONTRACTS.md); backbone_state: truncated backbone tensors;
    mean ``[P, D]`` float32; whitening_packed ``[P, T]`` float32.
    """

    config: dict
    backbone_state: dict
    mean: torch.Tensor
    whitening_packed: torch.Tensor
    path: str = field(default=None)

    # ---- building torch modules -------------------------------------------------------------
    def frame_embedding(self, prune_deepest=False):
        """The FrameEmbedding (uint8 frames -> ``[N, D, h, w]``) with the bundle's backbone weights.

        prune_deepest: compute only the chosen channels in the deepest block (export; see edgead.pruning).
        """
        cfg = self.config
        extractor = backbones.create_feature_extractor(cfg["backbone"]["name"], self.input_hw)
        extractor.load_state_dict(self.backbone_state)
        patch = PatchEmbedding(
            extractor, cfg["embedding"]["channel_indices"], cfg["backbone"]["channels"], cfg["backbone"]["strides"],
            prune_deepest=prune_deepest,
        )
        return FrameEmbedding(Preprocess(cfg["input"]["mean"], cfg["input"]["std"]), patch).eval()

    def model(self):
        """The full PadimModel (uint8 frames -> map, score), eval mode."""
        cfg = self.config
        head = PadimHead(
            self.mean, self.whitening_packed, (cfg["input"]["height"], cfg["input"]["width"]),
            cfg["postprocess"]["blur_sigma"], cfg["embedding"]["grid"],
        )
        return PadimModel(self.frame_embedding(), head).eval()

    @property
    def input_hw(self):
        return self.config["input"]["height"], self.config["input"]["width"]

    # ---- persistence -------------------------------------------------------------------------
    def save(self, folder):
        """Write ``folder/weights.safetensors`` then ``folder/model.json``, each atomically."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        tensors = {"backbone." + k: v.detach().contiguous().cpu() for k, v in self.backbone_state.items()}
        tensors["padim.mean"] = self.mean.contiguous().to(torch.float32)
        tensors["padim.whitening_packed"] = self.whitening_packed.contiguous().to(torch.float32)
        weights_path = os.path.join(folder, WEIGHTS_NAME)
        with atomic.atomic_path(weights_path) as tmp:
            save_file(tensors, tmp, metadata={"format": "edgead-padim", "format_version": str(FORMAT_VERSION)})
            digest = _sha256(tmp)
        config = dict(self.config)
        config["format_version"] = FORMAT_VERSION
        config["edgead_version"] = __version__
        config["weights_sha256"] = digest
        atomic.write_text(os.path.join(folder, CONFIG_NAME), json.dumps(config, indent=2) + "\n")
        self.config = config
        self.path = folder
        return folder


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_config(folder):
    """Parse and validate ``folder/model.json``; BundleError names the file and the problem."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isdir(folder):
        raise BundleError("{}: not a bundle folder (expected {} and {} inside)".format(folder, CONFIG_NAME, WEIGHTS_NAME))
    if not os.path.isfile(path):
        raise BundleError("{}: missing; is {} an edgead bundle?".format(path, folder))
    try:
        with open(path, "r", encoding="utf-8") as fh:
            config = json.load(fh)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError("{}: invalid JSON ({})".format(path, exc))
    if not isinstance(config, dict):
        raise BundleError("{}: expected a JSON object".format(path))
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError("{}: format_version {!r} is not supported (expected {})".format(path, version, FORMAT_VERSION))
    if config.get("method") != "padim":
        raise BundleError("{}: method {!r} is not supported (expected 'padim')".format(path, config.get("method")))
    for section, keys in _REQUIRED.items():
        if not isinstance(config.get(section), dict):
            raise BundleError("{}: missing section {!r}".format(path, section))
        for key in keys:
            if key not in config[section]:
                raise BundleError("{}: missing {}.{}".format(path, section, key))
    _check_arch(config["backbone"], path)
    return config


def _check_arch(backbone, path):
    """Refuse a bundle whose backbone network is not the one edgead builds for that name today."""
    from edgead.errors import ConfigError

    try:
        spec = backbones.get_spec(backbone["name"])
    except ConfigError as exc:
        raise BundleError("{}: {}".format(path, exc))
    expected = backbones.arch_name(spec)
    recorded = backbone.get("arch", backbones.LEGACY_ARCH.get(spec.name, expected))
    if recorded != expected:
        raise BundleError(
            "{}: fitted with the {} network, but edgead now builds {} as {} (the network its ImageNet weights "
            "were trained in); refit this bundle with `edgead fit`".format(path, recorded, spec.name, expected))


def load_bundle(folder):
    """Load and validate a bundle folder. Raises BundleError for missing, truncated, corrupt or mismatched files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = os.fspath(folder)
    config = read_config(folder)
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise BundleError("{}: missing".format(weights_path))
    expected = config.get("weights_sha256")
    if expected and _sha256(weights_path) != expected:
        raise BundleError(
            "{}: checksum does not match {} (file truncated, corrupted or from another fit)".format(weights_path, CONFIG_NAME)
        )
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError("{}: cannot read safetensors ({})".format(weights_path, exc))
    for key in ("padim.mean", "padim.whitening_packed"):
        if key not in tensors:
            raise BundleError("{}: tensor {} missing".format(weights_path, key))
    grid_h, grid_w = config["embedding"]["grid"]
    num_patches, dim = grid_h * grid_w, len(config["embedding"]["channel_indices"])
    mean, whitening = tensors["padim.mean"], tensors["padim.whitening_packed"]
    if tuple(mean.shape) != (num_patches, dim):
        raise BundleError("{}: padim.mean has shape {}, model.json implies {}".format(
            weights_path, tuple(mean.shape), (num_patches, dim)))
    if tuple(whitening.shape) != (num_patches, packing.packed_length(dim)):
        raise BundleError("{}: padim.whitening_packed has shape {}, model.json implies {}".format(
            weights_path, tuple(whitening.shape), (num_patches, packing.packed_length(dim))))
    if not (torch.isfinite(mean).all() and torch.isfinite(whitening).all()):
        raise BundleError("{}: statistics contain NaN or Inf".format(weights_path))
    backbone_state = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    bundle = PadimBundle(config, backbone_state, mean, whitening, path=folder)
    try:
        bundle.frame_embedding()
    except RuntimeError as exc:
        raise BundleError("{}: backbone weights do not fit {} ({})".format(
            weights_path, config["backbone"]["name"], str(exc).splitlines()[0]))
    return bundle
