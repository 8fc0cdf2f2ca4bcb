"""CFLOW-AD fit: embed the good images once, train one conditional flow per scale by maximum likelihood on their
patch features, stop early on a held-out fold, and learn the thresholds from that fold.

Features: the backbone is frozen, so each training image is embedded once (``update``) and its features kept
(``n sum C_l P_l`` float32: 0.36 MB an image for EfficientNet-Lite0 at 256 px, 3.7 MB for WideResNet50);
epochs then cost only the flows. ``FeatureMemoryPlan`` checks that against the budget before the fit starts.

Training (``train``), as the paper's code: every epoch visits each scale's training rows once in a random order
("fiber batches" of ``fiber_batch`` rows from all images and positions), each fiber batch one Adam step on
``-log sigmoid(l)`` of its rows' log-likelihoods per dimension ``l`` (``flow.log_likelihood_per_dim``). One
optimizer per scale: the decoders share nothing. After each epoch the held-out fold's mean loss is measured per
scale; a scale keeps its best state and stops after ``PATIENCE`` epochs without a ``MIN_IMPROVEMENT`` gain;
training ends when every scale stopped or at ``epochs``. Without a held-out fold (``--folds 0``, ``--val``, too
few images) every image trains for ``epochs`` epochs and each scale keeps its last state. A scale whose loss or
weights turn non-finite stops and keeps its best (or last finite) state, with a warning; one that never had a usable
state is a one-line error.

Thresholds (``calibrate_out_of_sample``): fold 0 of ``--folds K`` (default 5: a fifth of the images; fewer folds
when a fold would hold fewer than 4 images, ``held_out_folds``) is held out;
the final model is trained on the other folds, stopped early on it, and it scores those images out of sample
through the full scoring model (``edgead.thresholds.normal_calibration``, provenance ``cflow-held-out-fold``).
Each scale's reference log-likelihood (``l_ref``: ``edgead.cflow.model``) is the largest over the training rows.
"""
import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from edgead import model_config, resources, thresholds
from edgead.cflow import flow
from edgead.cflow.model import CflowEmbedding, CflowHead, scale_layout
from edgead.embedding import FrameEmbedding, Preprocess, embed_frames
from edgead.errors import ConfigError, DataError
from edgead.weights import load_backbone

#: timm feature stages CFLOW uses: the last three (strides 8, 16, 32; WideResNet50: layer2..layer4, as anomalib)
OUT_INDICES = (2, 3, 4)
#: Default folds: the held-out fold is 1/K of the training images
DEFAULT_FOLDS = 5
#: Default largest number of epochs (early stopping usually ends sooner)
EPOCHS = 16
#: Default rows per Adam step
FIBER_BATCH = 256
#: Default Adam learning rate
LEARNING_RATE = 1e-3
#: Epochs without a held-out gain before a scale stops
PATIENCE = 3
#: Smallest held-out loss decrease that counts as a gain
MIN_IMPROVEMENT = 1e-4
#: Rows per forward pass when scoring (held-out loss, references)
SCORE_ROWS = 8192
#: Images per batch when scoring held-out images for thresholds
SCORE_BATCH = 8
#: Multiply-adds of a fiber batch's largest matrix product below which the flows train on one thread: such products
#: gain little from a second thread, and when another process holds a core every op of a multi-threaded step waits
#: for a descheduled thread (measured: 9 ms steps became 1.3 s on 2 busy cores; one thread stayed at 14 ms)
SINGLE_THREAD_MACS = 64_000_000


def _parse_int(value, option, low, high, note=""):
    try:
        number = None if isinstance(value, bool) else int(str(value).strip())
    except (TypeError, ValueError):
        number = None
    if number is None or not low <= number <= high:
        raise ConfigError("{} must be an integer in {}..{}{}, got {!r}".format(option, low, high, note, value))
    return number


def parse_epochs(value):
    return _parse_int(value, "--epochs", 1, 10000, " (the most epochs; early stopping may end sooner)")


def parse_fiber_batch(value):
    return _parse_int(value, "--fiber-batch", 1, 1 << 20, " (patch rows per Adam step)")


def parse_coupling_blocks(value):
    return _parse_int(value, "--coupling-blocks", 1, 64, " (8 in the paper)")


def parse_learning_rate(value):
    try:
        rate = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        rate = None
    if rate is None or not 0.0 < rate <= 1.0 or math.isnan(rate):
        raise ConfigError("--learning-rate must be a number in (0, 1], e.g. 1e-3, got {!r}".format(value))
    return rate


def make_config(backbone_name, weights_description, extractor, input_hw, dim, seed, epochs, fiber_batch,
                coupling_blocks, learning_rate, condition_dim=flow.CONDITION_DIM, clamp_alpha=flow.CLAMP_ALPHA,
                blur_sigma=4.0):
    """model.json dict for a new CFLOW model (training results filled in by ``CflowFitter.bundle``)."""
    config = model_config.shared_config("cflow", backbone_name, weights_description, extractor, input_hw, OUT_INDICES,
                                        blur_sigma)
    channels, strides = config["backbone"]["channels"], config["backbone"]["strides"]
    if dim is not None and dim != sum(channels):
        raise ConfigError("--dim {!r}: CFLOW models every channel of {}'s stages {} ({} in all); leave --dim out".format(
            dim, config["backbone"]["name"], list(OUT_INDICES), sum(channels)))
    height, width = config["input"]["height"], config["input"]["width"]
    config["embedding"] = {"dim": int(sum(channels)), "seed": int(seed), "grid": config["embedding"]["grid"],
                           "layout": "scale_rows"}
    config["cflow"] = {
        "scale_grids": [[height // s, width // s] for s in strides],
        "condition_dim": int(condition_dim),
        "coupling_blocks": int(coupling_blocks),
        "clamp_alpha": float(clamp_alpha),
        "hidden_ratio": flow.HIDDEN_RATIO,
        "global_affine": "softplus",
        "reference_log_likelihood": [0.0] * len(channels),
        "epochs": int(epochs),
        "fiber_batch": int(fiber_batch),
        "learning_rate": float(learning_rate),
        "n_train": 0,
        "n_heldout": 0,
        "training": None,
    }
    return config


def frame_embedding(config, extractor):
    """The CFLOW FrameEmbedding (uint8 frames ``[N, H, W, 3]`` -> flat patch rows ``[N, T]``) for a model.json dict."""
    return FrameEmbedding(Preprocess(config["input"]["mean"], config["input"]["std"]), CflowEmbedding(extractor)).eval()


def compile_scales(config, scale_blocks, precision="fp32"):
    """Per scale ``flow.compile_decoder`` of the stored block tensors ``scale_blocks`` (list per scale), its matrices
    rounded as an export of ``precision`` stores them (``flow.with_storage_precision``)."""
    cfg = config["cflow"]
    return [flow.with_storage_precision(
        flow.compile_decoder(blocks, flow.positional_encoding(cfg["condition_dim"], *grid), cfg["clamp_alpha"]),
        precision) for blocks, grid in zip(scale_blocks, cfg["scale_grids"])]


def make_head(config, scale_blocks, references=None, precision="fp32"):
    """The ``CflowHead`` of a model.json dict and its stored block tensors (references: ``l_ref`` per scale, default
    model.json's; precision: the storage rounding of an export, ``compile_scales``)."""
    cfg = config["cflow"]
    references = cfg["reference_log_likelihood"] if references is None else references
    return CflowHead(compile_scales(config, scale_blocks, precision), references,
                     (config["input"]["height"], config["input"]["width"]), config["postprocess"]["blur_sigma"],
                     cfg["scale_grids"])


class FeatureMemoryPlan:
    """What a CFLOW fit holds, against a budget (``resources.fit_budget``). Sizes in bytes."""

    def __init__(self, row_floats, parameters, activation_floats, input_hw, batch_size, backbone_bytes, budget=None):
        self.budget, self.budget_source = resources.fit_budget(budget)
        self.image_bytes = int(row_floats) * 4  # one image's features, all scales
        # parameters, gradients, Adam's two moments and the best state kept
        self.flow_bytes = 5 * int(parameters) * 4
        # what one fiber batch's forward keeps for the backward pass (the largest scale's)
        self.activation_bytes = int(activation_floats) * 4
        self.fixed = resources.RUNTIME_BYTES + int(backbone_bytes) + self.flow_bytes + self.activation_bytes + int(
            batch_size) * (int(input_hw[0]) * int(input_hw[1]) * resources.ACTIVATION_BYTES_PER_PIXEL
                           + 2 * self.image_bytes)

    def needed(self, n_images):
        """Peak bytes of a fit on ``n_images``: their features, plus the training and held-out rows built from them
        (the same floats again, per scale in patch-row order)."""
        return self.fixed + 2 * int(n_images) * self.image_bytes

    def check(self, what, n_images):
        needed = self.needed(n_images)
        if self.budget is not None and needed > self.budget:
            raise ConfigError(
                "{} on {} images needs about {} of memory ({} of patch features, held twice while training; {} of "
                "activations per fiber batch), but the budget is {} ({}); use fewer images, a smaller --size or "
                "--fiber-batch, or more memory".format(
                    what, n_images, resources.human_bytes(needed), resources.human_bytes(n_images * self.image_bytes),
                    resources.human_bytes(self.activation_bytes), resources.human_bytes(self.budget),
                    self.budget_source))
        return needed

    def describe(self):
        return {"budget": self.budget, "image_bytes": self.image_bytes, "flow_bytes": self.flow_bytes,
                "activation_bytes": self.activation_bytes, "fixed": self.fixed}


def activation_floats(channels, condition_dim, coupling_blocks, fiber_batch):
    """Floats one fiber batch keeps for the backward pass, for the largest scale: per block the subnet input,
    hidden (before and after ReLU), output, the coupling's tanh / exp / products and the block output (an upper
    estimate of autograd's saved tensors)."""
    largest = 0
    for c in channels:
        s1, s2 = flow.splits(c)
        hidden = flow.hidden_width(c, condition_dim)
        largest = max(largest, (s1 + condition_dim) + 2 * hidden + 2 * s2 + 4 * s2 + 3 * c)
    return int(fiber_batch) * int(coupling_blocks) * largest


def count_parameters(channels, condition_dim, coupling_blocks):
    """Trainable parameters of the decoders of ``channels`` (one per scale)."""
    total = 0
    for c in channels:
        shapes = flow.block_shapes(c, condition_dim)
        total += coupling_blocks * sum(int(np.prod(shapes[k])) for k in flow.BLOCK_TENSORS if k != "permutation")
    return total


class CflowFitter:
    """Holds the embedding, the patch features and the decoders of one CFLOW fit.

    Feed it batches (``update``); ``calibrate_out_of_sample`` trains with a held-out fold (early stopping and
    thresholds); ``bundle()`` trains on every image first when that did not happen. ``warnings``: one-line notes.
    """

    def __init__(self, backbone="wide_resnet50_2", weights="imagenet", input_hw=(256, 256), dim=None, seed=0,
                 batch_size=1, max_memory=None, epochs=EPOCHS, fiber_batch=FIBER_BATCH,
                 coupling_blocks=flow.COUPLING_BLOCKS, learning_rate=LEARNING_RATE, patience=PATIENCE):
        epochs, fiber_batch = parse_epochs(epochs), parse_fiber_batch(fiber_batch)
        coupling_blocks, learning_rate = parse_coupling_blocks(coupling_blocks), parse_learning_rate(learning_rate)
        extractor, description = load_backbone(backbone, weights, seed=seed, input_hw=input_hw, out_indices=OUT_INDICES)
        self.config = make_config(backbone, description, extractor, input_hw, dim, seed, epochs, fiber_batch,
                                  coupling_blocks, learning_rate)
        self.seed, self.patience = int(seed), int(patience)
        self.embedding = frame_embedding(self.config, extractor)
        cfg = self.config["cflow"]
        self.channels = list(self.config["backbone"]["channels"])
        self.layout = scale_layout(self.channels, cfg["scale_grids"])
        backbone_bytes = sum(t.numel() * t.element_size() for t in extractor.state_dict().values())
        self.memory = FeatureMemoryPlan(sum(p * c for _, p, c in self.layout),
                                        count_parameters(self.channels, cfg["condition_dim"], coupling_blocks),
                                        activation_floats(self.channels, cfg["condition_dim"], coupling_blocks,
                                                          fiber_batch),
                                        input_hw, batch_size, backbone_bytes, max_memory)
        self._what = "CFLOW on {} at {}x{}".format(self.config["backbone"]["name"], *input_hw)
        self._features = []  # one float32 [B, T] array per batch
        self.count = 0
        self.calibration = self.calibration_provenance = None
        self.scale_blocks = self.references = self.training = None
        self.n_heldout = 0
        self.warnings = []

    # ---- features ---------------------------------------------------------------------------------
    def check_calibration_memory(self, folds, n_images):
        """ConfigError before any work: ``--folds n`` (CFLOW holds out one fold, it does not refit per image) or a
        fit on ``n_images`` beyond the memory budget."""
        _refuse_leave_one_out(thresholds.parse_folds(folds))
        self.memory.check(self._what, n_images)

    def embed(self, frames):
        """uint8 ``[B, H, W, 3]`` RGB (numpy or tensor) at the model input size -> flat rows ``[B, T]`` float32."""
        return embed_frames(self.embedding, frames)

    def update(self, frames):
        """Add a batch of training frames (uint8 ``[B, H, W, 3]`` RGB at the model input size)."""
        if self.scale_blocks is not None:
            raise RuntimeError("the flows were already trained; no more images can be added")
        self._features.append(np.ascontiguousarray(self.embed(frames).numpy(), dtype=np.float32))
        self.count += len(self._features[-1])
        if self.memory.budget is not None and self.memory.needed(self.count) > self.memory.budget:
            self.memory.check(self._what, self.count)

    def _image_features(self, images, columns=None):
        """float32 ``[len(images), T]`` (or ``[len(images), len(columns range)]``): the flat features of those
        training images (indices in fit order); columns: a ``slice`` of the flat features (default all)."""
        columns = slice(None) if columns is None else columns
        starts = np.cumsum([0] + [len(f) for f in self._features])
        images = np.asarray(images, np.int64)
        chunk_of = np.searchsorted(starts, images, side="right") - 1
        width = len(range(*columns.indices(self._features[0].shape[1])))
        out = np.empty((len(images), width), np.float32)
        for chunk in np.unique(chunk_of):
            where = np.flatnonzero(chunk_of == chunk)
            out[where] = self._features[chunk][images[where] - starts[chunk], columns]
        return out

    def _scale_rows(self, images):
        """Per scale: (rows ``[len(images) P_l, C_l]`` float32 tensor in patch-row order, positions
        ``[len(images) P_l]`` int64), filled image by image from the kept channel-first features (no other copy)."""
        images = np.asarray(images, np.int64)
        starts = np.cumsum([0] + [len(f) for f in self._features])
        out = []
        for offset, patches, channels in self.layout:
            rows = np.empty((len(images), patches, channels), np.float32)
            for i, image in enumerate(images):
                chunk = int(np.searchsorted(starts, image, side="right") - 1)
                rows[i] = self._features[chunk][image - starts[chunk], offset:offset + patches * channels].reshape(
                    channels, patches).T
            positions = np.tile(np.arange(patches, dtype=np.int64), len(images))
            out.append((torch.from_numpy(rows.reshape(-1, channels)), torch.from_numpy(positions)))
        return out

    # ---- training ---------------------------------------------------------------------------------
    def training_threads(self):
        """Intra-op threads for the flow training: 1 when every fiber batch's largest matrix product is below
        ``SINGLE_THREAD_MACS`` multiply-adds (small flows, e.g. EfficientNet-Lite0's), else torch's setting."""
        cfg = self.config["cflow"]
        largest = max(cfg["fiber_batch"] * flow.hidden_width(c, cfg["condition_dim"])
                      * max(flow.splits(c)[0] + cfg["condition_dim"], 2 * flow.splits(c)[1]) for c in self.channels)
        return 1 if largest < SINGLE_THREAD_MACS else torch.get_num_threads()

    def train(self, train_images, heldout_images=None):
        """``_train`` with ``training_threads()`` intra-op threads (restored afterwards)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(self.training_threads())
        try:
            return self._train(train_images, heldout_images)
        finally:
            torch.set_num_threads(threads)

    def _train(self, train_images, heldout_images=None):
        """Train the decoders on ``train_images`` (indices), stopping early on ``heldout_images`` when given; keep the
        best stored tensors per scale (``scale_blocks``: with a held-out fold the epoch of least held-out loss, without
        one the last epoch that ended finite), the references and the training record. DataError (one line) when a
        scale never got a usable state (it diverged in its first epoch, or its held-out loss was never finite)."""
        cfg = self.config["cflow"]
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        encodings = [torch.from_numpy(flow.positional_encoding(cfg["condition_dim"], *g).astype(np.float32))
                     for g in cfg["scale_grids"]]
        permutations = [flow.block_permutations(c, cfg["coupling_blocks"], self.seed, i)
                        for i, c in enumerate(self.channels)]
        decoders = [flow.make_decoder(c, p, cfg["condition_dim"], cfg["clamp_alpha"])
                    for c, p in zip(self.channels, permutations)]
        optimizers = [torch.optim.Adam([q for q in d.parameters() if q.requires_grad], lr=cfg["learning_rate"])
                      for d in decoders]
        train_rows = self._scale_rows(train_images)
        held_rows = self._scale_rows(heldout_images) if heldout_images is not None and len(heldout_images) else None
        scales = range(len(decoders))
        best = [None] * len(decoders)
        best_loss, best_epoch = [math.inf] * len(decoders), [0] * len(decoders)
        active, since = [True] * len(decoders), [0] * len(decoders)
        history = {"train_loss": [[] for _ in scales], "heldout_loss": [[] for _ in scales], "epoch_seconds": []}
        diverged = []
        steps = sum(math.ceil(len(rows) / cfg["fiber_batch"]) for rows, _ in train_rows)
        bar = tqdm(range(cfg["epochs"]), desc="train flows", unit="epoch", leave=False)
        for epoch in bar:
            started = time.perf_counter()
            for i in scales:
                if not active[i]:
                    continue
                rows, positions = train_rows[i]
                decoders[i].train()
                order = torch.randperm(len(rows), generator=generator)
                total, count = 0.0, 0
                for start in range(0, len(rows), cfg["fiber_batch"]):
                    index = order[start:start + cfg["fiber_batch"]]
                    loss = _fiber_loss(decoders[i], rows[index], encodings[i][positions[index]]).mean()
                    if not math.isfinite(loss.item()):
                        total = math.nan
                        break
                    optimizers[i].zero_grad(set_to_none=True)
                    loss.backward()
                    optimizers[i].step()
                    total, count = total + loss.item() * len(index), count + len(index)
                finite = math.isfinite(total) and _finite_parameters(decoders[i])
                if not finite:  # diverged: this scale keeps its best state and stops
                    active[i] = False
                    diverged.append(i)
                history["train_loss"][i].append(_finite_or_none(total / max(1, count)) if finite else None)
                if finite and held_rows is None:  # no held-out fold: the last epoch that ended finite
                    best[i], best_epoch[i] = flow.decoder_parameters(decoders[i], permutations[i]), epoch + 1
                bar.set_postfix(scale=i, loss="{:.4f}".format(total / max(1, count)), steps=steps)
            if held_rows is not None:
                for i in scales:
                    if not active[i]:
                        continue
                    loss = _mean_loss(decoders[i], *held_rows[i], encodings[i])
                    history["heldout_loss"][i].append(_finite_or_none(loss))
                    if loss < best_loss[i] - MIN_IMPROVEMENT:  # False for NaN
                        best_loss[i], best_epoch[i], since[i] = loss, epoch + 1, 0
                        best[i] = flow.decoder_parameters(decoders[i], permutations[i])
                    else:
                        since[i] += 1
                        active[i] = since[i] < self.patience
                bar.set_postfix(heldout=",".join("{:.4f}".format(v) for v in best_loss))
            history["epoch_seconds"].append(round(time.perf_counter() - started, 3))
            if not any(active):
                break
        bar.close()
        for i in scales:
            if best[i] is None:
                raise DataError("the flow of stage {} ({} channels) {} and has no trained state to keep; lower "
                                "--learning-rate (now {:g})".format(
                                    i, self.channels[i], "diverged in its first epoch (a non-finite loss)"
                                    if i in diverged else "never had a finite held-out loss", cfg["learning_rate"]))
            if i in diverged:
                self.warnings.append("the flow of stage {} ({} channels) diverged (a non-finite loss) after epoch {}; "
                                     "it keeps its state of epoch {} (a lower --learning-rate may train it "
                                     "further)".format(i, self.channels[i], len(history["train_loss"][i]) - 1,
                                                       best_epoch[i]))
        self.scale_blocks = best
        self.references = self._references(train_rows)
        seconds = history["epoch_seconds"]
        self.training = {
            "epochs_run": len(seconds), "best_epoch": best_epoch, "early_stopping": held_rows is not None,
            "stopped_early": len(seconds) < cfg["epochs"], "diverged": sorted(diverged),
            "seconds": round(float(sum(seconds)), 3), "seconds_per_epoch": round(float(np.mean(seconds)), 3),
            "heldout_loss": [None if math.isinf(v) else round(v, 6) for v in best_loss],
            "history": history,
        }
        return self.scale_blocks

    @torch.no_grad()
    def _references(self, train_rows):
        """Per scale: the largest log-likelihood per dimension over the training rows, with the kept decoders
        (NaN when any row's is not finite: ``bundle`` refuses it)."""
        head = make_head(self.config, self.scale_blocks, [0.0] * len(self.channels))
        references = []
        for decoder, (rows, _), (_, patches, channels) in zip(head.decoders, train_rows, self.layout):
            best = -math.inf
            images = max(1, SCORE_ROWS // patches)
            for start in range(0, len(rows) // patches, images):
                chunk = rows[start * patches:(start + images) * patches].reshape(-1, patches, channels)
                likelihood = decoder(chunk.transpose(1, 2))
                if not bool(torch.isfinite(likelihood).all()):
                    best = math.nan
                    break
                best = max(best, float(likelihood.max()))
            references.append(best)
        return references

    # ---- thresholds ---------------------------------------------------------------------------------
    def calibrate_out_of_sample(self, load_images=None, n_images=None, folds=DEFAULT_FOLDS,
                                quantile=thresholds.DEFAULT_QUANTILE, seed=0):
        """Hold out fold 0 of ``folds``, train on the rest with early stopping on it, and learn the image and pixel
        thresholds from its images' out-of-sample scores (module docstring). load_images: unused (the features are
        kept); n_images: how many were fed (checked). Returns the calibration dict, or None with a warning."""
        quantile = thresholds.check_quantile(quantile)
        folds = thresholds.parse_folds(folds)
        n_images = self.count if n_images is None else int(n_images)
        if n_images != self.count:
            raise ValueError("{} images to calibrate on, but {} were fitted".format(n_images, self.count))
        if not folds:
            return None
        _refuse_leave_one_out(folds)
        if n_images < 2 * thresholds.MIN_IMAGES:
            self.warnings.append("only {} training images: too few to hold out a fold for early stopping and "
                                 "thresholds, so the flows train on all of them and frames will not be classified "
                                 "(use at least {}, or eval --calibrate on a labelled split)".format(
                                     n_images, 2 * thresholds.MIN_IMAGES))
            return None
        folds = held_out_folds(n_images, folds)
        heldout = np.flatnonzero(thresholds.fold_assignment(n_images, folds, seed) == 0)
        train = np.setdiff1d(np.arange(n_images), heldout)
        self.train(train, heldout)
        self.n_heldout = len(heldout)
        scores, medians = np.empty(len(heldout)), np.empty(len(heldout))
        head = make_head(self.config, self.scale_blocks, self.references).eval()
        for start in range(0, len(heldout), SCORE_BATCH):
            batch = heldout[start:start + SCORE_BATCH]
            with torch.no_grad():
                amap, score = head(torch.from_numpy(self._image_features(batch)))
            scores[start:start + len(batch)] = score.double().numpy()
            medians[start:start + len(batch)] = amap.reshape(len(batch), -1).double().median(dim=1).values.numpy()
        try:
            self.calibration, self.calibration_provenance = thresholds.normal_calibration(
                scores, medians, folds, quantile, "cflow-held-out-fold")
        except DataError as exc:
            self.warnings.append("{}; frames will not be classified".format(exc))
        return self.calibration

    # ---- the bundle ---------------------------------------------------------------------------------
    def bundle(self):
        """Finish (training on every image first when no held-out fold was used) -> CflowBundle."""
        from edgead.cflow.bundle import CflowBundle

        if not self.count:
            raise DataError("no training images were given")
        if self.scale_blocks is None:
            self.train(np.arange(self.count))
        bad = [i for i, r in enumerate(self.references) if not math.isfinite(r)]
        if bad:
            raise DataError("the trained flow of stage {} gives non-finite log-likelihoods on training images; lower "
                            "--learning-rate (now {:g}) or check the images".format(
                                bad[0], self.config["cflow"]["learning_rate"]))
        self._features = []
        config = dict(self.config)
        config["cflow"] = dict(config["cflow"], reference_log_likelihood=[float(r) for r in self.references],
                               n_train=self.count - self.n_heldout, n_heldout=self.n_heldout, training=self.training)
        thresholds.set_calibration(config, self.calibration, self.calibration_provenance)
        state = {k: v.clone() for k, v in self.embedding.patch_embedding.extractor.state_dict().items()}
        return CflowBundle(config, state, self.scale_blocks)


def _refuse_leave_one_out(folds):
    """ConfigError for ``--folds n``: CFLOW trains once and holds out one fold, it does not refit per image."""
    if folds == "n":
        raise ConfigError("--folds n (leave-one-out) does not apply to --method cflow, which trains once and holds "
                          "out one fold of K for early stopping and thresholds; use --folds K (default {}) or "
                          "0".format(DEFAULT_FOLDS))


def held_out_folds(n_images, folds):
    """The folds actually used: ``folds``, fewer when a fold would hold fewer than ``thresholds.MIN_IMAGES`` images
    (10 images, ``--folds 5``: 2 folds of 5), so the held-out fold always has at least that many."""
    return int(max(2, min(int(folds), int(n_images) // thresholds.MIN_IMAGES)))


def _finite_parameters(decoder):
    """True when every parameter of ``decoder`` is finite (an Adam step can overflow without a non-finite loss)."""
    return all(bool(torch.isfinite(p).all()) for p in decoder.parameters())


def _finite_or_none(value):
    """A loss for the training record: rounded, or None when not finite (model.json holds no NaN)."""
    return round(float(value), 6) if math.isfinite(value) else None


def _fiber_loss(decoder, rows, conditions):
    """``-log sigmoid(l)`` ``[B]`` of rows ``[B, C]`` under conditions ``[B, K]`` (the paper's code's loss)."""
    z, log_jac_det = decoder(rows, [conditions])
    return -F.logsigmoid(flow.log_likelihood_per_dim(z, log_jac_det))


@torch.no_grad()
def _mean_loss(decoder, rows, positions, encoding):
    decoder.eval()
    total = 0.0
    for start in range(0, len(rows), SCORE_ROWS):
        total += float(_fiber_loss(decoder, rows[start:start + SCORE_ROWS],
                                   encoding[positions[start:start + SCORE_ROWS]]).sum())
    return total / max(1, len(rows))


def fit_cflow(batches, backbone="wide_resnet50_2", weights="imagenet", input_hw=(256, 256), seed=0,
              folds=DEFAULT_FOLDS, quantile=thresholds.DEFAULT_QUANTILE, batch_size=16, max_memory=None, **options):
    """Fit CFLOW on an iterable of uint8 ``[B, H, W, 3]`` batches (or ``(batch, paths)`` pairs) -> bundle.

    folds: K (default 5: the held-out fold) or 0 (train on all, no thresholds); options: ``epochs``,
    ``fiber_batch``, ``coupling_blocks``, ``learning_rate``. The fitter's warnings go to ``warnings.warn``.
    """
    folds, quantile = thresholds.parse_folds(folds), thresholds.check_quantile(quantile)
    fitter = CflowFitter(backbone, weights, input_hw, None, seed, batch_size, max_memory, **options)
    if folds:
        fitter.check_calibration_memory(folds, 0)
    for item in batches:
        fitter.update(np.asarray(item[0] if isinstance(item, tuple) else item))
    if folds:
        fitter.calibrate_out_of_sample(None, fitter.count, folds, quantile, seed)
    bundle = fitter.bundle()
    for message in fitter.warnings:
        warnings.warn(message, stacklevel=2)
    return bundle
