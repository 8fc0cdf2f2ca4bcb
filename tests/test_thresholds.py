"""Out-of-sample thresholds from normal images (edgead.thresholds, PadimFitter.calibrate_out_of_sample).

References: leave-fold-out statistics against a float64 numpy refit without the fold
(``reference_padim.fit_reference``); k-fold scores against k separate fits scored by the torch
model; the order-statistic false-positive rate against a Monte Carlo simulation.
"""
import numpy as np
import pytest
import torch

from edgead import thresholds
from edgead.errors import ConfigError, DataError
from edgead.evaluate import rates_at_threshold
from edgead.fit import PadimFitter, fit_padim

from conftest import TINY_HW, random_frames
from reference_padim import distance_reference, fit_reference


def _fitter(dim=12):
    return PadimFitter("resnet18", "random", TINY_HW, dim=dim, seed=0)


def test_held_out_distance_equals_a_float64_refit_without_the_fold():
    """Subtracting a fold's sums gives the statistics of the rest exactly (to float64 rounding)."""
    fitter = _fitter()
    frames = random_frames(14, seed=3)
    embeddings = fitter.embed(frames).flatten(2)  # [14, D, P]
    fitter.accumulator.update(embeddings)
    fold = np.array([1, 4, 9, 13])
    rest = np.setdiff1d(np.arange(14), fold)
    distance = fitter.accumulator.held_out_distance(embeddings[fold]).numpy()
    mean, inv = fit_reference(embeddings[rest].double().numpy())
    expected = distance_reference(embeddings[fold].double().numpy(), mean, inv)
    np.testing.assert_allclose(distance, expected, rtol=1e-9)
    # and it is not the in-sample distance (which the fold's own images would pull down)
    mean_all, inv_all = fit_reference(embeddings.double().numpy())
    in_sample = distance_reference(embeddings[fold].double().numpy(), mean_all, inv_all)
    assert (in_sample < expected).mean() > 0.9


def test_leave_one_out_distance_equals_n_float64_refits():
    """The closed form (Sherman-Morrison on the ε-regularised covariance) against n explicit refits."""
    fitter = _fitter()
    frames = random_frames(9, seed=4)
    embeddings = fitter.embed(frames).flatten(2)  # [9, D, P], D = 12 > n - 1: rank-deficient, ε matters
    fitter.accumulator.update(embeddings)
    distance = fitter.accumulator.leave_one_out_distance(embeddings).numpy()
    expected = np.empty_like(distance)
    for i in range(9):
        mean, inv = fit_reference(np.delete(embeddings.double().numpy(), i, axis=0))
        expected[i] = distance_reference(embeddings[i:i + 1].double().numpy(), mean, inv)[0]
    np.testing.assert_allclose(distance, expected, rtol=1e-8)


def test_leave_one_out_scores_equal_n_separate_fits():
    frames = random_frames(7, seed=6)
    fitter = _fitter(dim=8)
    fitter.update(frames)
    scores, medians = fitter.leave_one_out_scores([frames[:4], frames[4:]])
    for i in range(7):
        bundle = fit_padim([np.delete(frames, i, axis=0)], "resnet18", "random", TINY_HW, dim=8, folds=0)
        with torch.no_grad():
            amap, score = bundle.model()(torch.from_numpy(frames[i:i + 1]))
        assert scores[i] == pytest.approx(float(score[0]), rel=2e-5)
        assert medians[i] == pytest.approx(float(np.median(amap.numpy())), rel=2e-5)


def test_out_of_sample_scores_equal_k_separate_fits():
    """One extra pass gives what k refits (each scored by the float32 torch model) give."""
    frames = random_frames(15, seed=5)
    fitter = _fitter()
    fitter.update(frames)
    assignment = thresholds.fold_assignment(15, 3, seed=0)
    scores, medians = fitter.out_of_sample_scores([frames[assignment == f]] for f in range(3))
    expected_scores, expected_medians = [], []
    for f in range(3):
        bundle = fit_padim([frames[assignment != f]], "resnet18", "random", TINY_HW, dim=12, folds=0)
        with torch.no_grad():
            amap, score = bundle.model()(torch.from_numpy(frames[assignment == f]))
        expected_scores.append(score.numpy())
        expected_medians.append(np.median(amap.numpy().reshape(len(amap), -1), axis=1))
    np.testing.assert_allclose(scores, np.concatenate(expected_scores), rtol=2e-5)
    np.testing.assert_allclose(medians, np.concatenate(expected_medians), rtol=2e-5)


@pytest.mark.parametrize("given,parsed", [("n", "n"), ("LOO", "n"), ("5", 5), (2, 2), ("0", 0), (0, 0)])
def test_parse_folds(given, parsed):
    assert thresholds.parse_folds(given) == parsed


@pytest.mark.parametrize("bad", ["1", 1, -3, "five", True, None, "2.5"])
def test_parse_folds_rejects(bad):
    with pytest.raises(ConfigError, match="--folds must be n"):
        thresholds.parse_folds(bad)


def test_fold_assignment_is_balanced_seeded_and_checked():
    ids = thresholds.fold_assignment(23, 5, seed=1)
    assert sorted(np.bincount(ids).tolist()) == [4, 4, 5, 5, 5]
    assert np.array_equal(ids, thresholds.fold_assignment(23, 5, seed=1))
    assert not np.array_equal(ids, thresholds.fold_assignment(23, 5, seed=2))
    with pytest.raises(DataError, match="at least 2 folds"):
        thresholds.fold_assignment(10, 1)
    with pytest.raises(DataError, match="at least 5 training images"):
        thresholds.fold_assignment(4, 5)


@pytest.mark.parametrize("n,quantile,rank", [(50, 0.995, 50), (199, 0.995, 199), (399, 0.995, 398),
                                             (1000, 0.99, 991), (9, 0.5, 5), (10, 0.01, 1), (99, 0.55, 55)])
def test_conformal_rank(n, quantile, rank):
    assert thresholds.conformal_rank(n, quantile) == rank


@pytest.mark.parametrize("n,rank", [(20, 20), (40, 38), (8, 5)])
def test_exceedance_interval_matches_simulation(n, rank):
    """P(new normal score > k-th smallest of n) for any continuous distribution: Monte Carlo."""
    expected, upper = thresholds.exceedance_interval(n, rank)
    assert expected == pytest.approx((n - rank + 1) / (n + 1))
    rng = np.random.default_rng(0)
    trials = 40000
    samples = rng.standard_normal((trials, n))
    threshold = np.sort(samples, axis=1)[:, rank - 1]
    exceed = (1.0 - _normal_cdf(threshold))  # exact exceedance probability of each trial's threshold
    assert exceed.mean() == pytest.approx(expected, abs=0.003)
    assert np.quantile(exceed, 0.95) == pytest.approx(upper, abs=0.006)


def _normal_cdf(x):
    from scipy.special import ndtr

    return ndtr(x)


def test_normal_calibration_fields():
    scores = np.arange(1.0, 41.0)  # 40 normal scores 1..40
    cal, prov = thresholds.normal_calibration(scores[::-1], np.full(40, 0.5), folds=5, quantile=0.95)
    rank = thresholds.conformal_rank(40, 0.95)  # ceil(0.95 * 41) = 39
    assert rank == 39 and cal["image_threshold"] == 39.0 == cal["pixel_threshold"]
    assert cal["source"] == "normal-oos" and cal["score_min"] == 0.5 and cal["score_max"] == 77.5
    assert (prov["n_normal"], prov["rank"], prov["folds"], prov["quantile"]) == (40, 39, 5, 0.95)
    assert prov["expected_fpr"] == pytest.approx(2 / 41, abs=1e-6) and prov["normal_score_max"] == 40.0
    with pytest.raises(DataError):
        thresholds.normal_calibration([1.0, np.nan, 2.0, 3.0], np.zeros(4), 2)


def test_normal_calibration_pixel_threshold_from_map_maxima():
    """A method whose image score is not the map's max (PatchCore's reweighted score) passes the out-of-sample map
    maxima: the pixel threshold is the same rank order statistic of those (sorted on their own), the heatmap range
    is set around it, and the image threshold is unchanged."""
    scores = np.arange(1.0, 21.0)  # 20 normal scores 1..20
    maxima = 100.0 + 3.0 * np.arange(20.0)[::-1]  # 100..157, in the opposite order of the scores
    medians = np.full(20, 10.0)
    cal, prov = thresholds.normal_calibration(scores, medians, folds=5, quantile=0.9, method="patchcore-leave-fold-out",
                                              map_maxima=maxima)
    assert thresholds.conformal_rank(20, 0.9) == 19  # ceil(0.9 * 21)
    assert cal["image_threshold"] == 19.0 and cal["pixel_threshold"] == 154.0  # 19th of 100, 103, ..., 157
    assert cal["score_min"] == 10.0 and cal["score_max"] == 298.0  # 154 + (154 - 10)
    assert prov["method"] == "patchcore-leave-fold-out" and prov["rank"] == 19 and prov["n_normal"] == 20
    plain, _ = thresholds.normal_calibration(scores, medians, folds=5, quantile=0.9)  # None: pixel = image
    assert plain["pixel_threshold"] == plain["image_threshold"] == 19.0 and plain["score_max"] == 28.0
    with pytest.raises(DataError, match="one finite anomaly-map maximum per normal score"):
        thresholds.normal_calibration(scores, medians, 5, 0.9, map_maxima=maxima[:19])
    with pytest.raises(DataError, match="one finite anomaly-map maximum per normal score"):
        thresholds.normal_calibration(scores, medians, 5, 0.9, map_maxima=np.where(maxima > 150, np.nan, maxima))


def test_patchcore_provenance_is_described():
    from edgead.runtime import modelinfo

    info = {"calibration": {"image_threshold": 2.5, "pixel_threshold": 3.25, "source": "normal-oos"},
            "calibration_provenance": {"method": "patchcore-leave-fold-out", "folds": 5, "quantile": 0.99,
                                       "n_normal": 40, "rank": 39, "expected_fpr": 0.02439, "fpr_upper95": 0.07}}
    assert modelinfo.describe_thresholds(info).startswith(
        "image threshold 2.5, pixel threshold 3.25: 5-fold out-of-sample scores of 40 normal images, each fold "
        "against a memory bank built without it, quantile 0.99 (rank 39/40); expected")
    info["calibration_provenance"] = {"method": "patchcore-leave-fold-out"}  # sparse: nothing guessed
    assert modelinfo.describe_thresholds(info).endswith(
        "k-fold out-of-sample scores of the training normal images, each fold against a memory bank built without it")


@pytest.mark.parametrize("folds", ["n", 5])
def test_out_of_sample_threshold_keeps_new_normal_frames_quiet(folds):
    """The failure this fixes: 20 images for D = 24, so in-sample distances are pinned low and an
    in-sample p99.5 flags nearly every new normal frame; the out-of-sample threshold flags few."""
    train, new = random_frames(20, seed=11), random_frames(40, seed=12)
    fitter = PadimFitter("resnet18", "random", TINY_HW, dim=24, seed=0)
    fitter.update(train)
    fitter.calibrate_out_of_sample(lambda idx: [train[idx]], 20, folds=folds, quantile=0.995)
    provenance = fitter.calibration_provenance
    assert provenance["method"] == ("padim-leave-one-out" if folds == "n" else "padim-leave-fold-out")
    assert provenance["folds"] == (20 if folds == "n" else 5)
    bundle = fitter.bundle()
    assert any("rank <= 19 < 24" in w for w in fitter.warnings)
    model = bundle.model()
    with torch.no_grad():
        train_scores = model(torch.from_numpy(train))[1].numpy()
        new_scores = model(torch.from_numpy(new))[1].numpy()
    in_sample = np.percentile(train_scores, 99.5)
    labels = np.zeros(40)
    fpr_in_sample, _ = rates_at_threshold(labels, new_scores, in_sample)
    fpr_default, _ = rates_at_threshold(labels, new_scores, bundle.config["calibration"]["image_threshold"])
    assert fpr_in_sample >= 0.9
    assert fpr_default <= 0.15  # expected 1/21 for exchangeable frames


def test_too_few_images_leave_the_model_uncalibrated_with_a_warning():
    frames = random_frames(3, seed=1)
    with pytest.warns(UserWarning, match="too few for out-of-sample thresholds"):
        bundle = fit_padim([frames], "resnet18", "random", TINY_HW, dim=8)
    assert bundle.config["calibration"] is None and bundle.config["calibration_provenance"] is None


def test_identical_training_images_leave_the_model_uncalibrated_with_a_warning():
    """Copies of one image: every out-of-sample score is ~0, and a threshold of 0 would flag every frame."""
    frames = np.repeat(random_frames(1, seed=2), 6, axis=0)
    with pytest.warns(UserWarning, match="copies of one another"):
        bundle = fit_padim([frames], "resnet18", "random", TINY_HW, dim=8)
    assert bundle.config["calibration"] is None


def test_fit_padim_checks_folds_and_quantile_before_fitting():
    frames = random_frames(6, seed=1)
    bundle = fit_padim([frames], "resnet18", "random", TINY_HW, dim=8, folds="0")
    assert bundle.config["calibration"] is None
    calls = []

    def batches():
        calls.append(1)
        yield frames

    for bad in ({"folds": 1}, {"quantile": 1.0}, {"quantile": "high"}):
        with pytest.raises(ConfigError):
            fit_padim(batches(), "resnet18", "random", TINY_HW, dim=8, **bad)
    assert calls == []


def test_rates_at_threshold_use_the_runtime_rule():
    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 9.0])
    assert rates_at_threshold(labels, scores, 5.0) == (0.0, 0.5)  # score > threshold, as the runtime flags
    assert rates_at_threshold(labels, scores, 2.5) == (0.5, 1.0)
    fpr, recall = rates_at_threshold(labels, scores, None)
    assert np.isnan(fpr) and np.isnan(recall)
