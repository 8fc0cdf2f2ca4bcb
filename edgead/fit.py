"""PaDiM fit: stream good images through the embedding into mergeable float64 Gaussian sums."""
import numpy as np
import torch

from edgead import backbones, blur, padim
from edgead.bundle import PadimBundle
from edgead.embedding import FrameEmbedding, PatchEmbedding, Preprocess, choose_channels
from edgead.errors import ConfigError
from edgead.weights import load_backbone


def make_config(backbone_name, weights_description, extractor, input_hw, dim, seed, blur_sigma=4.0):
    """model.json dict for a new PaDiM model (statistics-dependent fields filled in by ``fit_padim``)."""
    spec = backbones.get_spec(backbone_name)
    height, width = (int(v) for v in input_hw)
    channels, strides = backbones.stage_info(extractor)
    if height % strides[-1] or width % strides[-1]:
        raise ConfigError("input size {}x{} must be a multiple of {}".format(height, width, strides[-1]))
    dim = spec.default_dim if dim is None else int(dim)
    dim = min(dim, sum(channels))
    indices = choose_channels(sum(channels), dim, seed)
    return {
        "method": "padim",
        "backbone": {
            "name": spec.name,
            "out_indices": list(spec.out_indices),
            "strides": strides,
            "channels": channels,
            "weights": weights_description,
        },
        "input": {
            "height": height,
            "width": width,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "channel_order": "RGB",
            "resize": "area",
        },
        "embedding": {
            "dim": dim,
            "seed": int(seed),
            "grid": [height // strides[0], width // strides[0]],
            "channel_indices": indices.tolist(),
        },
        "padim": {"epsilon": padim.EPSILON, "n_train": 0},
        "postprocess": {"blur_sigma": float(blur_sigma), "blur_radius": blur.blur_radius(blur_sigma)},
        "calibration": None,
    }


class PadimFitter:
    """Holds the embedding and the running statistics of one fit; feed it batches, then ``bundle()``."""

    def __init__(self, backbone="efficientnet_lite0", weights="imagenet", input_hw=(256, 256), dim=None, seed=0):
        extractor, description = load_backbone(backbone, weights, seed=seed)
        self.config = make_config(backbone, description, extractor, input_hw, dim, seed)
        cfg = self.config
        patch = PatchEmbedding(extractor, cfg["embedding"]["channel_indices"], cfg["backbone"]["channels"],
                               cfg["backbone"]["strides"])
        self.embedding = FrameEmbedding(Preprocess(cfg["input"]["mean"], cfg["input"]["std"]), patch).eval()
        grid_h, grid_w = cfg["embedding"]["grid"]
        self.accumulator = padim.GaussianAccumulator(grid_h * grid_w, cfg["embedding"]["dim"])

    @torch.no_grad()
    def update(self, frames):
        """frames: uint8 ``[B, H, W, 3]`` RGB (numpy or tensor) at the model input size."""
        frames = torch.as_tensor(np.ascontiguousarray(frames))
        self.accumulator.update(self.embedding(frames))

    def bundle(self):
        """Finish: Cholesky whitening of every patch covariance -> PadimBundle."""
        mean, whitening = self.accumulator.finalize(self.config["padim"]["epsilon"])
        config = dict(self.config)
        config["padim"] = dict(config["padim"], n_train=self.accumulator.count)
        state = {k: v.clone() for k, v in self.embedding.patch_embedding.extractor.state_dict().items()}
        return PadimBundle(config, state, mean, whitening)


def fit_padim(batches, backbone="efficientnet_lite0", weights="imagenet", input_hw=(256, 256), dim=None, seed=0):
    """Fit PaDiM on an iterable of uint8 ``[B, H, W, 3]`` batches (or ``(batch, paths)`` pairs)."""
    fitter = PadimFitter(backbone, weights, input_hw, dim, seed)
    for item in batches:
        fitter.update(item[0] if isinstance(item, tuple) else item)
    return fitter.bundle()
