"""Evaluation on MVTec-layout test sets: scores, maps, metrics, calibration and overlay pictures."""
import os

import numpy as np
import torch
from tqdm import tqdm

from edgead import atomic, metrics
from edgead.data import ImageBatches, read_image, read_mask


@torch.no_grad()
def score_images(model, paths, input_hw, batch_size=8, desc=None, resize="area"):
    """Run a bundle's torch scoring model (``bundle.model()``, any method) over ``paths``: (maps ``[N, H, W]``
    float32, scores ``[N]`` float32)."""
    maps, scores = [], []
    for frames, _ in ImageBatches(paths, input_hw, batch_size=batch_size, resize=resize, desc=desc):
        amap, score = model(torch.from_numpy(frames))
        maps.append(amap[:, 0].numpy())
        scores.append(score.numpy())
    return np.concatenate(maps), np.concatenate(scores)


def rates_at_threshold(labels, scores, threshold):
    """(false-positive rate on good images, recall on defective images) of ``score > threshold``.

    The runtime's decision rule. Either rate is NaN when its class is absent or ``threshold`` is None.
    """
    labels = np.asarray(labels).astype(bool)
    if threshold is None:
        return float("nan"), float("nan")
    flagged = np.asarray(scores, dtype=np.float64) > float(threshold)
    fpr = float(flagged[~labels].mean()) if (~labels).any() else float("nan")
    recall = float(flagged[labels].mean()) if labels.any() else float("nan")
    return fpr, recall


def evaluate_category(bundle, category, out_dir=None, overlays=True, batch_size=8, max_overlays=None,
                      keep_scores=False):
    """Score ``category`` (an ``MvtecCategory``) with ``bundle`` (any method: its torch model, ``bundle.model()``).

    Returns a dict: ``category``, ``n_good``, ``n_defect``, ``image_auroc``, ``pixel_auroc``, ``pro``
    (AUPRO up to FPR 0.3), ``image_f1_max``; ``threshold`` (the bundle's image threshold, None when
    uncalibrated), ``fpr`` / ``recall`` (good images flagged / defective images flagged at it, the
    runtime's ``score > threshold``); and ``calibration`` / ``calibration_provenance`` (F1-max
    thresholds from this labelled set, what ``eval --calibrate`` stores; None without both classes). Writes ``out_dir/overlays/<defect>/<name>.png`` heatmap
    overlays with the bundle's own thresholds (what the device shows) when ``overlays``.
    keep_scores: also return ``scores`` ``[N]`` float32 and ``labels`` ``[N]`` int64 (numpy, not JSON).
    """
    samples = category.test_samples()
    input_hw = bundle.input_hw
    resize = bundle.config["input"].get("resize", "area")
    name = os.path.basename(os.path.normpath(category.root))
    maps, scores = score_images(bundle.model(), [s.path for s in samples], input_hw, batch_size,
                                desc="eval {}".format(name), resize=resize)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    masks = np.stack([
        read_mask(s.mask_path, input_hw) if s.mask_path else np.zeros(input_hw, bool) for s in samples
    ])
    default = bundle.config.get("calibration") or {}
    result = {
        "category": name,
        "n_good": int((labels == 0).sum()),
        "n_defect": int((labels == 1).sum()),
        "image_auroc": metrics.image_auroc(labels, scores),
        "pixel_auroc": metrics.pixel_auroc(masks, maps) if masks.any() else float("nan"),
        "pro": metrics.pro_auc(masks, maps, fpr_limit=0.3) if masks.any() else float("nan"),
        "threshold": default.get("image_threshold"),
        "threshold_source": default.get("source"),
    }
    result["fpr"], result["recall"] = rates_at_threshold(labels, scores, result["threshold"])
    result["image_f1_max"], _ = metrics.f1_max_threshold(labels, scores)
    result["calibration"] = result["calibration_provenance"] = None
    if not (labels.all() or not labels.any()):
        result["calibration"] = metrics.calibrate(labels, scores, masks if masks.any() else None,
                                                  maps if masks.any() else None)
        result["calibration_provenance"] = {"method": "validation-f1max", "n_good": result["n_good"],
                                            "n_defect": result["n_defect"], "data": os.path.normpath(category.root)}
    if overlays and out_dir:
        write_overlays(samples, maps, scores, default, input_hw, os.path.join(out_dir, "overlays"),
                       resize, max_overlays)
    if keep_scores:
        result["scores"], result["labels"] = scores, labels
    return result


def write_overlays(samples, maps, scores, calibration, input_hw, folder, resize="area", limit=None):
    """Heatmap + boxes + score for each sample, as PNG under ``folder/<defect>/<name>.png``."""
    import cv2

    from edgead.runtime.overlay import annotate

    vmin, vmax = calibration.get("score_min"), calibration.get("score_max")
    pixel_threshold = calibration.get("pixel_threshold") or calibration.get("image_threshold")
    chosen = range(len(samples)) if limit is None else _spread(samples, limit)
    for i in tqdm(list(chosen), desc="overlays", leave=False):
        sample = samples[i]
        image = read_image(sample.path, input_hw, resize)
        picture = annotate(image, maps[i], float(scores[i]), pixel_threshold, vmin, vmax,
                           image_threshold=calibration.get("image_threshold"))
        if sample.mask_path:
            mask = read_mask(sample.mask_path, input_hw).astype(np.uint8)
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(picture, contours, -1, (0, 255, 0), 1)  # ground truth in green
        path = os.path.join(folder, sample.defect_type, os.path.splitext(os.path.basename(sample.path))[0] + ".png")
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        atomic.write_bytes(path, encoded.tobytes())


def _spread(samples, limit):
    """Up to ``limit`` sample indices, spread over the defect types."""
    by_type = {}
    for i, s in enumerate(samples):
        by_type.setdefault(s.defect_type, []).append(i)
    per_type = max(1, limit // max(1, len(by_type)))
    return [i for idx in by_type.values() for i in idx[:per_type]]


_TABLE_COLUMNS = (("image AUROC", "image_auroc"), ("pixel AUROC", "pixel_auroc"), ("PRO@0.3", "pro"),
                  ("F1-max", "image_f1_max"), ("FPR@thr", "fpr"), ("recall@thr", "recall"))
#: shown when some result has it: median latency of the exported model (``onnx_ms_per_frame``)
_LATENCY_COLUMN = ("ms/frame", "ms_per_frame")


def format_table(results):
    """Plain-text metrics table: one row per result (category) and a mean row per method with several.

    A ``method`` column appears when the results name one (``result["method"]``, the demo's method x category
    table), an ``ms/frame`` column when some have ``ms_per_frame``. FPR@thr / recall@thr: good images flagged /
    defective images flagged at the bundle's default image threshold (no labels used to set it).
    """
    with_method = any(r.get("method") for r in results)
    columns = _TABLE_COLUMNS + ((_LATENCY_COLUMN,) if any(r.get("ms_per_frame") is not None for r in results)
                                else ())
    lead = "{:<10} ".format("method") if with_method else ""
    header = lead + "{:<16} {:>6} {:>6} ".format("category", "good", "defect") + " ".join(
        "{:>11}".format(title) for title, _ in columns)

    def cell(key, value):
        value = float("nan") if value is None else value
        return "{:>11.1f}".format(value) if key == _LATENCY_COLUMN[1] else "{:>11.3f}".format(value)

    def row(method, label, good, defect, values):
        first = "{:<10} ".format(str(method)[:10]) if with_method else ""
        return first + "{:<16} {:>6} {:>6} ".format(label[:16], good, defect) + " ".join(
            cell(key, v) for (_, key), v in zip(columns, values))

    groups = {}
    for r in results:  # in order of first appearance
        groups.setdefault(r.get("method") or "", []).append(r)
    lines = [header, "-" * len(header)]
    for method, group in groups.items():
        for r in group:
            lines.append(row(method, r["category"], r["n_good"], r["n_defect"], [r.get(key) for _, key in columns]))
        if len(group) > 1:
            lines.append(row(method, "mean", "", "", [_nanmean([r.get(key) for r in group]) for _, key in columns]))
    return "\n".join(lines)


def _nanmean(values):
    values = np.asarray([float("nan") if v is None else v for v in values], dtype=np.float64)
    return float(values[~np.isnan(values)].mean()) if (~np.isnan(values)).any() else float("nan")


def onnx_ms_per_frame(onnx_path, frames, threads=2, warmup=3, runs=20):
    """Median wall time (ms) of one frame through an exported model on ONNX Runtime CPU (``threads`` intra-op
    threads, batch 1): ``warmup`` untimed runs, then ``runs`` timed ones, cycling through ``frames`` (uint8
    ``[N, H, W, 3]``)."""
    import time

    from edgead.runtime.engines import open_engine

    frames = np.ascontiguousarray(frames)
    times = []
    with open_engine(onnx_path, backend="onnxruntime", providers=("cpu",), threads=threads) as engine:
        for i in range(warmup + runs):
            frame = frames[i % len(frames)][None]
            started = time.perf_counter()
            engine.infer(frame)
            if i >= warmup:
                times.append(time.perf_counter() - started)
    return float(np.median(times) * 1e3)


def write_json(path, payload):
    """Atomically write ``payload`` as pretty strict JSON: an undefined metric (NaN) is written as null."""
    from edgead.runtime.report import dumps

    atomic.write_text(path, dumps(payload, indent=2) + "\n")
