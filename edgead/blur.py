"""Gaussian blur constants shared by the torch model, the ONNX graph and the numpy reference.

The blur is ``scipy.ndimage.gaussian_filter(map, sigma, mode="reflect", truncate=4.0)`` done as two
1-D passes: pad each axis by ``radius`` with scipy's ``reflect`` rule (``d c b a | a b c d``, the
edge sample repeated) through an index gather, then a valid 1-D convolution. Torch-free.
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
