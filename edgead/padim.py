"""PaDiM statistics: streaming mergeable per-patch Gaussians, Cholesky whitening, Mahalanobis distance.

Fit streams batches of embeddings into float64 running sums whose size depends only on ``P`` and
``D`` (``n``, ``sum [P, D]``, lower triangle of ``sum x xᵀ`` packed ``[P, T]``), so memory is
flat in the number of training images and partial fits merge exactly (sums add).
"""
import numpy as np
import torch

from edgead import packing
from edgead.errors import DataError

EPSILON = 0.01


class GaussianAccumulator:
    """Running float64 sums for per-patch Gaussians.

    ``count``: images seen; ``sum``: ``[P, D]`` float64; ``outer_packed``: ``[P, T]`` float64 (lower
    triangle of ``Σ_n x xᵀ`` per patch).
    """

    def __init__(self, num_patches, dim, patch_chunk=1024):
        self.num_patches = int(num_patches)
        self.dim = int(dim)
        self.count = 0
        self.sum = torch.zeros(self.num_patches, self.dim, dtype=torch.float64)
        self.outer_packed = torch.zeros(self.num_patches, packing.packed_length(self.dim), dtype=torch.float64)
        rows, cols = packing.tril_indices(self.dim)
        self._flat_tril = torch.from_numpy(rows * self.dim + cols)
        self.patch_chunk = patch_chunk

    def update(self, embedding):
        """Add a batch. embedding: ``[N, D, h, w]`` or ``[N, D, P]`` float tensor (any device)."""
        batch = embedding.detach().reshape(embedding.shape[0], self.dim, -1).to("cpu", torch.float64)
        if batch.shape[2] != self.num_patches:
            raise ValueError("embedding has {} patches, expected {}".format(batch.shape[2], self.num_patches))
        by_patch = batch.permute(2, 0, 1)  # [P, N, D]
        self.sum += by_patch.sum(dim=1)
        for start in range(0, self.num_patches, self.patch_chunk):
            chunk = by_patch[start:start + self.patch_chunk]
            outer = torch.bmm(chunk.transpose(1, 2), chunk)  # [p, D, D]
            self.outer_packed[start:start + self.patch_chunk] += outer.reshape(len(chunk), -1)[:, self._flat_tril]
        self.count += batch.shape[0]

    def merge(self, other):
        """Add another accumulator's sums (exact: partial fits on disjoint image sets combine)."""
        if (other.num_patches, other.dim) != (self.num_patches, self.dim):
            raise ValueError("cannot merge accumulators of different shapes")
        self.count += other.count
        self.sum += other.sum
        self.outer_packed += other.outer_packed
        return self

    def mean(self):
        """``[P, D]`` float64."""
        return self.sum / self.count

    def covariance(self, start=0, stop=None, epsilon=EPSILON):
        """Unbiased per-patch covariance + εI for patches ``start:stop``: ``[p, D, D]`` float64."""
        if self.count < 2:
            raise DataError("PaDiM needs at least 2 training images, got {}".format(self.count))
        stop = self.num_patches if stop is None else stop
        outer = torch.from_numpy(packing.unpack_lower(self.outer_packed[start:stop].numpy()))
        outer = outer + outer.transpose(1, 2) - torch.diag_embed(torch.diagonal(outer, dim1=1, dim2=2))
        mean = self.mean()[start:stop]
        cov = (outer - self.count * mean[:, :, None] * mean[:, None, :]) / (self.count - 1)
        return cov + epsilon * torch.eye(self.dim, dtype=torch.float64)

    def finalize(self, epsilon=EPSILON):
        """Return ``(mean [P, D] float32, whitening_packed [P, T] float32)`` with ``W = L^-1``, ``Σ+εI = L Lᵀ``."""
        packed = torch.empty(self.num_patches, packing.packed_length(self.dim), dtype=torch.float64)
        for start in range(0, self.num_patches, self.patch_chunk):
            stop = min(start + self.patch_chunk, self.num_patches)
            whitening = whitening_from_covariance(self.covariance(start, stop, epsilon))
            packed[start:stop] = whitening.reshape(stop - start, -1)[:, self._flat_tril]
        return self.mean().to(torch.float32), packed.to(torch.float32)


def whitening_from_covariance(cov):
    """``[p, D, D]`` float64 SPD -> lower-triangular ``W = L^-1`` float64, where ``cov = L Lᵀ``.

    ``||W (x - μ)||² = (x - μ)ᵀ cov⁻¹ (x - μ)``.
    """
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info.max()) > 0:
        raise DataError("a patch covariance is not positive definite; are the training images constant?")
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype).expand_as(cov)
    return torch.linalg.solve_triangular(chol, eye, upper=False)


def dense_whitening(whitening_packed):
    """``[P, T]`` packed -> dense lower-triangular ``[P, D, D]`` (same dtype)."""
    dim = packing.dim_from_packed_length(whitening_packed.shape[-1])
    index = torch.from_numpy(packing.dense_gather_index(dim).reshape(-1))
    padded = torch.cat([whitening_packed, whitening_packed.new_zeros(whitening_packed.shape[0], 1)], dim=1)
    return padded[:, index].reshape(-1, dim, dim)


def mahalanobis(embedding, mean, whitening_dense):
    """Per-patch Mahalanobis distance.

    embedding ``[N, D, P]`` float32, mean ``[P, D]``, whitening_dense ``[P, D, D]`` (lower-triangular)
    -> distance ``[N, P]`` float32 = ``||W_p (x_p - μ_p)||₂``.
    """
    centred = embedding.permute(2, 0, 1) - mean[:, None, :]  # [P, N, D]
    projected = torch.bmm(centred, whitening_dense.transpose(1, 2))  # [P, N, D]
    return projected.pow(2).sum(-1).sqrt().transpose(0, 1)
