"""edgead.demo_data: layout, exact masks, determinism (tiny builds, a few seconds)."""
import hashlib
import json
import os

import numpy as np
import pytest

pytest.importorskip("skimage")

from edgead.data import MvtecCategory, find_categories, read_image, read_mask  # noqa: E402
from edgead.demo_data import (DEFECT_TYPES, DEMO_CATEGORIES, build_demo_dataset,  # noqa: E402
                              demo_images_available, iter_demo_samples, synthesize_defect)
from edgead.errors import DataError  # noqa: E402

TINY = dict(n_train=3, n_test_good=2, n_defect_per_type=2, size=96)


def _digest(root):
    h = hashlib.sha256()
    for dirpath, dirnames, files in sorted(os.walk(root)):
        dirnames.sort()
        for f in sorted(files):
            if f.endswith(".png"):
                h.update(os.path.relpath(os.path.join(dirpath, f), root).encode())
                with open(os.path.join(dirpath, f), "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


def test_images_available():
    assert demo_images_available()
    assert demo_images_available(list(DEMO_CATEGORIES))


def test_layout_and_masks(tmp_path):
    out = str(tmp_path / "demo")
    cats = build_demo_dataset(out, categories=("gravel",), progress=False, **TINY)
    assert cats == [os.path.join(out, "gravel")] == find_categories(out)
    cat = MvtecCategory(cats[0])
    assert len(cat.train_images()) == 3
    assert cat.defect_types() == sorted(DEFECT_TYPES)
    samples = cat.test_samples()
    assert len(samples) == 2 + 2 * len(DEFECT_TYPES)
    for s in samples:
        img = read_image(s.path)
        assert img.shape == (96, 96, 3)
        if s.label == 0:
            assert s.mask_path is None
            assert not os.path.isdir(os.path.join(cats[0], "ground_truth", "good"))
        else:
            mask = read_mask(s.mask_path)
            assert mask.shape == (96, 96)
            assert 10 <= mask.sum() < 0.25 * mask.size, (s.path, int(mask.sum()))
    marker = json.load(open(os.path.join(cats[0], ".edgead_demo.json")))
    assert marker["params"]["seed"] == 0 and marker["source"] == "skimage.data.gravel"


def test_determinism_and_reuse(tmp_path):
    a = build_demo_dataset(str(tmp_path / "a"), categories=("brick",), seed=3, progress=False, **TINY)
    b = build_demo_dataset(str(tmp_path / "b"), categories=("brick",), seed=3, progress=False, **TINY)
    c = build_demo_dataset(str(tmp_path / "c"), categories=("brick",), seed=4, progress=False, **TINY)
    assert _digest(a[0]) == _digest(b[0])
    assert _digest(a[0]) != _digest(c[0])
    # a complete build with the same parameters is reused, other parameters rebuild it
    first = os.path.getmtime(os.path.join(a[0], "train", "good", "000.png"))
    os.utime(os.path.join(a[0], "train", "good", "000.png"), (first - 100, first - 100))
    build_demo_dataset(str(tmp_path / "a"), categories=("brick",), seed=3, progress=False, **TINY)
    assert os.path.getmtime(os.path.join(a[0], "train", "good", "000.png")) == first - 100
    build_demo_dataset(str(tmp_path / "a"), categories=("brick",), seed=4, progress=False, **TINY)
    assert _digest(a[0]) == _digest(c[0])


def test_foreign_folder_is_not_touched(tmp_path):
    os.makedirs(tmp_path / "grass")
    (tmp_path / "grass" / "mine.txt").write_text("keep")
    with pytest.raises(DataError, match="not an edgead demo dataset"):
        build_demo_dataset(str(tmp_path), categories=("grass",), progress=False, **TINY)
    assert (tmp_path / "grass" / "mine.txt").read_text() == "keep"
    with pytest.raises(DataError, match="unknown demo category"):
        build_demo_dataset(str(tmp_path / "x"), categories=("marble",), progress=False, **TINY)


@pytest.mark.parametrize("category", sorted(DEMO_CATEGORIES))
def test_defects_change_exactly_the_mask(category):
    seen = set()
    for s in iter_demo_samples(category, seed=1, n_train=1, n_test_good=1, n_defect_per_type=3, size=128):
        assert s.image.dtype == np.uint8 and s.image.shape == (128, 128, 3)
        if s.defect_type == "good":
            assert s.mask is None
            continue
        seen.add(s.defect_type)
        m = s.mask
        assert m.dtype == bool and m.shape == s.image.shape[:2] and m.any()
        diff = np.abs(s.image.astype(np.int16) - s.clean.astype(np.int16)).max(axis=2)
        assert (diff[~m] == 0).all(), "pixels outside the mask changed"
        assert diff[m].mean() > 12, (category, s.defect_type, diff[m].mean())
        assert (diff[m] > 0).mean() > 0.6, (category, s.defect_type)
    assert seen == set(DEFECT_TYPES)


def test_synthesize_defect_contract():
    rng = np.random.default_rng(0)
    clean = np.full((64, 64, 3), 128, np.uint8)
    for t in DEFECT_TYPES:
        img, mask = synthesize_defect(clean, t, rng)
        assert mask.any() and (img[~mask] == 128).all() and (img[mask] != 128).any()
    with pytest.raises(DataError, match="unknown defect type"):
        synthesize_defect(clean, "dent", rng)
