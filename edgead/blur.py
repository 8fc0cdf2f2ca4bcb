"""Gaussian blur constants shared by the torch model, the ONNX graph and the numpy reference.

The blur is ``scipy.ndimage.gaussian_filter(map, sigma, mode="reflect", truncate=4.0)``, separable:
one 1-D pass per axis with scipy's ``reflect`` border (``d c b a | a b c d``, the edge sample
repeated). The anomaly map is ``blur(bilinear_upsample(distance))``; both steps are linear and act on
each axis separately, so per axis they compose into one small matrix
``A = G @ U`` (``G``: reflect-padded Gaussian ``[L, L]``, ``U``: bilinear ``[L, l]``) and the map is
``A_y @ distance @ A_xᵀ``: two tiny MatMuls instead of a full-resolution pad, 33-tap convolutions and
a resize. Torch-free.
"""
import numpy as np


def blur_radius(sigma, truncate=4.0):
    """scipy's kernel radius: ``int(truncate * sigma + 0.5)`` (16 for σ = 4)."""
    return int(truncate * float(sigma) + 0.5)


def gaussian_kernel1d(sigma, radius):
    """float64 ``[2*radius + 1]`` normalised Gaussian taps, identical to scipy's ``_gaussian_kernel1d``."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) ** 2) * x ** 2)
    return phi / phi.sum()


def reflect_pad_index(length, radius):
    """int64 ``[length + 2*radius]``: source index of every padded position under scipy ``reflect``."""
    return np.pad(np.arange(length, dtype=np.int64), radius, mode="symmetric")


def bilinear_matrix(out_len, in_len):
    """float64 ``[out_len, in_len]``: 1-D linear resize with half-pixel centres.

    Same rule as torch ``interpolate(mode="bilinear", align_corners=False)`` and ONNX ``Resize``
    (``linear``, ``half_pixel``): source ``s = (i + 0.5) * in/out - 0.5`` clamped to ``[0, in-1]``,
    weights ``1 - frac`` / ``frac`` on ``floor(s)`` and the next sample.
    """
    source = (np.arange(out_len, dtype=np.float64) + 0.5) * (in_len / out_len) - 0.5
    source = np.clip(source, 0.0, in_len - 1)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, in_len - 1)
    frac = source - low
    matrix = np.zeros((out_len, in_len), np.float64)
    rows = np.arange(out_len)
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


def gaussian_matrix(length, sigma):
    """float64 ``[length, length]``: the 1-D scipy-reflect Gaussian blur as a matrix (``y = G @ x``); the identity
    for ``sigma <= 0`` (no blur, as scipy's ``gaussian_filter`` leaves such an axis alone; model.json allows 0)."""
    if float(sigma) <= 0.0:
        return np.identity(length)
    radius = blur_radius(sigma)
    taps = gaussian_kernel1d(sigma, radius)
    padded = reflect_pad_index(length, radius)  # [length + 2r]: source of each padded position
    matrix = np.zeros((length, length), np.float64)
    for k, tap in enumerate(taps):
        np.add.at(matrix, (np.arange(length), padded[k:k + length]), tap)
    return matrix


def upsample_blur_matrix(out_len, in_len, sigma):
    """float64 ``[out_len, in_len]``: bilinear upsample ``in_len -> out_len`` then the reflect Gaussian blur.

    The anomaly map of a distance grid ``d [h, w]`` is ``upsample_blur_matrix(H, h) @ d @
    upsample_blur_matrix(W, w).T`` (``[H, W]``), equal to scipy ``gaussian_filter`` of the bilinear
    upsample up to float rounding.
    """
    return gaussian_matrix(out_len, sigma) @ bilinear_matrix(out_len, in_len)
