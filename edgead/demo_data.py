"""The embedded demo dataset: real photos shipped offline with scikit-image, MVTec-AD layout.

Categories (``DEMO_CATEGORIES``), built from files bundled inside the scikit-image wheel (no
download):

- textures ``brick``, ``grass``, ``gravel`` (``skimage.data.brick/grass/gravel``, 512x512 gray):
  random crops with small zoom / rotation, flips, brightness and contrast jitter;
- object ``coffee`` (``skimage.data.coffee``, cup on a saucer): the same framing with small
  shifts, zoom, rotation and brightness jitter (aligned objects, like MVTec's objects).

Synthetic defects (``DEFECT_TYPES``) with exact masks: every pixel the defect changes is in
the mask and no pixel outside it changes. Shapes are rendered 4x supersampled, so their edges
are anti-aliased and the mask is the non-zero coverage.

- ``scratch``: a thick bent polyline of a foreign (bright, dark or coloured) tone;
- ``hole``: a dark ellipse keeping a trace of the texture;
- ``cut``: a rotated rectangle of another texture, colour-jittered (CutPaste-style);
- ``stain``: a translucent tinted blob (union of ellipses).

Everything is seeded per (seed, category, split, index): the same arguments give the same
bytes, and adding a category does not change the others.
"""
import collections
import dataclasses
import functools
import json
import os
import shutil
import zlib

import cv2
import numpy as np

from .atomic import atomic_path, write_text
from .errors import DataError

DEFECT_TYPES = ("scratch", "hole", "cut", "stain")
DEFAULT_CATEGORIES = ("brick", "grass", "gravel", "coffee")
#: Categories built from photos the default demo never uses. They are for checking defaults (thresholds,
#: backbones) on data they were not tuned on (``benchmarks/default_thresholds.py``).
HELDOUT_CATEGORIES = ("tissue", "moon", "cells", "cat", "coins")
_MARKER = ".edgead_demo.json"
_FORMAT = 1
_SS = 4  # supersampling factor of defect shapes


@dataclasses.dataclass(frozen=True)
class _Spec:
    source: str            # skimage.data function name
    kind: str              # "texture" | "object"
    crop: float            # source pixels covered by one output side
    max_rotation: float    # degrees
    flips: bool
    rot90: bool
    foreign: str           # category whose texture is pasted by "cut" defects
    center: tuple = None   # object centre (x, y) in source pixels
    max_shift: float = 0.0  # object shift in source pixels


DEMO_CATEGORIES = {
    "brick": _Spec("brick", "texture", 256, 2.0, True, False, foreign="gravel"),
    "grass": _Spec("grass", "texture", 256, 180.0, True, True, foreign="brick"),
    "gravel": _Spec("gravel", "texture", 256, 180.0, True, True, foreign="grass"),
    "coffee": _Spec("coffee", "object", 380, 3.0, False, False, foreign="brick",
                    center=(290.0, 200.0), max_shift=10.0),
    # held-out style (HELDOUT_CATEGORIES): other bundled photos, same defect renderers
    "tissue": _Spec("immunohistochemistry", "texture", 256, 180.0, True, True, foreign="moon"),
    "moon": _Spec("moon", "texture", 256, 180.0, True, True, foreign="tissue"),
    "cells": _Spec("cell", "texture", 256, 180.0, True, True, foreign="tissue"),
    "cat": _Spec("chelsea", "object", 280, 3.0, False, False, foreign="moon",
                 center=(225.0, 150.0), max_shift=8.0),
    "coins": _Spec("coins", "object", 280, 2.0, False, False, foreign="tissue",
                   center=(192.0, 152.0), max_shift=6.0),
}

DemoSample = collections.namedtuple(
    "DemoSample", ["category", "split", "defect_type", "name", "image", "mask", "clean"])
DemoSample.__doc__ = """One generated image: ``split`` "train" | "test", ``defect_type`` "good" or
one of ``DEFECT_TYPES``, ``name`` "000.png", ``image`` / ``clean`` uint8 [H, W, 3] RGB (identical
for good images), ``mask`` bool [H, W] (None for good images)."""


def _load_skimage(name):
    try:
        import skimage.data
    except ImportError:
        raise DataError("the demo dataset needs scikit-image (its bundled sample photos): "
                        "pip install scikit-image") from None
    try:
        img = getattr(skimage.data, name)()
    except Exception as exc:  # a missing bundled file would trigger a network download
        raise DataError("skimage.data.%s() could not be loaded offline (%s: %s); reinstall "
                        "scikit-image" % (name, type(exc).__name__, exc)) from None
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3]).astype(np.uint8)


@functools.lru_cache(maxsize=16)
def _source(name, scale):
    """Source photo as float32 RGB, resized by ``scale`` (INTER_AREA); read-only."""
    img = _load_skimage(name)
    if scale != 1.0:
        h, w = img.shape[:2]
        interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)
    out = img.astype(np.float32)
    out.setflags(write=False)
    return out


def demo_images_available(categories=DEFAULT_CATEGORIES):
    """True when scikit-image is installed and every photo the categories need loads offline."""
    try:
        for cat in categories:
            spec = _spec(cat)
            _load_skimage(spec.source)
            _load_skimage(DEMO_CATEGORIES[spec.foreign].source)
    except DataError:
        return False
    return True


def _spec(category):
    try:
        return DEMO_CATEGORIES[category]
    except KeyError:
        raise DataError("unknown demo category %r; available: %s"
                        % (category, ", ".join(sorted(DEMO_CATEGORIES)))) from None


def _clean_float(spec, size, rng):
    """One defect-free view, float32 [size, size, 3] in [0, 255]."""
    f = size / float(spec.crop)
    src = _source(spec.source, f)
    sh, sw = src.shape[:2]
    zoom = rng.uniform(0.92, 1.08)
    angle = rng.uniform(-spec.max_rotation, spec.max_rotation)
    if spec.kind == "object":
        cx = (spec.center[0] + rng.uniform(-spec.max_shift, spec.max_shift)) * f
        cy = (spec.center[1] + rng.uniform(-spec.max_shift, spec.max_shift)) * f
    else:
        half = 0.5 * size / zoom * 1.45  # room for rotation and zoom; borders reflect anyway
        cx = rng.uniform(min(half, sw / 2.0), max(sw - half, sw / 2.0))
        cy = rng.uniform(min(half, sh / 2.0), max(sh - half, sh / 2.0))
    m = cv2.getRotationMatrix2D((float(cx), float(cy)), float(angle), float(zoom))
    m[0, 2] += size / 2.0 - cx
    m[1, 2] += size / 2.0 - cy
    img = cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if spec.flips:
        if rng.random() < 0.5:
            img = img[:, ::-1]
        if rng.random() < 0.5:
            img = img[::-1]
    if spec.rot90:
        img = np.rot90(img, int(rng.integers(0, 4)))
    mean = float(img.mean())
    img = (img - mean) * rng.uniform(0.9, 1.1) + mean * rng.uniform(0.9, 1.1) + rng.uniform(-6, 6)
    return np.ascontiguousarray(np.clip(img, 0, 255), dtype=np.float32)


def _clean(spec, size, rng):
    return np.rint(_clean_float(spec, size, rng)).astype(np.uint8)


# ---------------------------------------------------------------- defects


def _coverage(size, draw):
    """Anti-aliased coverage in [0, 1], float32 [size, size]: ``draw(canvas, s)`` paints 255 on a
    ``size*s`` square uint8 canvas (coordinates in supersampled pixels: multiply by ``s``)."""
    canvas = np.zeros((size * _SS, size * _SS), np.uint8)
    draw(canvas, _SS)
    cov = cv2.resize(canvas.astype(np.float32) / 255.0, (size, size), interpolation=cv2.INTER_AREA)
    cov[cov < 1e-6] = 0.0
    return cov


def _pt(x, y, s):
    return int(round(x * s)), int(round(y * s))


def _foreign_tone(rng):
    tones = [(235, 232, 222), (28, 24, 22), (150, 72, 30), (40, 70, 150), (200, 190, 60)]
    return np.array(tones[int(rng.integers(len(tones)))], np.float32)


def _scratch(img, rng, other):
    size = img.shape[0]
    n_seg = int(rng.integers(2, 5))
    length = rng.uniform(0.25, 0.5) * size
    x, y = rng.uniform(0.25, 0.75, 2) * size
    ang = rng.uniform(0, 2 * np.pi)
    pts = [(x, y)]
    for _ in range(n_seg):
        ang += rng.normal(0, 0.35)
        x += length / n_seg * np.cos(ang)
        y += length / n_seg * np.sin(ang)
        pts.append((x, y))
    thickness = rng.uniform(2.5, 5.0)

    def draw(canvas, s):
        p = np.array([_pt(px, py, s) for px, py in pts], np.int32)
        cv2.polylines(canvas, [p], False, 255, thickness=max(1, int(round(thickness * s))), lineType=cv2.LINE_8)

    alpha = _coverage(size, draw) * rng.uniform(0.85, 1.0)
    fg = _foreign_tone(rng) + 0.25 * (img - img.mean(axis=(0, 1)))
    return fg, alpha


def _hole(img, rng, other):
    size = img.shape[0]
    a = rng.uniform(0.035, 0.09) * size
    b = a * rng.uniform(0.5, 1.0)
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    angle = rng.uniform(0, 180)

    def draw(canvas, s):
        cv2.ellipse(canvas, _pt(cx, cy, s), _pt(a, b, s), angle, 0, 360, 255, -1, lineType=cv2.LINE_8)

    alpha = _coverage(size, draw)
    fg = img * rng.uniform(0.12, 0.3) + rng.uniform(0, 12)
    return fg, alpha


def _cut(img, rng, other):
    size = img.shape[0]
    w = rng.uniform(0.09, 0.22) * size
    h = w * rng.uniform(0.5, 1.0)
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    angle = rng.uniform(0, 180)
    box = cv2.boxPoints(((cx, cy), (w, h), angle))

    def draw(canvas, s):
        cv2.fillPoly(canvas, [np.array([_pt(px, py, s) for px, py in box], np.int32)], 255, lineType=cv2.LINE_8)

    alpha = _coverage(size, draw)
    fg = other * rng.uniform(0.75, 1.25, 3).astype(np.float32)
    return fg, alpha


def _stain(img, rng, other):
    size = img.shape[0]
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    blobs = []
    for _ in range(int(rng.integers(3, 6))):
        r = rng.uniform(0.025, 0.06) * size
        blobs.append((cx + rng.normal(0, r), cy + rng.normal(0, r), r, r * rng.uniform(0.5, 1.0),
                      rng.uniform(0, 180)))

    def draw(canvas, s):
        for bx, by, ra, rb, an in blobs:
            cv2.ellipse(canvas, _pt(bx, by, s), _pt(ra, rb, s), an, 0, 360, 255, -1, lineType=cv2.LINE_8)

    alpha = _coverage(size, draw) * rng.uniform(0.6, 0.85)
    tints = [(0.75, 0.48, 0.25), (0.45, 0.7, 0.35), (0.4, 0.45, 0.9), (1.0, 0.85, 0.2)]
    tint = np.array(tints[int(rng.integers(len(tints)))], np.float32)
    fg = 0.5 * img * tint + 0.5 * 255.0 * tint * rng.uniform(0.4, 0.8)
    return fg, alpha


_RENDERERS = {"scratch": _scratch, "hole": _hole, "cut": _cut, "stain": _stain}


def synthesize_defect(clean, defect_type, rng, other=None):
    """Paint one synthetic defect onto a copy of ``clean``.

    Args:
        clean: uint8 [S, S, 3] RGB defect-free image.
        defect_type: one of ``DEFECT_TYPES``.
        rng: ``numpy.random.Generator``.
        other: uint8 [S, S, 3] foreign texture for ``"cut"`` (defaults to a shuffled ``clean``).

    Returns:
        (uint8 [S, S, 3] defective image, bool [S, S] mask). Pixels outside the mask are
        bit-identical to ``clean``; the mask is non-empty.
    """
    if defect_type not in _RENDERERS:
        raise DataError("unknown defect type %r; available: %s" % (defect_type, ", ".join(DEFECT_TYPES)))
    clean = np.asarray(clean, dtype=np.uint8)
    if clean.ndim != 3 or clean.shape[2] != 3 or clean.shape[0] != clean.shape[1]:
        raise DataError("synthesize_defect needs a square uint8 [S, S, 3] image, got %s" % (clean.shape,))
    img = clean.astype(np.float32)
    if other is None:
        other = np.rot90(clean, 1)[:, ::-1]
    fg, alpha = _RENDERERS[defect_type](img, rng, np.asarray(other, np.float32))
    mask = alpha > 0
    a = alpha[:, :, None]
    out = np.clip(np.rint(img * (1.0 - a) + fg * a), 0, 255).astype(np.uint8)
    out[~mask] = clean[~mask]
    return out, mask


# ---------------------------------------------------------------- dataset


def _rng(seed, *keys):
    words = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(str(k).encode("utf-8")) for k in keys]
    return np.random.default_rng(words)


def iter_demo_samples(category, seed=0, n_train=50, n_test_good=16, n_defect_per_type=6, size=256,
                      defect_types=DEFECT_TYPES):
    """Generate one category's images in memory: yields ``DemoSample`` (train, test/good, then
    each defect type in the order given). See ``build_demo_dataset`` for the arguments."""
    spec = _spec(category)
    foreign = _spec(spec.foreign)
    size = int(size)
    if size < 32:
        raise DataError("demo image size must be >= 32, got %d" % size)
    for t in defect_types:
        if t not in _RENDERERS:
            raise DataError("unknown defect type %r; available: %s" % (t, ", ".join(DEFECT_TYPES)))
    for i in range(int(n_train)):
        img = _clean(spec, size, _rng(seed, category, "train", i))
        yield DemoSample(category, "train", "good", "%03d.png" % i, img, None, img)
    for i in range(int(n_test_good)):
        img = _clean(spec, size, _rng(seed, category, "test", "good", i))
        yield DemoSample(category, "test", "good", "%03d.png" % i, img, None, img)
    for t in defect_types:
        for i in range(int(n_defect_per_type)):
            rng = _rng(seed, category, "test", t, i)
            clean = _clean(spec, size, rng)
            other = _clean(foreign, size, rng)
            img, mask = synthesize_defect(clean, t, rng, other)
            yield DemoSample(category, "test", t, "%03d.png" % i, img, mask, clean)


def _write_png(path, rgb_or_gray):
    arr = rgb_or_gray if rgb_or_gray.ndim == 2 else cv2.cvtColor(rgb_or_gray, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise DataError("%s: PNG encoding failed" % path)
    with atomic_path(path) as tmp:  # rename-atomic; no fsync, the set is cheap to rebuild
        with open(tmp, "wb") as fh:
            fh.write(buf.tobytes())


def _write_sample(cat_dir, s):
    sub = "good" if s.defect_type == "good" else s.defect_type
    _write_png(os.path.join(cat_dir, s.split, sub, s.name), s.image)
    if s.mask is not None:
        stem = os.path.splitext(s.name)[0]
        _write_png(os.path.join(cat_dir, "ground_truth", s.defect_type, stem + "_mask.png"),
                   s.mask.astype(np.uint8) * 255)


def build_demo_dataset(out_dir, categories=DEFAULT_CATEGORIES, seed=0, n_train=50, n_test_good=16,
                       n_defect_per_type=6, size=256, defect_types=DEFECT_TYPES, progress=True,
                       overwrite=False):
    """Write the demo dataset in MVTec-AD layout under ``out_dir``.

    ``out_dir/<category>/train/good/NNN.png``, ``test/good/NNN.png``, ``test/<defect>/NNN.png``,
    ``ground_truth/<defect>/NNN_mask.png`` (0 / 255). Each file is written atomically; a
    category is complete when its ``.edgead_demo.json`` marker exists. A complete category with
    the same parameters is reused (not rewritten) unless ``overwrite``; one built with other
    parameters is replaced. A non-empty category folder without a marker is never touched.

    Args:
        out_dir: output folder (created).
        categories: names from ``DEMO_CATEGORIES``.
        seed: master seed; the same arguments produce identical files.
        n_train, n_test_good: defect-free train / test images per category.
        n_defect_per_type: defective test images per defect type.
        size: image side in pixels (square).
        defect_types: subset of ``DEFECT_TYPES``.
        progress: tqdm progress bar on stderr.
        overwrite: rebuild even when a matching complete category exists.

    Returns:
        list of str category folders (what ``edgead.data.find_categories(out_dir)`` finds).

    Raises:
        DataError: scikit-image missing, unknown category / defect type, or a foreign folder in
            the way.
    """
    out_dir = os.fspath(out_dir)
    categories = list(categories)
    if not categories:
        raise DataError("build_demo_dataset: no categories given; available: %s"
                        % ", ".join(sorted(DEMO_CATEGORIES)))
    for cat in categories:
        _spec(cat)
    if not demo_images_available(categories):
        for cat in categories:  # raise the precise error
            _load_skimage(_spec(cat).source)
            _load_skimage(DEMO_CATEGORIES[_spec(cat).foreign].source)
    params = {"format": _FORMAT, "seed": int(seed), "n_train": int(n_train), "n_test_good": int(n_test_good),
              "n_defect_per_type": int(n_defect_per_type), "size": int(size),
              "defect_types": list(defect_types)}
    per_cat = int(n_train) + int(n_test_good) + int(n_defect_per_type) * len(defect_types)
    os.makedirs(out_dir, exist_ok=True)

    todo = []
    for cat in categories:
        cat_dir = os.path.join(out_dir, cat)
        marker = os.path.join(cat_dir, _MARKER)
        if os.path.isfile(marker):
            try:
                with open(marker, encoding="utf-8") as fh:
                    old = json.load(fh).get("params")
            except (OSError, ValueError):
                old = None
            if old == params and not overwrite:
                continue
            shutil.rmtree(cat_dir)  # ours (marker present): safe to replace
        elif os.path.isdir(cat_dir) and os.listdir(cat_dir):
            raise DataError("%s: folder exists and is not an edgead demo dataset (no %s); choose "
                            "another output folder or remove it" % (cat_dir, _MARKER))
        todo.append(cat)

    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=per_cat * len(todo), desc="demo dataset", unit="img", leave=False)
    try:
        for cat in todo:
            cat_dir = os.path.join(out_dir, cat)
            for s in iter_demo_samples(cat, seed, n_train, n_test_good, n_defect_per_type, size, defect_types):
                _write_sample(cat_dir, s)
                if bar is not None:
                    bar.update(1)
            info = {"params": params, "category": cat, "source": "skimage.data.%s" % _spec(cat).source,
                    "foreign_texture": "skimage.data.%s" % DEMO_CATEGORIES[_spec(cat).foreign].source,
                    "note": "synthetic defects on real photos bundled with scikit-image; built by edgead"}
            write_text(os.path.join(cat_dir, _MARKER), json.dumps(info, indent=2) + "\n")
    finally:
        if bar is not None:
            bar.close()
    return [os.path.join(out_dir, cat) for cat in categories]
