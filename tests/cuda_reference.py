"""Self-contained float64 reference of the packed-triangular PaDiM distance (numpy only).

Layout (docs/CONTRACTS.md): ``W_p`` lower triangular, packed row-major, element ``(i, j)``, ``j <= i``, at
``i*(i+1)/2 + j`` of a length ``T = D(D+1)/2`` vector. Distance: ``d[n, p] = ||W_p (x[n, :, p] - mean[p])||_2``.
Kept independent of ``edgead.packing`` on purpose so the two can check each other.
"""
import numpy as np


def packed_length(dim):
    """T = D(D+1)/2."""
    return dim * (dim + 1) // 2


def packed_index(i, j):
    """Packed position of lower-triangle element ``(i, j)``, ``j <= i`` (ints or int arrays)."""
    return i * (i + 1) // 2 + j


def pack(dense):
    """``[..., D, D]`` lower-triangular -> ``[..., T]`` (row by row, columns ``0..i``)."""
    dim = dense.shape[-1]
    out = np.empty(dense.shape[:-2] + (packed_length(dim),), dense.dtype)
    for i in range(dim):
        out[..., packed_index(i, 0):packed_index(i, 0) + i + 1] = dense[..., i, :i + 1]
    return out


def unpack(packed, dim):
    """``[..., T]`` -> dense lower-triangular ``[..., D, D]`` (zeros above the diagonal), same dtype."""
    dense = np.zeros(packed.shape[:-1] + (dim, dim), packed.dtype)
    for i in range(dim):
        dense[..., i, :i + 1] = packed[..., packed_index(i, 0):packed_index(i, 0) + i + 1]
    return dense


def distance_f64(x, mean, w_packed, patch_chunk=64):
    """float64 ``[N, P]``. x ``[N, D, P]``, mean ``[P, D]``, w_packed ``[P, T]`` (any float dtype, read exactly)."""
    x = np.asarray(x, np.float64)
    mean = np.asarray(mean, np.float64)
    n, dim, num_patches = x.shape
    out = np.empty((n, num_patches), np.float64)
    for start in range(0, num_patches, patch_chunk):
        stop = min(start + patch_chunk, num_patches)
        w = unpack(np.asarray(w_packed[start:stop], np.float64), dim)          # [p, D, D]
        centred = x[:, :, start:stop].transpose(2, 1, 0) - mean[start:stop, :, None]  # [p, D, N]
        projected = np.matmul(w, centred)                                      # [p, D, N]
        out[:, start:stop] = np.sqrt(np.sum(projected * projected, axis=1)).T
    return out


def random_whitening(num_patches, dim, rng, scale=None):
    """Random lower-triangular ``[P, T]`` float64 with a positive diagonal (well-conditioned, like L^-1)."""
    scale = 1.0 / np.sqrt(dim) if scale is None else scale
    dense = np.tril(rng.standard_normal((num_patches, dim, dim))) * scale
    diag = np.arange(dim)
    dense[:, diag, diag] = 0.5 + rng.random((num_patches, dim))
    return pack(dense)


def random_problem(n, dim, num_patches, seed=0):
    """(x ``[N, D, P]`` f32, mean ``[P, D]`` f32, w_packed ``[P, T]`` f32) with PaDiM-like magnitudes."""
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal((num_patches, dim)).astype(np.float32)
    x = (mean.T[None] + rng.standard_normal((n, dim, num_patches))).astype(np.float32)
    return x, mean, random_whitening(num_patches, dim, rng).astype(np.float32)


def spd_whitening(num_patches, dim, rng, epsilon=0.01):
    """(sigma ``[P, D, D]``, packed W = L^-1 ``[P, T]``) for random SPD covariances, Σ + εI = L Lᵀ."""
    a = rng.standard_normal((num_patches, dim, 2 * dim))
    sigma = a @ a.transpose(0, 2, 1) / (2 * dim) + epsilon * np.eye(dim)
    chol = np.linalg.cholesky(sigma)
    w = np.linalg.inv(chol)
    return sigma, pack(np.tril(w))
