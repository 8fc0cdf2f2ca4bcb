"""Greedy k-center coreset selection on a random projection (PatchCore, section 3.2; Sener & Savarese 2018).

The memory bank of all training patches is reduced to the subset that covers it best: start from one patch,
then repeatedly add the patch farthest from everything chosen so far. Distances are measured after a
Johnson-Lindenstrauss random projection to ``projection_dim`` dimensions (default 128), which keeps them
within a small factor and makes each step a memory-bound mat-vec over ``[n, 128]`` float32.

Each step reads the projected bank once (``n x 128 x 4`` bytes, 105 MB for 200 images at 256 px): the whole
selection costs ``size`` such passes, so time grows as ``n_patches x coreset size`` (benchmarks/patchcore_coreset.py).
"""
import numpy as np
import torch
from tqdm import tqdm

#: The paper's random-projection dimension
PROJECTION_DIM = 128
#: Squared distances below this fraction of the largest squared norm count as the same point (float32 rounding of
#: the expanded distance is ~1e-7 of it)
DUPLICATE_TOLERANCE = 4e-6


def projection(dim, projection_dim=PROJECTION_DIM, seed=0):
    """float32 ``[dim, projection_dim]`` Gaussian random projection (entries N(0, 1/projection_dim), seeded),
    or None when ``dim <= projection_dim`` (projecting would not save anything)."""
    if int(dim) <= int(projection_dim):
        return None
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(int(dim), int(projection_dim), generator=generator) / float(projection_dim) ** 0.5


def project(features, matrix):
    """``[n, D]`` float32 -> ``[n, projection_dim]`` float32 (``features`` itself when ``matrix`` is None)."""
    features = torch.as_tensor(features, dtype=torch.float32)
    return features if matrix is None else features @ matrix


def k_center_greedy(points, size, start=None, first=0, progress=False, desc="coreset"):
    """Indices ``[size]`` int64 (numpy) of a greedy k-center subset of ``points`` (float32 ``[n, d]``).

    start: indices taken first, in order (a coreset of part of the points, extended greedily to all of
    them); without it the first centre is ``first``. Then each step takes the point whose squared distance to
    its nearest chosen centre is largest (the first such index on ties). ``size >= n`` returns ``arange(n)``.
    Distances: ``|x|^2 - 2 x.c + |c|^2``, float32, clamped at 0. The selection stops early, returning fewer than
    ``size`` indices, once every point lies within ``DUPLICATE_TOLERANCE x max |x|^2`` of a chosen one (repeated
    rows, e.g. copied images): it never picks the same point twice.
    """
    points = np.ascontiguousarray(torch.as_tensor(points, dtype=torch.float32).numpy())
    n = int(points.shape[0])
    size = int(size)
    if size >= n:
        return np.arange(n, dtype=np.int64)
    if size < 1:
        raise ValueError("coreset size must be >= 1, got {}".format(size))
    start = [] if start is None else [int(i) for i in start]
    if len(start) > size:
        raise ValueError("{} start indices for a coreset of {}".format(len(start), size))
    # numpy throughout: the mat-vec is BLAS (multi-threaded, memory-bound); the vector updates are single
    # threaded on purpose (0.8 MB vectors: torch's thread hand-off cost 100x the arithmetic on 2 busy cores)
    squared_norms = np.einsum("ij,ij->i", points, points)
    nearest = np.full(n, np.inf, np.float32)
    distance = np.empty(n, np.float32)
    chosen = np.empty(size, np.int64)
    tolerance = DUPLICATE_TOLERANCE * float(squared_norms.max()) if n else 0.0
    with tqdm(total=size, desc=desc, unit="centre", disable=not progress, leave=False, mininterval=1.0) as bar:
        for step in range(size):
            if step < len(start):
                index = start[step]
            elif step == 0:
                index = int(first)
            else:
                index = int(np.argmax(nearest))
                if nearest[index] <= tolerance:  # everything is a chosen point or a copy of one
                    return chosen[:step].copy()
            chosen[step] = index
            # distance = |x|^2 - 2 x.c + |c|^2, in one preallocated vector
            np.dot(points, points[index], out=distance)
            distance *= -2.0
            distance += squared_norms
            distance += squared_norms[index]
            np.maximum(distance, 0.0, out=distance)
            np.minimum(nearest, distance, out=nearest)
            nearest[index] = 0.0  # chosen (its own distance is float32 rounding, not always 0)
            bar.update(1)
    return chosen


def greedy_coreset(features, size, projection_dim=PROJECTION_DIM, seed=0, progress=False):
    """Indices ``[size]`` int64 (numpy) of the greedy k-center coreset of ``features`` (float32 ``[n, D]``),
    measured after a seeded random projection to ``projection_dim`` dimensions; the first centre is a seeded
    random row (as in the paper's implementation)."""
    features = torch.as_tensor(features, dtype=torch.float32)
    points = project(features, projection(features.shape[1], projection_dim, seed))
    first = int(np.random.default_rng(seed).integers(len(points))) if len(points) else 0
    return k_center_greedy(points, size, first=first, progress=progress)
