"""PatchCore numerics against plain float64 references (tests/reference_patchcore.py): the locally aware
embedding, the greedy coreset, the scoring model, the out-of-sample thresholds, the bundle."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_HW, random_frames
from edgead import backbones, thresholds
from edgead.errors import BundleError, ConfigError
from edgead.patchcore import coreset
from edgead.patchcore.embedding import PatchcoreEmbedding, projection_matrix
from edgead.patchcore.fit import (PatchcoreFitter, coreset_size, fit_patchcore, parse_coreset_ratio,
                                  parse_neighbors)
from edgead.patchcore.model import PatchcoreHead
from reference_patchcore import embedding_reference, greedy_reference, score_reference

RATIO = 0.25


@pytest.fixture(scope="module")
def train_frames():
    return random_frames(12)


@pytest.fixture(scope="module")
def tiny_patchcore(train_frames):
    """PatchCore on resnet18 (random weights, seed 0), 64x64, default D = 256 (of 384), 25 % coreset, 5 folds."""
    return fit_patchcore([train_frames[:5], train_frames[5:]], backbone="resnet18", weights="random",
                         input_hw=TINY_HW, coreset_ratio=RATIO)


def _train_rows(bundle, frames):
    """float32 ``[n P, D]``: the training patch rows, embedded in the fit's batches (5, then 7)."""
    embedding = bundle.frame_embedding()
    with torch.no_grad():
        parts = [embedding(torch.from_numpy(frames[:5])), embedding(torch.from_numpy(frames[5:]))]
    emb = torch.cat(parts)
    return emb.reshape(len(frames), emb.shape[1], -1).transpose(1, 2).reshape(-1, emb.shape[1]).numpy()


@pytest.mark.parametrize("channels,dim", [(384, 100), (10, 3), (7, 7), (1536, 1024), (152, 151)])
def test_projection_matrix_is_adaptive_average_pooling(channels, dim):
    vectors = torch.randn(5, 1, channels, dtype=torch.float64, generator=torch.Generator().manual_seed(channels))
    expected = F.adaptive_avg_pool1d(vectors, dim)[:, 0].numpy()
    np.testing.assert_allclose(vectors[:, 0].numpy() @ projection_matrix(channels, dim).T, expected, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("backbone,dim", [("resnet18", None), ("resnet18", 200), ("resnet18", 64),
                                          ("mobilenetv2_100", 50)])
def test_embedding_matches_the_float64_reference(backbone, dim):
    """Per-stage projection / pooling / upsampling == concatenate, pool, upsample, adaptive-average-pool (float64).
    resnet18 D = 200 projects stage 2 (128 channels) after pooling and stage 3 (256) before."""
    extractor = backbones.create_feature_extractor(backbone, TINY_HW, out_indices=(2, 3))
    backbones.seeded_random_init(extractor, 3)
    channels, strides = backbones.stage_info(extractor)
    assert strides == [8, 16]
    dim = sum(channels) if dim is None else dim
    module = PatchcoreEmbedding(extractor, channels, strides, dim).eval()
    images = torch.randn(2, 3, *TINY_HW, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = module(images).double().numpy()
        reference = embedding_reference(extractor(images), dim)
    assert ours.shape == (2, dim, TINY_HW[0] // 8, TINY_HW[1] // 8)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=2e-6 * np.abs(reference).max())


def test_k_center_greedy_matches_the_reference():
    points = torch.randn(300, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([3.0, 1, 1, 0.5, 0.1])
    np.testing.assert_array_equal(coreset.k_center_greedy(points, 40, first=7), greedy_reference(points.numpy(), 40, 7))
    started = coreset.k_center_greedy(points, 40, start=[3, 10, 20])
    np.testing.assert_array_equal(started, greedy_reference(points.numpy(), 40, [3, 10, 20]))
    np.testing.assert_array_equal(coreset.k_center_greedy(points, 500), np.arange(300))  # size >= n: everything


def test_greedy_coreset_projects_then_selects():
    features = torch.randn(400, 300, generator=torch.Generator().manual_seed(2))
    matrix = coreset.projection(300, 128, seed=4)
    assert matrix.shape == (300, 128)
    first = int(np.random.default_rng(4).integers(400))
    expected = greedy_reference((features @ matrix).numpy(), 30, first)
    np.testing.assert_array_equal(coreset.greedy_coreset(features, 30, 128, seed=4), expected)
    assert coreset.projection(100, 128) is None  # nothing to gain below the projection dimension


def test_coreset_size_rules():
    assert coreset_size(1000, 0.1) == 100
    assert coreset_size(1001, 0.1) == 101  # ceil
    assert coreset_size(1000, "auto") == 100
    assert coreset_size(1_000_000, "auto") == 50_000  # capped
    assert coreset_size(10_000_000, "auto") == 100_000  # never below 1 %
    assert coreset_size(5, 0.01) == 1
    assert coreset_size(64, 1.0) == 64


@pytest.mark.parametrize("bad", ["0", "-0.1", "1.5", "nan", "ten", ""])
def test_bad_coreset_ratio_is_one_line(bad):
    with pytest.raises(ConfigError, match="--coreset-ratio") as info:
        parse_coreset_ratio(bad)
    assert "\n" not in str(info.value)


def test_option_parsing():
    assert parse_coreset_ratio("auto") == "auto" and parse_coreset_ratio("0.01") == 0.01
    assert parse_neighbors("9") == 9
    for bad in ("0", "x", "2.5"):
        with pytest.raises(ConfigError, match="--neighbors"):
            parse_neighbors(bad)


def test_model_matches_the_float64_reference(tiny_patchcore):
    bank = tiny_patchcore.memory_bank
    test_frames = random_frames(3, seed=5)
    test_frames[0, 20:30, 20:40] = 255  # a bright defect
    with torch.no_grad():
        amap, score = tiny_patchcore.model()(torch.from_numpy(test_frames))
        emb = tiny_patchcore.frame_embedding()(torch.from_numpy(test_frames)).flatten(2).double().numpy()
    grid = tiny_patchcore.config["embedding"]["grid"]
    ref_maps, ref_scores = score_reference(emb, bank.numpy(), grid, TINY_HW, neighbors=9)
    np.testing.assert_allclose(amap[:, 0].numpy(), ref_maps, rtol=0, atol=1e-4 * ref_maps.max())
    np.testing.assert_allclose(score.numpy(), ref_scores, rtol=1e-4)
    assert score[0] > score[1:].max()  # the defect frame scores highest
    # b = 1: the score is the largest patch distance
    head = PatchcoreHead(bank, TINY_HW, 4.0, grid, neighbors=1)
    with torch.no_grad():
        _, plain = head(torch.from_numpy(emb).float().reshape(3, -1, *grid))
    np.testing.assert_allclose(plain.numpy(), score_reference(emb, bank.numpy(), grid, TINY_HW, neighbors=1)[1],
                               rtol=1e-5)


def test_chunked_distances_equal_one_block(tiny_patchcore):
    bank = tiny_patchcore.memory_bank
    grid = tiny_patchcore.config["embedding"]["grid"]
    emb = torch.randn(2, bank.shape[1], *grid, generator=torch.Generator().manual_seed(3))
    whole = PatchcoreHead(bank, TINY_HW, 4.0, grid)
    chunked = PatchcoreHead(bank, TINY_HW, 4.0, grid, chunk_bytes=4 * grid[0] * grid[1] * 50)
    assert whole.chunk >= bank.shape[0] and chunked.chunk == 50
    with torch.no_grad():
        for a, b in zip(whole(emb), chunked(emb)):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


def test_bank_is_the_greedy_coreset_of_the_training_patches(tiny_patchcore, train_frames):
    rows = _train_rows(tiny_patchcore, train_frames)  # [768, 384]
    cfg = tiny_patchcore.config["patchcore"]
    assert cfg["n_patches"] == len(rows) == 768 and cfg["n_train"] == 12
    assert cfg["coreset_size"] == math.ceil(RATIO * 768) == tiny_patchcore.memory_bank.shape[0]
    points = (torch.from_numpy(rows) @ coreset.projection(rows.shape[1], 128, 0)).numpy()
    first = int(np.random.default_rng(0).integers(len(points)))
    expected = np.sort(greedy_reference(points, cfg["coreset_size"], first))
    np.testing.assert_allclose(tiny_patchcore.memory_bank.numpy(), rows[expected], rtol=0, atol=1e-5)


def test_thresholds_come_from_folds_scored_against_the_other_folds_coresets(tiny_patchcore, train_frames):
    """Recompute the out-of-sample scores independently: per fold, the reference greedy coreset of its projected
    rows; each fold scored (reference) against the union of the others; the threshold is their rank-th value."""
    rows = _train_rows(tiny_patchcore, train_frames)
    n, patches = 12, 64
    assignment = thresholds.fold_assignment(n, 5, 0)
    ratio = math.ceil(RATIO * n * patches) / float(n * patches)
    matrix = coreset.projection(rows.shape[1], 128, 0)
    chosen = []
    for fold in range(5):
        images = np.flatnonzero(assignment == fold)
        fold_rows = np.concatenate([rows[i * patches:(i + 1) * patches] for i in images])
        points = (torch.from_numpy(fold_rows) @ matrix).numpy()
        local = greedy_reference(points, math.ceil(ratio * len(points)), int(np.random.default_rng(0).integers(len(points))))
        chosen.append(fold_rows[local])
    scores, maxima = np.empty(n), np.empty(n)
    grid = tiny_patchcore.config["embedding"]["grid"]
    for fold in range(5):
        bank = np.concatenate([c for f, c in enumerate(chosen) if f != fold])
        for i in np.flatnonzero(assignment == fold):
            emb = rows[i * patches:(i + 1) * patches].T[None]
            maps, score = score_reference(emb, bank, grid, TINY_HW)
            scores[i], maxima[i] = score[0], maps.max()
    rank = thresholds.conformal_rank(n, 0.995)
    calibration = tiny_patchcore.config["calibration"]
    provenance = tiny_patchcore.config["calibration_provenance"]
    assert provenance["method"] == "patchcore-leave-fold-out" and provenance["folds"] == 5
    assert provenance["n_normal"] == 12 and provenance["rank"] == rank
    np.testing.assert_allclose(calibration["image_threshold"], np.sort(scores)[rank - 1], rtol=1e-4)
    np.testing.assert_allclose(calibration["pixel_threshold"], np.sort(maxima)[rank - 1], rtol=1e-4)
    assert calibration["pixel_threshold"] != calibration["image_threshold"]  # the map's own order statistic


def test_save_and_load_round_trip(tiny_patchcore, tmp_path):
    import json

    from edgead.bundle import load_bundle
    from edgead.patchcore.bundle import PatchcoreBundle

    folder = str(tmp_path / "pc.edgead")
    tiny_patchcore.save(folder)
    loaded = load_bundle(folder)
    assert isinstance(loaded, PatchcoreBundle) and loaded.config["method"] == "patchcore"
    assert torch.equal(loaded.memory_bank, tiny_patchcore.memory_bank)
    frames = torch.from_numpy(random_frames(2, seed=9))
    with torch.no_grad():
        for a, b in zip(loaded.model()(frames), tiny_patchcore.model()(frames)):
            assert torch.equal(a, b)
    # model.json promising another bank size: one line naming the weights file
    config_path = tmp_path / "pc.edgead" / "model.json"
    config = json.loads(config_path.read_text())
    config["patchcore"]["coreset_size"] += 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(BundleError, match=r"patchcore\.memory_bank has shape .* model\.json implies"):
        load_bundle(folder)


def test_memory_budget_is_checked_before_the_fit():
    fitter = PatchcoreFitter("resnet18", "random", TINY_HW, None, 0, 4, max_memory=800 << 20)
    fitter.check_calibration_memory(5, 20)  # small: fine
    with pytest.raises(ConfigError, match="memory bank") as info:
        fitter.check_calibration_memory(5, 200_000)
    assert "\n" not in str(info.value)


def test_too_few_images_leave_the_model_uncalibrated():
    frames = random_frames(3)
    with pytest.warns(UserWarning, match="too few"):
        bundle = fit_patchcore([frames], backbone="resnet18", weights="random", input_hw=TINY_HW)
    assert bundle.config["calibration"] is None


def test_coreset_never_picks_a_point_twice():
    """Repeated rows (copied images): the selection stops once everything is chosen or a copy of a chosen row."""
    base = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    points = base.repeat(40, 1)  # 200 rows, 5 distinct
    chosen = coreset.k_center_greedy(points, 10, first=0)
    assert len(chosen) == 5 and len({tuple(points[i].tolist()) for i in chosen}) == 5
    assert len(coreset.k_center_greedy(torch.ones(30, 4), 8, first=3)) == 1


def test_copied_training_images_leave_the_model_uncalibrated():
    """Copies of one image: every out-of-sample distance is exactly 0 (the distance of a patch the bank holds is
    computed directly, not through the cancelling expansion), so no threshold is learned, with a warning."""
    frames = np.repeat(random_frames(1), 8, axis=0)
    with pytest.warns(UserWarning, match="copies of one another"):
        bundle = fit_patchcore([frames], backbone="resnet18", weights="random", input_hw=TINY_HW, coreset_ratio=1.0)
    assert bundle.config["calibration"] is None
    with torch.no_grad():
        _, score = bundle.model()(torch.from_numpy(frames[:2]))
    assert score.abs().max() == 0.0
    half = fit_patchcore([frames], backbone="resnet18", weights="random", input_hw=TINY_HW, coreset_ratio=0.5,
                         folds=0)
    assert half.memory_bank.shape[0] == half.config["patchcore"]["coreset_size"] == 64  # the distinct patches, once


def test_corrupt_out_indices_are_one_line(tiny_patchcore, tmp_path):
    import json

    from edgead.bundle import load_bundle

    folder = str(tmp_path / "pc.edgead")
    tiny_patchcore.save(folder)
    config_path = tmp_path / "pc.edgead" / "model.json"
    config = json.loads(config_path.read_text())
    config["backbone"]["out_indices"] = [2, 9]
    config_path.write_text(json.dumps(config))
    with pytest.raises(BundleError, match=r"model\.json: backbone resnet18 with out_indices \[2, 9\] cannot be built"):
        load_bundle(folder)
