"""Packed lower-triangular storage (row-major), shared by fit, export, runtime and tests.

Element ``(i, j)`` with ``j <= i`` of a ``D x D`` lower-triangular matrix lives at ``i*(i+1)/2 + j``
of a length ``T = D(D+1)/2`` vector. Torch-free (numpy only).
"""
import numpy as np


def packed_length(dim):
    """T = D(D+1)/2 for a D x D triangle."""
    return dim * (dim + 1) // 2


def dim_from_packed_length(length):
    """Inverse of ``packed_length``; ValueError when ``length`` is not triangular."""
    dim = int((np.sqrt(8 * length + 1) - 1) // 2)
    if packed_length(dim) != length:
        raise ValueError("{} is not a triangular number D(D+1)/2".format(length))
    return dim


def tril_indices(dim):
    """(rows, cols) int64 ``[T]`` in packed order: row by row, columns 0..i."""
    rows, cols = np.tril_indices(dim)
    return rows.astype(np.int64), cols.astype(np.int64)


def pack_lower(matrices):
    """``[..., D, D]`` -> ``[..., T]`` (lower triangle incl. diagonal, row-major)."""
    rows, cols = tril_indices(matrices.shape[-1])
    return matrices[..., rows, cols]


def dense_gather_index(dim, transpose=False):
    """int64 ``[D, D]``: packed index of each dense entry, ``T`` (one past the end) above the diagonal.

    Gathering ``concat(packed, 0)`` with it rebuilds the dense lower-triangular matrix
    (its transpose when ``transpose=True``).
    """
    index = np.full((dim, dim), packed_length(dim), dtype=np.int64)
    rows, cols = tril_indices(dim)
    index[rows, cols] = np.arange(len(rows), dtype=np.int64)
    return index.T.copy() if transpose else index


def unpack_lower(packed):
    """``[..., T]`` -> dense lower-triangular ``[..., D, D]`` (zeros above the diagonal)."""
    dim = dim_from_packed_length(packed.shape[-1])
    padded = np.concatenate([packed, np.zeros(packed.shape[:-1] + (1,), packed.dtype)], axis=-1)
    return padded[..., dense_gather_index(dim)]
