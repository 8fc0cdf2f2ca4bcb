"""The CFLOW-AD detector as torch modules: uint8 frames -> (anomaly map, score).

Front end (``CflowEmbedding``): the truncated backbone's stages (timm ``out_indices`` (2, 3, 4): strides 8, 16, 32),
each ``[N, C_l, h_l, w_l]`` flattened channel first to ``[N, C_l P_l]`` and concatenated to one ``[N, T]`` tensor
(``T = sum C_l P_l``): the one ``embedding`` output the ONNX front end has, with no transpose. ``split_scales``
takes it apart again into ``[N, C_l, P_l]``.

Head (``CflowHead``), mirrored op for op by ``edgead.exporters.cflow_head``: per scale, the decoder's inference form
(``edgead.cflow.flow.compile_decoder``) gives each patch's log-likelihood per dimension ``l``; as in the paper it
becomes a probability ``p = exp(l - l_ref)`` normalised by the scale's reference ``l_ref`` (the largest training
patch log-likelihood, fixed at fit, so a frame's map does not depend on the other frames of its batch as the
paper's and anomalib's batch maximum does), and the anomaly of the patch is ``relu(1 - p)`` in ``[0, 1]``. Each
scale's grid is bilinearly upsampled and blurred (``edgead.blur``, one matrix per axis) and the scales are summed:
the map lies in ``[0, L]`` for L scales, and the image score is its maximum.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgead import blur
from edgead.cflow import flow


def scale_layout(channels, grids):
    """``[(offset, P_l, C_l)]``: where each scale's features lie in the flat embedding ``[N, T]``."""
    layout, offset = [], 0
    for c, (h, w) in zip(channels, grids):
        layout.append((offset, int(h) * int(w), int(c)))
        offset += int(h) * int(w) * int(c)
    return layout


def split_scales(embedding, layout):
    """Flat embedding ``[N, T]`` -> list of channel-first patches ``[N, C_l, P_l]`` (views)."""
    return [embedding[:, o:o + p * c].reshape(embedding.shape[0], c, p) for o, p, c in layout]


class CflowEmbedding(nn.Module):
    """Normalised images ``[N, 3, H, W]`` -> flat multi-scale features ``[N, T]`` float32 (module docstring)."""

    def __init__(self, extractor):
        super().__init__()
        self.extractor = extractor

    def forward(self, images):
        return torch.cat([f.reshape(f.shape[0], -1) for f in self.extractor(images)], dim=1)


def _tensor(array):
    return torch.from_numpy(np.ascontiguousarray(array))


#: buffers of each block of a ``FlowDecoder`` (``block{i}_<name>``)
_BLOCK_BUFFERS = ("in_weight", "position_bias", "scale_weight", "scale_bias", "shift_weight", "shift_bias", "gain",
                  "offset", "passive", "active")


class FlowDecoder(nn.Module):
    """One scale's decoder, inference form: patches ``[N, C, P]`` -> log-likelihood per dimension ``[N, P]``."""

    def __init__(self, compiled):
        super().__init__()
        self.channels, self.split = int(compiled["channels"]), int(compiled["split"])
        self.clamp = float(compiled["clamp"])
        self.log_det_constant = float(compiled["log_det_constant"])
        encoding = _tensor(compiled["encoding"])  # [K, P]
        self.blocks = []
        for i, block in enumerate(compiled["blocks"]):
            tensors = {
                "in_weight": _tensor(block["in_weight"]),
                # q^T = condition_weight @ encoding + in_bias, [H, P]: the condition's share of the first layer
                "position_bias": torch.matmul(_tensor(block["condition_weight"]), encoding)
                + _tensor(block["in_bias"])[:, None],
                "scale_weight": _tensor(block["scale_weight"]), "scale_bias": _tensor(block["scale_bias"])[:, None],
                "shift_weight": _tensor(block["shift_weight"]), "shift_bias": _tensor(block["shift_bias"])[:, None],
                "gain": _tensor(block["gain"])[:, None], "offset": _tensor(block["offset"])[:, None],
                "passive": _tensor(block["permutation"][:self.split]),
                "active": _tensor(block["permutation"][self.split:]),
            }
            for name in _BLOCK_BUFFERS:
                self.register_buffer("block{}_{}".format(i, name), tensors[name], persistent=False)
            self.blocks.append(i)

    def forward(self, patches):
        """``[N, C, P]`` -> ``[N, P]``. Computed on ``[C, N P]`` (every patch of every frame a column), so each layer is
        one 2-D matrix product with its bias (``addmm``; ONNX Gemm, which ONNX Runtime fuses with the ReLU)."""
        batch, channels, num_patches = patches.shape
        x = patches.transpose(0, 1).reshape(channels, batch * num_patches)
        x1, x2 = x[:self.split], x[self.split:]
        log_scales = []
        for i in self.blocks:
            t = {name: getattr(self, "block{}_{}".format(i, name)) for name in _BLOCK_BUFFERS}
            position_bias = t["position_bias"].repeat(1, batch)  # [H, N P]: column n P + p is q[:, p]
            hidden = F.relu(torch.addmm(position_bias, t["in_weight"], x1))
            log_scale = self.clamp * torch.tanh(torch.addmm(t["scale_bias"], t["scale_weight"], hidden))
            x2 = x2 * torch.exp(log_scale) + torch.addmm(t["shift_bias"], t["shift_weight"], hidden)
            log_scales.append(log_scale)
            out = torch.cat([x1, x2], dim=0) * t["gain"] + t["offset"]
            if i == self.blocks[-1]:  # |z|^2 does not depend on the order: the last permutation is skipped
                z = out
            else:
                x1, x2 = out[t["passive"]], out[t["active"]]
        log_det = torch.cat(log_scales, dim=0).sum(dim=0)  # [N P]
        squared = (z * z).sum(dim=0)
        constant = self.channels * flow.LOG_NORMAL_CONSTANT + self.log_det_constant
        return ((log_det - 0.5 * squared + constant) / self.channels).reshape(batch, num_patches)


class CflowHead(nn.Module):
    """flat embedding ``[N, T]`` -> (anomaly_map ``[N, 1, H, W]`` float32, score ``[N]`` float32).

    compiled: one ``flow.compile_decoder`` dict per scale; references: ``l_ref`` per scale (float); grids: ``[h, w]``
    per scale; output_hw: ``(H, W)``; blur_sigma: pixels.
    """

    def __init__(self, compiled, references, output_hw, blur_sigma, grids):
        super().__init__()
        self.decoders = nn.ModuleList([FlowDecoder(c) for c in compiled])
        self.references = [float(r) for r in references]
        self.grids = [tuple(int(v) for v in g) for g in grids]
        self.layout = scale_layout([c["channels"] for c in compiled], self.grids)
        self.output_hw = tuple(int(v) for v in output_hw)
        height, width = self.output_hw
        for i, (grid_h, grid_w) in enumerate(self.grids):
            self.register_buffer("rows_op%d" % i, _float32(blur.upsample_blur_matrix(height, grid_h, blur_sigma)),
                                 persistent=False)
            self.register_buffer("cols_op_t%d" % i, _float32(blur.upsample_blur_matrix(width, grid_w, blur_sigma).T),
                                 persistent=False)

    def log_likelihoods(self, embedding):
        """``[N, T]`` -> list of per-scale log-likelihoods per dimension ``[N, P_l]``."""
        return [decoder(rows) for decoder, rows in zip(self.decoders, split_scales(embedding, self.layout))]

    def scale_anomalies(self, embedding):
        """``[N, T]`` -> list of per-scale patch anomalies ``relu(1 - exp(l - l_ref))`` ``[N, 1, h_l, w_l]``."""
        out = []
        for i, likelihood in enumerate(self.log_likelihoods(embedding)):
            anomaly = F.relu(1.0 - torch.exp(likelihood - self.references[i]))
            out.append(anomaly.reshape(embedding.shape[0], 1, *self.grids[i]))
        return out

    def forward(self, embedding):
        amap = None
        for i, grid_map in enumerate(self.scale_anomalies(embedding)):
            up = torch.matmul(torch.matmul(getattr(self, "rows_op%d" % i), grid_map), getattr(self, "cols_op_t%d" % i))
            amap = up if amap is None else amap + up
        return amap, amap.amax(dim=(1, 2, 3))


def _float32(array):
    return torch.from_numpy(np.asarray(array).astype("float32"))
