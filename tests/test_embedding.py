"""The fused embedding equals the PaDiM reference embedding_concat + index_select (exactly)."""
import numpy as np
import pytest
import torch

from edgead import backbones
from edgead.embedding import PatchEmbedding, choose_channels
from reference_padim import reference_embedding


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0", "mobilenet_v1_050"])
def test_fused_embedding_equals_reference(name):
    extractor = backbones.seeded_random_init(backbones.create_feature_extractor(name), seed=3)
    channels, strides = backbones.stage_info(extractor)
    indices = choose_channels(sum(channels), 40, seed=7)
    embed = PatchEmbedding(extractor, indices, channels, strides)
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = embed(images)
        reference = reference_embedding(extractor(images), indices)
    assert ours.shape == (2, 40, 16, 24)
    assert torch.equal(ours, reference)


def test_channel_subset_is_sorted_distinct_and_seeded():
    a = choose_channels(448, 100, seed=0)
    assert len(np.unique(a)) == 100 and np.all(np.diff(a) > 0) and a.max() < 448
    assert np.array_equal(a, choose_channels(448, 100, seed=0))
    assert not np.array_equal(a, choose_channels(448, 100, seed=1))


def test_stage_without_chosen_channels_is_skipped():
    extractor = backbones.create_feature_extractor("resnet18")
    channels, strides = backbones.stage_info(extractor)
    indices = np.arange(64, 64 + 10)  # stage 2 only
    embed = PatchEmbedding(extractor, indices, channels, strides)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(embed(images), reference_embedding(extractor(images), indices))


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2", "efficientnet_lite0", "mobilenetv3_large_100"])
def test_pruned_deepest_block_matches_full_embedding(name):
    """Export-time pruning (edgead.pruning) computes the same embedding to float rounding."""
    if name == "wide_resnet50_2":
        pytest.importorskip("timm")
    extractor = backbones.seeded_random_init(backbones.create_feature_extractor(name), seed=5)
    channels, strides = backbones.stage_info(extractor)
    indices = choose_channels(sum(channels), 40, seed=2)
    full = PatchEmbedding(extractor, indices, channels, strides)
    pruned = PatchEmbedding(extractor, indices, channels, strides, prune_deepest=True)
    assert pruned.pruned and not full.pruned
    assert pruned.extractor is not extractor and full.extractor is extractor  # the caller's module is untouched
    assert set(pruned.extractor.state_dict()) == set(extractor.state_dict())
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(pruned(images), full(images), rtol=1e-5, atol=1e-5)
