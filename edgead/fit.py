"""PaDiM fit: stream good images through the embedding into mergeable float64 Gaussian sums,
then (second pass) score each of them with the model fitted without it (leave-one-out, or K-fold) for out-of-sample
thresholds (``edgead.thresholds``)."""
import warnings

import numpy as np
import torch
from tqdm import tqdm

from edgead import backbones, blur, model_config, padim, resources, thresholds
from edgead.bundle import PadimBundle
from edgead.embedding import FrameEmbedding, PatchEmbedding, Preprocess, choose_channels, embed_frames
from edgead.errors import ConfigError, DataError
from edgead.weights import load_backbone

#: Images whose full-size float64 anomaly maps ``_map_stats`` builds at once (16 x 256 x 256 x 8 B = 8 MB)
MAP_SLICE = 16


def make_config(backbone_name, weights_description, extractor, input_hw, dim, seed, blur_sigma=4.0):
    """model.json dict for a new PaDiM model (statistics-dependent fields filled in by ``fit_padim``)."""
    spec = backbones.get_spec(backbone_name)
    config = model_config.shared_config("padim", backbone_name, weights_description, extractor, input_hw,
                                        spec.out_indices, blur_sigma)
    channels = config["backbone"]["channels"]
    if dim is None:
        dim = min(spec.default_dim, sum(channels))  # the default adapts to a narrow backbone; an explicit --dim never
    else:
        dim = check_dim(dim)
        if dim > sum(channels):
            raise ConfigError("--dim {} is larger than the {} channels backbone {} has ({} in its stages {}); use "
                              "--dim {} or less".format(dim, sum(channels), spec.name, " + ".join(map(str, channels)),
                                                        list(spec.out_indices), sum(channels)))
    indices = choose_channels(sum(channels), dim, seed)
    config["embedding"] = {"dim": dim, "seed": int(seed), "grid": config["embedding"]["grid"],
                           "channel_indices": indices.tolist()}
    config["padim"] = {"epsilon": padim.EPSILON, "n_train": 0}
    return config


def check_dim(dim):
    """An explicit embedding dimension (``--dim``) as an int >= 1, else ConfigError (one line)."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise ConfigError("--dim must be a positive integer, got {!r}".format(dim))
    if dim < 1:
        raise ConfigError("--dim must be >= 1 (the number of embedding channels), got {}".format(dim))
    return int(dim)


class PadimFitter:
    """Holds the embedding and the running statistics of one fit.

    Feed it batches (``update``), optionally learn thresholds from the same images out of sample
    (``calibrate_out_of_sample``), then ``bundle()``. ``warnings`` collects one-line notes for the user.
    """

    def __init__(self, backbone="efficientnet_lite0", weights="imagenet", input_hw=(256, 256), dim=None, seed=0,
                 batch_size=1, max_memory=None):
        if dim is not None:
            check_dim(dim)  # before loading weights; the upper bound needs the backbone (make_config)
        extractor, description = load_backbone(backbone, weights, seed=seed, input_hw=input_hw)
        cfg = make_config(backbone, description, extractor, input_hw, dim, seed)
        patch = PatchEmbedding(extractor, cfg["embedding"]["channel_indices"], cfg["backbone"]["channels"],
                               cfg["backbone"]["strides"])
        self.embedding = FrameEmbedding(Preprocess(cfg["input"]["mean"], cfg["input"]["std"]), patch).eval()
        self._embed = lambda frames: embed_frames(self.embedding, frames)
        self._backbone_state = lambda: {k: v.clone() for k, v in extractor.state_dict().items()}
        backbone_bytes = sum(t.numel() * t.element_size() for t in extractor.state_dict().values())
        self._start_statistics(cfg, backbone_bytes, batch_size, max_memory)

    @classmethod
    def for_features(cls, config, backbone_state, embed, batch_size=1, max_memory=None):
        """A fitter whose features come from ``embed`` (uint8 frames ``[B, H, W, 3]`` -> ``[B, D, h, w]`` float32,
        numpy or torch) instead of the torch backbone: the int8 export refits the Gaussian statistics (and the
        out-of-sample thresholds) on the features the quantised network computes. config: the bundle's
        model.json dict (its calibration is replaced); backbone_state: the state dict the bundle keeps."""
        self = cls.__new__(cls)
        self.embedding = None
        self._embed = lambda frames: torch.as_tensor(np.asarray(embed(frames), dtype=np.float32))
        self._backbone_state = lambda: {k: v.clone() for k, v in backbone_state.items()}
        config = {k: v for k, v in config.items() if k not in ("calibration", "calibration_provenance")}
        backbone_bytes = sum(t.numel() * t.element_size() for t in backbone_state.values())
        self._start_statistics(config, backbone_bytes, batch_size, max_memory)
        return self

    def _start_statistics(self, config, backbone_bytes, batch_size, max_memory):
        self.config = cfg = config
        input_hw = (cfg["input"]["height"], cfg["input"]["width"])
        grid_h, grid_w = cfg["embedding"]["grid"]
        #: the memory budget and what fits in it (``resources.FitMemoryPlan``); max_memory: bytes or None (default)
        self.memory = resources.FitMemoryPlan(grid_h * grid_w, cfg["embedding"]["dim"], input_hw, batch_size,
                                              backbone_bytes, max_memory)
        self._what = "fitting {} at {}x{}".format(cfg["backbone"]["name"], *input_hw)
        self.memory.check(self._what)
        self.accumulator = padim.GaussianAccumulator(grid_h * grid_w, cfg["embedding"]["dim"],
                                                     chunk_bytes=self.memory.chunk_bytes)
        self.calibration = self.calibration_provenance = None
        self._statistics = None  # (mean, whitening) once finalized
        self.warnings = []

    def check_calibration_memory(self, folds, n_images):
        """ConfigError before any work when the out-of-sample pass (``folds``: ``"n"``, K or 0) cannot fit the
        memory budget: leave-one-out needs one image's embeddings at least, K-fold a whole fold's."""
        folds = thresholds.parse_folds(folds)
        if not folds or n_images < thresholds.MIN_IMAGES:
            return
        if folds == "n" or folds >= n_images:
            self.memory.check(self._what + " with leave-one-out thresholds", 1, "one image")
        else:
            largest = -(-int(n_images) // int(folds))
            self.memory.check(self._what + " with {}-fold thresholds".format(folds), largest,
                              "a fold of {} images (--folds n needs one image's)".format(largest))

    def embed(self, frames):
        """uint8 ``[B, H, W, 3]`` RGB (numpy or tensor) at the model input size -> ``[B, D, h, w]`` float32."""
        return self._embed(frames)

    def update(self, frames):
        """Add a batch of training frames: uint8 ``[B, H, W, 3]`` RGB at the model input size."""
        self.accumulator.update(self.embed(frames))

    def _map_stats(self, distances):
        """Iterable of patch distances ``[m, P]`` float64 -> (max ``[n]``, median ``[n]``) of the anomaly maps,
        concatenated, made as the exported model makes them (bilinear upsample + blur as two matrices)."""
        cfg = self.config
        (grid_h, grid_w), sigma = cfg["embedding"]["grid"], cfg["postprocess"]["blur_sigma"]
        rows = blur.upsample_blur_matrix(cfg["input"]["height"], grid_h, sigma)  # [H, h]
        cols_t = blur.upsample_blur_matrix(cfg["input"]["width"], grid_w, sigma).T  # [w, W]
        maxima, medians = [], []
        for distance in distances:
            grids = distance.numpy().reshape(-1, grid_h, grid_w)
            for first in range(0, len(grids), MAP_SLICE):  # full-size float64 maps of a few images at a time
                flat = (rows @ grids[first:first + MAP_SLICE] @ cols_t).reshape(len(grids[first:first + MAP_SLICE]), -1)
                maxima.append(flat.max(axis=1))
                medians.append(np.median(flat, axis=1))
        return np.concatenate(maxima), np.concatenate(medians)

    def out_of_sample_scores(self, fold_batches, desc="out-of-sample thresholds"):
        """Score every fold of the training images with the model fitted without it (exact: sums subtract).

        fold_batches: one entry per fold, each an iterable of uint8 ``[B, H, W, 3]`` batches holding
        exactly that fold's images, all of which went through ``update`` before. A fold's embeddings
        are kept in memory while it is scored (``m · D · P`` float32 for m images).
        Returns ``(scores [n], map_medians [n])`` float64, in fold order: the max and the median of each
        image's out-of-sample anomaly map.
        """
        progress = tqdm(total=self.accumulator.count, desc=desc, unit="img", leave=False)

        def distances():
            for batches in fold_batches:
                embeddings = self._embed_all(batches, progress)
                yield self.accumulator.held_out_distance(embeddings, self.config["padim"]["epsilon"])
                del embeddings

        with progress:
            return self._map_stats(distances())

    def leave_one_out_scores(self, batches, desc="out-of-sample thresholds"):
        """Score every training image with the model fitted without it (exact, closed form: see
        ``GaussianAccumulator.leave_one_out_distance``), in groups of images whose embeddings fit the memory
        budget (``memory.group_images``; each group costs one Cholesky sweep over the patches).

        batches: uint8 ``[B, H, W, 3]`` batches of images that all went through ``update``.
        Returns ``(scores [m], map_medians [m])`` float64, in the order given.
        """
        group_size = self.memory.group_images(self.accumulator.count)
        progress = tqdm(total=self.accumulator.count, desc=desc, unit="img", leave=False)

        def groups():  # whole batches, at most group_size images (a larger batch is a group of its own)
            group, held = [], 0
            for frames in batches:
                if group and held + len(frames) > group_size:
                    yield group
                    group, held = [], 0
                group.append(frames)
                held += len(frames)
            if group:
                yield group

        def distances():
            for group in groups():
                embeddings = self._embed_all(group, progress)
                yield self.accumulator.leave_one_out_distance(embeddings, self.config["padim"]["epsilon"])
                del embeddings

        with progress:
            return self._map_stats(distances())

    def _embed_all(self, batches, progress):
        """Embeddings of all frames of ``batches`` (uint8 ``[B, H, W, 3]`` each) as one ``[m, D, P]`` float32 tensor,
        filled batch by batch into one allocation (no second copy of the group)."""
        batches = [np.asarray(frames) for frames in batches]  # uint8 frames: small next to their embeddings
        out = torch.empty(sum(len(f) for f in batches), self.accumulator.dim, self.accumulator.num_patches)
        filled = 0
        for frames in batches:
            progress.update(len(frames))
            out[filled:filled + len(frames)] = self.embed(frames).reshape(len(frames), self.accumulator.dim, -1)
            filled += len(frames)
        return out

    def calibrate_out_of_sample(self, load_images, n_images, folds=thresholds.DEFAULT_FOLDS,
                                quantile=thresholds.DEFAULT_QUANTILE, seed=0):
        """Learn the image and pixel thresholds from the training images, out of sample (one extra pass).

        load_images: ``indices [m] int -> iterable of uint8 batches`` of those training images (indices
        into the order in which they were fed to ``update``); n_images: how many were fed.
        folds: ``"n"`` (default): leave-one-out, exact and in closed form, so each image is scored by the
        model of the other n - 1 (the least biased choice: with fewer images than dimensions, a model of
        (k-1)/k of them scores new images markedly higher than the full model does); an int K >= 2: K-fold
        by subtracting each fold's sums. With fewer than ``thresholds.MIN_IMAGES`` images the model stays
        uncalibrated and a warning says so, as it does when the images are copies of one another.
        Returns the calibration dict (kept with its provenance for ``bundle()``), or None.
        """
        quantile = thresholds.check_quantile(quantile)
        folds = thresholds.parse_folds(folds)
        if n_images != self.accumulator.count:
            raise ValueError("{} images to calibrate on, but {} were fitted".format(n_images, self.accumulator.count))
        if n_images < thresholds.MIN_IMAGES:
            self.warnings.append("only {} training images: too few for out-of-sample thresholds, so frames will "
                                 "not be classified (use at least {}, or eval --calibrate on a labelled split)".format(
                                     n_images, thresholds.MIN_IMAGES))
            return None
        self.check_calibration_memory(folds, n_images)
        if folds == "n" or folds >= n_images:
            scores, medians = self.leave_one_out_scores(load_images(np.arange(n_images)))
            method, folds = "padim-leave-one-out", n_images
        else:
            assignment = thresholds.fold_assignment(n_images, folds, seed)
            scores, medians = self.out_of_sample_scores(
                load_images(np.flatnonzero(assignment == fold)) for fold in range(folds))
            method = "padim-leave-fold-out"
        try:
            self.calibration, self.calibration_provenance = thresholds.normal_calibration(
                scores, medians, folds, quantile, method)
        except DataError as exc:
            self.warnings.append("{}; frames will not be classified".format(exc))
        return self.calibration

    def covariance_warning(self):
        """A one-line warning when too few images make each patch covariance rank-deficient (else None)."""
        n, dim = self.accumulator.count, self.accumulator.dim
        if n - 1 >= dim:
            return None
        return ("{} training images for D = {}: each patch covariance has rank <= {} < {} and is held up only by "
                "epsilon = {}, so distances lean on noise directions; {} images make it full rank and about {} make "
                "it stable".format(n, dim, n - 1, dim, self.config["padim"]["epsilon"], dim + 1, 2 * dim))

    def bundle(self):
        """Finish: Cholesky whitening of every patch covariance -> PadimBundle (with the calibration, if any).

        The whitening is computed once, in the memory of the float64 sums (``GaussianAccumulator.finalize``):
        no more images can be added afterwards, and bundles made by later calls share it."""
        warning = self.covariance_warning()
        if warning and warning not in self.warnings:
            self.warnings.append(warning)
        if self._statistics is None:  # the float32 whitening is written over the float64 sums: once
            self._statistics = self.accumulator.finalize(self.config["padim"]["epsilon"], in_place=True)
        mean, whitening = self._statistics
        config = dict(self.config)
        config["padim"] = dict(config["padim"], n_train=self.accumulator.count)
        thresholds.set_calibration(config, self.calibration, self.calibration_provenance)
        return PadimBundle(config, self._backbone_state(), mean, whitening)


def fit_padim(batches, backbone="efficientnet_lite0", weights="imagenet", input_hw=(256, 256), dim=None, seed=0,
              folds=thresholds.DEFAULT_FOLDS, quantile=thresholds.DEFAULT_QUANTILE, batch_size=16, max_memory=None):
    """Fit PaDiM on an iterable of uint8 ``[B, H, W, 3]`` batches (or ``(batch, paths)`` pairs).

    folds: ``"n"`` (leave-one-out) or K of the out-of-sample thresholds (0: none; the frames are then not
    kept in memory); quantile: the normal-score quantile they target. The fitter's warnings (too few images for D,
    ...) are issued with ``warnings.warn``.
    """
    folds, quantile = thresholds.parse_folds(folds), thresholds.check_quantile(quantile)  # before the long work
    fitter = PadimFitter(backbone, weights, input_hw, dim, seed, batch_size, max_memory)
    kept = []
    for item in batches:
        frames = np.asarray(item[0] if isinstance(item, tuple) else item)
        fitter.update(frames)
        if folds:
            kept.append(frames)
    if folds:
        frames = np.concatenate(kept)

        def load_images(indices):
            if len(indices) == len(frames) and np.array_equal(indices, np.arange(len(frames))):
                return iter(kept)  # leave-one-out: the very batches of the fit, so embeddings match bit for bit
            return (frames[indices[i:i + batch_size]] for i in range(0, len(indices), batch_size))

        fitter.calibrate_out_of_sample(load_images, len(frames), folds, quantile, seed)
    bundle = fitter.bundle()
    for message in fitter.warnings:
        warnings.warn(message, stacklevel=2)
    return bundle
