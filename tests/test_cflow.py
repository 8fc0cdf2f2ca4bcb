"""CFLOW-AD: the decoders against FrEIA and a float64 reference, the scoring head against the reference, the fit
(held-out fold, early stopping, references, thresholds) and the bundle's checks.

References: ``reference_cflow`` (float64 numpy from the stored tensors, anomalib's positional encoding) and FrEIA's
own ``AllInOneBlock`` in float64. Tolerances are stated at each comparison.
"""
import json
import os
import re

import numpy as np
import pytest
import torch

from conftest import TINY_HW, random_frames
from edgead import thresholds
from edgead.cflow import flow
from edgead.cflow.bundle import CflowBundle, assemble, tensor_key
from edgead.cflow.fit import CflowFitter, _mean_loss, fit_cflow, make_head, parse_epochs, parse_learning_rate
from edgead.errors import BundleError, ConfigError
from reference_cflow import (block_reference, log_likelihood_reference, positional_encoding_reference,
                             score_reference)

FIT = dict(epochs=2, fiber_batch=64, coupling_blocks=2)


def _fitter(n=16, folds=4, seed=0, **options):
    frames = random_frames(n, seed=5)
    fitter = CflowFitter("resnet18", "random", TINY_HW, None, seed, 8, None, **dict(FIT, **options))
    for start in range(0, n, 8):
        fitter.update(frames[start:start + 8])
    if folds:
        fitter.calibrate_out_of_sample(None, n, folds, 0.9, seed)
    return fitter, frames


@pytest.fixture(scope="module")
def fitted():
    fitter, frames = _fitter()
    heldout = np.flatnonzero(thresholds.fold_assignment(16, 4, 0) == 0)
    return fitter, fitter.bundle(), frames, heldout


def _perturbed(scale_blocks, seed=1):
    """The stored tensors with every parameter moved off its trained value (so each one matters)."""
    rng = np.random.default_rng(seed)
    out = []
    for blocks in scale_blocks:
        moved = []
        for block in blocks:
            block = dict(block)
            for name in ("subnet_in_bias", "subnet_out_bias", "global_offset"):
                block[name] = (block[name] + rng.normal(0, 0.3, block[name].shape)).astype(np.float32)
            block["global_scale"] = (block["global_scale"] + rng.normal(0, 1.0, block["global_scale"].shape)).astype(
                np.float32)
            block["subnet_out_weight"] = (block["subnet_out_weight"] * 5).astype(np.float32)
            moved.append(block)
        out.append(moved)
    return out


def _features(bundle, frames):
    """float64 stage features ``[N, C, h, w]`` per scale, from the bundle's own truncated backbone."""
    from edgead.embedding import Preprocess

    cfg = bundle.config["input"]
    with torch.no_grad():
        images = Preprocess(cfg["mean"], cfg["std"])(torch.from_numpy(frames))
        return [f.double().numpy() for f in bundle.feature_extractor()(images)]


@pytest.mark.parametrize("k,h,w", [(128, 8, 8), (16, 3, 5), (128, 32, 32), (4, 1, 7)])
def test_positional_encoding_is_anomalibs(k, h, w):
    ours = flow.positional_encoding(k, h, w)
    reference = positional_encoding_reference(k, h, w).reshape(k, h * w).T
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12)  # both float64


def test_positional_encoding_needs_a_multiple_of_four():
    with pytest.raises(ValueError, match="multiple of 4"):
        flow.positional_encoding(6, 2, 2)


def test_freia_decoder_is_the_reference_block_math(fitted):
    """The stored tensors mean what FrEIA means: its AllInOneBlock chain (float64) equals the reference to 1e-10."""
    _, bundle, _, _ = fitted
    blocks = _perturbed(bundle.scale_blocks)[1]
    channels = len(blocks[0]["permutation"])
    decoder = flow.load_decoder(blocks, condition_dim=128).double().eval()
    rng = np.random.default_rng(3)
    x, c = rng.normal(0, 2, (37, channels)), rng.normal(0, 1, (37, 128))
    with torch.no_grad():
        z, log_det = decoder(torch.from_numpy(x), [torch.from_numpy(c)])
    expected, expected_det = x, 0.0
    for block in blocks:
        expected, det = block_reference(expected, c, block, flow.CLAMP_ALPHA)
        expected_det = expected_det + det
    np.testing.assert_allclose(z.numpy(), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(log_det.numpy(), expected_det, rtol=1e-10, atol=1e-10)


def test_permutations_are_seeded_and_differ_per_scale_and_block():
    a, b = flow.block_permutations(40, 8, 0, 0), flow.block_permutations(40, 8, 0, 0)
    assert np.array_equal(a, b) and not np.array_equal(a, flow.block_permutations(40, 8, 1, 0))
    assert not np.array_equal(a, flow.block_permutations(40, 8, 0, 1)) and not np.array_equal(a[0], a[1])
    assert all(np.array_equal(np.sort(p), np.arange(40)) for p in a)


def test_inference_form_log_likelihoods_match_the_reference(fitted):
    """The folded float32 decoder (the head's) vs float64 reference: |error| <= 1e-5 (1 + |l|) per patch."""
    _, bundle, frames, _ = fitted
    scale_blocks = _perturbed(bundle.scale_blocks)
    head = make_head(bundle.config, scale_blocks, [0.0] * 3)
    flat = bundle.frame_embedding()(torch.from_numpy(frames[:3]))
    with torch.no_grad():
        ours = head.log_likelihoods(flat)
    for scale, (feature, blocks, grid) in enumerate(zip(_features(bundle, frames[:3]), scale_blocks,
                                                        bundle.config["cflow"]["scale_grids"])):
        encoding = positional_encoding_reference(128, *grid).reshape(128, -1).T
        for image in range(3):
            rows = feature[image].reshape(feature.shape[1], -1).T
            expected = log_likelihood_reference(rows, encoding, blocks, flow.CLAMP_ALPHA)
            got = ours[scale][image].double().numpy()
            assert np.all(np.abs(got - expected) <= 1e-5 * (1 + np.abs(expected))), (scale, image)


def test_head_map_and_score_match_the_float64_reference(fitted):
    """Map and score of the torch model vs ``reference_cflow.score_reference``: |error| <= 1e-5 (map in [0, 3]).
    The references sit at each scale's median likelihood of these frames, so the anomalies spread over [0, 1)."""
    _, bundle, frames, _ = fitted
    scale_blocks = _perturbed(bundle.scale_blocks)
    flat = bundle.frame_embedding()(torch.from_numpy(frames[:4]))
    with torch.no_grad():
        likelihoods = make_head(bundle.config, scale_blocks, [0.0] * 3).log_likelihoods(flat)
    references = [float(torch.median(lik)) for lik in likelihoods]
    head = make_head(bundle.config, scale_blocks, references)
    with torch.no_grad():
        amap, score = head(flat)
    expected_map, expected_score = score_reference(_features(bundle, frames[:4]), scale_blocks, references, 128,
                                                   flow.CLAMP_ALPHA, TINY_HW, sigma=4.0)
    inside = ((amap > 0.05) & (amap < 2.95)).double().mean()
    assert float(amap.max()) < 3.0 and float(inside) > 0.5  # not saturated: every part of the head matters
    np.testing.assert_allclose(amap[:, 0].double().numpy(), expected_map, rtol=0, atol=1e-5)
    np.testing.assert_allclose(score.double().numpy(), expected_score, rtol=0, atol=1e-5)


def test_a_frame_scores_the_same_alone_and_in_a_batch(fitted):
    _, bundle, frames, _ = fitted
    model = bundle.model()
    with torch.no_grad():
        batch_map, batch_score = model(torch.from_numpy(frames[:4]))
        alone_map, alone_score = model(torch.from_numpy(frames[2:3]))
    # float32 matrix products block differently per batch size (~1e-6); a batch-wide normalisation would move the
    # map by the whole spread of the other frames
    np.testing.assert_allclose(alone_map[0].numpy(), batch_map[2].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(alone_score.numpy(), batch_score[2:3].numpy(), rtol=0, atol=1e-5)


def test_fit_holds_out_fold_zero_and_records_its_training(fitted):
    fitter, bundle, _, heldout = fitted
    cfg = bundle.config
    assert cfg["method"] == "cflow" and cfg["backbone"]["out_indices"] == [2, 3, 4]
    assert cfg["embedding"]["dim"] == 128 + 256 + 512 and cfg["cflow"]["scale_grids"] == [[8, 8], [4, 4], [2, 2]]
    assert cfg["cflow"]["n_heldout"] == len(heldout) == 4 and cfg["cflow"]["n_train"] == 12
    training = cfg["cflow"]["training"]
    assert training["early_stopping"] and training["epochs_run"] == len(training["history"]["epoch_seconds"]) <= 2
    assert len(training["best_epoch"]) == 3 and training["seconds_per_epoch"] > 0
    assert all(len(h) == training["epochs_run"] for h in training["history"]["heldout_loss"])
    provenance = cfg["calibration_provenance"]
    assert provenance["method"] == "cflow-held-out-fold" and provenance["n_normal"] == 4 and provenance["folds"] == 4


def test_the_heldout_images_are_not_trained_on(monkeypatch):
    seen = {}
    original = CflowFitter.train

    def spy(self, train_images, heldout_images=None):
        seen["train"], seen["heldout"] = list(train_images), list(heldout_images)
        return original(self, train_images, heldout_images)

    monkeypatch.setattr(CflowFitter, "train", spy)
    _fitter(n=10, folds=5, epochs=1)
    heldout = np.flatnonzero(thresholds.fold_assignment(10, 2, 0) == 0)  # 10 images: 2 folds of 5, not 5 of 2
    assert seen["heldout"] == list(heldout) and sorted(seen["train"] + seen["heldout"]) == list(range(10))


@pytest.mark.parametrize("n,folds,used", [(10, 5, 2), (16, 4, 4), (50, 5, 5), (20, 10, 5), (8, 5, 2)])
def test_folds_shrink_so_the_heldout_fold_has_four_images(n, folds, used):
    from edgead.cflow.fit import held_out_folds

    assert held_out_folds(n, folds) == used
    assert (thresholds.fold_assignment(n, used, 0) == 0).sum() >= thresholds.MIN_IMAGES


def test_thresholds_are_the_heldout_images_out_of_sample_scores(fitted):
    """image threshold = the conformal-rank order statistic of the held-out images' scores under the final model
    (quantile 0.9 of 4: the largest), to float32 precision."""
    _, bundle, frames, heldout = fitted
    with torch.no_grad():
        _, scores = bundle.model()(torch.from_numpy(frames[heldout]))
    rank = thresholds.conformal_rank(4, 0.9)
    expected = np.sort(scores.double().numpy())[rank - 1]
    assert bundle.config["calibration"]["image_threshold"] == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_references_are_the_largest_training_log_likelihood(fitted):
    fitter, bundle, frames, heldout = fitted
    train = np.setdiff1d(np.arange(16), heldout)
    features = _features(bundle, frames[train])
    for feature, blocks, grid, reference in zip(features, bundle.scale_blocks, bundle.config["cflow"]["scale_grids"],
                                                bundle.config["cflow"]["reference_log_likelihood"]):
        encoding = positional_encoding_reference(128, *grid).reshape(128, -1).T
        best = max(log_likelihood_reference(image.reshape(image.shape[0], -1).T, encoding, blocks, flow.CLAMP_ALPHA)
                   .max() for image in feature)
        assert reference == pytest.approx(best, abs=1e-5 * (1 + abs(best)))


def test_early_stopping_stops_each_scale_patience_epochs_after_its_best(monkeypatch):
    """Scripted held-out losses: scale 0 is best at epoch 2, scale 1 at epoch 4, scale 2 keeps improving; each of
    the first two stops PATIENCE (3) epochs later, training ends at the epochs limit for scale 2, and each scale
    keeps the decoder state of its best epoch."""
    from edgead.cflow import fit as cflow_fit

    script = {0: [5.0, 4.0, 4.5, 4.6, 4.7], 1: [5.0, 4.9, 4.8, 4.0, 4.1, 4.2, 4.3], 2: [9.0 - e for e in range(9)]}
    calls, snapshots = {0: 0, 1: 0, 2: 0}, {0: [], 1: [], 2: []}

    def scripted(decoder, rows, positions, encoding):
        scale = {128: 0, 256: 1, 512: 2}[rows.shape[1]]
        snapshots[scale].append({k: v.clone() for k, v in decoder.state_dict().items()})
        value = script[scale][calls[scale]]
        calls[scale] += 1
        return value

    monkeypatch.setattr(cflow_fit, "_mean_loss", scripted)
    fitter, _ = _fitter(epochs=8, learning_rate=1e-3)
    training = fitter.training
    assert training["best_epoch"] == [2, 4, 8] and training["epochs_run"] == 8
    assert calls == {0: 5, 1: 7, 2: 8}  # scale 0 stopped after epoch 5, scale 1 after epoch 7
    assert [len(h) for h in training["history"]["train_loss"]] == [5, 7, 8]
    assert training["heldout_loss"] == [4.0, 4.0, 2.0]
    for scale, best in enumerate(training["best_epoch"]):
        kept = flow.load_decoder(fitter.scale_blocks[scale]).state_dict()
        state = snapshots[scale][best - 1]
        assert all(torch.equal(kept[k], state[k]) for k in state if not k.endswith("w_perm_inv"))


def test_the_kept_tensors_reproduce_the_recorded_best_heldout_loss():
    fitter, _ = _fitter(epochs=3, learning_rate=0.05)
    training = fitter.training
    held = np.flatnonzero(thresholds.fold_assignment(16, 4, 0) == 0)
    rows = fitter._scale_rows(held)
    for i, blocks in enumerate(fitter.scale_blocks):
        assert training["best_epoch"][i] >= 1
        decoder = flow.load_decoder(blocks)
        encoding = torch.from_numpy(flow.positional_encoding(128, *fitter.config["cflow"]["scale_grids"][i])
                                    .astype(np.float32))
        loss = _mean_loss(decoder, *rows[i], encoding)
        assert loss == pytest.approx(training["heldout_loss"][i], rel=1e-5)
        assert training["heldout_loss"][i] == min(v for v in training["history"]["heldout_loss"][i] if v is not None)


def _nan_at(monkeypatch, channels, call):
    """Make ``_fiber_loss`` return NaN from its ``call``-th call (1-based) on the scale with ``channels`` channels;
    returns the per-scale call counter."""
    from edgead.cflow import fit as cflow_fit

    original, calls = cflow_fit._fiber_loss, {}

    def fiber_loss(decoder, rows, conditions):
        calls[rows.shape[1]] = calls.get(rows.shape[1], 0) + 1
        loss = original(decoder, rows, conditions)
        return loss * float("nan") if rows.shape[1] == channels and calls[channels] >= call else loss

    monkeypatch.setattr(cflow_fit, "_fiber_loss", fiber_loss)
    return calls


def _kept_states(monkeypatch):
    """Record every ``flow.decoder_parameters`` result per scale (by channels), in call order."""
    original, kept = flow.decoder_parameters, {}

    def record(decoder, permutations):
        blocks = original(decoder, permutations)
        kept.setdefault(len(blocks[0]["permutation"]), []).append(blocks)
        return blocks

    monkeypatch.setattr(flow, "decoder_parameters", record)
    return kept


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_without_a_fold_a_diverging_scale_keeps_its_last_finite_epoch(monkeypatch):
    """Scale 0 (128 channels: 12 steps an epoch on 12 images) turns NaN in epoch 3: it stops, keeps epoch 2's
    state, warns, and model.json holds no NaN; the other scales train all 3 epochs."""
    from edgead.cflow import fit as cflow_fit

    kept = _kept_states(monkeypatch)
    _nan_at(monkeypatch, 128, 2 * 12 + 5)
    frames = random_frames(12, seed=5)
    with pytest.warns(UserWarning, match="stage 0 .* diverged .* keeps its state of epoch 2"):
        bundle = cflow_fit.fit_cflow([frames], backbone="resnet18", weights="random", input_hw=TINY_HW, folds=0,
                                     **dict(FIT, epochs=3))
    training = bundle.config["cflow"]["training"]
    assert training["best_epoch"] == [2, 3, 3] and training["diverged"] == [0] and training["epochs_run"] == 3
    assert training["history"]["train_loss"][0][2] is None and len(training["history"]["train_loss"][1]) == 3
    assert _same(bundle.scale_blocks[0], kept[128][1]) and _same(bundle.scale_blocks[1], kept[256][2])
    json.dumps(bundle.config, allow_nan=False)


def test_with_a_fold_a_diverging_scale_keeps_its_best_epoch(monkeypatch):
    kept = _kept_states(monkeypatch)
    # scale 1: 3 training steps and 1 held-out pass an epoch (12 + 4 images of 16 patches): NaN in epoch 3
    _nan_at(monkeypatch, 256, 2 * 4 + 1)
    fitter, _ = _fitter(epochs=4)
    training = fitter.training
    assert training["diverged"] == [1] and training["best_epoch"][1] == 2
    assert len(training["history"]["heldout_loss"][1]) == 2 and training["history"]["train_loss"][1] == [
        pytest.approx(v) for v in training["history"]["train_loss"][1][:2]] + [None]
    assert _same(fitter.scale_blocks[1], kept[256][1]) and any("stage 1" in w for w in fitter.warnings)


def test_a_scale_diverging_in_its_first_epoch_is_one_line(monkeypatch):
    from edgead.errors import DataError

    _nan_at(monkeypatch, 512, 1)
    with pytest.raises(DataError) as error:
        _fitter(epochs=2)
    assert "the flow of stage 2 (512 channels) diverged in its first epoch" in str(error.value)
    assert "lower --learning-rate (now 0.001)" in str(error.value) and "\n" not in str(error.value)


def test_non_finite_weights_count_as_divergence(monkeypatch):
    from edgead.cflow import fit as cflow_fit

    checks = {"n": 0}

    def finite(decoder):  # the weights of the first scale checked in epoch 2 "overflow"
        checks["n"] += 1
        return checks["n"] != 4

    monkeypatch.setattr(cflow_fit, "_finite_parameters", finite)
    fitter, _ = _fitter(epochs=2)
    assert fitter.training["diverged"] == [0] and fitter.training["best_epoch"][0] == 1


def test_small_flows_train_on_one_thread_and_large_ones_on_torchs(monkeypatch):
    fitter = CflowFitter("resnet18", "random", TINY_HW, None, 0, 8, None, **dict(FIT, fiber_batch=256))
    # ResNet18's deepest subnet: 256 rows x 768 hidden x 384 inputs = 75.5M multiply-adds per product
    assert fitter.training_threads() == torch.get_num_threads()
    small = CflowFitter("resnet18", "random", TINY_HW, None, 0, 8, None, **dict(FIT, fiber_batch=64))
    assert small.training_threads() == 1  # 64 rows: 18.9M


def test_the_memory_plan_counts_features_twice_and_a_fiber_batchs_activations():
    from edgead.cflow.fit import activation_floats

    fitter = CflowFitter("resnet18", "random", TINY_HW, None, 0, 8, None, **FIT)
    image_floats = 128 * 64 + 256 * 16 + 512 * 4
    assert fitter.memory.image_bytes == 4 * image_floats
    assert fitter.memory.needed(10) - fitter.memory.needed(0) == 2 * 10 * 4 * image_floats
    # the deepest scale: (256 + 128) inputs, 768 hidden, 256-channel halves, 512 channels; 2 blocks of 64 rows
    assert activation_floats([128, 256, 512], 128, 2, 64) == 64 * 2 * (384 + 2 * 768 + 2 * 256 + 4 * 256 + 3 * 512)
    tight = CflowFitter("resnet18", "random", TINY_HW, None, 0, 8, fitter.memory.needed(10) - 1, **FIT)
    tight.check_calibration_memory(5, 9)
    with pytest.raises(ConfigError, match="CFLOW on resnet18 at 64x64 on 10 images needs about"):
        tight.check_calibration_memory(5, 10)


def test_without_a_fold_every_image_trains_for_the_epochs():
    frames = random_frames(12, seed=5)
    bundle = fit_cflow([frames[:6], frames[6:]], backbone="resnet18", weights="random", input_hw=TINY_HW, folds=0,
                       **dict(FIT, epochs=1))
    cflow = bundle.config["cflow"]
    assert bundle.config["calibration"] is None and cflow["n_heldout"] == 0 and cflow["n_train"] == 12
    assert cflow["training"]["epochs_run"] == 1 and not cflow["training"]["early_stopping"]


def test_too_few_images_train_on_all_and_warn():
    fitter, _ = _fitter(n=6, folds=5, epochs=1)
    assert fitter.calibration is None and any("too few to hold out" in w for w in fitter.warnings)
    assert fitter.bundle().config["cflow"]["n_train"] == 6


def test_leave_one_out_folds_are_refused_before_any_work():
    fitter = CflowFitter("resnet18", "random", TINY_HW, None, 0, 8, None, **FIT)
    with pytest.raises(ConfigError, match="--folds n .* does not apply to --method cflow"):
        fitter.check_calibration_memory("n", 10)


@pytest.mark.parametrize("parse,value,message", [
    (parse_epochs, "0", "--epochs must be an integer in 1..10000"),
    (parse_epochs, "2.5", "--epochs must be an integer"),
    (parse_learning_rate, "-1", "--learning-rate must be a number in (0, 1]"),
    (parse_learning_rate, "nan", "--learning-rate must be a number in (0, 1]"),
])
def test_bad_options_are_one_line(parse, value, message):
    with pytest.raises(ConfigError) as error:
        parse(value)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_method_parses_its_options():
    from edgead import methods

    parsed = methods.parse_fit_options("cflow", {"epochs": "3", "fiber_batch": "128", "coupling_blocks": "4",
                                                 "learning_rate": "1e-3"})
    assert parsed == {"epochs": 3, "fiber_batch": 128, "coupling_blocks": 4, "learning_rate": 1e-3}
    with pytest.raises(ConfigError, match="--coreset-ratio applies to --method patchcore, not cflow"):
        methods.parse_fit_options("cflow", {"coreset_ratio": "0.1"})


def test_dim_other_than_all_channels_is_refused():
    with pytest.raises(ConfigError, match="CFLOW models every channel"):
        CflowFitter("resnet18", "random", TINY_HW, 12, 0, 8, None, **FIT)


def test_bundle_saves_and_loads_to_the_same_model(fitted, tmp_path):
    from edgead.bundle import load_bundle

    _, bundle, frames, _ = fitted
    folder = str(tmp_path / "m.edgead")
    bundle.save(folder)
    loaded = load_bundle(folder)
    assert isinstance(loaded, CflowBundle) and loaded.config["cflow"] == json.loads(json.dumps(bundle.config["cflow"]))
    with torch.no_grad():
        a = bundle.model()(torch.from_numpy(frames[:2]))
        b = loaded.model()(torch.from_numpy(frames[:2]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _tensors(bundle):
    tensors = {"backbone." + k: v for k, v in bundle.backbone_state.items()}
    tensors.update(bundle.tensors_to_save())
    return tensors


@pytest.mark.parametrize("damage,message", [
    ("missing", "tensor cflow.scale1.block0.global_scale missing"),
    ("shape", "cflow.scale0.block1.subnet_in_weight is float32 (3, 4), model.json implies float32"),
    ("dtype", "cflow.scale2.block0.permutation is float32"),
    ("nan", "cflow.scale0.block0.global_offset contains NaN or Inf"),
    ("permutation", "cflow.scale1.block1.permutation is not a permutation of 0..255"),
    ("extra", "tensor cflow.scale0.block2.global_scale is not part of a 2-block model"),
])
def test_damaged_tensors_are_one_line(fitted, damage, message):
    _, bundle, _, _ = fitted
    tensors = _tensors(bundle)
    if damage == "missing":
        del tensors[tensor_key(1, 0, "global_scale")]
    elif damage == "shape":
        tensors[tensor_key(0, 1, "subnet_in_weight")] = torch.zeros(3, 4)
    elif damage == "dtype":
        tensors[tensor_key(2, 0, "permutation")] = tensors[tensor_key(2, 0, "permutation")].float()
    elif damage == "nan":
        value = tensors[tensor_key(0, 0, "global_offset")].clone()
        value[3] = float("nan")
        tensors[tensor_key(0, 0, "global_offset")] = value
    elif damage == "permutation":
        value = tensors[tensor_key(1, 1, "permutation")].clone()
        value[0] = value[1]
        tensors[tensor_key(1, 1, "permutation")] = value
    else:
        tensors[tensor_key(0, 2, "global_scale")] = torch.zeros(128)
    with pytest.raises(BundleError) as error:
        assemble("m.edgead", bundle.config, tensors, "m.edgead/weights.safetensors")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith("m.edgead/weights.safetensors: ")


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c["cflow"]["scale_grids"].__setitem__(1, [5, 4]),
     r"cflow.scale_grids\[1\] must be \[height // 16, width // 16\] = \[4, 4\], got \[5, 4\]"),
    (lambda c: c["cflow"]["reference_log_likelihood"].pop(),
     r"cflow.reference_log_likelihood must have one entry per backbone stage \(3\), got 2"),
    (lambda c: c["embedding"].__setitem__("dim", 100),
     r"embedding.dim must equal sum\(backbone.channels\) = 896 when embedding.layout is scale_rows, got 100"),
    (lambda c: c["embedding"].pop("layout"), r"lacks key 'embedding.layout'"),
    (lambda c: c["cflow"].__setitem__("condition_dim", 126), r"cflow.condition_dim"),
])
def test_model_json_with_inconsistent_cflow_fields_is_one_line(fitted, tmp_path, mutate, message):
    from edgead.bundle import load_bundle

    _, bundle, _, _ = fitted
    folder = str(tmp_path / "m.edgead")
    bundle.save(folder)
    config = json.load(open(os.path.join(folder, "model.json")))
    mutate(config)
    json.dump(config, open(os.path.join(folder, "model.json"), "w"))
    with pytest.raises(BundleError) as error:
        load_bundle(folder)
    assert "\n" not in str(error.value) and str(error.value).startswith(os.path.join(folder, "model.json") + ": ")
    assert re.search(message, str(error.value)), str(error.value)


def test_storage_precision_rounds_the_compiled_matrices_only(fitted):
    _, bundle, _, _ = fitted
    fp16 = bundle.with_storage_precision("fp16")
    assert fp16.scale_blocks is bundle.scale_blocks and bundle.with_storage_precision("fp32") is bundle
    head32, head16 = bundle.head(), fp16.head()
    block32, block16 = head32.decoders[0], head16.decoders[0]
    weight32, weight16 = block32.block0_in_weight, block16.block0_in_weight
    assert torch.equal(weight16, weight32.half().float()) and not torch.equal(weight16, weight32)
    assert torch.equal(block32.block0_gain, block16.block0_gain)
