"""Decision thresholds learned from normal images only, out of sample.

A detector scored on its own training images is over-confident. In-sample, PaDiM's per-patch
covariance is fitted on the very vectors it scores, so with fewer images than dimensions every
training distance is pinned near the same value. A threshold taken from those scores is meaningless.
Instead each training image is scored by a model that did not see it, and the threshold is an order
statistic of those n out-of-sample normal scores. The default is leave-one-out, exact and in closed
form (``GaussianAccumulator.leave_one_out_distance``): each image's model has n - 1 images, nearly
the full model. K-fold (``PadimFitter.out_of_sample_scores``, by subtracting a fold's sums) is an
option. With D > n its models of (K-1)/K of the images score new images measurably higher than the
full model does, so its thresholds run high. On the held-out-style demo categories, 5-fold gave recall
0.29-0.38 at FPR 0 where leave-one-out gave 0.58-0.79.

Rank (split-conformal rule): ``k = ceil(q · (n + 1))``, clipped to ``n``. For a new normal image
from the same distribution, the chance that its score exceeds the k-th smallest of n is
distributed ``Beta(n - k + 1, k)``. That gives an expected false-positive rate of
``(n - k + 1) / (n + 1)`` and a one-sided 95 % upper bound, whatever the score distribution. With
``n < 1 / (1 - q)`` the quantile cannot be resolved and the rule gives the largest score. The
provenance says so. Models of n - 1 images score slightly higher than the model of n, so the
threshold errs towards fewer false alarms.
"""
import math

import numpy as np

from edgead.errors import ConfigError, DataError

DEFAULT_QUANTILE = 0.995
#: ``"n"``: leave-one-out (n folds of one image), exact in closed form for PaDiM.
DEFAULT_FOLDS = "n"
#: Fewest training images for which out-of-sample thresholds are computed.
MIN_IMAGES = 4
#: Out-of-sample scores all below this (distance units; normal images score ~10-1000) mean the training
#: images are copies of one another: no threshold can be learned from them.
DEGENERATE_SCORE = 1e-3


def parse_folds(folds):
    """``"n"`` (leave-one-out), 0 (no out-of-sample thresholds) or an int >= 2; digit strings accepted.

    Raises ConfigError (one line, naming the option) for anything else.
    """
    if isinstance(folds, str) and folds.strip().lower() in ("n", "loo"):
        return "n"
    try:
        value = None if isinstance(folds, bool) else int(folds)
    except (TypeError, ValueError):
        value = None
    if value is None or value < 0 or value == 1:
        raise ConfigError("--folds must be n (leave-one-out), an integer >= 2 (K-fold) or 0 (no thresholds), "
                          "got {!r}".format(folds))
    return value


def fold_assignment(n_images, folds, seed=0):
    """Balanced random fold ids ``[n]`` int64 in ``0..folds-1`` (seeded; every fold non-empty)."""
    folds = int(folds)
    if folds < 2:
        raise DataError("out-of-sample thresholds need at least 2 folds, got {}".format(folds))
    if n_images < max(folds, MIN_IMAGES):
        raise DataError("out-of-sample thresholds need at least {} training images for {} folds, got {}".format(
            max(folds, MIN_IMAGES), folds, n_images))
    ids = np.arange(n_images, dtype=np.int64) % folds
    return np.random.default_rng(seed).permutation(ids)


def check_quantile(quantile):
    """``quantile`` as a float in (0, 1); ConfigError otherwise (call before the long work starts)."""
    try:
        value = None if isinstance(quantile, bool) else float(quantile)
    except (TypeError, ValueError):
        value = None
    if value is None or not 0.0 < value < 1.0:
        raise ConfigError("--quantile must be a number in (0, 1), e.g. 0.995, got {!r}".format(quantile))
    return value


def conformal_rank(n, quantile):
    """1-based rank of the order statistic used as the ``quantile`` threshold of ``n`` scores."""
    quantile = check_quantile(quantile)
    # ceil with a tolerance: 0.55 * 100 is 55.000000000000007 in floating point, and the rank is 55
    return int(min(n, max(1, math.ceil(quantile * (n + 1) - 1e-9))))


def exceedance_interval(n, rank, confidence=0.95):
    """(expected, upper) false-positive rate of the rank-th smallest of n normal scores as threshold.

    ``P(new normal score > X_(rank)) ~ Beta(n - rank + 1, rank)``; ``upper`` is its one-sided
    ``confidence`` quantile.
    """
    from scipy.stats import beta

    a, b = n - rank + 1, rank
    return a / float(n + 1), float(beta.ppf(confidence, a, b))


def normal_calibration(scores, pixel_medians, folds, quantile=DEFAULT_QUANTILE, method="padim-leave-one-out",
                       map_maxima=None):
    """model.json ``calibration`` and ``calibration_provenance`` dicts from out-of-sample normal scores.

    Args:
        scores: ``[n]`` float, each training image's score under the model fitted without it (its fold):
            the max of its anomaly map (PaDiM), or the method's image score.
        pixel_medians: ``[n]`` float, the median of each of those anomaly maps (heatmap scale).
        folds: number of folds used (n for leave-one-out); quantile: target quantile of normal scores;
        method: the provenance name, e.g. ``padim-leave-one-out``, ``padim-leave-fold-out``,
            ``patchcore-leave-fold-out``.
        map_maxima: ``[n]`` float or None: the max of each of those anomaly maps, for a method whose image
            score is not the map's max (PatchCore's reweighted score); the pixel threshold is then the same
            rank order statistic of these. None: the scores are the map maxima.

    Returns:
        ``(calibration, provenance)``. calibration: ``image_threshold`` (the rank-th order statistic),
        ``pixel_threshold`` (the same value, or the rank-th of ``map_maxima``: either way a normal frame
        shows an anomalous pixel at the same expected rate as a normal frame is flagged),
        ``score_min`` / ``score_max`` (heatmap range: median normal pixel value, and the same distance
        above the pixel threshold, so it sits mid-scale), ``source`` = ``normal-oos``; numbers
        only, so runtimes that predate the provenance still read it. provenance: method, folds,
        quantile, n_normal, rank, expected_fpr, fpr_upper95, and the normal score median / max.

    Raises:
        DataError: fewer than ``MIN_IMAGES`` scores, non-finite scores or map maxima (or not one per score),
        or degenerate scores (all below ``DEGENERATE_SCORE``: identical training images).
    """
    scores = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    if scores.size < MIN_IMAGES or not np.all(np.isfinite(scores)):
        raise DataError("out-of-sample calibration needs at least {} finite normal scores".format(MIN_IMAGES))
    if map_maxima is not None:
        map_maxima = np.sort(np.asarray(map_maxima, dtype=np.float64).reshape(-1))
        if map_maxima.size != scores.size or not np.all(np.isfinite(map_maxima)):
            raise DataError("out-of-sample calibration needs one finite anomaly-map maximum per normal score "
                            "({} scores, {} maxima)".format(scores.size, map_maxima.size))
    if scores[-1] < DEGENERATE_SCORE:
        raise DataError("the training images are copies of one another (every out-of-sample score is below {}): "
                        "no threshold can be learned from them; fit on varied good images, or set thresholds "
                        "with --val".format(DEGENERATE_SCORE))
    n = int(scores.size)
    rank = conformal_rank(n, quantile)
    threshold = float(scores[rank - 1])
    pixel_threshold = threshold if map_maxima is None else float(map_maxima[rank - 1])
    expected, upper = exceedance_interval(n, rank)
    low = float(np.median(pixel_medians))
    calibration = {
        "image_threshold": threshold,
        "pixel_threshold": pixel_threshold,
        "score_min": low,
        "score_max": pixel_threshold + max(pixel_threshold - low, 1e-6),
        "source": "normal-oos",
    }
    provenance = {
        "method": method,
        "folds": int(folds),
        "quantile": float(quantile),
        "n_normal": n,
        "rank": rank,
        "expected_fpr": round(expected, 6),
        "fpr_upper95": round(upper, 6),
        "normal_score_median": float(np.median(scores)),
        "normal_score_max": float(scores[-1]),
    }
    return calibration, provenance


def set_calibration(config, calibration, provenance):
    """Store thresholds and where they came from in a model.json dict (together, so they never disagree)."""
    config["calibration"] = calibration
    config["calibration_provenance"] = provenance if calibration is not None else None
    return config

