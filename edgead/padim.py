"""PaDiM statistics: streaming mergeable per-patch Gaussians, Cholesky whitening, Mahalanobis distance.

Fit streams batches of embeddings into float64 running sums whose size depends only on ``P`` and
``D`` (``n``, ``sum [P, D]``, lower triangle of ``sum x xᵀ`` packed ``[P, T]``), so memory is
flat in the number of training images and partial fits merge exactly (sums add).
"""
import torch

from edgead import packing
from edgead.errors import DataError

EPSILON = 0.01
#: Bytes of float64 ``[chunk, D, D]`` temporaries one patch chunk may use while whitening (covariance,
#: Cholesky factor, inverse): D = 100 gives the full 1024-patch chunk, D = 550 (WideResNet50) 110 patches.
CHUNK_BYTES = 256 << 20


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

    def chunks(self):
        """``(start, stop)`` patch ranges of at most ``patch_chunk`` patches and ``CHUNK_BYTES`` of ``[p, D, D]``
        float64 each."""
        size = max(1, min(self.patch_chunk, CHUNK_BYTES // (8 * self.dim * self.dim)))
        for start in range(0, self.num_patches, size):
            yield start, min(start + size, self.num_patches)

    def update(self, embedding):
        """Add a batch. embedding: ``[N, D, h, w]`` or ``[N, D, P]`` float tensor (any device)."""
        batch = embedding.detach().reshape(embedding.shape[0], self.dim, -1).to("cpu", torch.float64)
        if batch.shape[2] != self.num_patches:
            raise ValueError("embedding has {} patches, expected {}".format(batch.shape[2], self.num_patches))
        by_patch = batch.permute(2, 0, 1)  # [P, N, D]
        self.sum += by_patch.sum(dim=1)
        for start, stop in self.chunks():
            chunk = by_patch[start:stop]
            outer = torch.bmm(chunk.transpose(1, 2), chunk)  # [p, D, D]
            self.outer_packed[start:stop] += outer.reshape(len(chunk), -1)[:, self._flat_tril]
        self.count += batch.shape[0]

    def merge(self, other):
        """Add another accumulator's sums (exact: partial fits on disjoint image sets combine)."""
        if (other.num_patches, other.dim) != (self.num_patches, self.dim):
            raise ValueError("cannot merge accumulators of different shapes")
        self.count += other.count
        self.sum += other.sum
        self.outer_packed += other.outer_packed
        return self

    def mean(self, minus=None):
        """``[P, D]`` float64; ``minus``: an accumulator of held-out images whose sums are taken out."""
        count, total, _ = self._sums(minus)
        return total / count

    def _sums(self, minus, start=0, stop=None):
        """(count, sum ``[P, D]``, outer_packed ``[p, T]`` for patches ``start:stop``) without ``minus``'s images."""
        outer = self.outer_packed[start:stop]
        if minus is None:
            return self.count, self.sum, outer
        if (minus.num_patches, minus.dim) != (self.num_patches, self.dim):
            raise ValueError("cannot subtract accumulators of different shapes")
        return self.count - minus.count, self.sum - minus.sum, outer - minus.outer_packed[start:stop]

    def covariance(self, start=0, stop=None, epsilon=EPSILON, minus=None, scale=1.0):
        """Unbiased per-patch covariance ``S``, returned as ``scale · S + εI`` for patches ``start:stop``:
        ``[p, D, D]`` float64.

        minus: an accumulator of a subset of the images (a held-out fold); the covariance is then the
        one of the remaining images, exact, because the statistics are sums.
        """
        count, total, outer = self._sums(minus, start, stop)
        if count < 2:
            raise DataError("PaDiM needs at least 2 training images, got {}".format(count))
        outer = torch.from_numpy(packing.unpack_lower(outer.numpy()))
        outer = outer + outer.transpose(1, 2) - torch.diag_embed(torch.diagonal(outer, dim1=1, dim2=2))
        mean = (total / count)[start:stop]
        cov = (outer - count * mean[:, :, None] * mean[:, None, :]) * (scale / (count - 1))
        return cov + epsilon * torch.eye(self.dim, dtype=torch.float64)

    def held_out_distance(self, held_out, embedding, epsilon=EPSILON):
        """Mahalanobis distance of held-out images under the model fitted without them.

        held_out: accumulator of exactly the images in ``embedding`` (already added to ``self``);
        embedding: ``[m, D, P]`` float. Returns ``[m, P]`` float64, patch chunk by patch chunk
        (memory ``O(chunk · D²)``, no full whitening kept).
        """
        embedding = embedding.reshape(embedding.shape[0], self.dim, -1).to(torch.float64)
        mean = self.mean(minus=held_out)
        out = torch.empty(embedding.shape[0], self.num_patches, dtype=torch.float64)
        for start, stop in self.chunks():
            whitening = whitening_from_covariance(self.covariance(start, stop, epsilon, minus=held_out))
            out[:, start:stop] = mahalanobis(embedding[:, :, start:stop], mean[start:stop], whitening)
        return out

    def leave_one_out_whitening(self, epsilon=EPSILON):
        """Packed ``[P, T]`` float64 ``W = L⁻¹`` of ``A = (n-1)/(n-2) · S + εI`` (``leave_one_out_distance``)."""
        if self.count < 3:
            raise DataError("leave-one-out scores need at least 3 training images, got {}".format(self.count))
        return self._packed_whitening(epsilon, scale=(self.count - 1) / (self.count - 2))

    def _packed_whitening(self, epsilon, scale=1.0):
        """Packed ``[P, T]`` float64 ``L⁻¹`` of ``scale · S + εI`` for every patch, chunk by chunk."""
        packed = torch.empty(self.num_patches, packing.packed_length(self.dim), dtype=torch.float64)
        for start, stop in self.chunks():
            whitening = whitening_from_covariance(self.covariance(start, stop, epsilon, scale=scale))
            packed[start:stop] = whitening.reshape(stop - start, -1)[:, self._flat_tril]
        return packed

    def leave_one_out_distance(self, embedding, loo_whitening):
        """Exact Mahalanobis distance of training images under the model fitted without each of them.

        embedding: ``[m, D, P]`` of images that are part of this fit; loo_whitening: from
        ``leave_one_out_whitening``. Returns ``[m, P]`` float64.

        Without image i (n images, mean μ, unbiased covariance S, ``d = x_i - μ``), the mean moves to
        ``μ - d/(n-1)``, so ``x_i - μ₋ᵢ = n/(n-1) · d``, and ``(n-2)·S₋ᵢ = (n-1)·S - n/(n-1) · d dᵀ``.
        Hence ``S₋ᵢ + εI = A - c · d dᵀ`` with ``A = (n-1)/(n-2) · S + εI`` and ``c = n/((n-1)(n-2))``, and
        Sherman-Morrison gives ``dᵀ(A - c ddᵀ)⁻¹d = q / (1 - c q)`` with ``q = dᵀA⁻¹d``. The squared
        distance is ``(n/(n-1))² · q / (1 - c q)``. It costs one Cholesky per patch for all n images, where
        refitting would cost n.
        """
        n = self.count
        embedding = embedding.reshape(embedding.shape[0], self.dim, -1).to(torch.float64)
        mean, c = self.mean(), n / ((n - 1.0) * (n - 2.0))
        out = torch.empty(embedding.shape[0], self.num_patches, dtype=torch.float64)
        for start, stop in self.chunks():
            dense = dense_whitening(loo_whitening[start:stop])
            q = mahalanobis(embedding[:, :, start:stop], mean[start:stop], dense).pow(2)
            out[:, start:stop] = (n / (n - 1.0)) * torch.sqrt(q / (1.0 - c * q))
        return out

    def finalize(self, epsilon=EPSILON):
        """Return ``(mean [P, D] float32, whitening_packed [P, T] float32)`` with ``W = L^-1``, ``Σ+εI = L Lᵀ``."""
        return self.mean().to(torch.float32), self._packed_whitening(epsilon).to(torch.float32)


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
