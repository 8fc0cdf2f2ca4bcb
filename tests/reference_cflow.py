"""Plain float64 references for the CFLOW parity tests (independent of ``edgead.cflow``'s folded inference form).

- ``positional_encoding_reference``: anomalib's ``positional_encoding_2d`` transcribed (torch, float64), as
  ``[K, H, W]``.
- ``block_reference``: one FrEIA ``AllInOneBlock`` forward (affine coupling with ``alpha tanh`` soft clamping,
  SOFTPLUS global affine, hard permutation) computed from the stored tensors as FrEIA defines it: the subnet on
  ``concat(x1, c)``, the coupling scaled by 0.1, ``F.linear`` by the permutation matrix; float64 numpy.
- ``score_reference``: per scale the log-likelihood per dimension, ``relu(1 - exp(l - l_ref))``, bilinear
  upsample (half-pixel) + ``scipy.ndimage.gaussian_filter(sigma)``, summed over scales; score = max.
"""
import math

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from reference_padim import bilinear_upsample


def positional_encoding_reference(condition_vector, height, width):
    """anomalib ``positional_encoding_2d`` (float64): ``[K, H, W]``."""
    pos_encoding = torch.zeros(condition_vector, height, width, dtype=torch.float64)
    condition_vector = condition_vector // 2
    div_term = torch.exp(torch.arange(0.0, condition_vector, 2, dtype=torch.float64)
                         * -(math.log(1e4) / condition_vector))
    pos_w = torch.arange(0.0, width, dtype=torch.float64).unsqueeze(1)
    pos_h = torch.arange(0.0, height, dtype=torch.float64).unsqueeze(1)
    pos_encoding[0:condition_vector:2, :, :] = torch.sin(pos_w * div_term).transpose(0, 1).unsqueeze(1).repeat(
        1, height, 1)
    pos_encoding[1:condition_vector:2, :, :] = torch.cos(pos_w * div_term).transpose(0, 1).unsqueeze(1).repeat(
        1, height, 1)
    pos_encoding[condition_vector::2, :, :] = torch.sin(pos_h * div_term).transpose(0, 1).unsqueeze(2).repeat(
        1, 1, width)
    pos_encoding[condition_vector + 1::2, :, :] = torch.cos(pos_h * div_term).transpose(0, 1).unsqueeze(2).repeat(
        1, 1, width)
    return pos_encoding.numpy()


def block_reference(x, c, block, clamp):
    """x ``[B, C]``, c ``[B, K]`` float64, block: stored tensors -> (out ``[B, C]``, log|det J| ``[B]``)."""
    x = np.asarray(x, np.float64)
    channels = x.shape[1]
    s1 = channels - channels // 2
    x1, x2 = x[:, :s1], x[:, s1:]
    hidden = np.maximum(np.concatenate([x1, c], axis=1) @ block["subnet_in_weight"].astype(np.float64).T
                        + block["subnet_in_bias"], 0.0)
    a = (hidden @ block["subnet_out_weight"].astype(np.float64).T + block["subnet_out_bias"]) * 0.1
    s = clamp * np.tanh(a[:, :channels - s1])
    x2 = x2 * np.exp(s) + a[:, channels - s1:]
    y = np.concatenate([x1, x2], axis=1)
    scale = 0.1 * 2.0 * np.log1p(np.exp(0.5 * block["global_scale"].astype(np.float64)))  # 0.1 softplus(beta 0.5)
    v = y * scale + block["global_offset"]
    w = np.zeros((channels, channels))
    w[np.arange(channels), block["permutation"]] = 1.0
    return v @ w.T, s.sum(axis=1) + np.log(scale).sum()


def log_likelihood_reference(rows, encoding, blocks, clamp):
    """rows ``[B, C]`` at positions with conditions ``encoding`` ``[B, K]`` -> log-likelihood per dimension ``[B]``."""
    z, log_det = np.asarray(rows, np.float64), 0.0
    for block in blocks:
        z, det = block_reference(z, encoding, block, clamp)
        log_det = log_det + det
    channels = z.shape[1]
    return (-0.5 * channels * math.log(2 * math.pi) - 0.5 * (z * z).sum(axis=1) + log_det) / channels


def score_reference(features, scale_blocks, references, condition_dim, clamp, out_hw, sigma=4.0):
    """features: per scale ``[N, C, h, w]`` -> (maps ``[N, H, W]``, scores ``[N]``) float64."""
    maps = 0.0
    for feature, blocks, reference in zip(features, scale_blocks, references):
        feature = np.asarray(feature, np.float64)
        n, channels, h, w = feature.shape
        encoding = positional_encoding_reference(condition_dim, h, w).reshape(condition_dim, h * w).T  # [P, K]
        scale_maps = []
        for image in feature:
            rows = image.reshape(channels, h * w).T
            likelihood = log_likelihood_reference(rows, encoding, blocks, clamp)
            anomaly = np.maximum(1.0 - np.exp(likelihood - reference), 0.0).reshape(h, w)
            scale_maps.append(gaussian_filter(bilinear_upsample(anomaly, *out_hw), sigma=sigma) if sigma else
                              bilinear_upsample(anomaly, *out_hw))
        maps = maps + np.stack(scale_maps)
    return maps, maps.reshape(len(maps), -1).max(axis=1)
