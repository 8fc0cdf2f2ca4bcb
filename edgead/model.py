"""The PaDiM detector as one torch module: uint8 frames -> (anomaly map, score).

This is the workstation inference path (eval, compare) and the source of the exported ONNX
front end; its head is mirrored op-for-op by ``edgead.exporters.onnx_head``.
"""
import torch
import torch.nn.functional as F
from torch import nn

from edgead import blur, padim
from edgead.embedding import FrameEmbedding


class PadimHead(nn.Module):
    """embedding ``[N, D, h, w]`` -> (anomaly_map ``[N, 1, H, W]`` float32, score ``[N]`` float32)."""

    def __init__(self, mean, whitening_packed, output_hw, blur_sigma):
        super().__init__()
        self.register_buffer("mean", mean.to(torch.float32), persistent=False)
        self.register_buffer(
            "whitening", padim.dense_whitening(whitening_packed.to(torch.float32)), persistent=False
        )
        self.output_hw = tuple(int(v) for v in output_hw)
        radius = blur.blur_radius(blur_sigma)
        taps = torch.from_numpy(blur.gaussian_kernel1d(blur_sigma, radius)).to(torch.float32)
        self.register_buffer("taps_x", taps.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("taps_y", taps.view(1, 1, -1, 1), persistent=False)
        height, width = self.output_hw
        self.register_buffer("pad_y", torch.from_numpy(blur.reflect_pad_index(height, radius)), persistent=False)
        self.register_buffer("pad_x", torch.from_numpy(blur.reflect_pad_index(width, radius)), persistent=False)

    def distance_map(self, embedding):
        """``[N, D, h, w]`` -> Mahalanobis distance ``[N, 1, h, w]``."""
        batch, dim, height, width = embedding.shape
        dist = padim.mahalanobis(embedding.reshape(batch, dim, -1), self.mean, self.whitening)
        return dist.reshape(batch, 1, height, width)

    def blur(self, amap):
        """Separable Gaussian blur with scipy-reflect borders: ``[N, 1, H, W]`` -> same."""
        amap = F.conv2d(amap.index_select(3, self.pad_x), self.taps_x)
        return F.conv2d(amap.index_select(2, self.pad_y), self.taps_y)

    def forward(self, embedding):
        amap = self.distance_map(embedding)
        amap = F.interpolate(amap, size=self.output_hw, mode="bilinear", align_corners=False)
        amap = self.blur(amap)
        return amap, amap.amax(dim=(1, 2, 3))


class PadimModel(nn.Module):
    """uint8 RGB frames ``[N, H, W, 3]`` -> (anomaly_map ``[N, 1, H, W]``, score ``[N]``), float32."""

    def __init__(self, frame_embedding: FrameEmbedding, head: PadimHead):
        super().__init__()
        self.frame_embedding = frame_embedding
        self.head = head

    def forward(self, frames):
        return self.head(self.frame_embedding(frames))
