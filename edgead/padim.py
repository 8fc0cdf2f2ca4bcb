"""PaDiM statistics: streaming mergeable per-patch Gaussians, Cholesky whitening, Mahalanobis distance.

Fit streams batches of embeddings into float64 running sums whose size depends only on ``P`` and
``D`` (``n``, ``sum [P, D]``, lower triangle of ``sum x xᵀ`` packed ``[P, T]``), so memory is
flat in the number of training images and partial fits merge exactly (sums add).

Everything that needs dense ``[p, D, D]`` matrices (covariances, Cholesky factors, whitening) works on
patch chunks sized by a byte budget (``chunk_bytes`` per float64 temporary, ``CHUNK_BYTES`` by default),
so temporaries stay around 100-200 MB whatever D is. ``finalize(in_place=True)`` writes the float32
whitening over the float64 sums it has consumed, chunk by chunk: a WideResNet50 fit (P = 4096,
D = 550) never holds more than its 4.96 GB of sums plus a few chunks.
"""
import torch
from tqdm import tqdm

from edgead import packing, resources
from edgead.errors import DataError

EPSILON = 0.01
#: Bytes of one float64 ``[chunk, D, D]`` temporary (dense covariance, Cholesky factor, whitening); a chunk holds
#: about four at once (``resources.CHUNK_TEMPORARIES``). D = 100: 1677 patches per chunk; D = 550 (WideResNet50): 55.
CHUNK_BYTES = 128 << 20


def chunk_patches(dim, chunk_bytes=CHUNK_BYTES, limit=None, images=0):
    """Patches per chunk: as many float64 ``[D, D]`` matrices (and ``[images, D]`` blocks, when scoring that many
    images per chunk) as fit ``chunk_bytes`` (at least one), at most ``limit``."""
    size = max(1, int(chunk_bytes) // (8 * dim * max(dim, int(images))))
    return size if limit is None else max(1, min(size, int(limit)))


class GaussianAccumulator:
    """Running float64 sums for per-patch Gaussians.

    ``count``: images seen; ``sum``: ``[P, D]`` float64; ``outer_packed``: ``[P, T]`` float64 (lower
    triangle of ``Σ_n x xᵀ`` per patch). ``chunk_bytes`` bounds each ``[p, D, D]`` float64 temporary;
    ``patch_chunk`` (optional) caps the patches per chunk.
    """

    def __init__(self, num_patches, dim, patch_chunk=None, chunk_bytes=CHUNK_BYTES):
        self.num_patches = int(num_patches)
        self.dim = int(dim)
        self.count = 0
        self.sum = torch.zeros(self.num_patches, self.dim, dtype=torch.float64)
        self.outer_packed = torch.zeros(self.num_patches, packing.packed_length(self.dim), dtype=torch.float64)
        rows, cols = packing.tril_indices(self.dim)
        self._flat_tril = torch.from_numpy(rows * self.dim + cols)  # dense [D*D] position of packed entry t
        self._flat_triu = torch.from_numpy(cols * self.dim + rows)  # its mirror above the diagonal
        self.patch_chunk = patch_chunk
        self.chunk_bytes = int(chunk_bytes)
        self.finalized = False

    @property
    def nbytes(self):
        """Bytes of the running sums (what stays allocated for the whole fit)."""
        return self.sum.nbytes + self.outer_packed.nbytes

    def chunks(self, desc=None, images=0):
        """``(start, stop)`` patch ranges whose ``[p, D, D]`` (and ``[p, images, D]``) float64 temporaries fit
        ``chunk_bytes`` each.

        desc: show a progress bar (patches) with this label when there is more than one chunk."""
        size = chunk_patches(self.dim, self.chunk_bytes, self.patch_chunk, images)
        ranges = [(start, min(start + size, self.num_patches)) for start in range(0, self.num_patches, size)]
        if desc is None or len(ranges) < 2:
            yield from ranges
            return
        with tqdm(total=self.num_patches, desc=desc, unit="patch", leave=False) as progress:
            for start, stop in ranges:
                yield start, stop
                progress.update(stop - start)

    def _check_open(self):
        if self.finalized:
            raise RuntimeError("the sums were finalized in place (their memory now holds the whitening)")

    def update(self, embedding):
        """Add a batch. embedding: ``[N, D, h, w]`` or ``[N, D, P]`` float tensor (any device)."""
        self._check_open()
        batch = embedding.detach().reshape(embedding.shape[0], self.dim, -1)
        if batch.shape[2] != self.num_patches:
            raise ValueError("embedding has {} patches, expected {}".format(batch.shape[2], self.num_patches))
        batch = batch.to("cpu")  # [N, D, P], float64 a chunk at a time (no float64 copy of the whole batch)
        for start, stop in self.chunks(images=batch.shape[0]):
            chunk = _by_patch(batch, start, stop)  # [p, N, D] float64
            self.sum[start:stop] += chunk.sum(dim=1)
            outer = torch.bmm(chunk.transpose(1, 2), chunk)  # [p, D, D]
            self.outer_packed[start:stop] += outer.view(stop - start, -1)[:, self._flat_tril]
            del outer, chunk
        self.count += batch.shape[0]

    def merge(self, other):
        """Add another accumulator's sums (exact: partial fits on disjoint image sets combine)."""
        self._check_open()
        other._check_open()
        if (other.num_patches, other.dim) != (self.num_patches, self.dim):
            raise ValueError("cannot merge accumulators of different shapes")
        self.count += other.count
        self.sum += other.sum
        self.outer_packed += other.outer_packed
        return self

    def mean(self):
        """``[P, D]`` float64."""
        return self.sum / self.count

    def _dense_outer(self, sums, start, stop):
        """``Σ x xᵀ`` of patches ``start:stop`` (rows of packed ``sums``) as dense symmetric ``[p, D, D]`` float64
        (one chunk temporary)."""
        packed = sums[start:stop]
        dense = packed.new_empty(stop - start, self.dim * self.dim)
        dense.index_copy_(1, self._flat_triu, packed)
        dense.index_copy_(1, self._flat_tril, packed)  # the diagonal is in both: same value
        return dense.view(stop - start, self.dim, self.dim)

    def covariance(self, start=0, stop=None, epsilon=EPSILON, scale=1.0, held_out=None):
        """Unbiased per-patch covariance ``S``, returned as ``scale · S + εI`` for patches ``start:stop``:
        ``[p, D, D]`` float64, built in one chunk temporary.

        held_out: ``[m, D, P]`` embeddings of images that went into the sums (a held-out fold); the
        covariance is then the one of the remaining images, exact, because the statistics are sums.
        """
        self._check_open()
        stop = self.num_patches if stop is None else stop
        fold = None if held_out is None else _by_patch(held_out, start, stop)
        return self._covariance(self.outer_packed, start, stop, epsilon, scale, fold)

    def _covariance(self, sums, start, stop, epsilon, scale=1.0, fold=None):
        """``covariance`` from the packed ``sums`` given (``finalize`` passes them once it has taken them over);
        fold: the held-out images of these patches, ``[p, m, D]`` float64 (``_by_patch``)."""
        count, total = self.count, self.sum[start:stop]
        cov = self._dense_outer(sums, start, stop)
        if fold is not None:
            cov.baddbmm_(fold.transpose(1, 2), fold, alpha=-1.0)
            count, total = count - fold.shape[1], total - fold.sum(dim=1)
        if count < 2:
            raise DataError("PaDiM needs at least 2 training images, got {}".format(count))
        mean = total / count  # [p, D]
        cov.baddbmm_(mean[:, :, None], mean[:, None, :], alpha=-float(count))  # Σ x xᵀ - n μ μᵀ
        cov.mul_(scale / (count - 1))
        cov.diagonal(dim1=1, dim2=2).add_(epsilon)
        return cov

    def held_out_distance(self, held_out, epsilon=EPSILON):
        """Mahalanobis distance of held-out images under the model fitted without them.

        held_out: ``[m, D, P]`` (or ``[m, D, h, w]``) float embeddings of exactly the images of one fold, all
        already added to these sums. Returns ``[m, P]`` float64, patch chunk by patch chunk (memory: the
        fold's embeddings plus a chunk; no full whitening kept).
        """
        held_out = held_out.reshape(held_out.shape[0], self.dim, -1)
        rest = self.count - held_out.shape[0]
        out = torch.empty(held_out.shape[0], self.num_patches, dtype=torch.float64)
        for start, stop in self.chunks("held-out covariances", images=held_out.shape[0]):
            self._check_open()
            fold = _by_patch(held_out, start, stop)  # [p, m, D], converted once for the covariance and the distance
            chol = _cholesky(self._covariance(self.outer_packed, start, stop, epsilon, fold=fold))
            rest_mean = (self.sum[start:stop] - fold.sum(dim=1)) / rest
            out[:, start:stop] = _whitened_norm2(chol, fold.sub_(rest_mean[:, None, :])).sqrt().T
        return out

    def leave_one_out_distance(self, embedding, epsilon=EPSILON):
        """Exact Mahalanobis distance of training images under the model fitted without each of them.

        embedding: ``[m, D, P]`` (or ``[m, D, h, w]``) of images that are part of these sums. Returns ``[m, P]``
        float64; memory: the m embeddings plus a chunk (one Cholesky sweep over the patches per call, so
        pass images in groups as large as memory allows).

        Without image i (n images, mean μ, unbiased covariance S, ``d = x_i - μ``), the mean moves to
        ``μ - d/(n-1)``, so ``x_i - μ₋ᵢ = n/(n-1) · d``, and ``(n-2)·S₋ᵢ = (n-1)·S - n/(n-1) · d dᵀ``.
        Hence ``S₋ᵢ + εI = A - c · d dᵀ`` with ``A = (n-1)/(n-2) · S + εI`` and ``c = n/((n-1)(n-2))``, and
        Sherman-Morrison gives ``dᵀ(A - c ddᵀ)⁻¹d = q / (1 - c q)`` with ``q = dᵀA⁻¹d = ||L⁻¹d||²``
        (``A = L Lᵀ``). The squared distance is ``(n/(n-1))² · q / (1 - c q)``: one Cholesky per patch for
        all n images, where refitting would cost n.
        """
        n = self.count
        if n < 3:
            raise DataError("leave-one-out scores need at least 3 training images, got {}".format(n))
        embedding = embedding.reshape(embedding.shape[0], self.dim, -1)
        mean, c = self.mean(), n / ((n - 1.0) * (n - 2.0))
        out = torch.empty(embedding.shape[0], self.num_patches, dtype=torch.float64)
        for start, stop in self.chunks("leave-one-out covariances", images=embedding.shape[0]):
            chol = _cholesky(self.covariance(start, stop, epsilon, scale=(n - 1.0) / (n - 2.0)))
            q = _whitened_norm2(chol, _by_patch(embedding, start, stop) - mean[start:stop, None, :])  # [p, m]
            out[:, start:stop] = ((n / (n - 1.0)) * torch.sqrt(q / (1.0 - c * q))).T
        return out

    def finalize(self, epsilon=EPSILON, in_place=False):
        """Return ``(mean [P, D] float32, whitening_packed [P, T] float32)`` with ``W = L^-1``, ``Σ+εI = L Lᵀ``.

        in_place: write the float32 whitening into the first half of the float64 sums' memory, chunk by
        chunk (each chunk is read before the bytes it lands on are written: float32 row p lies in the bytes
        of float64 rows p/2 .. (p+1)/2), then give the second half's pages back to the system: no second
        full-size array is ever allocated. The accumulator is spent afterwards (``finalized``).
        """
        self._check_open()
        num_patches, length = self.outer_packed.shape
        mean = self.mean().to(torch.float32)
        sums = self.outer_packed
        if in_place:
            result = sums.view(-1).view(torch.float32)[:num_patches * length].view(num_patches, length)
            self.outer_packed, self.finalized = None, True  # spent from the first chunk on, even if one fails
        else:
            result = torch.empty(num_patches, length, dtype=torch.float32)
        for start, stop in self.chunks("whitening"):
            whitening = whitening_from_covariance(self._covariance(sums, start, stop, epsilon))
            result[start:stop] = whitening.view(stop - start, -1)[:, self._flat_tril]
            del whitening
        if in_place:  # the storage lives on in ``result``; its second half goes back to the system
            resources.release_pages(sums.data_ptr() + result.nbytes, sums.nbytes - result.nbytes)
        return mean, result


def _by_patch(embedding, start, stop):
    """``[m, D, P]`` float -> ``[p, m, D]`` float64 for patches ``start:stop``."""
    return embedding[:, :, start:stop].to(torch.float64).permute(2, 0, 1)


def _cholesky(cov):
    """Lower Cholesky factor of ``[p, D, D]`` SPD float64; DataError when a patch is not positive definite."""
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info.max()) > 0:
        raise DataError("a patch covariance is not positive definite; are the training images constant?")
    return chol


def _whitened_norm2(chol, centred):
    """``||L⁻¹ d||²`` for ``chol [p, D, D]`` lower, ``centred [p, m, D]`` -> ``[p, m]`` float64."""
    solved = torch.linalg.solve_triangular(chol, centred.transpose(1, 2), upper=False)  # [p, D, m]
    return solved.pow(2).sum(dim=1)


def whitening_from_covariance(cov):
    """``[p, D, D]`` float64 SPD -> lower-triangular ``W = L^-1`` float64, where ``cov = L Lᵀ``.

    ``||W (x - μ)||² = (x - μ)ᵀ cov⁻¹ (x - μ)``. ``cov``'s memory is reused for the result.
    """
    chol = _cholesky(cov)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype).expand_as(cov)
    return torch.linalg.solve_triangular(chol, eye, upper=False, out=cov)


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
