"""edgead.metrics against hand-computed cases and slow reference implementations.

References: sklearn ``roc_auc_score`` (AUROC), and for AUPRO a direct threshold loop written
below following the MVTec AD evaluation code (``compute_pro`` + ``trapezoid(x_max=0.3)``);
tolerances are stated per test.
"""
from bisect import bisect

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, label
from sklearn.metrics import roc_auc_score

from edgead.errors import DataError
from edgead.metrics import (calibrate, f1_max_threshold, image_auroc, pixel_auroc, pro_auc,
                            pro_curve)


# ------------------------------------------------------------------ AUROC


def test_image_auroc_perfect_inverted_ties_single_class():
    labels = [0, 0, 1, 1]
    assert image_auroc(labels, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc(labels, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert image_auroc(labels, [0.5, 0.5, 0.5, 0.5]) == 0.5
    # one of four (neg, pos) pairs mis-ordered -> 3/4
    assert image_auroc(labels, [0.1, 0.7, 0.6, 0.9]) == pytest.approx(0.75)
    assert np.isnan(image_auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert np.isnan(image_auroc([1, 1], [0.1, 0.2]))
    with pytest.raises(ValueError):
        image_auroc([0, 1], [0.1, np.nan])


def test_image_auroc_random_is_near_half_and_matches_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 4000)
    scores = rng.random(4000)
    auc = image_auroc(labels, scores)
    assert abs(auc - 0.5) < 0.03
    assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_pixel_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    masks = rng.random((3, 16, 16)) < 0.2
    maps = np.round(rng.random((3, 16, 16)) + 0.6 * masks, 1)  # many ties
    expected = roc_auc_score(masks.ravel(), maps.astype(np.float32).ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(masks, maps[:, None]) == pytest.approx(expected, abs=1e-12)  # [N, 1, H, W]
    assert pixel_auroc(masks, masks.astype(float)) == 1.0
    assert pixel_auroc(masks, -masks.astype(float)) == 0.0
    assert np.isnan(pixel_auroc(np.zeros((2, 4, 4), bool), maps[:2, :4, :4]))
    with pytest.raises(ValueError):
        pixel_auroc(masks, maps[:2])


# ------------------------------------------------------------------ PRO


def _mvtec_trapezoid(x, y, x_max):
    """MVTec AD evaluation ``trapezoid`` (generic_util.py), copied logic."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    correction = 0.0
    if x_max not in x:
        ins = bisect(x, x_max)
        assert 0 < ins < len(x)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    mask = x <= x_max
    x, y = x[mask], y[mask]
    return np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction


def _slow_pro_auc(masks, maps, fpr_limit=0.3, thresholds=None):
    """Loop over thresholds (default: every distinct value, high to low) and over regions."""
    maps = maps.astype(np.float32)
    regions = []
    for i, m in enumerate(masks):
        lab, n = label(m, structure=np.ones((3, 3), int))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = ~masks
    if thresholds is None:
        thresholds = np.unique(maps)
    fprs, pros = [0.0], [0.0]
    for t in np.sort(thresholds)[::-1]:
        pred = maps >= t
        fprs.append((pred & normal).sum() / normal.sum())
        pros.append(np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    return _mvtec_trapezoid(fprs, pros, fpr_limit) / fpr_limit


def _toy():
    """Two 2x2 regions (not 8-connected): A fully at 1.0, B half at 1.0; one normal pixel at 0.5."""
    masks = np.zeros((1, 4, 6), bool)
    masks[0, 0:2, 0:2] = True
    masks[0, 0:2, 4:6] = True
    maps = np.zeros((1, 4, 6), np.float32)
    maps[0, 0:2, 0:2] = 1.0
    maps[0, 0, 4:6] = 1.0
    maps[0, 3, 3] = 0.5
    return masks, maps


def test_pro_toy_by_hand():
    masks, maps = _toy()
    fpr, pro = pro_curve(masks, maps)
    # thresholds 1.0 -> (0, mean(1, 1/2)); 0.5 -> (1/16, 0.75); 0.0 -> (1, 1)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 16, 1, 1])
    np.testing.assert_allclose(pro, [0, 0.75, 0.75, 1, 1])
    # area on [0, 0.3]: 0.75 * 1/16 + trapezoid from (1/16, 0.75) to (0.3, y), y on the line to (1, 1)
    y = 0.75 + 0.25 * (0.3 - 1 / 16) / (1 - 1 / 16)
    expected = (0.75 / 16 + 0.5 * (0.75 + y) * (0.3 - 1 / 16)) / 0.3
    assert pro_auc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.7750694, abs=1e-6)


def test_pro_perfect_constant_and_eight_connectivity():
    masks, _ = _toy()
    assert pro_auc(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    # a constant map: curve (0, 0) -> (1, 1), area 0.3^2 / 2 on [0, 0.3], normalised 0.15
    assert pro_auc(masks, np.zeros(masks.shape)) == pytest.approx(0.15)
    # (0,0) touches (1,1) diagonally: one region of 3 pixels with 8-connectivity
    m = np.zeros((1, 5, 5), bool)
    m[0, 0, 0] = m[0, 1, 1] = m[0, 1, 2] = True
    s = np.zeros((1, 5, 5), np.float32)
    s[0, 0, 0] = 1.0
    fpr, pro = pro_curve(m, s)
    assert fpr[1] == 0.0 and pro[1] == pytest.approx(1 / 3)  # 4-connectivity would give 1/2


def test_pro_no_regions_is_nan_and_bad_limit():
    assert np.isnan(pro_auc(np.zeros((2, 4, 4), bool), np.random.rand(2, 4, 4)))
    with pytest.raises(ValueError):
        pro_auc(*_toy(), fpr_limit=0.0)


def _random_case(seed, n=3, hw=24):
    rng = np.random.default_rng(seed)
    masks = gaussian_filter(rng.random((n, hw, hw)), (0, 2, 2)) > 0.53
    masks[0] = False  # one fully normal image
    maps = gaussian_filter(rng.random((n, hw, hw)), (0, 1.5, 1.5)) + 0.08 * masks
    return masks, maps.astype(np.float32)


@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_pro_auc_matches_slow_reference_exactly(limit):
    masks, maps = _random_case(2)
    assert masks.sum() > 0
    ref = _slow_pro_auc(masks, maps, limit)
    assert pro_auc(masks, maps, fpr_limit=limit) == pytest.approx(ref, abs=1e-9)
    tied = np.round(maps, 2)  # many ties: tie groups must be collapsed into one curve point
    assert pro_auc(masks, tied, fpr_limit=limit) == pytest.approx(_slow_pro_auc(masks, tied, limit), abs=1e-9)


def test_pro_auc_binned_matches_threshold_loop():
    masks, maps = _random_case(3)
    thresholds = np.linspace(maps.min(), maps.max(), 50)
    ref = _slow_pro_auc(masks, maps, 0.3, thresholds=thresholds.astype(np.float32))
    assert pro_auc(masks, maps, num_thresholds=50) == pytest.approx(ref, abs=1e-6)


def test_pro_auc_exact_vs_1000_threshold_loop():
    """Exact (every value) vs the usual 1000 evenly spaced thresholds: agree to ~1e-3."""
    masks, maps = _random_case(4, n=4, hw=32)
    thresholds = np.linspace(maps.min(), maps.max(), 1000).astype(np.float32)
    ref = _slow_pro_auc(masks, maps, 0.3, thresholds=thresholds)
    exact = pro_auc(masks, maps)
    assert 0.0 < exact < 1.0
    assert exact == pytest.approx(ref, abs=2e-3)
    assert pro_auc(masks, maps, num_thresholds=1000) == pytest.approx(ref, abs=1e-6)


# ------------------------------------------------------------------ F1 / calibration


def test_f1_max_threshold_toy():
    labels = [0, 0, 1, 1, 0, 1]
    scores = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    # t=0.35: TP 3, FP 1 -> P 3/4, R 1 -> F1 6/7 (t=0.8: 0.8, t=0.4: 2/3, t=0.2: 0.75)
    f1, t = f1_max_threshold(labels, scores)
    assert f1 == pytest.approx(6 / 7)
    assert t == pytest.approx(0.35)
    assert f1_max_threshold([0, 1], [0.2, 0.7]) == (1.0, 0.7)
    f1, t = f1_max_threshold([0, 0], [0.2, 0.7])
    assert np.isnan(f1) and np.isnan(t)


def test_calibrate_keys_values_and_subsampling():
    rng = np.random.default_rng(5)
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([1.0, 2.0, 2.5, 3.0, 4.0, 5.0])
    masks = np.zeros((6, 20, 20), bool)
    masks[3:, 5:10, 5:10] = True
    maps = rng.random((6, 20, 20)).astype(np.float32) + 2.0 * masks
    cal = calibrate(labels, scores, masks, maps)
    assert set(cal) == {"image_threshold", "pixel_threshold", "score_min", "score_max", "source"}
    assert cal["image_threshold"] == 3.0
    assert cal["score_min"] == 1.0 and cal["score_max"] == 5.0 and cal["source"] == "validation"
    # perfectly separable pixels: F1 = 1 at the lowest defect-pixel score
    assert cal["pixel_threshold"] == pytest.approx(float(maps[masks].min()))
    sub = calibrate(labels, scores, masks, maps, max_pixels=500)
    assert sub == calibrate(labels, scores, masks, maps, max_pixels=500)  # deterministic
    assert maps[~masks].max() < sub["pixel_threshold"] <= maps[masks].max()
    assert calibrate(labels, scores)["pixel_threshold"] is None
    with pytest.raises(DataError, match="good and defective"):
        calibrate([0, 0], [1.0, 2.0])
