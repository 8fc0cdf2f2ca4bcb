"""PaDiM statistics and scoring against a float64 numpy reference (np.cov + explicit inverse).

Tolerances: float64 paths 1e-9 relative; float32 scoring paths 1e-4 relative (the issue's bar).
"""
import sys

import numpy as np
import pytest
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


def test_chunks_follow_the_byte_budget():
    """One float64 [p, D, D] temporary per chunk stays within chunk_bytes (the issue's 100-200 MB at D = 550)."""
    assert padim.chunk_patches(550) == (128 << 20) // (8 * 550 * 550) == 55
    assert padim.chunk_patches(100) == 1677
    acc = padim.GaussianAccumulator(100, 50, chunk_bytes=8 * 50 * 50 * 7)
    assert [stop - start for start, stop in acc.chunks()] == [7] * 14 + [2]
    assert list(padim.GaussianAccumulator(3, 50, chunk_bytes=1).chunks()) == [(0, 1), (1, 2), (2, 3)]
    assert list(padim.GaussianAccumulator(10, 4, patch_chunk=4).chunks()) == [(0, 4), (4, 8), (8, 10)]


def test_finalize_in_place_is_bit_identical_and_spends_the_sums():
    emb = torch.from_numpy(_random_embeddings(n=30, d=12, p=20))
    copy_acc, in_place_acc = (padim.GaussianAccumulator(20, 12, chunk_bytes=8 * 12 * 12 * 3) for _ in range(2))
    for acc in (copy_acc, in_place_acc):
        acc.update(emb)
    storage = in_place_acc.outer_packed.untyped_storage()
    mean, packed = copy_acc.finalize()
    mean_ip, packed_ip = in_place_acc.finalize(in_place=True)
    assert torch.equal(mean, mean_ip) and torch.equal(packed, packed_ip)
    assert packed_ip.dtype == torch.float32 and packed_ip.shape == (20, 78) and packed_ip.is_contiguous()
    assert packed_ip.untyped_storage().data_ptr() == storage.data_ptr()  # written over the sums, no new array
    assert in_place_acc.finalized and in_place_acc.outer_packed is None
    with pytest.raises(RuntimeError, match="finalized in place"):
        in_place_acc.update(emb)
    with pytest.raises(RuntimeError, match="finalized in place"):
        in_place_acc.covariance(0, 2)
    ref_mean, ref_inv = fit_reference(emb.numpy())
    queries = _random_embeddings(n=4, d=12, p=20, seed=5)
    np.testing.assert_allclose(padim.mahalanobis(torch.from_numpy(queries).float(), mean_ip,
                                                 padim.dense_whitening(packed_ip)).numpy(),
                               distance_reference(queries, ref_mean, ref_inv), rtol=1e-4)


def test_covariance_without_a_held_out_fold_equals_np_cov_of_the_rest():
    emb = _random_embeddings(n=16, d=6, p=9)
    acc = padim.GaussianAccumulator(9, 6, patch_chunk=4)
    acc.update(torch.from_numpy(emb))
    fold = [2, 3, 11]
    rest = np.delete(emb, fold, axis=0)
    for start, stop in acc.chunks():
        got = acc.covariance(start, stop, epsilon=0.5, scale=2.0, held_out=torch.from_numpy(emb[fold])).numpy()
        for p in range(start, stop):
            expected = 2.0 * np.cov(rest[:, :, p], rowvar=False) + 0.5 * np.eye(6)
            np.testing.assert_allclose(got[p - start], expected, rtol=1e-10, atol=1e-12)


def _rss_anon_bytes():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("RssAnon:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_DONTNEED) and /proc are Linux")
def test_release_pages_gives_memory_back_and_keeps_the_rest():
    from edgead.resources import release_pages

    data = torch.arange(8 << 20, dtype=torch.float64)  # 64 MiB, every page touched
    before = _rss_anon_bytes()
    released = release_pages(data.data_ptr() + data.nbytes // 2, data.nbytes // 2)
    assert released >= (32 << 20) - 8192
    assert before - _rss_anon_bytes() >= (30 << 20)
    assert torch.equal(data[:4 << 20], torch.arange(4 << 20, dtype=torch.float64))  # the kept half is intact
    assert float(data[6 << 20]) == 0.0  # a released page reads as zeros (the partial pages at the ends are kept)
    assert release_pages(data.data_ptr(), 100) == 0  # less than a page: nothing


def test_head_above_the_dense_limit_expands_the_packed_rows_chunk_by_chunk(monkeypatch):
    """Same distances (bit for bit) with and without the precomputed dense whitening."""
    from edgead import model

    emb = _random_embeddings(n=25, d=12, p=20)
    acc = padim.GaussianAccumulator(20, 12)
    acc.update(torch.from_numpy(emb))
    mean, packed = acc.finalize()
    queries = torch.from_numpy(_random_embeddings(n=3, d=12, p=20, seed=4)).float().reshape(3, 12, 4, 5)
    dense_head = model.PadimHead(mean, packed, (8, 10), 1.0, (4, 5))
    monkeypatch.setattr(model, "DENSE_WHITENING_BYTES", 8 * 12 * 12 * 4 * 2)  # 20 patches are over it; 2 per chunk
    chunked_head = model.PadimHead(mean, packed, (8, 10), 1.0, (4, 5))
    assert dense_head.whitening is not None and chunked_head.whitening is None and chunked_head.patch_chunk == 2
    assert chunked_head.whitening_packed.data_ptr() == packed.data_ptr()  # no copy of the statistics
    expected = dense_head.distance_map(queries)
    assert torch.equal(chunked_head.distance_map(queries), expected)
    ref_mean, ref_inv = fit_reference(emb)
    np.testing.assert_allclose(expected.reshape(3, 20).numpy(),
                               distance_reference(queries.reshape(3, 12, 20).double().numpy(), ref_mean, ref_inv),
                               rtol=1e-4)


def test_a_failed_in_place_finalize_leaves_the_accumulator_spent():
    """Chunks already overwritten with float32 must never be read again as sums."""
    acc = padim.GaussianAccumulator(20, 12, patch_chunk=5)
    acc.update(torch.from_numpy(_random_embeddings(n=30, d=12, p=20)))
    calls = []
    original = padim.whitening_from_covariance

    def fail_on_third_chunk(cov):
        calls.append(len(cov))
        if len(calls) == 3:
            raise padim.DataError("a patch covariance is not positive definite")
        return original(cov)

    import unittest.mock

    with unittest.mock.patch.object(padim, "whitening_from_covariance", fail_on_third_chunk):
        with pytest.raises(padim.DataError):
            acc.finalize(in_place=True)
    assert calls == [5, 5, 5] and acc.finalized
    for use in (lambda: acc.covariance(0, 5), lambda: acc.update(torch.zeros(1, 12, 20)),
                lambda: acc.finalize(), lambda: acc.leave_one_out_distance(torch.zeros(1, 12, 20))):
        with pytest.raises(RuntimeError, match="finalized in place"):
            use()
