"""Upsample + blur as per-axis matrices (``edgead.blur``) against torch bilinear + scipy ``gaussian_filter``
(float64; tolerance 1e-12 absolute: the composition is exact up to float64 rounding)."""
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from edgead import blur


@pytest.mark.parametrize("grid,out", [((64, 64), (256, 256)), ((4, 6), (16, 24)), ((56, 48), (224, 192)),
                                      ((2, 3), (8, 12))])
def test_upsample_blur_matrices_equal_bilinear_then_scipy_gaussian(grid, out):
    rng = np.random.default_rng(grid[0] * 100 + grid[1])
    distance = rng.random(grid)
    upsampled = F.interpolate(torch.from_numpy(distance)[None, None], size=out, mode="bilinear",
                              align_corners=False)[0, 0].numpy()
    expected = ndi.gaussian_filter(upsampled, sigma=4, mode="reflect", truncate=4.0)
    rows = blur.upsample_blur_matrix(out[0], grid[0], 4.0)
    cols = blur.upsample_blur_matrix(out[1], grid[1], 4.0)
    assert rows.shape == (out[0], grid[0]) and cols.shape == (out[1], grid[1])
    np.testing.assert_allclose(rows @ distance @ cols.T, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(blur.bilinear_matrix(out[0], grid[0]) @ distance @ blur.bilinear_matrix(out[1], grid[1]).T,
                               upsampled, rtol=0, atol=1e-12)


def test_operators_preserve_constants():
    """Rows sum to 1: a constant distance map stays that constant after upsample + blur."""
    for out_len, in_len in [(256, 64), (24, 6), (7, 7)]:
        np.testing.assert_allclose(blur.upsample_blur_matrix(out_len, in_len, 4.0).sum(axis=1), 1.0, atol=1e-12)


def test_sigma_zero_is_no_blur():
    """``postprocess.blur_sigma: 0`` (allowed by the schema) is the plain bilinear upsample, as scipy does."""
    from scipy.ndimage import gaussian_filter

    grid = np.random.default_rng(0).standard_normal((8, 8))
    up = blur.bilinear_matrix(32, 8) @ grid @ blur.bilinear_matrix(32, 8).T
    np.testing.assert_allclose(blur.upsample_blur_matrix(32, 8, 0.0) @ grid @ blur.upsample_blur_matrix(32, 8, 0.0).T,
                               gaussian_filter(up, sigma=0.0), rtol=0, atol=1e-12)
