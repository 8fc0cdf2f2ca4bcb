"""Runs inside the anomalib venv: fit anomalib 2.7's PaDiM (ResNet18, layers 1-3, random init) and export ONNX.

Usage: python _anomalib_export.py OUT_DIR N_TRAIN SEED SIZE  -> prints JSON {"onnx": path, "version": ...}
       python _anomalib_export.py OUT_DIR N_TRAIN SEED SIZE patchcore RATIO
           -> anomalib's PatchCore (ResNet18, layers 2-3, random init, coreset ratio RATIO, 9 neighbours);
              prints JSON {"onnx", "version", "method", "coreset_size", "embeddings", "input_shape",
              "input_dtype", "outputs", "opset", "fit_s"}
Training frames come from ``synthetic_frames`` (same generator as vs_anomalib.py).
"""
import json
import os
import sys
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")


def synthetic_frames(n, size, seed):
    """uint8 ``[n, size, size, 3]``: blurred uniform noise (identical to vs_anomalib.synthetic_frames)."""
    import cv2

    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    return np.stack([cv2.GaussianBlur(f, (7, 7), 2.0) for f in frames])


def main(out_dir, n_train, seed, size):
    import anomalib
    from anomalib.models import Padim

    torch.manual_seed(seed)
    model = Padim(backbone="resnet18", layers=["layer1", "layer2", "layer3"], pre_trained=False)
    frames = synthetic_frames(n_train, size, seed)
    images = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    model.model.train()
    with torch.no_grad():
        for start in range(0, n_train, 8):
            model.model((images[start:start + 8] - mean) / std)
    model.model.fit()
    model.eval()
    path = model.to_onnx(out_dir, input_size=(size, size))
    print(json.dumps({"onnx": str(path), "version": anomalib.__version__}))


def main_patchcore(out_dir, n_train, seed, size, ratio):
    """anomalib's own PatchCore pipeline minus Lightning: train-mode forwards fill ``embedding_store``,
    ``Patchcore.fit()`` (= ``model.subsample_embedding(ratio)``: k-center greedy on a sparse random projection)
    builds the memory bank, then ``to_onnx`` as ``Engine.export(export_type="onnx")`` does."""
    import time

    import anomalib
    import onnx
    from anomalib.models import Patchcore

    torch.manual_seed(seed)  # backbone init and KCenterGreedy's random first centre
    model = Patchcore(backbone="resnet18", layers=["layer2", "layer3"], pre_trained=False,
                      coreset_sampling_ratio=ratio, num_neighbors=9)
    frames = synthetic_frames(n_train, size, seed)
    images = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    start = time.perf_counter()
    model.model.train()
    with torch.no_grad():
        for first in range(0, n_train, 8):
            model.model((images[first:first + 8] - mean) / std)
    embeddings = sum(int(e.shape[0]) for e in model.model.embedding_store)
    coreset_start = time.perf_counter()
    model.fit()
    model._is_fitted = torch.tensor([True])
    fit_s, coreset_s = time.perf_counter() - start, time.perf_counter() - coreset_start
    model.eval()
    path = model.to_onnx(out_dir, input_size=(size, size))  # the default export: batch 2 (see the module doc)
    # The same model with no dynamic axes: the exporter's example input is then batch 1, a batch-1 graph.
    path_b1 = model.to_onnx(os.path.join(out_dir, "batch1"), input_size=(size, size), dynamic_axes={})
    graph = onnx.load(str(path), load_external_data=False)

    def shape(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    print(json.dumps({
        "onnx": str(path), "version": anomalib.__version__, "method": "patchcore",
        "coreset_size": int(model.model.memory_bank.shape[0]), "embedding_dim": int(model.model.memory_bank.shape[1]),
        "embeddings": embeddings, "coreset_ratio": ratio,
        "input_name": graph.graph.input[0].name, "input_shape": shape(graph.graph.input[0]),
        "input_dtype": onnx.TensorProto.DataType.Name(graph.graph.input[0].type.tensor_type.elem_type),
        "outputs": {o.name: shape(o) for o in graph.graph.output},
        "opset": max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")),
        "onnx_batch1": str(path_b1), "fit_s": round(fit_s, 2), "coreset_s": round(coreset_s, 2)}))


if __name__ == "__main__":
    if len(sys.argv) > 5 and sys.argv[5] == "patchcore":
        main_patchcore(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                       float(sys.argv[6]) if len(sys.argv) > 6 else 0.1)
    elif len(sys.argv) > 5 and sys.argv[5] != "padim":
        sys.exit("unknown method {!r} (padim or patchcore)".format(sys.argv[5]))
    else:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
