"""Build a TensorRT engine from an edgead ONNX file (TensorRT Python API), plus its JSON sidecar.

``build_engine(onnx_path, engine_path, fp16=False, int8=False, calib_dir=None, workspace_mb=1024,
plugin_lib=None, max_batch=8)`` -> summary dict. Steps: read the ``edgead`` metadata (no onnx import), load
``libedgead_plugins.so`` when the graph has the ``PadimMahalanobis`` node (before parsing), parse, configure
(fp16 / int8 entropy calibration on images from ``calib_dir`` / workspace pool / a batch profile for
dynamic-batch graphs), build the serialized network, write ``model.engine`` and ``model.engine.json``
(metadata + ``tensorrt`` {version, fp16, int8, gpu, compute_capability, workspace_mb, plugin_lib} +
``engine_sha256``) as one pair (``edgead.runtime.engine_files``: a kill never leaves a mismatched pair).
Works with TensorRT 8.5, 8.6, 10.x. Every failure raises ExportError / BackendError naming the file.
"""
import glob
import os
import time

import numpy as np

from edgead import atomic
from edgead.errors import BackendError, ExportError
from edgead.runtime import engine_files, modelinfo, tensorrt_plugin
from edgead.runtime.engines import tensorrt_engine

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _import_tensorrt(onnx_path):
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ExportError("{}: cannot build a TensorRT engine: the tensorrt Python module is not installed ({}); "
                          "run `edgead build` on the target (JetPack ships python3-libnvinfer) or "
                          "`pip install tensorrt` on x86".format(onnx_path, exc))
    return trt


def calibration_frames(calib_dir, height, width, limit=512):
    """uint8 ``[M, H, W, 3]`` RGB frames from the images in ``calib_dir`` (recursive), area-resized."""
    import cv2

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


def _make_calibrator(trt, frames, batch, input_dtype, cache_path):
    """An IInt8EntropyCalibrator2 feeding ``frames`` in batches of ``batch`` through one device buffer."""
    cuda = tensorrt_engine.CudaRuntime()
    sample = np.ascontiguousarray(frames[:batch], input_dtype)
    device = cuda.malloc(sample.nbytes)

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.position = 0

        def get_batch_size(self):
            return batch

        def get_batch(self, names):
            if self.position + batch > len(frames):
                return None
            chunk = np.ascontiguousarray(frames[self.position:self.position + batch], input_dtype)
            self.position += batch
            cuda.copy_to_device(device, chunk)
            return [int(device)]

        def read_calibration_cache(self):
            if cache_path and os.path.exists(cache_path):
                with open(cache_path, "rb") as fh:
                    return fh.read()
            return None

        def write_calibration_cache(self, cache):
            if cache_path:
                atomic.write_bytes(cache_path, bytes(cache))

    return Calibrator()


def _parse(trt, onnx_path, logger):
    major = int(trt.__version__.split(".")[0])
    builder = trt.Builder(logger)
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.path.abspath(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        first = errors[0] if errors else "unknown parser error"
        hint = ""
        if "PadimMahalanobis" in " ".join(errors):
            hint = " (the plugin library is not loaded or was built for another TensorRT; pass --plugin-lib)"
        raise ExportError("{}: the TensorRT ONNX parser failed: {}{}".format(onnx_path, first, hint))
    return builder, network, parser


def build_engine(onnx_path, engine_path, fp16=False, int8=False, calib_dir=None, workspace_mb=1024,
                 plugin_lib=None, max_batch=8, verbose=False):
    """Build and save ``engine_path`` (+ ``engine_path.json``) from ``onnx_path``; returns the summary dict."""
    onnx_path, engine_path = os.fspath(onnx_path), os.fspath(engine_path)
    info = modelinfo.load_model_info(onnx_path)  # ModelFileError when missing / not an edgead model
    if int8 and not calib_dir:
        raise ExportError("{}: --int8 needs --calib DIR with representative (good) images".format(onnx_path))
    if workspace_mb <= 0:
        raise ExportError("{}: --workspace must be a positive number of MiB, got {}".format(onnx_path, workspace_mb))
    trt = _import_tensorrt(onnx_path)
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
    started = time.time()
    builder, network, _parser = _parse(trt, onnx_path, logger)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if fp16:
        if not builder.platform_has_fast_fp16:
            raise ExportError("{}: --fp16 requested but this GPU has no fast fp16".format(onnx_path))
        config.set_flag(trt.BuilderFlag.FP16)
    image = network.get_input(0)
    shape = tuple(image.shape)
    if shape[0] < 0:
        profile = builder.create_optimization_profile()
        rest = tuple(shape[1:])
        profile.set_shape(image.name, (1,) + rest, (max(1, max_batch // 2),) + rest, (max_batch,) + rest)
        config.add_optimization_profile(profile)
        if int8:
            config.set_calibration_profile(profile)
    if int8:
        if not hasattr(trt, "IInt8EntropyCalibrator2"):
            raise ExportError("{}: this TensorRT ({}) has no implicit INT8 calibration; use --fp16".format(
                onnx_path, trt.__version__))
        if not builder.platform_has_fast_int8:
            raise ExportError("{}: --int8 requested but this GPU has no fast int8".format(onnx_path))
        height, width = modelinfo.input_hw(info)
        frames = calibration_frames(calib_dir, height, width)
        batch = shape[0] if shape[0] > 0 else 1
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _make_calibrator(trt, frames, batch, trt.nptype(image.dtype),
                                                  engine_path + ".calib")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("{}: TensorRT failed to build the engine (run with --verbose for the builder log; "
                          "try a larger --workspace)".format(onnx_path))
    cuda = tensorrt_engine.CudaRuntime()
    built = {"version": trt.__version__, "fp16": bool(fp16), "int8": bool(int8),
             "gpu": cuda.device_name(), "compute_capability": cuda.compute_capability(),
             "workspace_mb": int(workspace_mb), "plugin_lib": loaded_plugin,
             "max_batch": int(max_batch) if shape[0] < 0 else int(shape[0]),
             "build_seconds": round(time.time() - started, 1)}
    sidecar = dict(info)
    sidecar["tensorrt"] = built
    engine_files.write_engine_pair(engine_path, bytes(serialized), sidecar)
    return {"onnx": onnx_path, "engine": engine_path, "sidecar": modelinfo.sidecar_path(engine_path),
            "engine_bytes": os.path.getsize(engine_path), "tensorrt": built}
