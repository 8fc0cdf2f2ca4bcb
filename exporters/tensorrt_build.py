"""Build a TensorRT engine from an edgead ONNX file (TensorRT Python API), plus its JSON sidecar.

``build_engine(onnx_path, engine_path, fp16=False, int8=False, calib_dir=None, workspace_mb=1024,
plugin_lib=None, max_batch=8)`` -> summary dict. Steps: read the ``edgead`` metadata (no onnx import), refuse
what this TensorRT cannot do (``--fp16`` / ``--int8`` on TensorRT 11) before any long work, load
``libedgead_plugins.so`` when the graph has the ``PadimMahalanobis`` node (before parsing), parse (an external
data file next to the .onnx is found by the parser), configure, build the serialized network, write
``model.engine`` and ``model.engine.json`` (metadata + ``tensorrt`` build info + ``engine_sha256``) as one pair
(``edgead.runtime.engine_files``: a kill never leaves a mismatched pair).

Precision:

- default: strict fp32 (``BuilderFlag.TF32`` cleared, so an fp32 engine matches ONNX Runtime to ~1e-4);
  ``--fp16`` / ``--int8`` leave TF32 at TensorRT's default (on). The sidecar records ``tf32``.
- TensorRT 11 builds strongly typed networks only: precision comes from the ONNX types (fp32 compute, the
  statistics as exported) and there is no ``BuilderFlag.FP16`` / ``INT8`` nor implicit INT8 calibration, so
  ``--fp16`` / ``--int8`` are refused with a one-line ExportError. The sidecar records ``strongly_typed``.

Dynamic-batch graphs get one optimisation profile ``min 1 / opt max(1, max_batch // 2) / max max_batch``.

INT8 (TensorRT 8.5 - 10.x, entropy calibration): frames from ``calib_dir`` (up to 512 images, recursive,
area-resized) are fed in batches of exactly ``B`` frames through one device buffer of exactly ``B`` frames,
freed after the build (also when it fails). ``B`` is the engine's batch for a fixed-batch graph, and
``min(max_batch, 8, images)`` for a dynamic one, which then gets a separate calibration profile with
``min = opt = max = B`` (TensorRT calibrates at a calibration profile's opt and overwrites its min/max with it,
so the main profile, opt ``max_batch // 2``, must not be reused). The last ``images % B`` images are not used
(recorded as ``dropped``). The calibration cache is ``<engine>.<key>.calib`` where ``key`` is the first 16 hex
of a SHA-256 over the ONNX file's SHA-256 (external data files are content-addressed, so their names in the
.onnx change with their bytes), the TensorRT version, ``B``, the input dtype/shape and the calibration frames
themselves: a changed model or image folder never silently reuses another calibration. Caches of the same
engine path with another key are removed after a successful build.

Sidecar ``tensorrt``: ``version``, ``fp16``, ``int8``, ``strongly_typed``, ``tf32``, ``gpu``,
``compute_capability``, ``workspace_mb``, ``plugin_lib``, ``max_batch``, ``opt_batch``, ``int8_calibration``
(None, or ``images`` / ``used`` / ``dropped`` / ``batch`` / ``batches`` / ``cache`` / ``from_cache``) and
``build_seconds``.

Works with TensorRT 8.5, 8.6, 10.x (fp32/fp16/int8) and 11.x (strongly typed). Every failure raises
ExportError / BackendError naming the file.
"""
import contextlib
import glob
import hashlib
import json
import os
import re
import time

import numpy as np

from edgead import atomic
from edgead.errors import BackendError, EdgeadError, ExportError
from edgead.runtime import engine_files, modelinfo, tensorrt_plugin
from edgead.runtime.engines import tensorrt_engine

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: most calibration images read from --calib
CALIBRATION_LIMIT = 512
#: largest calibration batch for dynamic-batch graphs (one device buffer of this many frames)
CALIBRATION_BATCH_CAP = 8


def _import_tensorrt(onnx_path):
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ExportError("{}: cannot build a TensorRT engine: the tensorrt Python module is not installed ({}); "
                          "run `edgead build` on the target (JetPack ships python3-libnvinfer) or "
                          "`pip install tensorrt` on x86".format(onnx_path, exc))
    return trt


def strongly_typed_only(trt):
    """True for a TensorRT whose builder has no precision flags (11.x: every network is strongly typed)."""
    flags = getattr(trt, "BuilderFlag", None)
    return tensorrt_engine.tensorrt_major(trt) >= 11 or flags is None or not hasattr(flags, "FP16")


def has_implicit_int8(trt):
    """True when this TensorRT can calibrate INT8 itself (BuilderFlag.INT8 + IInt8EntropyCalibrator2: 8.x - 10.x)."""
    flags = getattr(trt, "BuilderFlag", None)
    return not strongly_typed_only(trt) and hasattr(flags, "INT8") and hasattr(trt, "IInt8EntropyCalibrator2")


def network_flags(trt):
    """``create_network`` flags: EXPLICIT_BATCH on 8.x; 0 on 10.x (explicit batch is the only mode, the flag is
    deprecated and ignored) and on 11.x (the flag is gone; STRONGLY_TYPED is always on and deprecated)."""
    if tensorrt_engine.tensorrt_major(trt) < 10:
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return 0


def calibration_frames(calib_dir, height, width, limit=CALIBRATION_LIMIT):
    """uint8 ``[M, H, W, 3]`` RGB frames from the images in ``calib_dir`` (recursive, sorted, at most
    ``limit``), area-resized."""
    import cv2

    if not os.path.isdir(os.fspath(calib_dir)):
        raise ExportError("{}: --calib folder not found".format(calib_dir))
    paths = sorted(p for p in glob.glob(os.path.join(os.fspath(calib_dir), "**", "*"), recursive=True)
                   if p.lower().endswith(IMAGE_EXTENSIONS))[:limit]
    if not paths:
        raise ExportError("{}: no calibration images ({}) found for --int8".format(calib_dir, ", ".join(IMAGE_EXTENSIONS)))
    frames = []
    for path in paths:
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise ExportError("{}: cannot read calibration image".format(path))
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        frames.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    return np.stack(frames)


def calibration_batch(engine_batch, max_batch, images, calib_dir):
    """Frames per calibration batch: the fixed batch of the graph, or ``min(max_batch, 8, images)`` for a
    dynamic one (``engine_batch`` < 0). ExportError when a fixed batch needs more images than there are."""
    if engine_batch > 0:
        if images < engine_batch:
            raise ExportError("{}: {} calibration image(s) but the ONNX has a fixed batch of {}: add images or "
                              "export with --batch 1 / dynamic".format(calib_dir, images, engine_batch))
        return int(engine_batch)
    return max(1, min(int(max_batch), CALIBRATION_BATCH_CAP, int(images)))


def calibration_cache_path(engine_path, onnx_sha256, trt_version, frames, batch, input_dtype):
    """``<engine>.<16 hex>.calib``: the key covers the model, TensorRT version, batch, input dtype and the frames."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"onnx_sha256": onnx_sha256, "tensorrt": str(trt_version), "batch": int(batch),
                              "frames_shape": [int(v) for v in frames.shape],
                              "input_dtype": np.dtype(input_dtype).name}, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(frames).tobytes())
    return "{}.{}.calib".format(engine_path, digest.hexdigest()[:16])


def _remove_stale_caches(engine_path, keep):
    """Remove ``<engine>.<16 hex>.calib`` files other than ``keep`` (earlier calibrations of this engine path)."""
    folder = os.path.dirname(os.path.abspath(engine_path))
    pattern = re.compile(re.escape(os.path.basename(engine_path)) + r"\.[0-9a-f]{16}\.calib$")
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        path = os.path.join(folder, name)
        if pattern.match(name) and os.path.abspath(path) != os.path.abspath(keep):
            try:
                os.remove(path)
            except OSError:
                pass


class CalibrationFeed(object):
    """Calibration frames -> one device buffer of exactly ``batch`` frames (no TensorRT needed).

    ``next_batch()`` copies the next ``batch`` frames (converted to the network input dtype) with a
    synchronous ``cudaMemcpy`` and returns the device pointer, or None after ``len(frames) // batch`` batches
    (the remaining ``len(frames) % batch`` frames are dropped). The host chunk is complete on the device when
    the copy returns and is also kept (``self.chunk``) until the next batch. ``close()`` frees the buffer.
    """

    def __init__(self, cuda, frames, batch, input_dtype):
        self.cuda, self.frames, self.batch = cuda, frames, int(batch)
        self.dtype = np.dtype(input_dtype)
        self.batches = len(frames) // self.batch
        self.nbytes = self.batch * int(np.prod(frames.shape[1:])) * self.dtype.itemsize
        self.fed, self.chunk, self.error = 0, None, None
        self.device = None
        self.device = cuda.malloc(self.nbytes)

    def next_batch(self):
        if self.fed >= self.batches or self.device is None:
            return None
        start = self.fed * self.batch
        chunk = np.ascontiguousarray(self.frames[start:start + self.batch], self.dtype)
        if chunk.nbytes != self.nbytes:  # cannot happen: the loop stops before a short batch
            raise ExportError("calibration batch of {} bytes does not fit the {}-byte device buffer".format(
                chunk.nbytes, self.nbytes))
        self.cuda.copy_to_device(self.device, chunk)
        self.chunk = chunk
        self.fed += 1
        return self.device

    def close(self):
        """Free the device buffer (idempotent)."""
        device, self.device = self.device, None
        self.chunk = None
        if device is not None:
            self.cuda.free(device)


def _make_calibrator(trt, feed, cache_path):
    """An IInt8EntropyCalibrator2 over ``feed``. TensorRT's Python trampoline prints and swallows exceptions
    from these callbacks (a failing ``get_batch`` would just end calibration early), so each one stores its
    exception in ``feed.error`` for ``build_engine`` to raise after the build."""

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.cache_read = False

        def get_batch_size(self):
            return feed.batch

        def get_batch(self, names):
            try:
                if len(names) != 1:
                    raise ExportError("INT8 calibration feeds one network input, TensorRT asks for {}".format(
                        list(names)))
                pointer = feed.next_batch()
                return None if pointer is None else [int(pointer)]
            except Exception as exc:  # noqa: BLE001 - re-raised by build_engine after the build
                feed.error = feed.error or exc
                return None

        def read_calibration_cache(self):
            try:
                if os.path.isfile(cache_path):
                    with open(cache_path, "rb") as fh:
                        data = fh.read()
                    if data:
                        self.cache_read = True
                        return data
            except Exception as exc:  # noqa: BLE001
                feed.error = feed.error or exc
            return None

        def write_calibration_cache(self, cache):
            try:
                atomic.write_bytes(cache_path, bytes(cache))
            except Exception as exc:  # noqa: BLE001
                feed.error = feed.error or exc

    return Calibrator()


def _parse(trt, onnx_path, logger):
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # shared lock on the folder: a concurrent `edgead export` never removes the external data file mid-parse
    with atomic.reading_folder_of(onnx_path):
        parsed = parser.parse_from_file(os.path.abspath(onnx_path))
    if not parsed:
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        first = errors[0] if errors else "unknown parser error"
        hint = ""
        if "PadimMahalanobis" in " ".join(errors):
            hint = " (the plugin library is not loaded or was built for another TensorRT; pass --plugin-lib)"
        raise ExportError("{}: the TensorRT ONNX parser failed: {}{}".format(onnx_path, first, hint))
    return builder, network, parser


def _check_precision_support(trt, onnx_path, fp16, int8):
    """One-line ExportError for a precision flag this TensorRT cannot honour (before any long work)."""
    version = trt.__version__
    if strongly_typed_only(trt):
        if fp16 or int8:
            raise ExportError(
                "{}: TensorRT {} builds strongly typed networks only (precision comes from the ONNX types; there is "
                "no {} builder flag): rebuild without {} (the engine then runs the ONNX as typed: fp32 compute, "
                "statistics as exported)".format(onnx_path, version, "FP16" if fp16 else "INT8",
                                                  "--fp16" if fp16 else "--int8"))
        return
    if int8 and not has_implicit_int8(trt):
        raise ExportError("{}: TensorRT {} has no implicit INT8 calibration (IInt8EntropyCalibrator2); rebuild "
                          "without --int8 (use --fp16)".format(onnx_path, version))


def _explicit_int8(onnx_path, info, implicit_int8):
    """True for an ``edgead export --precision int8 --int8-target tensorrt`` model (Q/DQ in the graph: TensorRT's
    explicit quantisation); ExportError for an int8 export made for ONNX Runtime (uint8 activations, which
    TensorRT's Q/DQ layers do not take) or combined with the implicit calibrator (--int8)."""
    export = info.get("export") or {}
    if export.get("precision") != "int8":
        return False
    target = (export.get("quantization") or {}).get("target")
    if target != "tensorrt":
        raise ExportError("{}: this int8 export is for ONNX Runtime (uint8 activations; TensorRT's explicit "
                          "quantisation takes int8 with zero point 0): re-export with --precision int8 "
                          "--int8-target tensorrt".format(onnx_path))
    if implicit_int8:
        raise ExportError("{}: the model is already quantised (Q/DQ, statistics refitted on its int8 features): "
                          "build it without --int8/--calib".format(onnx_path))
    return True


def build_engine(onnx_path, engine_path, fp16=False, int8=False, calib_dir=None, workspace_mb=1024,
                 plugin_lib=None, max_batch=8, verbose=False):
    """Build and save ``engine_path`` (+ ``engine_path.json``) from ``onnx_path``; returns the summary dict."""
    onnx_path, engine_path = os.fspath(onnx_path), os.fspath(engine_path)
    info = modelinfo.load_model_info(onnx_path)  # ModelFileError when missing / not an edgead model
    if int8 and not calib_dir:
        raise ExportError("{}: --int8 needs --calib DIR with representative (good) images".format(onnx_path))
    if workspace_mb <= 0:
        raise ExportError("{}: --workspace must be a positive number of MiB, got {}".format(onnx_path, workspace_mb))
    if max_batch < 1:
        raise ExportError("{}: --max-batch must be >= 1, got {}".format(onnx_path, max_batch))
    explicit_int8 = _explicit_int8(onnx_path, info, int8)
    trt = _import_tensorrt(onnx_path)
    _check_precision_support(trt, onnx_path, fp16, int8)
    strongly_typed = strongly_typed_only(trt)
    frames = None
    if int8:
        frames = calibration_frames(calib_dir, *modelinfo.input_hw(info))  # bad images fail before the parse
    loaded_plugin = None
    if plugin_lib or tensorrt_plugin.needs_plugin(info):
        try:
            loaded_plugin = tensorrt_plugin.load_plugin_library(plugin_lib)
        except BackendError as exc:
            raise ExportError("{}: the graph uses the PadimMahalanobis plugin: {}".format(onnx_path, exc))
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    if hasattr(trt, "init_libnvinfer_plugins"):
        trt.init_libnvinfer_plugins(logger, "")
    if loaded_plugin and not tensorrt_plugin.is_registered(trt):
        raise ExportError("{}: {} loaded but PadimMahalanobis v1 is not registered (built for another TensorRT "
                          "major version?)".format(onnx_path, loaded_plugin))
    cuda = tensorrt_engine.CudaRuntime()  # no libcudart / no GPU: BackendError before the long build
    started = time.time()
    builder, network, _parser = _parse(trt, onnx_path, logger)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    tf32 = hasattr(trt.BuilderFlag, "TF32")
    if tf32 and not (fp16 or int8):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 rounds conv/matmul inputs to 10 bits
        tf32 = False
    if explicit_int8 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ layers run in int8 only with the flag (TensorRT 8.x-10.x)
    if fp16:
        if not getattr(builder, "platform_has_fast_fp16", True):
            raise ExportError("{}: --fp16 requested but this GPU has no fast fp16".format(onnx_path))
        config.set_flag(trt.BuilderFlag.FP16)
    if network.num_inputs != 1:
        raise ExportError("{}: expected one network input, the parsed network has {}".format(
            onnx_path, network.num_inputs))
    image = network.get_input(0)
    shape = tuple(int(v) for v in image.shape)
    dynamic = shape[0] < 0
    opt_batch = max(1, max_batch // 2)
    if dynamic:
        profile = builder.create_optimization_profile()
        rest = shape[1:]
        profile.set_shape(image.name, (1,) + rest, (opt_batch,) + rest, (max_batch,) + rest)
        config.add_optimization_profile(profile)
    calibration, feed, calibrator = None, None, None
    if int8:
        if not getattr(builder, "platform_has_fast_int8", True):
            raise ExportError("{}: --int8 requested but this GPU has no fast int8".format(onnx_path))
        batch = calibration_batch(shape[0], max_batch, len(frames), calib_dir)
        used = (len(frames) // batch) * batch
        input_dtype = np.dtype(trt.nptype(image.dtype))
        cache_path = calibration_cache_path(engine_path, engine_files.sha256_file(onnx_path), trt.__version__,
                                            frames[:used], batch, input_dtype)
        if dynamic:
            calib_profile = builder.create_optimization_profile()
            fixed = (batch,) + shape[1:]
            calib_profile.set_shape(image.name, fixed, fixed, fixed)
            if config.set_calibration_profile(calib_profile) is False:
                raise ExportError("{}: TensorRT refused the calibration profile {}".format(onnx_path, fixed))
        config.set_flag(trt.BuilderFlag.INT8)
        calibration = {"images": int(len(frames)), "used": int(used), "dropped": int(len(frames) - used),
                       "batch": int(batch), "batches": int(used // batch),
                       "cache": os.path.basename(cache_path), "from_cache": False}
    try:
        if int8:
            feed = CalibrationFeed(cuda, frames[:used], batch, input_dtype)
            calibrator = _make_calibrator(trt, feed, cache_path)
            config.int8_calibrator = calibrator
        serialized = builder.build_serialized_network(network, config)
    except BaseException:
        if feed is not None:  # the build's own error matters; a failing free after it (sticky CUDA error) must not hide it
            with contextlib.suppress(Exception):
                feed.close()
        raise
    if feed is not None:
        feed.close()
    if feed is not None and feed.error is not None:
        error = feed.error
        where = cache_path if isinstance(error, OSError) else calib_dir
        text = str(error) if isinstance(error, EdgeadError) else "{}: {}".format(type(error).__name__, error)
        raise ExportError("{}: INT8 calibration failed ({}): {}".format(onnx_path, where, " ".join(text.split())))
    if serialized is None:
        raise ExportError("{}: TensorRT failed to build the engine (run with --verbose for the builder log; "
                          "try a larger --workspace)".format(onnx_path))
    if calibration is not None:
        calibration["from_cache"] = bool(calibrator.cache_read and feed.fed == 0)  # TensorRT took the cache
    built = {"version": trt.__version__, "fp16": bool(fp16), "int8": bool(int8),
             "strongly_typed": bool(strongly_typed), "tf32": bool(tf32),
             "gpu": cuda.device_name(), "compute_capability": cuda.compute_capability(),
             "workspace_mb": int(workspace_mb), "plugin_lib": loaded_plugin,
             "max_batch": int(max_batch) if dynamic else int(shape[0]),
             "opt_batch": int(opt_batch) if dynamic else int(shape[0]),
             "int8_calibration": calibration, "int8_explicit": bool(explicit_int8),
             "build_seconds": round(time.time() - started, 1)}
    sidecar = dict(info)
    sidecar["tensorrt"] = built
    engine_files.write_engine_pair(engine_path, bytes(serialized), sidecar)
    if calibration is not None:
        _remove_stale_caches(engine_path, cache_path)
    return {"onnx": onnx_path, "engine": engine_path, "sidecar": modelinfo.sidecar_path(engine_path),
            "engine_bytes": os.path.getsize(engine_path), "tensorrt": built}
