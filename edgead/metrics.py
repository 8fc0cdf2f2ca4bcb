"""Anomaly-detection metrics (numpy + scikit-learn + scipy), anomalib / MVTec-AD names.

- ``image_auroc``: ROC AUC of per-image scores.
- ``pixel_auroc``: ROC AUC over all pixels (exact, memory-light, float32).
- ``pro_auc``: area under the per-region-overlap curve up to FPR 0.3, normalised (AUPRO),
  as in the MVTec AD paper's reference evaluation code.
- ``f1_max_threshold``: best F1 over thresholds and the threshold reaching it.
- ``calibrate``: the ``calibration`` dict of ``model.json`` (docs/CONTRACTS.md).

Conventions: label/mask 1 (True) = anomalous; higher score = more anomalous; a pixel or image
is predicted anomalous when ``score >= threshold``.
"""
import numpy as np

from .errors import DataError

#: Pixels used for the pixel F1-max threshold; more are subsampled (deterministically).
PIXEL_F1_MAX_SAMPLES = 5_000_000


def _as_1d(labels, scores):
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError("labels and scores differ in length: %d vs %d" % (labels.size, scores.size))
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf")
    return labels.astype(bool), scores


def _as_nhw(masks, maps):
    """Masks ``[N, H, W]`` / ``[H, W]`` (any dtype, > 0 = anomalous), maps ``[N, H, W]`` or
    ``[N, 1, H, W]`` -> (bool ``[N, H, W]``, float32 ``[N, H, W]``)."""
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim == 2:
        masks = masks[None]
    if maps.ndim == 2:
        maps = maps[None]
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError("masks %s and maps %s must both be [N, H, W]" % (masks.shape, maps.shape))
    maps = maps.astype(np.float32, copy=False)
    if not np.all(np.isfinite(maps)):
        raise ValueError("anomaly maps contain NaN or inf")
    return masks > 0, maps


def image_auroc(labels, scores):
    """Image-level ROC AUC.

    Args:
        labels: ``[N]`` int, 0 = good, 1 = anomalous.
        scores: ``[N]`` float, higher = more anomalous.

    Returns:
        float in [0, 1]; ``float('nan')`` when only one class is present (AUROC undefined).
    """
    from sklearn.metrics import roc_auc_score

    labels, scores = _as_1d(labels, scores)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def _auroc_mann_whitney(pos, neg, chunk=1 << 22):
    """Exact ROC AUC = P(pos > neg) + 0.5 P(pos == neg) (the trapezoidal ROC AUC, ties included).

    ``neg`` is sorted once; positives are ranked against it by binary search in chunks, so
    memory stays at one sorted copy of the negatives.
    """
    neg = np.sort(neg, kind="stable")
    total = 0.0
    for i in range(0, pos.size, chunk):
        p = pos[i:i + chunk]
        lo = np.searchsorted(neg, p, side="left")   # negatives < p
        hi = np.searchsorted(neg, p, side="right")  # negatives <= p
        total += float(lo.sum(dtype=np.int64)) + 0.5 * float((hi - lo).sum(dtype=np.int64))
    return total / (float(pos.size) * float(neg.size))


def pixel_auroc(masks, maps):
    """Pixel-level ROC AUC over all pixels of all images (exact; equals sklearn's roc_auc_score).

    Args:
        masks: ``[N, H, W]`` bool ground truth (True = anomalous pixel).
        maps: ``[N, H, W]`` (or ``[N, 1, H, W]``) float anomaly maps; used as float32.

    Returns:
        float in [0, 1]; ``float('nan')`` when all pixels are of one class.
    """
    masks, maps = _as_nhw(masks, maps)
    m = masks.reshape(-1)
    s = maps.reshape(-1)
    pos = s[m]
    if pos.size == 0 or pos.size == s.size:
        return float("nan")
    return float(_auroc_mann_whitney(pos, s[~m]))


def _region_weights(masks):
    """Per-pixel PRO weight ``1 / size of its GT region`` (8-connected), 0 on normal pixels.

    Returns (float64 ``[N, H, W]`` weights, number of regions).
    """
    from scipy.ndimage import label

    structure = np.ones((3, 3), dtype=int)
    weights = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        labeled, n = label(mask, structure=structure)
        sizes = np.bincount(labeled.ravel()).astype(np.float64)
        inv = np.zeros_like(sizes)
        inv[1:] = 1.0 / sizes[1:]
        weights[i] = inv[labeled]
        n_regions += n
    return weights, n_regions


def _area_to_limit(fpr, pro, limit):
    """Trapezoid area under ``pro(fpr)`` for fpr in [0, limit], linearly interpolated at
    ``limit`` (the MVTec AD reference ``trapezoid(x, y, x_max)``). ``fpr`` is non-decreasing."""
    keep = fpr <= limit
    x = fpr[keep]
    y = pro[keep]
    if x[-1] < limit and keep.size > x.size:
        j = x.size  # first point beyond the limit
        x0, y0, x1, y1 = fpr[j - 1], pro[j - 1], fpr[j], pro[j]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        x = np.append(x, limit)
        y = np.append(y, y_lim)
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


def pro_curve(masks, maps, fpr_limit=1.0, num_thresholds=None):
    """The PRO curve: (fpr, pro) float64 arrays, fpr non-decreasing, starting at (0, 0).

    ``fpr(t)`` = share of normal pixels with ``map >= t``; ``pro(t)`` = mean over all GT regions
    (8-connected components of every mask) of the share of the region with ``map >= t``.

    Exact (``num_thresholds=None``): one point per distinct map value, sort-based like the MVTec
    AD reference ``compute_pro``; pixels that cannot affect the curve below ``fpr_limit``
    are dropped before sorting, and the curve ends with the first point past ``fpr_limit`` (or
    at (1, 1) when ``fpr_limit >= 1``). Binned (``num_thresholds=K``): thresholds
    ``linspace(min, max, K)``; memory O(H*W + K).

    Returns (None, None) when there are no GT regions or no normal pixels.
    """
    masks, maps = _as_nhw(masks, maps)
    weights, n_regions = _region_weights(masks)
    normal = ~masks
    n_ok = int(normal.sum())
    if n_regions == 0 or n_ok == 0:
        return None, None
    if num_thresholds is not None:
        return _pro_curve_binned(normal, weights, maps, n_regions, n_ok, int(num_thresholds))

    scores = maps.reshape(-1)
    fp = normal.reshape(-1)
    w = weights.reshape(-1)
    truncated = False
    if fpr_limit < 1.0:
        # k-th largest normal score, k = floor(limit * n_ok) + 1: its point already has
        # fpr > limit; every point with fpr <= limit uses only pixels scoring >= it.
        k = min(n_ok, int(np.floor(fpr_limit * n_ok)) + 1)
        normal_scores = scores[fp]
        cut = np.partition(normal_scores, n_ok - k)[n_ok - k]
        sel = scores >= cut
        truncated = not sel.all()
        scores, fp, w = scores[sel], fp[sel], w[sel]
    order = np.argsort(scores, kind="stable")[::-1]
    s = scores[order]
    fpr = np.cumsum(fp[order], dtype=np.int64) / float(n_ok)
    pro = np.cumsum(w[order]) / float(n_regions)
    last_of_tie = np.append(s[1:] != s[:-1], True)
    fpr = np.clip(fpr[last_of_tie], 0.0, 1.0)
    pro = np.clip(pro[last_of_tie], 0.0, 1.0)
    head = [np.zeros(1)]
    tail = [] if truncated else [np.ones(1)]
    return np.concatenate(head + [fpr] + tail), np.concatenate(head + [pro] + tail)


def _pro_curve_binned(normal, weights, maps, n_regions, n_ok, num_thresholds):
    if num_thresholds < 2:
        raise ValueError("num_thresholds must be >= 2 or None, got %d" % num_thresholds)
    lo, hi = float(maps.min()), float(maps.max())
    thresholds = np.linspace(lo, hi, num_thresholds)
    fp_hist = np.zeros(num_thresholds + 1, dtype=np.int64)
    pro_hist = np.zeros(num_thresholds + 1, dtype=np.float64)
    for i in range(maps.shape[0]):
        # b = number of thresholds <= score: the pixel is positive for thresholds 0 .. b-1
        b = np.searchsorted(thresholds, maps[i].ravel().astype(np.float64), side="right")
        fp_hist += np.bincount(b, weights=normal[i].ravel(), minlength=num_thresholds + 1).astype(np.int64)
        pro_hist += np.bincount(b, weights=weights[i].ravel(), minlength=num_thresholds + 1)
    # count at threshold k = sum over b > k; walk from the highest threshold down
    fp_at = np.cumsum(fp_hist[::-1])[:-1]      # thresholds K-1 .. 0
    pro_at = np.cumsum(pro_hist[::-1])[:-1]
    fpr = np.clip(fp_at / float(n_ok), 0.0, 1.0)
    pro = np.clip(pro_at / float(n_regions), 0.0, 1.0)
    return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], pro, [1.0]))


def pro_auc(masks, maps, fpr_limit=0.3, num_thresholds=None):
    """AUPRO: area under the per-region-overlap curve for FPR in [0, fpr_limit] / fpr_limit.

    As in the MVTec AD paper (Bergmann et al., IJCV 2021) and its reference ``compute_pro`` +
    ``trapezoid(..., x_max=0.3)``: GT regions are the 8-connected components of each mask,
    PRO is the mean overlap over all regions of all images, FPR is over all normal pixels,
    the curve is integrated with the trapezoid rule and linearly interpolated at ``fpr_limit``.

    Args:
        masks: ``[N, H, W]`` bool ground truth.
        maps: ``[N, H, W]`` (or ``[N, 1, H, W]``) float anomaly maps (used as float32).
        fpr_limit: upper FPR integration limit in (0, 1].
        num_thresholds: None = exact (every distinct map value is a threshold); an int K uses
            ``linspace(min, max, K)`` thresholds with O(H*W + K) memory for very large sets.

    Returns:
        float in [0, 1]; ``float('nan')`` when no mask has a defect pixel or no pixel is normal.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError("fpr_limit must be in (0, 1], got %r" % (fpr_limit,))
    fpr, pro = pro_curve(masks, maps, fpr_limit=fpr_limit, num_thresholds=num_thresholds)
    if fpr is None:
        return float("nan")
    return float(np.clip(_area_to_limit(fpr, pro, fpr_limit) / fpr_limit, 0.0, 1.0))


def f1_max_threshold(labels, scores):
    """Highest F1 over all thresholds (``score >= threshold`` = anomalous).

    Args:
        labels: ``[N]`` int/bool, 1 = anomalous.
        scores: ``[N]`` float.

    Returns:
        ``(f1, threshold)`` floats; ``(nan, nan)`` when there is no anomalous sample.
    """
    from sklearn.metrics import precision_recall_curve

    labels, scores = _as_1d(labels, scores)
    if not labels.any():
        return float("nan"), float("nan")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    denom = precision + recall
    f1 = np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def calibrate(image_labels, image_scores, masks=None, maps=None, max_pixels=PIXEL_F1_MAX_SAMPLES,
              seed=0):
    """Thresholds for ``model.json`` ``calibration`` from labelled validation data.

    Args:
        image_labels: ``[N]`` int, 1 = anomalous.
        image_scores: ``[N]`` float image scores.
        masks: ``[N, H, W]`` bool ground truth or None (then ``pixel_threshold`` is None).
        maps: ``[N, H, W]`` float anomaly maps or None.
        max_pixels: more pixels than this are subsampled uniformly (seeded, so deterministic)
            for the pixel F1-max threshold.
        seed: subsampling seed.

    Returns:
        dict ``image_threshold`` (image F1-max), ``pixel_threshold`` (pixel F1-max or None),
        ``score_min`` / ``score_max`` (of the image scores), ``source`` = ``"validation"``;
        all numbers are Python floats.

    Raises:
        DataError: the validation images are not both good and anomalous, or the masks hold
            no anomalous pixel.
    """
    labels, scores = _as_1d(image_labels, image_scores)
    if labels.all() or not labels.any():
        raise DataError("calibration needs both good and defective validation images "
                        "(got %d good, %d defective)" % (int((~labels).sum()), int(labels.sum())))
    _, image_threshold = f1_max_threshold(labels, scores)
    pixel_threshold = None
    if masks is not None and maps is not None:
        masks, maps = _as_nhw(masks, maps)
        m = masks.reshape(-1)
        s = maps.reshape(-1)
        if m.size > max_pixels:
            rng = np.random.default_rng(seed)
            idx = np.sort(rng.choice(m.size, size=int(max_pixels), replace=False))
            m, s = m[idx], s[idx]
        if not m.any():
            raise DataError("calibration: the ground-truth masks of the defective validation "
                            "images hold no anomalous pixel (check ground_truth/*_mask.png)")
        _, pixel_threshold = f1_max_threshold(m, s)
    elif (masks is None) != (maps is None):
        raise ValueError("give both masks and maps, or neither")
    return {
        "image_threshold": float(image_threshold),
        "pixel_threshold": None if pixel_threshold is None else float(pixel_threshold),
        "score_min": float(scores.min()),
        "score_max": float(scores.max()),
        "source": "validation",
    }
