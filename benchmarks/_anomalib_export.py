"""Runs inside the anomalib venv: fit anomalib 2.7's PaDiM (ResNet18, layers 1-3, random init) and export ONNX.

Usage: python _anomalib_export.py OUT_DIR N_TRAIN SEED SIZE  -> prints JSON {"onnx": path, "version": ...}
Training frames come from ``synthetic_frames`` (same generator as vs_anomalib.py).
"""
import json
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


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
