"""Plain references for parity tests.

- ``embedding_concat``: verbatim logic of the PaDiM paper code (xiahaifeng1995/PaDiM-Anomaly-Detection-
  Localization, main.py): unfold/fold to place each coarse feature under its fine patches.
- ``fit_reference`` / ``score_reference``: float64 numpy, ``np.cov`` + explicit ``np.linalg.inv``, bilinear
  upsample (half-pixel, edge-clamped) and ``scipy.ndimage.gaussian_filter(sigma=4)``, score = max.
"""
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def embedding_concat(x, y):
    B, C1, H1, W1 = x.size()
    _, C2, H2, W2 = y.size()
    s = int(H1 / H2)
    x = F.unfold(x, kernel_size=s, dilation=1, stride=s)
    x = x.view(B, C1, -1, H2, W2)
    z = torch.zeros(B, C1 + C2, x.size(2), H2, W2)
    for i in range(x.size(2)):
        z[:, :, i, :, :] = torch.cat((x[:, :, i, :, :], y), 1)
    z = z.view(B, -1, H2 * W2)
    z = F.fold(z, kernel_size=s, output_size=(H1, W1), stride=s)
    return z


def reference_embedding(features, channel_indices):
    """PaDiM reference: concat the stages with ``embedding_concat``, then ``index_select``."""
    embedding = features[0]
    for layer in features[1:]:
        embedding = embedding_concat(embedding, layer)
    return torch.index_select(embedding, 1, torch.as_tensor(channel_indices))


def fit_reference(embeddings, epsilon=0.01):
    """embeddings ``[N, D, P]`` -> (mean ``[D, P]``, inverse covariance ``[P, D, D]``), float64."""
    emb = np.asarray(embeddings, dtype=np.float64)
    n, d, p = emb.shape
    mean = emb.mean(axis=0)
    inv = np.empty((p, d, d))
    for i in range(p):
        cov = np.cov(emb[:, :, i], rowvar=False) + epsilon * np.identity(d)
        inv[i] = np.linalg.inv(cov)
    return mean, inv


def distance_reference(embeddings, mean, inv):
    """``[N, D, P]`` -> Mahalanobis distance ``[N, P]`` float64."""
    emb = np.asarray(embeddings, dtype=np.float64)
    delta = emb - mean[None]
    return np.sqrt(np.einsum("ndp,pde,nep->np", delta, inv, delta))


def bilinear_upsample(grid, out_h, out_w):
    """``[h, w]`` -> ``[out_h, out_w]`` float64, half-pixel centres, edges clamped (torch align_corners=False)."""
    h, w = grid.shape

    def axis(n_in, n_out):
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0, None)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, fy = axis(h, out_h)
    x0, x1, fx = axis(w, out_w)
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x1] * fx
    bottom = grid[y1][:, x0] * (1 - fx) + grid[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def score_reference(embeddings, mean, inv, grid_hw, out_hw, sigma=4.0):
    """Full PaDiM scoring in float64: (maps ``[N, H, W]``, scores ``[N]``)."""
    dist = distance_reference(embeddings, mean, inv)
    maps = np.stack([
        gaussian_filter(bilinear_upsample(d.reshape(grid_hw), *out_hw), sigma=sigma) for d in dist
    ])
    return maps, maps.reshape(len(maps), -1).max(axis=1)
