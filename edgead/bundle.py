"""Model bundles: a folder with ``model.json`` (config) and one weights file (tensors). No pickle.

``Bundle`` holds what every method shares (config, backbone, save, load); each method subclasses it with its
statistics (``PadimBundle``) and registers how to assemble one from a weights file (``edgead.methods``).
The weights file, ``weights-<first 16 hex digits of its SHA-256>.safetensors``, holds the truncated
backbone (``backbone.*``) and the method's tensors, named after it: PaDiM's ``padim.mean [P, D]`` float32
and ``padim.whitening_packed [P, T]`` float32.
``model.json`` names it (``weights_file``) and records its full SHA-256 (``weights_sha256``, mandatory),
so a mismatched pair is caught on load. Bundles of edgead 0.1 name no file: theirs is ``weights.safetensors``.

Saving switches a bundle as a whole, in one step (``Bundle.save``): the new weights go to a new
file name, the old bundle's files stay untouched, and renaming the new ``model.json`` over the old one
is the switch. A process killed at any point leaves either the old bundle or the new one loadable,
never a mix; the next save removes what such a crash left behind.
"""
import contextlib
import hashlib
import json
import os
import re

import numpy as np
import torch

from edgead import __version__, atomic, backbones
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


class Bundle:
    """What every method's fitted detector shares; one subclass per method (``PadimBundle``, PatchCore's ...).

    config: the model.json dict (see docs/CONTRACTS.md; ``config["method"]`` names the method); backbone_state:
    the truncated backbone tensors; path: the folder it was loaded from or saved to (None for a bundle fitted in
    memory). Subclasses hold their statistics and implement ``tensors_to_save``, ``frame_embedding`` and
    ``model`` (and, where they differ from the defaults, ``export_front_end``, ``with_storage_precision``,
    ``close``). ``load_bundle`` builds them through the method registry (``Method.assemble``).
    """

    def __init__(self, config, backbone_state, path=None):
        self.config = config
        self.backbone_state = backbone_state
        self.path = path

    @property
    def method(self):
        """model.json ``method`` (``padim``, ``patchcore``, ...)."""
        return self.config.get("method")

    @property
    def input_hw(self):
        """``(H, W)``: the model input size."""
        return self.config["input"]["height"], self.config["input"]["width"]

    # ---- what a method provides ------------------------------------------------------------------
    def tensors_to_save(self):
        """``{weights-file key: tensor}`` of the method's statistics (keys prefixed with the method name, e.g.
        ``padim.mean``); ``save`` adds the backbone's as ``backbone.*``."""
        raise NotImplementedError

    def frame_embedding(self, prune_deepest=False):
        """The torch front end: uint8 frames ``[N, H, W, 3]`` -> the method's embedding ``[N, D, h, w]``, eval mode.

        prune_deepest: compute only what the head reads in the deepest block (export; a method may ignore it)."""
        raise NotImplementedError

    def model(self):
        """The torch scoring model: uint8 ``[N, H, W, 3]`` -> (anomaly_map ``[N, 1, H, W]``, score ``[N]``) float32,
        eval mode (what eval, compare and the demo run)."""
        raise NotImplementedError

    def export_front_end(self):
        """The ``nn.Module`` traced as the ONNX front end (uint8 frames in, one output named ``embedding``, what
        ``Method.build_onnx_head`` reads). Default: ``frame_embedding()``."""
        return self.frame_embedding()

    def with_storage_precision(self, precision):
        """A bundle whose statistics are rounded as an export of ``precision`` (``fp32`` | ``fp16``) stores them,
        so a comparison separates backend error from storage rounding (``exporters.compare``). Default: the
        method stores nothing at reduced precision, so ``self``."""
        check_precision(precision)
        return self

    # ---- shared ----------------------------------------------------------------------------------
    def feature_extractor(self):
        """The truncated backbone (the stages ``backbone.out_indices`` of model.json) with the bundle's weights."""
        cfg = self.config["backbone"]
        extractor = backbones.create_feature_extractor(cfg["name"], self.input_hw, cfg.get("out_indices"))
        extractor.load_state_dict(self.backbone_state)
        return extractor

    def close(self):
        """Release files a lazily loaded bundle keeps open (none by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- persistence -------------------------------------------------------------------------
    def save(self, folder):
        """Write this bundle to ``folder``, switching from any bundle already there in one step.

        The weights file holds ``backbone.*`` and ``tensors_to_save()`` (safetensors metadata format
        ``edgead-<method>``). Steps (each an ``atomic.fault_point`` the crash tests kill at): the weights go to a
        temp file, renamed to their content-addressed name (the old bundle's weights file is a different name and
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
        tensors.update(self.tensors_to_save())
        metadata = {"format": "edgead-{}".format(self.method), "format_version": str(FORMAT_VERSION)}
        with atomic.locked(folder):
            with atomic.temp_path(os.path.join(folder, WEIGHTS_NAME)) as tmp:
                save_file(tensors, tmp, metadata=metadata)
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


#: ``precision`` values of ``Bundle.with_storage_precision`` (and of ``edgead export --precision``)
PRECISIONS = ("fp32", "fp16")


def check_precision(precision):
    """``precision`` when it is ``fp32`` or ``fp16``; ValueError otherwise."""
    if precision not in PRECISIONS:
        raise ValueError("precision must be 'fp32' or 'fp16', not {!r}".format(precision))
    return precision


def check_backbone(bundle, folder, weights_path):
    """The backbone checks every method's ``assemble`` runs: the truncated backbone (model.json's name, input
    size and ``backbone.out_indices``) takes the bundle's backbone tensors, and its stage channels and strides
    are the ones model.json records. BundleError (one line) otherwise; returns the extractor."""
    config = bundle.config
    try:
        extractor = bundle.feature_extractor()
    except RuntimeError as exc:
        raise BundleError("{}: backbone weights do not fit {} ({})".format(
            weights_path, config["backbone"]["name"], str(exc).splitlines()[0]))
    except Exception as exc:  # e.g. out_indices naming stages the network does not have (IndexError in timm)
        raise BundleError("{}: backbone {} with out_indices {} cannot be built ({}: {})".format(
            os.path.join(folder, CONFIG_NAME), config["backbone"]["name"], config["backbone"].get("out_indices"),
            type(exc).__name__, (str(exc).splitlines() or [""])[0]))
    channels, strides = backbones.stage_info(extractor)
    if list(channels) != list(config["backbone"]["channels"]) or list(strides) != list(config["backbone"]["strides"]):
        raise BundleError("{}: backbone.channels {} / strides {} differ from the {} network edgead builds "
                          "(channels {}, strides {})".format(
                              os.path.join(folder, CONFIG_NAME), config["backbone"]["channels"],
                              config["backbone"]["strides"], config["backbone"]["name"], channels, strides))
    return extractor


class PadimBundle(Bundle):
    """Everything a fitted PaDiM detector is made of.

    config: the model.json dict (see docs/CONTRACTS.md); backbone_state: truncated backbone tensors;
    mean ``[P, D]`` float32; whitening_packed ``[P, T]`` float32: a tensor, or a ``LazyWhitening`` reader over
    the bundle's weights file (``load_bundle(..., lazy_statistics=True)``), read only when asked for:
    ``iter_whitening_rows`` streams row blocks either way, and the ``whitening_packed`` attribute reads the
    whole tensor into memory on first access. ``close()`` (or ``with bundle:``) releases a reader's file.
    """

    def __init__(self, config, backbone_state, mean, whitening_packed, path=None):
        super().__init__(config, backbone_state, path)
        self.mean = mean
        self.whitening_packed = whitening_packed

    def __repr__(self):
        return "PadimBundle({!r}, backbone {}, mean {}{})".format(
            self.path, (self.config.get("backbone") or {}).get("name"), tuple(self.mean.shape),
            ", statistics on disk" if self._whitening is None else "")

    # ---- the statistics ----------------------------------------------------------------------------
    @property
    def whitening_packed(self):
        """``[P, T]`` float32 tensor; a lazy bundle reads it from its weights file now (once)."""
        if self._whitening is None:
            self._whitening = torch.from_numpy(self._whitening_reader.read_all())
            self._whitening_reader = None  # a copy of this bundle may still read through it; closed when unused
        return self._whitening

    @whitening_packed.setter
    def whitening_packed(self, value):
        if isinstance(value, LazyWhitening):
            self._whitening, self._whitening_reader = None, value
        else:
            self._whitening, self._whitening_reader = value, None

    @property
    def whitening_shape(self):
        """``(P, T)`` without reading a lazy bundle's statistics."""
        source = self._whitening if self._whitening is not None else self._whitening_reader
        return tuple(int(v) for v in source.shape)

    @property
    def statistics_in_memory(self):
        """False while a lazy bundle has not read its whitening."""
        return self._whitening is not None

    def iter_whitening_rows(self, max_bytes=64 << 20):
        """Yield ``(start_row, float32 ndarray [rows, T])`` blocks of the packed whitening, in order, each at
        most ``max_bytes`` (at least one row). Eager bundles yield views of their tensor (no copy for float32);
        lazy ones read each block from the weights file with positional reads (no mmap: memory stays one block)."""
        if self._whitening is None:
            yield from self._whitening_reader.iter_rows(max_bytes)
            return
        whitening = self._whitening.detach()
        rows, cols = whitening.shape
        step = max(1, int(max_bytes) // max(1, int(cols) * 4))
        for start in range(0, rows, step):
            yield start, whitening[start:start + step].to(torch.float32).contiguous().cpu().numpy()

    def close(self):
        """Release the weights file a lazy bundle keeps open (its statistics can no longer be read)."""
        if self._whitening_reader is not None:
            self._whitening_reader.close()

    def tensors_to_save(self):
        """``padim.mean`` and ``padim.whitening_packed``, float32 (a lazy bundle reads its whitening now)."""
        return {MEAN_KEY: self.mean.contiguous().to(torch.float32),
                WHITENING_KEY: self.whitening_packed.contiguous().to(torch.float32)}

    def with_storage_precision(self, precision):
        """This bundle with the packed whitening rounded to ``precision`` (what an export of it stores; the mean
        stays float32): ``self`` for ``fp32``."""
        if check_precision(precision) == "fp32":
            return self
        return PadimBundle(self.config, self.backbone_state, self.mean,
                           self.whitening_packed.to(torch.float16).to(torch.float32), path=self.path)

    # ---- building torch modules -------------------------------------------------------------
    def frame_embedding(self, prune_deepest=False):
        """The FrameEmbedding (uint8 frames -> ``[N, D, h, w]``) with the bundle's backbone weights.

        prune_deepest: compute only the chosen channels in the deepest block (export; see edgead.pruning).
        """
        cfg = self.config
        patch = PatchEmbedding(
            self.feature_extractor(), cfg["embedding"]["channel_indices"], cfg["backbone"]["channels"],
            cfg["backbone"]["strides"], prune_deepest=prune_deepest,
        )
        return FrameEmbedding(Preprocess(cfg["input"]["mean"], cfg["input"]["std"]), patch).eval()

    def export_front_end(self):
        """``frame_embedding(prune_deepest=True)``: the deepest block computes only the chosen channels."""
        return self.frame_embedding(prune_deepest=True)

    def model(self):
        """The full PadimModel (uint8 frames -> map, score), eval mode."""
        cfg = self.config
        head = PadimHead(
            self.mean, self.whitening_packed, (cfg["input"]["height"], cfg["input"]["width"]),
            cfg["postprocess"]["blur_sigma"], cfg["embedding"]["grid"],
        )
        return PadimModel(self.frame_embedding(), head).eval()


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


def load_bundle(folder, lazy_statistics=False):
    """Load and validate a bundle folder: the method's ``Bundle`` subclass, built by ``Method.assemble`` of the
    method model.json names (``edgead.methods``). Raises BundleError for missing, truncated, corrupt or mismatched
    files.

    lazy_statistics: keep the method's large statistics (``Method.lazy_tensors``; PaDiM: ``padim.whitening_packed``,
    ``P x T`` float32, 2.48 GB for wide_resnet50_2) on disk; every other tensor is read into memory. The bundle
    holds the weights file open (opened, checksummed and validated under the folder's shared lock, so a later save
    that replaces or removes the file changes nothing it reads) and reads row blocks on demand
    (``PadimBundle.iter_whitening_rows``; what ``edgead export`` streams). Every check of the eager load runs,
    with the same messages (NaN/Inf block by block). Close it with ``bundle.close()`` or ``with``.
    """
    folder = os.fspath(folder)
    read_config(folder)  # a clear error for a missing or broken folder before locking it
    if not lazy_statistics:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        with atomic.locked(folder, shared=True):  # a save in progress (exclusive lock) cannot swap files mid-read
            config, tensors, weights_path = _read_locked(folder, load_file, SafetensorError)
        return _assemble(folder, config, tensors, weights_path)
    with atomic.locked(folder, shared=True):
        config, tensors, weights_path = _read_locked_lazy(folder)
    try:
        return _assemble(folder, config, tensors, weights_path)
    except BaseException:
        for reader in tensors.values():
            if isinstance(reader, LazyWhitening):
                reader.close()
        raise


MEAN_KEY = "padim.mean"
WHITENING_KEY = "padim.whitening_packed"


def method_of(config, folder):
    """The registered ``Method`` that model.json ``config`` names; BundleError (one line naming model.json) when
    this edgead has none by that name."""
    from edgead.errors import ConfigError
    from edgead.methods import get_method

    try:
        return get_method(config["method"])
    except ConfigError as exc:
        raise BundleError("{}: {}".format(os.path.join(folder, CONFIG_NAME), exc))


def _weights_to_read(folder):
    """model.json (validated), the weights file it names (must exist) and its recorded SHA-256."""
    config = read_config(folder)
    weights_path = weights_file_path(folder, config)
    weights_file = os.path.basename(weights_path)
    if not os.path.isfile(weights_path):
        raise BundleError("{}: missing".format(weights_path))
    expected = config.get("weights_sha256")
    if not isinstance(expected, str):
        raise BundleError("{}: no weights_sha256, so {} cannot be checked; refit with `edgead fit`".format(
            os.path.join(folder, CONFIG_NAME), weights_file))
    return config, weights_path, expected


def _checksum_error(weights_path):
    return BundleError(
        "{}: checksum does not match {} (file truncated, corrupted or from another fit)".format(weights_path, CONFIG_NAME))


def _read_locked(folder, load_file, SafetensorError):
    """model.json, then the weights file it names, checksum-verified: ``(config, tensors, weights_path)``."""
    config, weights_path, expected = _weights_to_read(folder)
    if _sha256(weights_path) != expected:
        raise _checksum_error(weights_path)
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError("{}: cannot read safetensors ({})".format(weights_path, exc))
    return config, tensors, weights_path


def _read_locked_lazy(folder):
    """As ``_read_locked``, but the method's ``lazy_tensors`` (PaDiM: ``padim.whitening_packed``) are
    ``LazyWhitening`` readers over one open descriptor of the weights file (a duplicate of it each after the
    first): the checksum is computed through it and every later read goes through it."""
    from safetensors import SafetensorError, safe_open

    config, weights_path, expected = _weights_to_read(folder)
    lazy_keys = method_of(config, folder).lazy_tensors
    try:
        fd = os.open(weights_path, os.O_RDONLY)
    except OSError as exc:
        raise BundleError("{}: cannot read ({})".format(weights_path, exc))
    tensors = {}
    try:
        if _sha256_fd(fd) != expected:
            raise _checksum_error(weights_path)
        try:  # the safetensors reader validates the file exactly as the eager load does; it reads through our fd
            try:
                handle = safe_open(_fd_path(fd, weights_path), framework="pt", backend="pread")
            except TypeError:  # a safetensors without the pread backend
                handle = safe_open(_fd_path(fd, weights_path), framework="pt")
            with handle:
                keys = list(handle.keys())
                tensors = {key: handle.get_tensor(key) for key in keys if key not in lazy_keys}
        except (SafetensorError, OSError, ValueError) as exc:
            raise BundleError("{}: cannot read safetensors ({})".format(weights_path, exc))
        for key in lazy_keys:  # a missing one is reported by the method's assemble
            if key in keys:
                reader_fd = os.dup(fd)  # the same open file (checked above), one descriptor per reader
                try:
                    tensors[key] = _lazy_tensor(reader_fd, weights_path, key)
                except BaseException:
                    os.close(reader_fd)
                    raise
    except BaseException:
        for reader in tensors.values():
            if isinstance(reader, LazyWhitening):
                reader.close()
        raise
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return config, tensors, weights_path


def _fd_path(fd, fallback):
    """A path that opens the file behind ``fd`` itself, even when it was renamed or removed since."""
    for pattern in ("/proc/self/fd/{}", "/dev/fd/{}"):
        if os.path.isdir(os.path.dirname(pattern.format(fd))):
            return pattern.format(fd)
    return fallback  # no such file system: the path, under the folder lock


#: safetensors dtype -> numpy little-endian type the lazy reader reads and converts to float32 block by block (the
#: dtypes an eager load takes too; BF16 is read as its 16 bits and widened)
_LAZY_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?"}


def _lazy_tensor(fd, weights_path, key):
    """A ``LazyWhitening`` for tensor ``key`` of the (already validated) safetensors file open as ``fd``."""
    def unreadable(reason):
        return BundleError("{}: cannot read safetensors ({})".format(weights_path, reason))

    try:
        header_len = int.from_bytes(_pread_bytes(fd, 8, 0), "little")
        header = json.loads(_pread_bytes(fd, header_len, 8))
        entry = header[key]
        dtype_name, shape = str(entry["dtype"]), [int(v) for v in entry["shape"]]
        begin, end = (int(v) for v in entry["data_offsets"])
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise unreadable("header entry of {}: {}".format(key, exc))
    itemsize = np.dtype(_LAZY_DTYPES[dtype_name]).itemsize if dtype_name in _LAZY_DTYPES else None
    if itemsize is not None and (begin < 0 or end - begin != int(np.prod(shape, dtype=np.int64)) * itemsize):
        raise unreadable("{}: data_offsets {} do not hold {} {}".format(key, [begin, end], dtype_name, shape))
    return LazyWhitening(fd, weights_path, 8 + header_len + begin, tuple(shape), dtype_name, key)


def _pread_bytes(fd, count, offset):
    data = os.pread(fd, count, offset)
    if len(data) != count:
        raise ValueError("file ends at byte {}".format(offset + len(data)))
    return data


def _pread_into(fd, view, offset, path, key=WHITENING_KEY):
    """Fill the byte memoryview ``view`` from ``fd`` at ``offset`` (positional reads: no file position, no mmap);
    key: the tensor being read (named when the file ends early)."""
    while len(view):
        if hasattr(os, "preadv"):
            count = os.preadv(fd, [view], offset)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, min(len(view), 1 << 26), offset)
            count = len(data)
            view[:count] = data
        if count <= 0:
            raise BundleError("{}: ends at byte {}, inside {} (the file was cut after it was checked)".format(
                path, offset, key))
        view, offset = view[count:], offset + count


def _sha256_of_fd(fd):
    """Hex SHA-256 of the whole file open as ``fd`` (positional reads from 0, 4 MiB at a time)."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(4 << 20))
    offset = 0
    while True:
        count = os.preadv(fd, [buffer], offset) if hasattr(os, "preadv") else _pread_compat(fd, buffer, offset)
        if count <= 0:
            return digest.hexdigest()
        digest.update(buffer[:count])
        offset += count


def _pread_compat(fd, buffer, offset):  # pragma: no cover - platforms without preadv
    data = os.pread(fd, len(buffer), offset)
    buffer[:len(data)] = data
    return len(data)


#: hex SHA-256 of an open file descriptor (the lazy load); a module global so tests can wrap it
_sha256_fd = _sha256_of_fd


class LazyWhitening:
    """A tensor left in the weights file (``padim.whitening_packed``, or another method's ``lazy_tensors``):
    positional reads (``os.preadv``) through a descriptor opened while the bundle was checked, so a save that
    replaces or removes the file later changes nothing read here (the kernel keeps an unlinked file's data while
    it is open). No mmap: read blocks are the only memory.

    shape ``(P, T)`` (rows first); dtype_name: the safetensors dtype; blocks come back as float32 (another stored
    type is converted block by block); key: the tensor's name in the weights file.
    """

    def __init__(self, fd, path, offset, shape, dtype_name="F32", key=WHITENING_KEY):
        self.key = key
        self._fd = fd
        self.path = path
        self.offset = int(offset)
        self.shape = tuple(int(v) for v in shape)
        self.dtype_name = dtype_name
        self.dtype = np.dtype(_LAZY_DTYPES[dtype_name]) if dtype_name in _LAZY_DTYPES else None

    @property
    def closed(self):
        return self._fd is None

    def close(self):
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self):
        self.close()

    def _row_bytes(self):
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def read_rows(self, start, stop, out=None):
        """Rows ``start:stop`` as float32 ``[stop - start, T]`` (into ``out`` when given)."""
        if self._fd is None:
            raise BundleError("{}: the bundle was closed; load it again to read its statistics".format(self.path))
        if self.dtype is None:
            raise BundleError("{}: {} is stored as {}, which edgead cannot read lazily; load the bundle without "
                              "lazy_statistics".format(self.path, self.key, self.dtype_name))
        count = max(0, int(stop) - int(start))
        block_shape = (count,) + self.shape[1:]
        native = self.dtype == np.dtype(np.float32)
        raw = out if (out is not None and native) else np.empty(block_shape, self.dtype)
        if raw.nbytes:
            _pread_into(self._fd, memoryview(raw).cast("B"), self.offset + int(start) * self._row_bytes(), self.path,
                        self.key)
        if native:
            return raw
        if self.dtype_name == "BF16":  # the upper half of a float32
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        if out is None:
            return raw.astype(np.float32)
        out[...] = raw
        return out

    def iter_rows(self, max_bytes=64 << 20):
        """Yield ``(start_row, float32 [rows, T])`` blocks of at most ``max_bytes`` (at least one row), in order."""
        rows = self.shape[0]
        step = max(1, int(max_bytes) // max(1, int(np.prod(self.shape[1:], dtype=np.int64)) * 4))
        for start in range(0, rows, step):
            yield start, self.read_rows(start, min(rows, start + step))

    def all_finite(self, max_bytes=64 << 20):
        """True when no element is NaN or Inf (read block by block)."""
        return all(bool(np.isfinite(block).all()) for _, block in self.iter_rows(max_bytes))

    def read_all(self, max_bytes=64 << 20):
        """The whole tensor, float32 ``[P, T]`` (one allocation, filled block by block)."""
        out = np.empty(self.shape, np.float32)
        step = max(1, int(max_bytes) // max(1, int(np.prod(self.shape[1:], dtype=np.int64)) * 4))
        for start in range(0, self.shape[0], step):
            stop = min(self.shape[0], start + step)
            self.read_rows(start, stop, out=out[start:stop])
        return out


def _assemble(folder, config, tensors, weights_path):
    """The tensors checked against model.json and the network edgead builds, by the method model.json names
    (``Method.assemble``): its ``Bundle``."""
    return method_of(config, folder).assemble(folder, config, tensors, weights_path)


def all_finite(tensor):
    """True when a tensor, or a ``LazyWhitening`` reader (read block by block), holds no NaN or Inf."""
    if isinstance(tensor, LazyWhitening):
        return tensor.all_finite()
    return bool(torch.isfinite(tensor).all())
