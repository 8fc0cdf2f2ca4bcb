"""The one PaDiM embedding: frames -> normalised tensor -> truncated backbone -> fused gather/upsample/concat.

Fit, the torch reference path and the ONNX export all run this module, so they cannot drift apart.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgead.errors import ConfigError


def choose_channels(total_channels, dim, seed):
    """PaDiM's random channel subset: ``dim`` distinct indices into the concatenated stages, sorted.

    Sorting changes nothing for the Gaussian model (Mahalanobis distance is invariant to a joint
    permutation) but lets the fused gather take each stage's channels in one contiguous pass.
    """
    if dim < 1:
        raise ConfigError("embedding dim must be >= 1, got {}".format(dim))
    if dim > total_channels:
        raise ConfigError("embedding dim {} exceeds the {} backbone channels".format(dim, total_channels))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total_channels, size=dim, replace=False)).astype(np.int64)


class Preprocess(nn.Module):
    """uint8 RGB frames ``[N, H, W, 3]`` -> normalised float32 ``[N, 3, H, W]``: ``(x/255 - mean)/std``."""

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def forward(self, frames):
        # Cast first: TensorRT accepts a uint8 network input only when it feeds a Cast directly.
        return frames.to(torch.float32).permute(0, 3, 1, 2) * self.scale + self.shift


class PatchEmbedding(nn.Module):
    """Normalised images ``[N, 3, H, W]`` -> embedding ``[N, D, H/s0, W/s0]`` float32.

    For each stage the chosen channels are gathered first (``index_select``), then nearest-upsampled
    by the integer factor ``s_i / s_0`` and concatenated. Equal to the PaDiM reference
    ``embedding_concat`` followed by ``index_select`` with the same (sorted) indices.
    """

    def __init__(self, extractor, channel_indices, stage_channels, stage_strides, prune_deepest=False):
        super().__init__()
        channel_indices = np.asarray(channel_indices, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(stage_channels)])
        self.factors = []
        self.stage_used = []
        for stage, stride in enumerate(stage_strides):
            if stride % stage_strides[0]:
                raise ConfigError("stage strides {} are not integer multiples".format(stage_strides))
            local = channel_indices[(channel_indices >= offsets[stage]) & (channel_indices < offsets[stage + 1])]
            local = local - offsets[stage]
            self.register_buffer("stage%d_index" % stage, torch.from_numpy(local.copy()), persistent=False)
            self.factors.append(stride // stage_strides[0])
            self.stage_used.append(len(local) > 0)
        self.dim = len(channel_indices)
        self.pruned = False
        if prune_deepest:
            # The deepest block computes only the chosen channels (edgead.pruning); its output is then
            # already gathered, so the last stage's index becomes 0..k-1.
            from edgead.pruning import prune_deepest_block

            last = len(stage_strides) - 1
            local = getattr(self, "stage%d_index" % last)
            extractor, self.pruned = prune_deepest_block(extractor, local)
            if self.pruned:
                self.register_buffer("stage%d_index" % last, torch.arange(len(local)), persistent=False)
        self.extractor = extractor

    def forward(self, images):
        features = self.extractor(images)
        parts = []
        for stage, feature in enumerate(features):
            if not self.stage_used[stage]:
                continue
            chosen = feature.index_select(1, getattr(self, "stage%d_index" % stage))
            factor = self.factors[stage]
            if factor > 1:
                chosen = F.interpolate(chosen, scale_factor=float(factor), mode="nearest")
            parts.append(chosen)
        return torch.cat(parts, dim=1)


class FrameEmbedding(nn.Module):
    """uint8 frames ``[N, H, W, 3]`` -> embedding ``[N, D, h, w]``: Preprocess + PatchEmbedding.

    This is the exported front end of the ONNX graph.
    """

    def __init__(self, preprocess, patch_embedding):
        super().__init__()
        self.preprocess = preprocess
        self.patch_embedding = patch_embedding

    def forward(self, frames):
        return self.patch_embedding(self.preprocess(frames))


@torch.no_grad()
def embed_frames(frame_embedding, frames):
    """uint8 ``[B, H, W, 3]`` RGB frames (numpy or tensor) at the model input size -> ``frame_embedding``'s output
    (float32), without autograd: what every method's fitter calls on a training batch."""
    return frame_embedding(torch.as_tensor(np.ascontiguousarray(frames)))
