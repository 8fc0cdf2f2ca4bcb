"""Tiny ONNX models that obey the edgead ONNX contract, built with ``onnx.helper`` (no torch, no exporter).

Graph: ``image`` uint8 ``[N, H, W, 3]`` -> Cast f32 -> ReduceMean over channels -> Transpose ->
``anomaly_map`` f32 ``[N, 1, H, W]`` (pixel brightness 0..255); ``score`` = ReduceMax -> f32 ``[N]``.
So a bright blob on a mid-grey frame is "anomalous" above the calibrated threshold.
"""
import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper

FAKE_HW = (64, 64)
#: thresholds in map units (= mean channel brightness); synthetic:// backgrounds stay below 160
FAKE_CALIBRATION = {"image_threshold": 200.0, "pixel_threshold": 200.0, "score_min": 100.0,
                    "score_max": 255.0, "source": "validation"}


def fake_metadata(hw=FAKE_HW, batch=1, calibration=FAKE_CALIBRATION, input_dtype="uint8", resize="area"):
    """The ``edgead`` metadata dict (model.json + export) of a fake model."""
    return {
        "format_version": 1,
        "edgead_version": "0.1.0",
        "method": "padim",
        "backbone": {"name": "fake", "out_indices": [1], "strides": [4], "channels": [3], "weights": "none"},
        "input": {"height": hw[0], "width": hw[1], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                  "channel_order": "RGB", "resize": resize},
        "embedding": {"dim": 3, "seed": 0, "grid": [hw[0] // 4, hw[1] // 4], "channel_indices": [0, 1, 2]},
        "padim": {"epsilon": 0.01, "n_train": 1},
        "postprocess": {"blur_sigma": 4.0, "blur_radius": 16},
        "calibration": calibration,
        "export": {"mahalanobis": "onnx", "precision": "fp32", "batch": batch, "opset": 17,
                   "input_dtype": input_dtype},
    }


def build_fake_model(hw=FAKE_HW, batch=1, calibration=FAKE_CALIBRATION, input_dtype="uint8", metadata=True,
                     resize="area"):
    """onnx.ModelProto. batch: int (fixed) or ``"dynamic"``; input_dtype: ``uint8`` or ``float32``."""
    height, width = hw
    n = "N" if batch == "dynamic" else int(batch)
    elem = TensorProto.UINT8 if input_dtype == "uint8" else TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["image_f"], ["mean_c"], axes=[3], keepdims=1),
        helper.make_node("Transpose", ["mean_c"], ["anomaly_map"], perm=[0, 3, 1, 2]),
        helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2, 3], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "edgead_fake",
        [helper.make_tensor_value_info("image", elem, [n, height, width, 3])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [n, 1, height, width]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, [n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgead-tests")
    model.ir_version = 8
    if metadata:
        helper.set_model_props(model, {"edgead": json.dumps(fake_metadata(hw, batch, calibration, input_dtype,
                                                                          resize)),
                                       "note": "fake"})
    onnx.checker.check_model(model)
    return model


def write_fake_model(path, **kwargs):
    """Write a fake model (see ``build_fake_model``) to ``path``; returns ``path`` as str."""
    path = os.fspath(path)
    onnx.save(build_fake_model(**kwargs), path)
    return path


def reference(frames):
    """What the fake model computes, in numpy: (map ``[N,1,H,W]`` f32, score ``[N]`` f32)."""
    amap = frames.astype(np.float32).mean(axis=3)[:, None]
    return amap, amap.reshape(len(frames), -1).max(axis=1)
