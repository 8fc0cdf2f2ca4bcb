"""edgead.data: image / mask reading, MVTec layout, image lists, batches."""
import os

import cv2
import numpy as np
import pytest

from edgead.data import (ImageBatches, MvtecCategory, Sample, find_categories, list_images, read_image,
                         read_mask)
from edgead.errors import DataError


def _write(path, arr):
    """Write with cv2.imencode + tofile (works for unicode paths); ``arr`` is in OpenCV order."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ext = os.path.splitext(path)[1]
    ok, buf = cv2.imencode(ext, arr)
    assert ok
    buf.tofile(path)


def _rgb(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------ read_image


def test_read_image_rgb_order_and_unicode_path(tmp_path):
    rgb = _rgb()
    path = str(tmp_path / "bilder_äöü_画像" / "x.png")
    _write(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, rgb)


def test_read_image_gray_rgba_16bit(tmp_path):
    gray = _rgb()[:, :, 0]
    _write(str(tmp_path / "g.png"), gray)
    np.testing.assert_array_equal(read_image(str(tmp_path / "g.png")), np.stack([gray] * 3, axis=2))

    rgba = np.dstack([_rgb(), np.full((20, 30), 7, np.uint8)])
    _write(str(tmp_path / "a.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    np.testing.assert_array_equal(read_image(str(tmp_path / "a.png")), rgba[:, :, :3])

    rgb = _rgb()
    deep = rgb.astype(np.uint16) * 256 + 100  # high byte == rgb
    _write(str(tmp_path / "d.png"), cv2.cvtColor(deep, cv2.COLOR_RGB2BGR))
    out = read_image(str(tmp_path / "d.png"))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


def test_read_image_resize_area_down_linear_up(tmp_path):
    rgb = _rgb(40, 60)
    p = str(tmp_path / "r.png")
    _write(p, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    down = read_image(p, size=(20, 30))
    np.testing.assert_array_equal(down, cv2.resize(rgb, (30, 20), interpolation=cv2.INTER_AREA))
    up = read_image(p, size=(80, 120))
    np.testing.assert_array_equal(up, cv2.resize(rgb, (120, 80), interpolation=cv2.INTER_LINEAR))
    near = read_image(p, size=(20, 30), resize="nearest")
    np.testing.assert_array_equal(near, cv2.resize(rgb, (30, 20), interpolation=cv2.INTER_NEAREST))
    with pytest.raises(DataError, match="resize"):
        read_image(p, size=(20, 30), resize="lanczos9")


def test_read_image_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not a jpeg at all")
    with pytest.raises(DataError, match="empty.png.*empty"):
        read_image(str(empty))
    with pytest.raises(DataError, match="corrupt.jpg.*not a readable image"):
        read_image(str(corrupt))
    with pytest.raises(DataError, match="missing.png.*not found"):
        read_image(str(tmp_path / "missing.png"))
    with pytest.raises(DataError, match="folder"):
        read_image(str(tmp_path))


def test_read_mask_nearest_and_threshold(tmp_path):
    m = np.zeros((8, 8), np.uint8)
    m[2:4, 4:8] = 255
    m[7, 0] = 1  # any value > 0 is anomalous
    p = str(tmp_path / "m_mask.png")
    _write(p, m)
    out = read_mask(p)
    assert out.dtype == bool
    np.testing.assert_array_equal(out, m > 0)
    big = read_mask(p, size=(16, 16))
    np.testing.assert_array_equal(big, np.kron(m > 0, np.ones((2, 2), bool)))
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[0, 0, 1] = 200
    _write(str(tmp_path / "c_mask.png"), rgb)
    assert read_mask(str(tmp_path / "c_mask.png")).sum() == 1


# ------------------------------------------------------------------ MVTec layout


def _make_category(root, n_train=3, good=2, defects=(("crack", 2),), masks=True):
    img = cv2.cvtColor(_rgb(), cv2.COLOR_RGB2BGR)
    for i in range(n_train):
        _write(os.path.join(root, "train", "good", "%03d.png" % i), img)
    for i in range(good):
        _write(os.path.join(root, "test", "good", "%03d.png" % i), img)
    for name, n in defects:
        for i in range(n):
            _write(os.path.join(root, "test", name, "%03d.png" % i), img)
            if masks:
                m = np.zeros((20, 30), np.uint8)
                m[i:i + 3, 5:9] = 255
                _write(os.path.join(root, "ground_truth", name, "%03d_mask.png" % i), m)
    return root


def test_mvtec_category_lists_train_and_test(tmp_path):
    root = _make_category(str(tmp_path / "bottle"), defects=(("crack", 2), ("hole", 1)))
    cat = MvtecCategory(root)
    assert cat.name == "bottle" and cat.has_test
    assert [os.path.basename(p) for p in cat.train_images()] == ["000.png", "001.png", "002.png"]
    assert cat.defect_types() == ["crack", "hole"]
    samples = cat.test_samples()
    assert all(isinstance(s, Sample) for s in samples)
    assert [(s.defect_type, s.label) for s in samples] == [
        ("crack", 1), ("crack", 1), ("good", 0), ("good", 0), ("hole", 1)]
    for s in samples:
        if s.label:
            assert s.mask_path == os.path.join(root, "ground_truth", s.defect_type,
                                               os.path.basename(s.path)[:-4] + "_mask.png")
            assert read_mask(s.mask_path).any()
        else:
            assert s.mask_path is None


def test_mvtec_missing_train_good_and_empty(tmp_path):
    with pytest.raises(DataError, match="train/good"):
        MvtecCategory(str(tmp_path))
    os.makedirs(tmp_path / "train" / "good")
    with pytest.raises(DataError, match="empty"):
        MvtecCategory(str(tmp_path))
    with pytest.raises(DataError, match="not found"):
        MvtecCategory(str(tmp_path / "nope"))


def test_mvtec_defect_without_mask_names_both_files(tmp_path):
    root = _make_category(str(tmp_path / "cable"), masks=False)
    cat = MvtecCategory(root)
    with pytest.raises(DataError) as exc:
        cat.test_samples()
    msg = str(exc.value)
    assert os.path.join("test", "crack", "000.png") in msg
    assert os.path.join("ground_truth", "crack", "000_mask.png") in msg


def test_mvtec_missing_test_and_empty_defect_folder(tmp_path):
    root = _make_category(str(tmp_path / "c"), good=0, defects=())
    cat = MvtecCategory(root)
    assert not cat.has_test
    with pytest.raises(DataError, match="missing folder test"):
        cat.test_samples()
    os.makedirs(os.path.join(root, "test", "good"))
    with pytest.raises(DataError, match="holds no images"):
        cat.test_samples()


def test_find_categories(tmp_path):
    a = _make_category(str(tmp_path / "a"))
    b = _make_category(str(tmp_path / "b"))
    os.makedirs(tmp_path / "not_a_category" / "stuff")
    assert find_categories(str(tmp_path)) == [a, b]
    assert find_categories(a) == [a]
    with pytest.raises(DataError, match="no MVTec-AD category"):
        find_categories(str(tmp_path / "not_a_category"))


# ------------------------------------------------------------------ list_images


def test_list_images_folder_file_glob(tmp_path):
    img = cv2.cvtColor(_rgb(), cv2.COLOR_RGB2BGR)
    for name in ["b.PNG", "a.jpg", "c.webp", "d.TIFF", "e.bmp"]:
        _write(str(tmp_path / name), img)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"")
    _write(str(tmp_path / "sub" / "z.png"), img)
    got = [os.path.basename(p) for p in list_images(str(tmp_path))]
    assert got == ["a.jpg", "b.PNG", "c.webp", "d.TIFF", "e.bmp"]
    assert list_images(str(tmp_path / "a.jpg")) == [str(tmp_path / "a.jpg")]
    assert [os.path.basename(p) for p in list_images(str(tmp_path / "**" / "*.png"))] == ["z.png"]
    with pytest.raises(DataError, match="no images found"):
        list_images(str(tmp_path / "sub" / "*.jpg"))
    with pytest.raises(DataError, match="no such file"):
        list_images(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="not an image"):
        list_images(str(tmp_path / "notes.txt"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="empty.*no images found"):
        list_images(str(tmp_path / "empty"))


# ------------------------------------------------------------------ ImageBatches


@pytest.mark.parametrize("workers", [0, 2])
def test_image_batches(tmp_path, workers):
    paths = []
    for i in range(7):
        p = str(tmp_path / ("%02d.png" % i))
        _write(p, np.full((10 + i, 12, 3), i * 10, np.uint8))
        paths.append(p)
    batches = ImageBatches(paths, size=(8, 6), batch_size=3, workers=workers, desc="test")
    assert len(batches) == 3
    got = list(batches)
    assert [b.shape for b, _ in got] == [(3, 8, 6, 3), (3, 8, 6, 3), (1, 8, 6, 3)]
    assert [p for _, ps in got for p in ps] == paths
    values = np.concatenate([b[:, 0, 0, 0] for b, _ in got])
    np.testing.assert_array_equal(values, np.arange(7) * 10)
    assert all(b.dtype == np.uint8 for b, _ in got)


def test_image_batches_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    with pytest.raises(DataError, match="bad.png"):
        list(ImageBatches([str(bad)], size=(8, 8), workers=2))
    with pytest.raises(DataError, match="no images"):
        ImageBatches([], size=(8, 8))
    with pytest.raises(DataError, match="batch size"):
        ImageBatches([str(bad)], size=(8, 8), batch_size=0)
