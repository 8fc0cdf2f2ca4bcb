"""int8 export: an explicitly quantised (QDQ) front end, with PaDiM's statistics refitted on its features.

Steps (``build_int8``):

1. The front end (normalisation, truncated backbone, embedding: ``bundle.export_front_end()``) is traced to ONNX
   with a dynamic batch, as for any export.
2. ``onnxruntime.quantization.quantize_static`` puts QuantizeLinear/DequantizeLinear pairs around every Conv:
   weights int8, per output channel, symmetric; activations calibrated (min/max) on the good images given.
   The ``target`` picks the activation type: ``onnxruntime`` = uint8 with a zero point (what ONNX Runtime's
   x86 int8 kernels run fastest: QLinearConv u8s8, int32 bias), ``tensorrt`` = int8 symmetric (zero point 0,
   float bias: TensorRT's explicit quantisation, the replacement of its implicit-calibrator path; ONNX Runtime
   runs it too).
3. Because int8 features differ from fp32 ones, the Gaussian statistics are refitted on the features the
   quantised network computes (ONNX Runtime's int8 kernels on this machine), with the out-of-sample
   thresholds of a normal fit (``PadimFitter.for_features``): the head models what the device computes.
4. The PaDiM head of the refitted statistics (``onnx_head``, fp16 or fp32 storage) is appended; the metadata
   is the refitted model.json plus the quantisation record.

The calibration images should be the training images (good parts only): they calibrate the activation ranges
and refit the statistics. Workstation side (torch + onnxruntime.quantization).
"""
import os
import tempfile

import numpy as np
import onnx

from edgead.errors import ExportError
from edgead.thresholds import DEFAULT_FOLDS, DEFAULT_QUANTILE

TARGETS = ("onnxruntime", "tensorrt")
CALIBRATION_METHODS = ("minmax", "percentile")
#: fewest calibration images accepted (the refit needs several per dimension; fewer is refused, not guessed)
MIN_CALIBRATION_IMAGES = 10
#: images the percentile (histogram) calibration takes (it holds all their activations); the refit uses all
PERCENTILE_MAX_IMAGES = 64
#: ops quantised in the front end (the backbone's convolutions; everything else stays float)
QUANTIZED_OPS = ("Conv",)


def check_options(bundle, target, calibration, mahalanobis):
    """ExportError (one line) for a model or option the int8 export does not take."""
    method = bundle.config.get("method")
    if method != "padim":
        raise ExportError("--precision int8 refits PaDiM's Gaussian statistics on the int8 features; {} models "
                          "export fp16 or fp32 (int8 for them is not built)".format(method))
    if target not in TARGETS:
        raise ExportError("--int8-target must be one of {}, not {!r}".format(", ".join(TARGETS), target))
    if calibration not in CALIBRATION_METHODS:
        raise ExportError("--int8-calibration must be one of {}, not {!r}".format(
            ", ".join(CALIBRATION_METHODS), calibration))
    if mahalanobis not in ("onnx", "plugin"):
        raise ExportError("--mahalanobis must be onnx or plugin, not {!r}".format(mahalanobis))


def check_frames(frames, input_hw, where="--calib"):
    """uint8 ``[N, H, W, 3]`` at the model input size with at least MIN_CALIBRATION_IMAGES images, else ExportError."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != tuple(input_hw) + (3,):
        raise ExportError("{}: calibration frames must be uint8 [N, {}, {}, 3], got {} {}".format(
            where, input_hw[0], input_hw[1], frames.dtype, list(frames.shape)))
    if len(frames) < MIN_CALIBRATION_IMAGES:
        raise ExportError("{}: {} calibration image(s); int8 needs at least {} good images (the training images: "
                          "they calibrate the activations and refit the statistics)".format(
                              where, len(frames), MIN_CALIBRATION_IMAGES))
    return frames


class _FrameReader:
    """``CalibrationDataReader``: the calibration frames one at a time, as the front end's input."""

    def __init__(self, frames, input_name, input_dtype):
        self.frames, self.input_name, self.input_dtype = frames, input_name, input_dtype
        self.position = 0

    def get_next(self):
        if self.position >= len(self.frames):
            return None
        frame = self.frames[self.position:self.position + 1]
        self.position += 1
        return {self.input_name: frame.astype(np.float32) if self.input_dtype == "float32" else frame}

    def rewind(self):
        self.position = 0


def quantize_front_end(front_end, frames, target="onnxruntime", calibration="minmax", input_dtype="uint8"):
    """QDQ-quantise ``front_end`` (ModelProto, dynamic batch, input ``image``, output ``embedding``).

    frames: uint8 ``[N, H, W, 3]`` good images. Returns ``(ModelProto, record)``; record: what the metadata states.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    symmetric = target == "tensorrt"
    # merge ranges every k images (bounded calibration memory); onnxruntime 1.32 raises "No data is collected"
    # when the last merge leaves nothing behind, i.e. when k divides the number of images
    merge_every = next(k for k in range(8, 64) if len(frames) % k)
    extra = {"WeightSymmetric": True, "ActivationSymmetric": symmetric, "CalibMaxIntermediateOutputs": merge_every,
             # TensorRT's Q/DQ layers take int8 only: the conv bias stays float there (its builder fuses it)
             "QuantizeBias": not symmetric}
    extra["CalibTensorRangeSymmetric"] = symmetric  # percentile defaults to symmetric ranges: wrong for uint8
    if calibration == "percentile":
        extra["CalibPercentile"] = 99.999
        # the histogram calibrator keeps every image's activations before binning: calibrate on a capped subset
        frames = frames[:PERCENTILE_MAX_IMAGES]
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[calibration]
    with tempfile.TemporaryDirectory(prefix="edgead-int8-") as tmp:
        source, prepared, quantized = (os.path.join(tmp, name) for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(front_end, source)
        quant_pre_process(source, prepared, skip_symbolic_shape=True)
        quantize_static(
            prepared, quantized, _FrameReader(frames, "image", input_dtype), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS), calibrate_method=method,
            extra_options=extra)
        model = onnx.load(quantized)
    record = {"target": target, "weights": "int8 per-channel symmetric",
              "activations": "int8 symmetric" if symmetric else "uint8 asymmetric",
              "calibration": calibration, "calibration_images": int(len(frames)), "ops": list(QUANTIZED_OPS)}
    return model, record


def front_end_session(model, threads=None):
    """ONNX Runtime CPU session (all optimisations: the int8 kernels) of a front-end ModelProto."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def session_embedder(session, input_dtype="uint8", batch_size=8):
    """``frames uint8 [B, H, W, 3] -> embedding [B, D, h, w] float32`` through ``session`` (in slices)."""
    def embed(frames):
        frames = np.asarray(frames)
        if input_dtype == "float32":
            frames = frames.astype(np.float32)
        return np.concatenate([session.run(["embedding"], {"image": frames[i:i + batch_size]})[0]
                               for i in range(0, len(frames), batch_size)])
    return embed


def refit_statistics(bundle, embed, frames, folds=DEFAULT_FOLDS, quantile=DEFAULT_QUANTILE, seed=0, batch_size=8):
    """PadimBundle of ``bundle``'s config and backbone with mean/whitening and thresholds from ``embed``'s
    features of ``frames`` (uint8 ``[N, H, W, 3]``). Returns ``(bundle, warnings)``."""
    from edgead.fit import PadimFitter

    fitter = PadimFitter.for_features(bundle.config, bundle.backbone_state, embed, batch_size=batch_size)
    fitter.check_calibration_memory(folds, len(frames))  # before the pass over the images, as fit does
    batches = [frames[i:i + batch_size] for i in range(0, len(frames), batch_size)]
    for batch in batches:
        fitter.update(batch)

    def load_images(indices):
        if len(indices) == len(frames) and np.array_equal(indices, np.arange(len(frames))):
            return iter(batches)
        return (frames[indices[i:i + batch_size]] for i in range(0, len(indices), batch_size))

    if folds:
        fitter.calibrate_out_of_sample(load_images, len(frames), folds, quantile, seed)
    refitted = fitter.bundle()
    return refitted, list(fitter.warnings)


def pin_batch(model, batch):
    """Set the dynamic batch of the front end's input and output to ``batch`` (int); ``"dynamic"`` keeps it."""
    if batch == "dynamic":
        return model
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_value = int(batch)
    del model.graph.value_info[:]  # inferred again by the checker / the runtime
    return model
