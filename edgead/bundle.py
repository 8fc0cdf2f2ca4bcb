"""Model bundles: a folder with ``model.json`` (config) and one weights file (tensors). No pickle.

The weights file, ``weights-<first 16 hex digits of its SHA-256>.safetensors``, holds the truncated
backbone (``backbone.*``), ``padim.mean [P, D]`` float32 and ``padim.whitening_packed [P, T]`` float32.
``model.json`` names it (``weights_file``) and records its full SHA-256 (``weights_sha256``, mandatory),
so a mismatched pair is caught on load. Bundles of edgead 0.1 name no file: theirs is ``weights.safetensors``.

Saving switches a bundle as a whole, in one step (``PadimBundle.save``): the new weights go to a new
file name, the old bundle's files stay untouched, and renaming the new ``model.json`` over the old one
is the switch. A process killed at any point leaves either the old bundle or the new one loadable,
never a mix; the next save removes what such a crash left behind.
"""
import contextlib
import json
import os
import re
from dataclasses import dataclass, field

import torch

from edgead import __version__, atomic, backbones, packing
from edgead.embedding import FrameEmbedding, PatchEmbedding, Preprocess
from edgead.errors import BundleError
from edgead.model import PadimHead, PadimModel
from edgead.runtime import engine_files, schema

FORMAT_VERSION = 1
CONFIG_NAME = "model.json"
WEIGHTS_NAME = "weights.safetensors"  # edgead 0.1 bundles (no ``weights_file`` key)
#: ``weights_file`` values a bundle may name: plain file names in the bundle folder, nothing else.
WEIGHTS_FILE_PATTERN = re.compile(r"^weights(-[0-9a-f]{16})?\.safetensors$")
#: Temp files our writers leave when killed (edgead.atomic names them ``.<stem>.<random>.tmp<ext>``).
_STALE_TEMP = re.compile(r"^\.(model|weights[-0-9a-f]*)\..+\.tmp\.(json|safetensors)$")


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
        """Write this bundle to ``folder``, switching from any bundle already there in one step.

        Steps (each an ``atomic.fault_point`` the crash tests kill at): the weights go to a temp file,
        renamed to their content-addressed name (the old bundle's weights file is a different name and
        stays); ``model.json`` naming them goes to a temp file and is renamed over the old one: that
        rename is the switch. Then files no bundle names any more and temp files of crashed saves
        are removed. The folder is locked (``flock``) for the duration, so two saves cannot interleave.
        Raises BundleError when ``folder`` is a file or a folder that holds something else.
        """
        from safetensors.torch import save_file

        folder = os.fspath(folder)
        check_bundle_target(folder)
        _check_config_before_save(self.config, folder)  # nothing written when the new model.json would be refused
        os.makedirs(folder, exist_ok=True)
        tensors = {"backbone." + k: v.detach().contiguous().cpu() for k, v in self.backbone_state.items()}
        tensors["padim.mean"] = self.mean.contiguous().to(torch.float32)
        tensors["padim.whitening_packed"] = self.whitening_packed.contiguous().to(torch.float32)
        with atomic.locked(folder):
            with atomic.temp_path(os.path.join(folder, WEIGHTS_NAME)) as tmp:
                save_file(tensors, tmp, metadata={"format": "edgead-padim", "format_version": str(FORMAT_VERSION)})
                atomic.set_default_mode(tmp)
                atomic.fsync_path(tmp)
                digest = _sha256(tmp)
                atomic.fault_point("bundle.weights-written")
                weights_file = "weights-{}.safetensors".format(digest[:16])
                os.replace(tmp, os.path.join(folder, weights_file))  # a new name: the old bundle still loads
                atomic.fault_point("bundle.weights-renamed")
            config = dict(self.config)
            config["format_version"] = FORMAT_VERSION
            config["edgead_version"] = __version__
            config["weights_file"] = weights_file
            config["weights_sha256"] = digest
            atomic.write_text(os.path.join(folder, CONFIG_NAME), json.dumps(config, indent=2) + "\n")
            atomic.fault_point("bundle.switched")
            _remove_leftovers(folder, keep=weights_file)
        self.config = config
        self.path = folder
        return folder


def _check_config_before_save(config, folder):
    """The model.json ``save`` would write must pass the schema ``read_config`` applies (with placeholder
    weights fields), or the good bundle it replaces would be lost to one that cannot load."""
    preview = dict(config, format_version=FORMAT_VERSION, edgead_version=__version__,
                   weights_file="weights-{}.safetensors".format("0" * 16), weights_sha256="0" * 64)
    try:
        text = json.dumps(preview, allow_nan=False)
    except (ValueError, TypeError) as exc:  # NaN/Inf, or a value JSON cannot hold (a numpy scalar, a tensor)
        raise BundleError("{}: cannot save, model.json would not be valid JSON ({})".format(folder, exc))
    schema.validate(json.loads(text), "bundle", os.path.join(folder, CONFIG_NAME) + " (not saved)", BundleError)


def check_bundle_target(folder):
    """Refuse an output path that is a file, or a folder holding something other than an edgead bundle
    (so ``fit -o`` never writes into a data folder). Cheap: call it before the long work."""
    folder = os.fspath(folder)
    if not folder.strip():
        raise BundleError("empty bundle path; give the folder to write, e.g. -o bottle.edgead")
    if os.path.lexists(folder) and not os.path.exists(folder):
        raise BundleError("{}: is a broken symbolic link".format(folder))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise BundleError("{}: exists and is not a folder; a bundle is a folder (pick a new name)".format(folder))
    if not os.path.isdir(folder):
        ancestor = os.path.dirname(os.path.abspath(folder))  # created with its missing parents, like mkdir -p
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor):
            raise BundleError("{}: cannot create it, {} is a file".format(folder, ancestor))
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise BundleError("{}: cannot create it, {} is not writable".format(folder, ancestor))
        return
    ours = [n for n in os.listdir(folder)
            if n == CONFIG_NAME or WEIGHTS_FILE_PATTERN.match(n) or _STALE_TEMP.match(n)]
    others = sorted(set(os.listdir(folder)) - set(ours))
    if others:
        raise BundleError("{}: holds files that are not an edgead bundle ({}{}); refusing to write a bundle "
                          "into it (pick a new folder)".format(folder, ", ".join(others[:3]),
                                                               ", ..." if len(others) > 3 else ""))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BundleError("{}: folder is not writable".format(folder))


def _remove_leftovers(folder, keep):
    """Delete weights files other than ``keep`` and our temp files: what earlier saves or crashes left
    (the caller holds the folder lock, so no other save is under way)."""
    for name in os.listdir(folder):
        if (WEIGHTS_FILE_PATTERN.match(name) and name != keep) or _STALE_TEMP.match(name):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


#: hex SHA-256 of a file (one implementation for bundles and engines); a module global so tests can wrap it
_sha256 = engine_files.sha256_file


def read_config(folder):
    """Parse and validate ``folder/model.json``; BundleError names the file and the problem."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isdir(folder):
        raise BundleError("{}: not a bundle folder (expected {} and a weights file inside)".format(folder, CONFIG_NAME))
    if not os.path.isfile(path):
        raise BundleError("{}: missing; is {} an edgead bundle?".format(path, folder))
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise BundleError("{}: cannot read ({})".format(path, exc))
    # One declared schema (runtime/schemas/model.schema.json, entry "bundle") plus the cross-field checks;
    # every problem is one line naming the file and the JSON path.
    config = schema.loads(data, path, BundleError)
    schema.validate(config, "bundle", path, BundleError)
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


def weights_file_path(folder, config=None):
    """Path of the weights file ``folder/model.json`` names (``weights.safetensors`` for edgead 0.1 bundles)."""
    config = read_config(folder) if config is None else config
    weights_file = config.get("weights_file", WEIGHTS_NAME)
    if not isinstance(weights_file, str) or not WEIGHTS_FILE_PATTERN.match(weights_file):
        raise BundleError("{}: weights_file {!r} is not a weights file name of this folder".format(
            os.path.join(folder, CONFIG_NAME), weights_file))
    return os.path.join(folder, weights_file)


def load_bundle(folder):
    """Load and validate a bundle folder. Raises BundleError for missing, truncated, corrupt or mismatched files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = os.fspath(folder)
    read_config(folder)  # a clear error for a missing or broken folder before locking it
    with atomic.locked(folder, shared=True):  # a save in progress (exclusive lock) cannot swap files mid-read
        config, tensors, weights_path = _read_locked(folder, load_file, SafetensorError)
    return _assemble(folder, config, tensors, weights_path)


def _read_locked(folder, load_file, SafetensorError):
    """model.json, then the weights file it names, checksum-verified: ``(config, tensors, weights_path)``."""
    config = read_config(folder)
    weights_path = weights_file_path(folder, config)
    weights_file = os.path.basename(weights_path)
    if not os.path.isfile(weights_path):
        raise BundleError("{}: missing".format(weights_path))
    expected = config.get("weights_sha256")
    if not isinstance(expected, str):
        raise BundleError("{}: no weights_sha256, so {} cannot be checked; refit with `edgead fit`".format(
            os.path.join(folder, CONFIG_NAME), weights_file))
    if _sha256(weights_path) != expected:
        raise BundleError(
            "{}: checksum does not match {} (file truncated, corrupted or from another fit)".format(weights_path, CONFIG_NAME)
        )
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError("{}: cannot read safetensors ({})".format(weights_path, exc))
    return config, tensors, weights_path


def _assemble(folder, config, tensors, weights_path):
    """Check the tensors against model.json and the network edgead builds; the PadimBundle."""
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
        embedding = bundle.frame_embedding()
    except RuntimeError as exc:
        raise BundleError("{}: backbone weights do not fit {} ({})".format(
            weights_path, config["backbone"]["name"], str(exc).splitlines()[0]))
    channels, strides = backbones.stage_info(embedding.patch_embedding.extractor)
    if list(channels) != list(config["backbone"]["channels"]) or list(strides) != list(config["backbone"]["strides"]):
        raise BundleError("{}: backbone.channels {} / strides {} differ from the {} network edgead builds "
                          "(channels {}, strides {})".format(
                              os.path.join(folder, CONFIG_NAME), config["backbone"]["channels"],
                              config["backbone"]["strides"], config["backbone"]["name"], channels, strides))
    return bundle
