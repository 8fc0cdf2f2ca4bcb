"""PatchCore's locally aware patch features: normalised images -> ``[N, D, H/s0, W/s0]`` float32.

Per the paper (section 3.1) and anomalib: the two middle stages of the backbone (timm ``out_indices`` (2, 3):
strides 8 and 16), each averaged over its 3x3 neighbourhood (``avg_pool2d(3, stride 1, padding 1)``,
zero padding counted), the deeper one bilinearly upsampled to the first one's grid (``align_corners=False``),
concatenated to ``C = C_1 + C_2`` channels and projected to ``D`` channels by adaptive average pooling over
the channel axis (``projection_matrix``; none when ``D == C``).

Projection, pooling and upsampling are all linear, and the projection acts on channels only, so it commutes
with the other two: each stage is projected by its own block of columns of the matrix (a 1x1 convolution)
and the stages are summed. Each stage projects before pooling when that shrinks it (``D < C_i``), after
otherwise, and is upsampled last: the same numbers as concatenate-then-project, with less work.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgead.errors import ConfigError

#: timm feature stages PatchCore uses (the two middle ones of the 4-stage pyramids: strides 8 and 16)
OUT_INDICES = (2, 3)
#: Side of the local neighbourhood averaged around each patch (the paper's p = 3)
AGGREGATION = 3
#: Largest default D: the paper's target dimension (WideResNet50's 1536 channels -> 1024)
MAX_DEFAULT_DIM = 1024
#: Default D as a fraction of the two stages' channels: the paper's 1024 of WideResNet50's 1536
DEFAULT_DIM_FRACTION = 2.0 / 3.0


def projection_matrix(channels, dim):
    """float64 ``[dim, channels]``: adaptive average pooling of a ``channels``-vector to ``dim`` values.

    Row ``i`` averages channels ``floor(i C / D)`` .. ``ceil((i + 1) C / D) - 1``, exactly as
    ``torch.nn.functional.adaptive_avg_pool1d`` does (``dim <= channels``).
    """
    channels, dim = int(channels), int(dim)
    if not 1 <= dim <= channels:
        raise ConfigError("the PatchCore dimension must be in 1..{} (the channels of the two stages), got {}".format(
            channels, dim))
    matrix = np.zeros((dim, channels), np.float64)
    for i in range(dim):
        start, stop = (i * channels) // dim, -(-((i + 1) * channels) // dim)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


def default_dim(stage_channels):
    """The default D: two thirds of the channels of the two stages (rounded up), at most ``MAX_DEFAULT_DIM``: the
    paper's target size for WideResNet50 (1536 -> 1024), applied to every backbone (ResNet18: 384 -> 256;
    EfficientNet-Lite0: 152 -> 102). The paper's code pools each layer to 1024 values and then averages the layers;
    this is one adaptive average over the concatenated channels (anomalib projects nothing). On the demo
    categories (Lite0) it scored mean image AUROC 0.991 where all 152 channels scored 0.984, and the
    nearest-neighbour search costs D/C of the unprojected one."""
    return min(MAX_DEFAULT_DIM, int(math.ceil(DEFAULT_DIM_FRACTION * sum(int(c) for c in stage_channels) - 1e-9)))


class PatchcoreEmbedding(nn.Module):
    """Normalised images ``[N, 3, H, W]`` -> locally aware patch features ``[N, D, H/s0, W/s0]`` float32.

    extractor: a truncated timm feature pyramid returning the stages ``stage_channels`` at ``stage_strides``
    (``edgead.backbones.create_feature_extractor(name, input_hw, out_indices=OUT_INDICES)``).
    """

    def __init__(self, extractor, stage_channels, stage_strides, dim, aggregation=AGGREGATION):
        super().__init__()
        self.extractor = extractor
        stage_channels = [int(c) for c in stage_channels]
        total = sum(stage_channels)
        self.dim = int(dim)
        self.aggregation = int(aggregation)
        if self.aggregation < 1 or self.aggregation % 2 == 0:
            raise ConfigError("the PatchCore neighbourhood must be an odd size >= 1, got {}".format(aggregation))
        for stride in stage_strides:
            if stride % stage_strides[0]:
                raise ConfigError("stage strides {} are not integer multiples".format(list(stage_strides)))
        self.projected = self.dim < total
        self.project_first = []
        self.factors = [int(stride) // int(stage_strides[0]) for stride in stage_strides]
        matrix = projection_matrix(total, self.dim) if self.projected else None
        offsets = np.concatenate([[0], np.cumsum(stage_channels)])
        for stage, channels in enumerate(stage_channels):
            weight = None
            if self.projected:  # this stage's columns of the projection, as a 1x1 convolution [D, C_i, 1, 1]
                block = matrix[:, offsets[stage]:offsets[stage + 1]]
                weight = torch.from_numpy(block.astype(np.float32)).reshape(self.dim, channels, 1, 1)
            self.register_buffer("stage%d_projection" % stage, weight)  # persistent: an ONNX initializer
            self.project_first.append(self.projected and self.dim < channels)

    @property
    def projection(self):
        """``"adaptive_avg"`` or ``"none"`` (model.json ``embedding.projection``)."""
        return "adaptive_avg" if self.projected else "none"

    def forward(self, images):
        features = self.extractor(images)
        radius = self.aggregation // 2
        parts = []
        for stage, feature in enumerate(features):
            weight = getattr(self, "stage%d_projection" % stage)
            if weight is not None and self.project_first[stage]:
                feature = F.conv2d(feature, weight)
            if self.aggregation > 1:
                feature = F.avg_pool2d(feature, self.aggregation, stride=1, padding=radius)
            if weight is not None and not self.project_first[stage]:
                feature = F.conv2d(feature, weight)
            if self.factors[stage] > 1:  # a constant scale: the exported Resize carries no shape arithmetic
                feature = F.interpolate(feature, scale_factor=float(self.factors[stage]), mode="bilinear",
                                        align_corners=False)
            parts.append(feature)
        if self.projected:
            out = parts[0]
            for part in parts[1:]:
                out = out + part
            return out
        return torch.cat(parts, dim=1)
