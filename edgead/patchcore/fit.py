"""PatchCore fit: stream good images into a memory bank of patch features, learn thresholds out of sample,
reduce the bank to its greedy k-center coreset.

Memory: the bank of all training patches (``n P D`` float32, e.g. 315 MB for 200 ResNet18 images at 256 px)
plus one batch; the coreset selection adds the projected bank (``n P 128`` float32) and a few ``[n P]``
vectors. ``BankMemoryPlan`` checks that against the budget before the fit starts.

Thresholds (``calibrate_out_of_sample``): the training images are split into K folds (``--folds``, default 5;
``n``: one image per fold); each fold gets its own coreset (the same ratio), and each fold's images are scored
by the full scoring model (nearest entry, reweighted score, upsampled and blurred map) over the union of the
*other* folds' coresets: a bank built without them, of (K-1)/K the final size. Each fold's coreset costs
``1/K^2`` of the final selection, so the pass costs about ``1/K`` of it. The final bank is the greedy coreset of
all patches (the paper's); thresholds are the ``--quantile`` of the out-of-sample scores
(``edgead.thresholds.normal_calibration``), the pixel threshold from the maxima of the out-of-sample maps.
"""
import math
import warnings

import numpy as np
import torch
from tqdm import tqdm

from edgead import model_config, resources, thresholds
from edgead.embedding import FrameEmbedding, Preprocess, embed_frames
from edgead.errors import ConfigError, DataError
from edgead.patchcore import coreset
from edgead.patchcore.embedding import AGGREGATION, OUT_INDICES, PatchcoreEmbedding, default_dim
from edgead.patchcore.model import NEIGHBORS, PatchcoreHead
from edgead.weights import load_backbone

#: ``--coreset-ratio auto``: 10 % of the patches, but no more than this many entries unless that is below 1 %
#: (the paper: 10 %, 1 % for large sets). Scoring time on the device grows with the bank size.
AUTO_CAP = 50_000
DEFAULT_RATIO = 0.1
LARGE_SET_RATIO = 0.01
#: Default folds of the out-of-sample thresholds (each fold scored against the other folds' coresets)
DEFAULT_FOLDS = 5
#: Images scored at once in the threshold pass
SCORE_BATCH = 8


def parse_coreset_ratio(value):
    """``"auto"`` / None -> ``"auto"``; else a float in (0, 1] (digit strings accepted); ConfigError otherwise."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return "auto"
    try:
        ratio = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        ratio = None
    if ratio is None or not 0.0 < ratio <= 1.0 or math.isnan(ratio):
        raise ConfigError("--coreset-ratio must be auto or a number in (0, 1], e.g. 0.1 or 0.01, got {!r}".format(value))
    return ratio


def parse_neighbors(value):
    """``--neighbors``: an int >= 1 (b of the score reweighting; 1 = the plain largest patch distance)."""
    try:
        number = None if isinstance(value, bool) else int(str(value).strip())
    except (TypeError, ValueError):
        number = None
    if number is None or number < 1 or number > 1024:
        raise ConfigError("--neighbors must be an integer in 1..1024 (9 in the paper), got {!r}".format(value))
    return number


def coreset_size(n_patches, ratio):
    """Bank entries kept of ``n_patches``: ``ceil(ratio n)`` (at least 1), or for ``"auto"``
    ``clamp(AUTO_CAP, 1 % n, 10 % n)``."""
    n_patches = int(n_patches)
    if ratio == "auto":
        size = min(math.ceil(DEFAULT_RATIO * n_patches), max(math.ceil(LARGE_SET_RATIO * n_patches), AUTO_CAP))
    else:
        size = math.ceil(float(ratio) * n_patches)
    return int(max(1, min(n_patches, size)))


def make_config(backbone_name, weights_description, extractor, input_hw, dim, seed, coreset_ratio, neighbors,
                projection_dim, blur_sigma=4.0):
    """model.json dict for a new PatchCore model (bank-dependent fields filled in by ``PatchcoreFitter.bundle``)."""
    config = model_config.shared_config("patchcore", backbone_name, weights_description, extractor, input_hw,
                                        OUT_INDICES, blur_sigma)
    channels = config["backbone"]["channels"]
    if dim is None:
        dim = default_dim(channels)
    elif isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= sum(channels):
        raise ConfigError("--dim {!r}: PatchCore projects the {} channels of {}'s stages {} to D, which must be in "
                          "1..{}".format(dim, sum(channels), config["backbone"]["name"], list(OUT_INDICES),
                                         sum(channels)))
    config["embedding"] = {
        "dim": int(dim),
        "seed": int(seed),
        "grid": config["embedding"]["grid"],
        "aggregation": AGGREGATION,
        "projection": "adaptive_avg" if int(dim) < sum(channels) else "none",
    }
    config["patchcore"] = {
        "coreset_ratio": coreset_ratio if coreset_ratio != "auto" else DEFAULT_RATIO,
        "coreset_size": 1,
        "projection_dim": int(projection_dim),
        "neighbors": int(neighbors),
        "n_train": 0,
        "n_patches": 0,
    }
    return config


def frame_embedding(config, extractor):
    """The PatchCore FrameEmbedding (uint8 frames ``[N, H, W, 3]`` -> ``[N, D, h, w]``) for a model.json dict."""
    cfg = config
    patch = PatchcoreEmbedding(extractor, cfg["backbone"]["channels"], cfg["backbone"]["strides"],
                               cfg["embedding"]["dim"], cfg["embedding"].get("aggregation", AGGREGATION))
    return FrameEmbedding(Preprocess(cfg["input"]["mean"], cfg["input"]["std"]), patch).eval()


class BankMemoryPlan:
    """What a PatchCore fit holds, against a budget (``resources`` rules: ``--max-memory`` or 85 % of the
    available memory plus what the process holds). Sizes in bytes."""

    def __init__(self, num_patches, dim, projection_dim, input_hw, batch_size, backbone_bytes, budget=None,
                 coreset_ratio="auto"):
        self.num_patches, self.dim = int(num_patches), int(dim)
        self.coreset_ratio = coreset_ratio
        self.projected_dim = min(int(projection_dim), self.dim)
        self.budget, self.budget_source = resources.fit_budget(budget)
        self.image_bytes = self.num_patches * self.dim * 4  # one image's rows of the bank
        self.fixed = resources.RUNTIME_BYTES + int(backbone_bytes) + int(batch_size) * (
            int(input_hw[0]) * int(input_hw[1]) * resources.ACTIVATION_BYTES_PER_PIXEL + 2 * self.image_bytes)

    def needed(self, n_images):
        """Peak bytes of a fit on ``n_images``: the bank, its projection, the selection's vectors, the coreset
        (gathered while the bank is still held)."""
        rows = int(n_images) * self.num_patches
        kept = coreset_size(rows, self.coreset_ratio) if rows else 0
        return self.fixed + rows * (self.dim + self.projected_dim + 3) * 4 + kept * self.dim * 4

    def check(self, what, n_images):
        """ConfigError (one line) when ``needed(n_images)`` exceeds the budget."""
        needed = self.needed(n_images)
        if self.budget is not None and needed > self.budget:
            raise ConfigError(
                "{} on {} images needs about {} of memory ({} for the memory bank of {} patches x D = {}), but the "
                "budget is {} ({}); use fewer images, a smaller --size or --dim, or more memory".format(
                    what, n_images, resources.human_bytes(needed),
                    resources.human_bytes(int(n_images) * self.image_bytes), int(n_images) * self.num_patches,
                    self.dim, resources.human_bytes(self.budget), self.budget_source))
        return needed

    def describe(self):
        return {"budget": self.budget, "image_bytes": self.image_bytes, "fixed": self.fixed}


class PatchcoreFitter:
    """Holds the embedding and the memory bank of one PatchCore fit.

    Feed it batches (``update``), optionally learn thresholds out of sample (``calibrate_out_of_sample``),
    then ``bundle()`` (the coreset selection). ``warnings`` collects one-line notes for the user.
    """

    def __init__(self, backbone="wide_resnet50_2", weights="imagenet", input_hw=(256, 256), dim=None, seed=0,
                 batch_size=1, max_memory=None, coreset_ratio="auto", neighbors=NEIGHBORS,
                 projection_dim=coreset.PROJECTION_DIM):
        coreset_ratio, neighbors = parse_coreset_ratio(coreset_ratio), parse_neighbors(neighbors)
        extractor, description = load_backbone(backbone, weights, seed=seed, input_hw=input_hw,
                                               out_indices=OUT_INDICES)
        self.config = make_config(backbone, description, extractor, input_hw, dim, seed, coreset_ratio, neighbors,
                                  projection_dim)
        self.coreset_ratio, self.seed = coreset_ratio, int(seed)
        self.embedding = frame_embedding(self.config, extractor)
        grid_h, grid_w = self.config["embedding"]["grid"]
        self.num_patches, self.dim = grid_h * grid_w, self.config["embedding"]["dim"]
        self.projection = coreset.projection(self.dim, projection_dim, seed)
        backbone_bytes = sum(t.numel() * t.element_size() for t in extractor.state_dict().values())
        self.memory = BankMemoryPlan(self.num_patches, self.dim, projection_dim, input_hw, batch_size, backbone_bytes,
                                     max_memory, coreset_ratio)
        self._what = "PatchCore on {} at {}x{}".format(self.config["backbone"]["name"], *input_hw)
        self._rows = []  # one float32 [B * P, D] array per batch: row i * P + p is patch p of image i
        self.count = 0
        self.calibration = self.calibration_provenance = None
        self._bank = None
        self.warnings = []

    # ---- the bank ------------------------------------------------------------------------------
    def check_calibration_memory(self, folds, n_images):
        """ConfigError before any work when a fit on ``n_images`` cannot fit the memory budget (the bank of all
        their patches is held until the coreset is chosen); ``folds`` does not change the need."""
        thresholds.parse_folds(folds)
        self.memory.check(self._what, n_images)

    def embed(self, frames):
        """uint8 ``[B, H, W, 3]`` RGB (numpy or tensor) at the model input size -> ``[B, D, h, w]`` float32."""
        return embed_frames(self.embedding, frames)

    def update(self, frames):
        """Add a batch of training frames (uint8 ``[B, H, W, 3]`` RGB at the model input size) to the bank."""
        if self._bank is not None:
            raise RuntimeError("the coreset was already selected; no more images can be added")
        embedding = self.embed(frames)
        rows = embedding.reshape(embedding.shape[0], self.dim, -1).transpose(1, 2).reshape(-1, self.dim)
        self._rows.append(np.ascontiguousarray(rows.numpy(), dtype=np.float32))
        self.count += int(embedding.shape[0])
        if self.memory.budget is not None and self.memory.needed(self.count) > self.memory.budget:
            self.memory.check(self._what, self.count)

    def _image_rows(self, images):
        """float32 ``[len(images) * P, D]``: the bank rows of those training images (indices in fit order)."""
        images = np.asarray(images, np.int64)
        return self._gather((images[:, None] * self.num_patches + np.arange(self.num_patches)).reshape(-1))

    def _gather(self, indices):
        """float32 ``[len(indices), D]``: bank rows at global row ``indices``."""
        starts = np.cumsum([0] + [len(r) for r in self._rows])
        indices = np.asarray(indices, np.int64)
        chunk_of = np.searchsorted(starts, indices, side="right") - 1
        out = np.empty((len(indices), self.dim), np.float32)
        for chunk in np.unique(chunk_of):
            where = np.flatnonzero(chunk_of == chunk)
            out[where] = self._rows[chunk][indices[where] - starts[chunk]]
        return out

    def _projected(self, images=None):
        """float32 ``[rows, p]``: the random projection of the bank rows (of ``images``; None: all), one allocation."""
        if images is not None:
            return coreset.project(self._image_rows(images), self.projection).numpy()
        width = self.dim if self.projection is None else self.projection.shape[1]
        out = np.empty((self.count * self.num_patches, width), np.float32)
        filled = 0
        for rows in self._rows:
            out[filled:filled + len(rows)] = coreset.project(rows, self.projection).numpy()
            filled += len(rows)
        return out

    def _select(self, points, size, desc):
        first = int(np.random.default_rng(self.seed).integers(len(points)))
        return coreset.k_center_greedy(points, size, first=first, progress=True, desc=desc)

    # ---- thresholds ---------------------------------------------------------------------------------
    def calibrate_out_of_sample(self, load_images=None, n_images=None, folds=DEFAULT_FOLDS,
                                quantile=thresholds.DEFAULT_QUANTILE, seed=0):
        """Learn the image and pixel thresholds from the training images, out of sample (module docstring).

        load_images: unused (the bank holds every training patch already); n_images: how many were fed (checked).
        folds: K >= 2, or ``"n"`` (one image per fold). Returns the calibration dict (kept with its provenance
        for ``bundle()``), or None with a warning when there are too few images or they are copies.
        """
        quantile = thresholds.check_quantile(quantile)
        folds = thresholds.parse_folds(folds)
        n_images = self.count if n_images is None else int(n_images)
        if n_images != self.count:
            raise ValueError("{} images to calibrate on, but {} were fitted".format(n_images, self.count))
        if not folds:
            return None
        if n_images < max(thresholds.MIN_IMAGES, 2):
            self.warnings.append("only {} training images: too few for out-of-sample thresholds, so frames will "
                                 "not be classified (use at least {}, or eval --calibrate on a labelled split)".format(
                                     n_images, thresholds.MIN_IMAGES))
            return None
        folds = n_images if folds == "n" else min(int(folds), n_images)
        assignment = thresholds.fold_assignment(n_images, folds, seed)
        total_size = coreset_size(n_images * self.num_patches, self.coreset_ratio)
        ratio = total_size / float(n_images * self.num_patches)
        members = [np.flatnonzero(assignment == fold) for fold in range(folds)]
        chosen = []  # per fold: global row indices of its own coreset
        for fold, images in enumerate(tqdm(members, desc="fold coresets", unit="fold", leave=False)):
            points = self._projected(images)
            local = self._select(points, max(1, math.ceil(ratio * len(points))), "coreset of fold {}".format(fold))
            image_of, patch_of = np.divmod(local, self.num_patches)
            chosen.append(images[image_of] * self.num_patches + patch_of)
        scores, medians, maxima = np.empty(n_images), np.empty(n_images), np.empty(n_images)
        cfg = self.config
        for fold, images in enumerate(tqdm(members, desc="out-of-sample scores", unit="fold", leave=False)):
            others = np.concatenate([c for f, c in enumerate(chosen) if f != fold])
            head = PatchcoreHead(torch.from_numpy(self._gather(others)), (cfg["input"]["height"], cfg["input"]["width"]),
                                 cfg["postprocess"]["blur_sigma"], cfg["embedding"]["grid"],
                                 cfg["patchcore"]["neighbors"])
            for start in range(0, len(images), SCORE_BATCH):
                batch = images[start:start + SCORE_BATCH]
                rows = torch.from_numpy(self._image_rows(batch))  # [b * P, D]
                embedding = rows.reshape(len(batch), self.num_patches, self.dim).transpose(1, 2).reshape(
                    len(batch), self.dim, *cfg["embedding"]["grid"])
                with torch.no_grad():
                    amap, score = head(embedding)
                flat = amap.reshape(len(batch), -1).double()
                scores[batch] = score.double().numpy()
                maxima[batch] = flat.max(dim=1).values.numpy()
                medians[batch] = flat.median(dim=1).values.numpy()
        try:
            self.calibration, self.calibration_provenance = thresholds.normal_calibration(
                scores, medians, folds, quantile, "patchcore-leave-fold-out", map_maxima=maxima)
        except DataError as exc:
            self.warnings.append("{}; frames will not be classified".format(exc))
        return self.calibration

    # ---- the coreset and the bundle -------------------------------------------------------------
    def memory_bank(self):
        """The final memory bank ``[M, D]`` float32 tensor: the greedy coreset of all training patches (selected
        once; the full bank is released then, so no image can be added afterwards)."""
        if self._bank is None:
            if not self.count:
                raise DataError("no training images were given")
            size = coreset_size(self.count * self.num_patches, self.coreset_ratio)
            if size >= self.count * self.num_patches:  # the whole bank: nothing to select
                selected = np.arange(size)
            else:
                selected = self._select(self._projected(), size, "coreset")
            self._bank = torch.from_numpy(self._gather(np.sort(selected)))
            self._rows = []
            self._size = size
        return self._bank

    def bundle(self):
        """Finish: coreset selection -> PatchcoreBundle (with the calibration, if any)."""
        from edgead.patchcore.bundle import PatchcoreBundle

        n_patches = self.count * self.num_patches
        bank = self.memory_bank()
        config = dict(self.config)
        config["patchcore"] = dict(config["patchcore"], coreset_size=int(bank.shape[0]), n_train=self.count,
                                   n_patches=int(n_patches), coreset_ratio=float(bank.shape[0]) / max(1, n_patches))
        thresholds.set_calibration(config, self.calibration, self.calibration_provenance)
        state = {k: v.clone() for k, v in self.embedding.patch_embedding.extractor.state_dict().items()}
        return PatchcoreBundle(config, state, bank)


def fit_patchcore(batches, backbone="wide_resnet50_2", weights="imagenet", input_hw=(256, 256), dim=None, seed=0,
                  folds=DEFAULT_FOLDS, quantile=thresholds.DEFAULT_QUANTILE, coreset_ratio="auto",
                  neighbors=NEIGHBORS, batch_size=16, max_memory=None):
    """Fit PatchCore on an iterable of uint8 ``[B, H, W, 3]`` batches (or ``(batch, paths)`` pairs) -> bundle.

    folds: K (default 5), ``"n"`` or 0 (no thresholds). The fitter's warnings are issued with ``warnings.warn``.
    """
    folds, quantile = thresholds.parse_folds(folds), thresholds.check_quantile(quantile)
    fitter = PatchcoreFitter(backbone, weights, input_hw, dim, seed, batch_size, max_memory, coreset_ratio, neighbors)
    for item in batches:
        fitter.update(np.asarray(item[0] if isinstance(item, tuple) else item))
    if folds:
        fitter.calibrate_out_of_sample(None, fitter.count, folds, quantile, seed)
    bundle = fitter.bundle()
    for message in fitter.warnings:
        warnings.warn(message, stacklevel=2)
    return bundle
