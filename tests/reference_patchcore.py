"""Plain float64 references for the PatchCore parity tests (independent of ``edgead.patchcore``).

- ``embedding_reference``: anomalib's ``PatchcoreModel.generate_embedding`` order: 3x3 average pool of each stage,
  bilinear upsample of the deeper ones to the first grid, concatenate, then (our projection) adaptive average
  pooling of each patch vector with ``torch.nn.functional.adaptive_avg_pool1d``; float64 throughout.
- ``greedy_reference``: k-center greedy with explicit ``np.linalg.norm`` distances (anomalib's
  ``KCenterGreedy`` without the projection), float64.
- ``score_reference``: ``scipy.spatial.distance.cdist`` nearest distances, bilinear upsample +
  ``scipy.ndimage.gaussian_filter(sigma=4)``, and anomalib's ``compute_anomaly_score`` reweighting.
"""
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist

from reference_padim import bilinear_upsample


def embedding_reference(features, dim):
    """features: the backbone stages (torch tensors ``[N, C_i, h_i, w_i]``) -> float64 ``[N, dim, h, w]``."""
    features = [f.double() for f in features]
    grid = features[0].shape[-2:]
    parts = []
    for feature in features:
        pooled = F.avg_pool2d(feature, 3, stride=1, padding=1)
        if pooled.shape[-2:] != grid:
            pooled = F.interpolate(pooled, size=grid, mode="bilinear", align_corners=False)
        parts.append(pooled)
    cat = torch.cat(parts, dim=1)  # [N, C, h, w]
    n, channels, h, w = cat.shape
    if dim == channels:
        return cat.numpy()
    vectors = cat.permute(0, 2, 3, 1).reshape(-1, 1, channels)
    pooled = F.adaptive_avg_pool1d(vectors, dim)  # [N h w, 1, dim]
    return pooled.reshape(n, h, w, dim).permute(0, 3, 1, 2).numpy()


def greedy_reference(points, size, start):
    """Indices of the greedy k-center subset of ``points`` (float64), taking the indices ``start`` (an int or a
    list) first."""
    points = np.asarray(points, np.float64)
    chosen = [int(i) for i in np.atleast_1d(start)]
    nearest = np.min([np.linalg.norm(points - points[i], axis=1) for i in chosen], axis=0)
    while len(chosen) < size:
        index = int(np.argmax(nearest))
        chosen.append(index)
        nearest = np.minimum(nearest, np.linalg.norm(points - points[index], axis=1))
    return np.array(chosen)


def score_reference(embeddings, bank, grid_hw, out_hw, neighbors=9, sigma=4.0):
    """embeddings ``[N, D, P]``, bank ``[M, D]`` -> (maps ``[N, H, W]``, scores ``[N]``) float64."""
    embeddings = np.asarray(embeddings, np.float64)
    bank = np.asarray(bank, np.float64)
    maps, scores = [], []
    for image in embeddings:
        rows = image.T  # [P, D]
        distances = cdist(rows, bank)  # [P, M]
        patch = distances.min(axis=1)
        maps.append(gaussian_filter(bilinear_upsample(patch.reshape(grid_hw), *out_hw), sigma=sigma))
        worst = int(np.argmax(patch))
        if neighbors == 1:
            scores.append(patch[worst])
            continue
        nearest = int(np.argmin(distances[worst]))
        support = np.argsort(cdist(bank[nearest:nearest + 1], bank)[0], kind="stable")[:min(neighbors, len(bank))]
        gaps = np.linalg.norm(bank[support] - rows[worst], axis=1)
        softmax = np.exp(gaps - gaps.max()) / np.exp(gaps - gaps.max()).sum()
        scores.append((1.0 - softmax[0]) * patch[worst])
    return np.stack(maps), np.array(scores)
