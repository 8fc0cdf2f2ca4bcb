"""The PaDiM detector as one torch module: uint8 frames -> (anomaly map, score).

This is the workstation inference path (eval, compare) and the source of the exported ONNX
front end; its head is mirrored op-for-op by ``edgead.exporters.onnx_head``.
"""
import torch
from torch import nn

from edgead import blur, padim
from edgead.embedding import FrameEmbedding


#: Largest dense ``[P, D, D]`` float32 whitening a head precomputes; above it (WideResNet50: 4.96 GB next to the
#: 2.48 GB packed one) each forward expands the packed rows chunk by chunk instead, trading time for memory.
DENSE_WHITENING_BYTES = 512 << 20


class PadimHead(nn.Module):
    """embedding ``[N, D, h, w]`` -> (anomaly_map ``[N, 1, H, W]`` float32, score ``[N]`` float32)."""

    def __init__(self, mean, whitening_packed, output_hw, blur_sigma, grid_hw):
        super().__init__()
        self.register_buffer("mean", mean.to(torch.float32), persistent=False)
        num_patches, dim = mean.shape
        if num_patches * dim * dim * 4 <= DENSE_WHITENING_BYTES:
            dense, packed, self.patch_chunk = padim.dense_whitening(whitening_packed.to(torch.float32)), None, num_patches
        else:  # the packed rows stay as they are (no copy); dense blocks of DENSE_WHITENING_BYTES / 8 per chunk
            dense, packed = None, whitening_packed.to(torch.float32)
            self.patch_chunk = max(1, DENSE_WHITENING_BYTES // 8 // (dim * dim * 4))
        self.register_buffer("whitening", dense, persistent=False)  # buffers (or None): .to(device) moves them
        self.register_buffer("whitening_packed", packed, persistent=False)
        self.output_hw = tuple(int(v) for v in output_hw)
        self.grid_hw = tuple(int(v) for v in grid_hw)
        (height, width), (grid_h, grid_w) = self.output_hw, self.grid_hw
        # upsample + blur per axis as one matrix (edgead.blur): map = rows_op @ grid @ cols_op_t
        self.register_buffer("rows_op", _float32(blur.upsample_blur_matrix(height, grid_h, blur_sigma)), persistent=False)
        self.register_buffer("cols_op_t", _float32(blur.upsample_blur_matrix(width, grid_w, blur_sigma).T), persistent=False)

    def distance_map(self, embedding):
        """``[N, D, h, w]`` -> Mahalanobis distance ``[N, 1, h, w]``."""
        batch, dim, height, width = embedding.shape
        flat = embedding.reshape(batch, dim, -1)
        if self.whitening is not None:
            dist = padim.mahalanobis(flat, self.mean, self.whitening)
        else:
            dist = torch.cat([
                padim.mahalanobis(flat[:, :, start:start + self.patch_chunk], self.mean[start:start + self.patch_chunk],
                                  padim.dense_whitening(self.whitening_packed[start:start + self.patch_chunk]))
                for start in range(0, flat.shape[2], self.patch_chunk)], dim=1)
        return dist.reshape(batch, 1, height, width)

    def upsample_blur(self, grid_map):
        """Bilinear upsample then separable scipy-reflect Gaussian blur: ``[N, 1, h, w]`` -> ``[N, 1, H, W]``."""
        return torch.matmul(torch.matmul(self.rows_op, grid_map), self.cols_op_t)

    def forward(self, embedding):
        amap = self.upsample_blur(self.distance_map(embedding))
        return amap, amap.amax(dim=(1, 2, 3))


def _float32(array):
    return torch.from_numpy(array.astype("float32"))


class DetectorModel(nn.Module):
    """uint8 RGB frames ``[N, H, W, 3]`` -> (anomaly_map ``[N, 1, H, W]``, score ``[N]``), float32: a method's
    front end (``FrameEmbedding``) followed by its head (``PadimHead``, ``PatchcoreHead``, ...)."""

    def __init__(self, frame_embedding: FrameEmbedding, head: nn.Module):
        super().__init__()
        self.frame_embedding = frame_embedding
        self.head = head

    def forward(self, frames):
        return self.head(self.frame_embedding(frames))


#: The PaDiM detector (the name edgead 0.1 code imports)
PadimModel = DetectorModel
