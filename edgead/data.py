"""Image and dataset loading, torch-free (numpy + OpenCV).

- ``read_image`` / ``read_mask``: one file -> ``uint8 [H, W, 3]`` RGB / ``bool [H, W]``.
- ``MvtecCategory`` / ``find_categories``: the MVTec-AD folder layout::

      category/train/good/*.png
      category/test/good/*.png
      category/test/<defect>/*.png
      category/ground_truth/<defect>/<name>_mask.png

- ``list_images``: a folder, a single file or a glob of images, sorted.
- ``ImageBatches``: ``(uint8 [B, H, W, 3], paths)`` batches with optional progress bar and
  threaded decoding.

Every problem a user can cause raises ``edgead.errors.DataError`` naming the file or folder.
Paths are returned as ``str``.
"""
import collections
import concurrent.futures
import glob
import os

import cv2
import numpy as np

from .errors import DataError

#: File extensions treated as images (lower case, with the dot).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

#: Resize modes accepted by ``read_image`` (``model.json`` ``input.resize``).
RESIZE_MODES = ("area", "bilinear", "nearest")

_GLOB_CHARS = set("*?[")


def is_image_file(path):
    """True when ``path`` has one of ``IMAGE_EXTENSIONS`` (case-insensitive) and is not hidden."""
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _check_size(size):
    if size is None:
        return None
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise DataError("image size must be (height, width), got %r" % (size,)) from None
    if h <= 0 or w <= 0:
        raise DataError("image size must be positive (height, width), got %r" % (size,))
    return h, w


def _decode(path, flags):
    """Read the bytes of ``path`` (unicode-safe) and decode them with OpenCV."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError("%s: file not found" % path)
    if os.path.isdir(path):
        raise DataError("%s: is a folder, expected an image file" % path)
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError("%s: cannot read (%s)" % (path, exc)) from None
    if buf.size == 0:
        raise DataError("%s: file is empty (0 bytes); re-copy or delete it" % path)
    img = cv2.imdecode(buf, flags)
    if img is None or img.size == 0:
        raise DataError("%s: not a readable image (corrupt or unsupported format; "
                        "supported: %s)" % (path, ", ".join(e[1:] for e in IMAGE_EXTENSIONS)))
    return img


def _to_uint8(img):
    """Any depth -> uint8: 16-bit keeps the high byte, float assumes [0, 1] (or [0, 255] if larger)."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img >> 8).astype(np.uint8)
    if img.dtype == np.int8:
        return (img.astype(np.int16) + 128).astype(np.uint8)
    if img.dtype == np.int16:
        return ((img.astype(np.int32) + 32768) >> 8).astype(np.uint8)
    img = np.nan_to_num(img.astype(np.float64))
    if img.size and img.max() <= 1.0:
        img = img * 255.0
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def read_image(path, size=None, resize="area"):
    """Read one image as RGB.

    Args:
        path: image file (unicode paths fine).
        size: ``(H, W)`` output size, or None to keep the file's size.
        resize: ``"area"`` (INTER_AREA to downscale, INTER_LINEAR to upscale), ``"bilinear"``
            or ``"nearest"``.

    Returns:
        ``uint8 [H, W, 3]`` RGB. Grayscale is replicated, alpha dropped, 16-bit reduced to
        its high byte.

    Raises:
        DataError: missing, empty, unreadable or corrupt file (the message names it).
    """
    if resize not in RESIZE_MODES:
        raise DataError("unknown resize mode %r; expected one of %s" % (resize, ", ".join(RESIZE_MODES)))
    size = _check_size(size)
    img = _to_uint8(_decode(path, cv2.IMREAD_UNCHANGED))
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.ndim == 3 and img.shape[2] == 1:
        img = cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    elif img.ndim == 3 and img.shape[2] == 2:  # gray + alpha
        img = cv2.cvtColor(np.ascontiguousarray(img[:, :, 0]), cv2.COLOR_GRAY2RGB)
    elif img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    else:
        raise DataError("%s: unsupported image layout %s" % (os.fspath(path), img.shape))
    if size is not None:
        # One resize rule for training, evaluation and the device runtime.
        from edgead.runtime.pipeline import resize_frame

        img = resize_frame(img, size, resize)
    return np.ascontiguousarray(img)


def read_mask(path, size=None):
    """Read a ground-truth mask: any channel ``> 0`` is anomalous.

    Args:
        path: mask image (typically ``<name>_mask.png``, 0 = good, 255 = defect).
        size: ``(H, W)`` output size (nearest-neighbour resize), or None to keep the file's size.

    Returns:
        ``bool [H, W]``.
    """
    size = _check_size(size)
    m = _decode(path, cv2.IMREAD_UNCHANGED)
    if m.ndim == 3:
        m = m.max(axis=2)
    m = (m > 0).astype(np.uint8)
    if size is not None and m.shape != size:
        m = cv2.resize(m, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return m.astype(bool)


def _images_in(folder):
    """Sorted image files directly inside ``folder`` (no recursion, hidden files skipped)."""
    try:
        names = os.listdir(folder)
    except OSError as exc:
        raise DataError("%s: cannot list folder (%s)" % (folder, exc)) from None
    return sorted(os.path.join(folder, n) for n in names
                  if is_image_file(n) and os.path.isfile(os.path.join(folder, n)))


def list_images(path_or_glob):
    """All images named by a folder, a single image file or a glob pattern, sorted.

    A folder is listed non-recursively; use a glob (``"data/**/*.png"``) to recurse.
    Extensions: png, jpg, jpeg, bmp, tif, tiff, webp (any case). Hidden files are skipped.

    Returns:
        list of str paths.

    Raises:
        DataError: the path does not exist or names no images.
    """
    spec = os.fspath(path_or_glob)
    if os.path.isdir(spec):
        files = _images_in(spec)
    elif os.path.isfile(spec):
        if not is_image_file(spec):
            raise DataError("%s: not an image file (supported extensions: %s)"
                            % (spec, ", ".join(e[1:] for e in IMAGE_EXTENSIONS)))
        files = [spec]
    elif _GLOB_CHARS & set(spec):
        files = sorted(p for p in glob.glob(spec, recursive=True) if is_image_file(p) and os.path.isfile(p))
    else:
        raise DataError("%s: no such file or folder" % spec)
    if not files:
        raise DataError("%s: no images found (looked for %s)"
                        % (spec, ", ".join("*" + e for e in IMAGE_EXTENSIONS)))
    return files


Sample = collections.namedtuple("Sample", ["path", "label", "defect_type", "mask_path"])
Sample.__doc__ = """One MVTec test image: ``path`` (str), ``label`` (0 good / 1 defective),
``defect_type`` (``"good"`` or the test sub-folder name), ``mask_path`` (str, None for good)."""


class MvtecCategory:
    """One MVTec-AD category folder (``train/good``, ``test/<type>``, ``ground_truth/<type>``).

    The constructor checks ``train/good`` (exists, holds images); ``test_samples`` checks the
    test and ground-truth folders. Problems raise ``DataError`` naming the folder and the
    expected layout.
    """

    def __init__(self, root):
        self.root = os.fspath(root)
        self.name = os.path.basename(os.path.normpath(os.path.abspath(self.root)))
        if not os.path.isdir(self.root):
            raise DataError("%s: dataset folder not found" % self.root)
        train_good = os.path.join(self.root, "train", "good")
        if not os.path.isdir(train_good):
            raise DataError("%s: missing folder train/good; expected the MVTec-AD layout "
                            "<category>/train/good/*.png (defect-free training images)" % self.root)
        if not _images_in(train_good):
            raise DataError("%s: folder is empty; put the defect-free training images (png, jpg, ...) "
                            "there" % train_good)

    def __repr__(self):
        return "MvtecCategory(%r)" % self.root

    @property
    def has_test(self):
        """True when a ``test`` folder exists."""
        return os.path.isdir(os.path.join(self.root, "test"))

    def train_images(self):
        """Sorted paths (str) of ``train/good`` images."""
        return _images_in(os.path.join(self.root, "train", "good"))

    def defect_types(self):
        """Sorted names of ``test/`` sub-folders other than ``good``."""
        return [t for t in self._test_types() if t != "good"]

    def _test_types(self):
        test = os.path.join(self.root, "test")
        if not os.path.isdir(test):
            raise DataError("%s: missing folder test; expected <category>/test/good/*.png and "
                            "<category>/test/<defect>/*.png" % self.root)
        types = sorted(n for n in os.listdir(test)
                       if not n.startswith(".") and os.path.isdir(os.path.join(test, n)))
        if not types:
            raise DataError("%s: no sub-folders; expected test/good and test/<defect> folders of "
                            "images" % test)
        return types

    def _find_mask(self, defect_type, image_path):
        stem = os.path.splitext(os.path.basename(image_path))[0]
        folder = os.path.join(self.root, "ground_truth", defect_type)
        for ext in IMAGE_EXTENSIONS:
            for cand in (stem + "_mask" + ext, stem + "_mask" + ext.upper()):
                p = os.path.join(folder, cand)
                if os.path.isfile(p):
                    return p
        raise DataError("%s: defect image has no ground-truth mask; expected %s"
                        % (image_path, os.path.join(folder, stem + "_mask.png")))

    def test_samples(self):
        """All test images as ``Sample`` tuples, sorted by (defect type, file name).

        Good images get ``label=0, mask_path=None``; every other sub-folder is a defect type with
        ``label=1`` and a mask ``ground_truth/<type>/<stem>_mask.<ext>``.

        Raises:
            DataError: missing ``test``, an empty sub-folder, a defect image without its mask
                (the message names both the image and the expected mask), or a mask whose size
                differs from its image's (names the mask and both sizes).
        """
        samples = []
        for t in self._test_types():
            folder = os.path.join(self.root, "test", t)
            files = _images_in(folder)
            if not files:
                raise DataError("%s: folder holds no images (png, jpg, ...); remove it or add images"
                                % folder)
            for f in files:
                if t == "good":
                    samples.append(Sample(f, 0, "good", None))
                else:
                    mask = self._find_mask(t, f)
                    _check_mask_size(mask, f)
                    samples.append(Sample(f, 1, t, mask))
        return samples


def _check_mask_size(mask_path, image_path):
    """A ground-truth mask must have its image's size: a stretched mask scores the wrong pixels."""
    mask_hw, image_hw = image_hw_of(mask_path), image_hw_of(image_path)
    if mask_hw != image_hw:
        raise DataError("%s: mask is %dx%d (HxW) but its image %s is %dx%d; masks must match their image's size"
                        % (mask_path, mask_hw[0], mask_hw[1], image_path, image_hw[0], image_hw[1]))


def image_hw_of(path):
    """``(height, width)`` of an image file: read from the PNG header when it is one, else decoded.

    Raises:
        DataError: missing, empty or unreadable file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError as exc:
        raise DataError("%s: cannot read (%s)" % (path, exc)) from None
    if len(head) == 24 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        if width > 0 and height > 0:
            return height, width
    return tuple(_decode(path, cv2.IMREAD_UNCHANGED).shape[:2])


def _is_category(folder):
    return os.path.isdir(os.path.join(folder, "train", "good"))


def find_categories(root):
    """MVTec category folders under ``root``.

    Returns:
        ``[root]`` when ``root`` itself holds ``train/good``; otherwise the sorted sub-folders
        of ``root`` that do (list of str).

    Raises:
        DataError: ``root`` is missing or holds no category.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError("%s: dataset folder not found" % root)
    if _is_category(root):
        return [root]
    cats = sorted(os.path.join(root, n) for n in os.listdir(root)
                  if not n.startswith(".") and _is_category(os.path.join(root, n)))
    if not cats:
        raise DataError("%s: no MVTec-AD category found; expected %s/train/good/*.png or "
                        "%s/<category>/train/good/*.png" % (root, root, root))
    return cats


class ImageBatches:
    """Iterate over images in batches: yields ``(uint8 [B, H, W, 3], list of B str paths)``.

    The last batch may be smaller. ``len()`` is the number of batches.

    Args:
        paths: image files (any sequence of paths).
        size: ``(H, W)`` every image is resized to.
        batch_size: images per batch (>= 1).
        resize: see ``read_image``.
        desc: when given, a tqdm progress bar (counting images) with this label on stderr.
        workers: decode threads; 0 decodes in the calling thread. OpenCV releases the GIL,
            so 2-4 threads speed up JPEG/PNG decoding. The next batch is decoded while the
            caller works on the current one.
    """

    def __init__(self, paths, size, batch_size=32, resize="area", desc=None, workers=0):
        self.paths = [os.fspath(p) for p in paths]
        if not self.paths:
            raise DataError("no images to load (empty list of paths)")
        self.size = _check_size(size)
        if self.size is None:
            raise DataError("ImageBatches needs a size (height, width)")
        if int(batch_size) < 1:
            raise DataError("batch size must be >= 1, got %r" % (batch_size,))
        if resize not in RESIZE_MODES:
            raise DataError("unknown resize mode %r; expected one of %s" % (resize, ", ".join(RESIZE_MODES)))
        self.batch_size = int(batch_size)
        self.resize = resize
        self.desc = desc
        self.workers = max(0, int(workers))

    def __len__(self):
        return (len(self.paths) + self.batch_size - 1) // self.batch_size

    def _chunks(self):
        for i in range(0, len(self.paths), self.batch_size):
            yield self.paths[i:i + self.batch_size]

    def _load(self, chunk, pool):
        read = lambda p: read_image(p, self.size, self.resize)  # noqa: E731
        images = list(pool.map(read, chunk)) if pool is not None else [read(p) for p in chunk]
        return np.stack(images), chunk

    def __iter__(self):
        bar = None
        if self.desc is not None:
            from tqdm import tqdm
            bar = tqdm(total=len(self.paths), desc=self.desc, unit="img", leave=False)
        pool = concurrent.futures.ThreadPoolExecutor(self.workers) if self.workers else None
        try:
            if pool is None:
                for chunk in self._chunks():
                    batch = self._load(chunk, None)
                    if bar is not None:
                        bar.update(len(chunk))
                    yield batch
            else:
                # one batch of look-ahead: decode batch i+1 while the caller uses batch i
                with concurrent.futures.ThreadPoolExecutor(1) as feeder:
                    pending = None
                    for chunk in self._chunks():
                        nxt = feeder.submit(self._load, chunk, pool)
                        if pending is not None:
                            batch = pending.result()
                            if bar is not None:
                                bar.update(len(batch[1]))
                            yield batch
                        pending = nxt
                    if pending is not None:
                        batch = pending.result()
                        if bar is not None:
                            bar.update(len(batch[1]))
                        yield batch
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
            if bar is not None:
                bar.close()
