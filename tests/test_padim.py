"""PaDiM statistics and scoring against a float64 numpy reference (np.cov + explicit inverse).

Tolerances: float64 paths 1e-9 relative; float32 scoring paths 1e-4 relative (the issue's bar).
"""
import numpy as np
import torch

from edgead import packing, padim
from reference_padim import distance_reference, fit_reference, score_reference

from conftest import random_frames


def _random_embeddings(n=30, d=12, p=20, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(p, d, d))
    base = rng.normal(size=(n, p, d))
    return (np.einsum("npd,pde->npe", base, mix) + rng.normal(size=(p, d)) * 3).transpose(0, 2, 1)  # [N, D, P]


def test_packing_roundtrip_and_index_math():
    rng = np.random.default_rng(0)
    lower = np.tril(rng.normal(size=(3, 7, 7)))
    packed = packing.pack_lower(lower)
    assert packed.shape == (3, 28)
    # element (i, j) at i(i+1)/2 + j
    assert packed[1, 4 * 5 // 2 + 2] == lower[1, 4, 2]
    assert np.array_equal(packing.unpack_lower(packed), lower)
    assert packing.dim_from_packed_length(packing.packed_length(550)) == 550


def test_accumulator_matches_np_cov():
    emb = _random_embeddings()
    acc = padim.GaussianAccumulator(num_patches=20, dim=12, patch_chunk=7)
    for chunk in np.array_split(emb, 4):
        acc.update(torch.from_numpy(chunk))
    ref_mean, _ = fit_reference(emb)
    np.testing.assert_allclose(acc.mean().numpy(), ref_mean.T, rtol=1e-12, atol=1e-12)
    for p in (0, 7, 19):
        ref_cov = np.cov(emb[:, :, p], rowvar=False) + 0.01 * np.eye(12)
        np.testing.assert_allclose(acc.covariance()[p].numpy(), ref_cov, rtol=1e-9, atol=1e-10)


def test_partial_fits_merge_exactly():
    emb = torch.from_numpy(_random_embeddings(n=40))
    whole = padim.GaussianAccumulator(20, 12)
    whole.update(emb)
    left, right = padim.GaussianAccumulator(20, 12), padim.GaussianAccumulator(20, 12)
    left.update(emb[:13])
    right.update(emb[13:])
    left.merge(right)
    assert left.count == 40
    torch.testing.assert_close(left.sum, whole.sum, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(left.outer_packed, whole.outer_packed, rtol=1e-13, atol=1e-10)


def test_accumulator_memory_does_not_grow_with_images():
    acc = padim.GaussianAccumulator(64, 10)
    sizes = []
    for seed in range(3):
        acc.update(torch.from_numpy(_random_embeddings(n=50, d=10, p=64, seed=seed)))
        sizes.append(acc.sum.nbytes + acc.outer_packed.nbytes)
    assert sizes == [64 * (10 + 55) * 8] * 3


def test_whitening_distance_matches_explicit_inverse():
    emb = _random_embeddings()
    acc = padim.GaussianAccumulator(20, 12)
    acc.update(torch.from_numpy(emb))
    mean, packed = acc.finalize()
    ref_mean, ref_inv = fit_reference(emb)
    queries = _random_embeddings(n=5, seed=9)
    ref = distance_reference(queries, ref_mean, ref_inv)
    ours = padim.mahalanobis(torch.from_numpy(queries).float(), mean, padim.dense_whitening(packed))
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4)
    # W (Σ + εI) Wᵀ = I in float64
    whitening = padim.whitening_from_covariance(acc.covariance())
    eye = whitening @ acc.covariance() @ whitening.transpose(1, 2)
    np.testing.assert_allclose(eye.numpy(), np.broadcast_to(np.eye(12), eye.shape), atol=1e-9)
    assert torch.all(torch.triu(whitening, diagonal=1) == 0)


def test_full_model_matches_float64_reference(tiny_bundle):
    """uint8 frames -> map/score from the torch model vs numpy float64 fit + scipy gaussian_filter."""
    frames = random_frames(12)
    embedding = tiny_bundle.frame_embedding()
    with torch.no_grad():
        train = embedding(torch.from_numpy(frames)).flatten(2).double().numpy()
    ref_mean, ref_inv = fit_reference(train)
    test_frames = random_frames(3, seed=5)
    test_frames[0, 20:30, 20:40] = 255  # a bright defect
    with torch.no_grad():
        amap, score = tiny_bundle.model()(torch.from_numpy(test_frames))
        test_emb = embedding(torch.from_numpy(test_frames)).flatten(2).double().numpy()
    ref_maps, ref_scores = score_reference(test_emb, ref_mean, ref_inv, tiny_bundle.config["embedding"]["grid"], (64, 64))
    np.testing.assert_allclose(amap[:, 0].numpy(), ref_maps, rtol=1e-4, atol=1e-4 * ref_maps.max())
    np.testing.assert_allclose(score.numpy(), ref_scores, rtol=1e-4)
    assert score[0] > score[1:].max()  # the defect frame scores highest
