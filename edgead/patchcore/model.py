"""The PatchCore detector as torch modules: uint8 frames -> (anomaly map, score).

The workstation scoring path (eval, compare, the out-of-sample thresholds) and the reference the exported
graph mirrors op for op (``edgead.exporters.patchcore_head``).

Nearest memory-bank entry of every patch, as in the issue's contract: ``|x - m|^2 = |x|^2 - 2 x.m + |m|^2``.
The bank is stored once, augmented as ``[D + 1, M]`` = (``m^T`` over ``|m|^2``), and the patch rows as
``[-2 x, 1]``, so one MatMul per chunk of ``chunk`` bank entries gives ``|m|^2 - 2 x.m``, which ranks the entries,
and a TopK(1) over it the nearest; no ``[P, M]`` tensor larger than ``CHUNK_BYTES`` per image exists at once. The
patch distance is then ``|x - m|`` of that entry, computed directly (exact where the expansion cancels).

Image score (the paper's eq. 7 as anomalib computes it): ``s*`` the largest patch distance, ``x*`` that
patch, ``m*`` its nearest bank entry, ``n_1 .. n_b`` the ``b`` nearest bank entries of ``m*`` (``m*`` itself
first); ``w = 1 - softmax_j(|x* - n_j|)[0]`` and ``score = w s*`` (``b = 1``: ``score = s*``). The map is the
patch distances, bilinearly upsampled and blurred (``edgead.blur``, as for PaDiM).
"""
import torch
from torch import nn

from edgead import blur

#: Largest per-image ``[P, chunk]`` float32 distance block (the issue: "a few MB at once on a Jetson")
CHUNK_BYTES = 4 << 20
#: The paper's neighbourhood size b of the score reweighting (anomalib's num_neighbors)
NEIGHBORS = 9


def bank_chunk(num_patches, chunk_bytes=CHUNK_BYTES):
    """Bank entries per distance block: ``[P, chunk]`` float32 stays within ``chunk_bytes`` (at least 1)."""
    return max(1, int(chunk_bytes) // (4 * max(1, int(num_patches))))


def augmented_bank(bank):
    """``[M, D]`` float32 -> ``[D + 1, M]`` float32: the transposed bank over its squared norms (one row)."""
    bank = bank.to(torch.float32)
    return torch.cat([bank.t(), (bank * bank).sum(dim=1, keepdim=True).t()], dim=0).contiguous()


def nearest_entries(rows, bank_aug, chunk):
    """rows ``[N, P, D]`` float32 -> index ``[N, P]`` int64 of each row's nearest bank entry.

    bank_aug: ``augmented_bank(bank)`` ``[D + 1, M]``; chunk: bank entries per MatMul. Each block's
    ``|m|^2 - 2 x.m`` ``[N, P, chunk]`` is reduced at once (TopK 1: value and index); a later block replaces the
    running best only where it is strictly smaller, so exact ties go to the lower index.
    """
    scaled = torch.nn.functional.pad(rows * -2.0, (0, 1), value=1.0)  # [N, P, D + 1] = [-2 x, 1]
    best_value = best_index = None
    for start in range(0, bank_aug.shape[1], chunk):
        value, index = torch.topk(torch.matmul(scaled, bank_aug[:, start:start + chunk]), 1, dim=-1, largest=False)
        value, index = value[..., 0], index[..., 0] + start
        if best_value is None:
            best_value, best_index = value, index
        else:
            closer = value < best_value
            best_index = torch.where(closer, index, best_index)
            best_value = torch.minimum(best_value, value)
    return best_index


def bank_offsets(rows, bank_aug):
    """rows ``[N, D]`` -> ``|m|^2 - 2 x.m`` ``[N, M]`` against the whole bank (small: N x M): the squared distances
    less ``|x|^2``, which orders the bank entries of each row as the distances do."""
    return torch.matmul(torch.nn.functional.pad(rows * -2.0, (0, 1), value=1.0), bank_aug)


class PatchcoreHead(nn.Module):
    """embedding ``[N, D, h, w]`` -> (anomaly_map ``[N, 1, H, W]`` float32, score ``[N]`` float32).

    bank: memory bank ``[M, D]`` float32; neighbors: b of the score reweighting (``min(b, M)`` used).
    """

    def __init__(self, bank, output_hw, blur_sigma, grid_hw, neighbors=NEIGHBORS, chunk_bytes=CHUNK_BYTES):
        super().__init__()
        bank = bank.to(torch.float32)
        self.register_buffer("bank", bank, persistent=False)
        self.register_buffer("bank_aug", augmented_bank(bank), persistent=False)
        self.output_hw = tuple(int(v) for v in output_hw)
        self.grid_hw = tuple(int(v) for v in grid_hw)
        self.neighbors = max(1, min(int(neighbors), int(bank.shape[0])))
        self.chunk = bank_chunk(self.grid_hw[0] * self.grid_hw[1], chunk_bytes)
        (height, width), (grid_h, grid_w) = self.output_hw, self.grid_hw
        self.register_buffer("rows_op", _float32(blur.upsample_blur_matrix(height, grid_h, blur_sigma)), persistent=False)
        self.register_buffer("cols_op_t", _float32(blur.upsample_blur_matrix(width, grid_w, blur_sigma).T),
                             persistent=False)

    def patch_distances(self, embedding):
        """``[N, D, h, w]`` -> (distance to the nearest bank entry ``[N, P]``, patch rows ``[N, P, D]``, the nearest
        entry's index ``[N, P]``). The distance is ``|x - m|`` of the nearest entry, computed directly: the expanded
        form only ranks the entries (its cancellation would turn float32 rounding into ~1e-2 for a patch the bank
        holds, and torch and ONNX Runtime round differently)."""
        batch, dim = embedding.shape[:2]
        rows = embedding.reshape(batch, dim, -1).transpose(1, 2)  # [N, P, D]
        nearest = nearest_entries(rows, self.bank_aug, self.chunk)
        gaps = self.bank[nearest] - rows  # [N, P, D]
        return torch.sqrt((gaps * gaps).sum(dim=-1)), rows, nearest

    def image_score(self, distances, rows, nearest):
        """The reweighted image score ``[N]`` from patch distances ``[N, P]``, patch rows ``[N, P, D]`` and the
        nearest entries ``[N, P]``."""
        worst, where = torch.topk(distances, 1, dim=1)  # s* [N, 1], its patch [N, 1]
        worst, where = worst[:, 0], where[:, 0]
        if self.neighbors == 1:
            return worst
        batch = torch.arange(rows.shape[0])
        worst_rows = rows[batch, where]  # x* [N, D]
        nearest = nearest[batch, where]  # m* [N]
        support = torch.topk(bank_offsets(self.bank[nearest], self.bank_aug), self.neighbors, dim=1,
                             largest=False).indices  # N_b(m*) [N, b], m* first
        gaps = self.bank[support] - worst_rows[:, None, :]  # [N, b, D]
        support_distance = torch.sqrt(torch.clamp((gaps * gaps).sum(dim=-1), min=0.0))  # [N, b]
        weight = 1.0 - torch.softmax(support_distance, dim=1)[:, 0]
        return weight * worst

    def upsample_blur(self, grid_map):
        """Bilinear upsample then separable scipy-reflect Gaussian blur: ``[N, 1, h, w]`` -> ``[N, 1, H, W]``."""
        return torch.matmul(torch.matmul(self.rows_op, grid_map), self.cols_op_t)

    def forward(self, embedding):
        distances, rows, nearest = self.patch_distances(embedding)
        grid_map = distances.reshape(embedding.shape[0], 1, *embedding.shape[2:])
        return self.upsample_blur(grid_map), self.image_score(distances, rows, nearest)


def _float32(array):
    return torch.from_numpy(array.astype("float32"))
