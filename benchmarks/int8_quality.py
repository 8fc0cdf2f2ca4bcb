"""int8 vs fp32/fp16 exports of PaDiM on the demo data: quality, latency, size, peak RSS, parity.

Per demo category (EfficientNet-Lite0 with its offline ImageNet weights, 256 px, the default fit): the bundle is
exported as ``fp32`` and ``fp16`` statistics (the default) and as ``int8`` (``edgead export --precision int8
--calib <category>/train/good``: a QDQ backbone, statistics and thresholds refitted on its features; target
onnxruntime, plus ``--int8-target tensorrt`` with ``--tensorrt``). Every model is scored by ONNX Runtime CPU at
batch 1 on the category's test split: image AUROC, pixel AUROC, PRO (FPR <= 0.3), and FPR / recall at the
threshold stored in that model (out of sample, learnt by the export itself for int8). The first category's
models are timed interleaved (``--rounds`` x ``--block`` runs, 2 threads), with file size and peak RSS (fresh
process). Parity of the int8 model: ONNX Runtime's int8 kernels vs ``onnx.reference`` (numpy, the QDQ graph
evaluated op by op in float: the int8-equivalent reference) on ``--parity-frames`` test frames.

    python benchmarks/int8_quality.py --out bench_out [--categories brick,coffee] [--quick]
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _report import cpu_name, pyplot, write_outputs  # noqa: E402
from vs_anomalib import _ort_version, _session, edgead_cli, peak_rss, time_interleaved  # noqa: E402


def score_onnx(path, samples, input_hw, threads):
    """(maps [N, H, W], scores [N]) of the ONNX model over the test samples, batch 1."""
    from edgead.data import ImageBatches

    session = _session(path, threads)
    maps, scores = [], []
    for frames, _ in ImageBatches([s.path for s in samples], input_hw, batch_size=1):
        amap, score = session.run(None, {"image": frames})
        maps.append(amap[:, 0])
        scores.append(score)
    return np.concatenate(maps), np.concatenate(scores)


def stored_threshold(path):
    import onnx

    from edgead.exporters.onnx_export import read_metadata

    meta = read_metadata(onnx.load(path, load_external_data=False))
    return (meta.get("calibration") or {}).get("image_threshold")


def quality(path, category, input_hw, threads):
    from edgead import metrics
    from edgead.data import read_mask
    from edgead.evaluate import rates_at_threshold

    samples = category.test_samples()
    maps, scores = score_onnx(path, samples, input_hw, threads)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    masks = np.stack([read_mask(s.mask_path, input_hw) if s.mask_path else np.zeros(input_hw, bool)
                      for s in samples])
    threshold = stored_threshold(path)
    fpr, recall = rates_at_threshold(labels, scores, threshold)
    return {"image_auroc": metrics.image_auroc(labels, scores), "pixel_auroc": metrics.pixel_auroc(masks, maps),
            "pro": metrics.pro_auc(masks, maps, fpr_limit=0.3), "threshold": threshold, "fpr": fpr, "recall": recall}


def parity(path, frames, threads):
    """Max |ORT int8 kernels - onnx.reference| / max |reference| of the map and the score over ``frames``."""
    import onnx
    from onnx import version_converter
    from onnx.reference import ReferenceEvaluator

    session = _session(path, threads)
    # onnx.reference implements QuantizeLinear/DequantizeLinear from opset 19: the same graph, converted
    reference = ReferenceEvaluator(version_converter.convert_version(onnx.load(path), 21))
    worst_map = worst_score = 0.0
    for frame in frames:
        ort_map, ort_score = session.run(None, {"image": frame[None]})
        ref_map, ref_score = reference.run(None, {"image": frame[None]})
        worst_map = max(worst_map, float(np.abs(ort_map - ref_map).max() / np.abs(ref_map).max()))
        worst_score = max(worst_score, float(np.abs(ort_score - ref_score).max() / np.abs(ref_score).max()))
    return worst_map, worst_score


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--categories", default=None, help="comma-separated demo categories (default: the demo's)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=15)
    parser.add_argument("--parity-frames", type=int, default=2)
    parser.add_argument("--tensorrt", action="store_true", help="also export and score --int8-target tensorrt")
    parser.add_argument("--quick", action="store_true", help="one category, 128 px, few images (smoke run)")
    args = parser.parse_args()

    from edgead import demo_data
    from edgead.data import MvtecCategory

    names = args.categories.split(",") if args.categories else list(demo_data.DEFAULT_CATEGORIES)
    counts = {}
    if args.quick:
        names, args.size, args.rounds, args.block, args.parity_frames = names[:1], 128, 2, 5, 1
        counts = dict(n_train=16, n_test_good=6, n_defect_per_type=2)
    work = os.path.join(args.out, "int8_quality" + ("_quick" if args.quick else ""))
    folders = demo_data.build_demo_dataset(os.path.join(work, "data"), categories=names, size=args.size, **counts)
    precisions = [("fp32", []), ("fp16", []), ("int8", None)]
    if args.tensorrt:
        precisions.append(("int8 tensorrt", ["--int8-target", "tensorrt"]))

    rows, timing_models = [], {}
    for folder in folders:
        name = os.path.basename(os.path.normpath(folder))
        bundle_dir = os.path.join(work, "models", name + ".edgead")
        fit_s, _, _ = edgead_cli("fit", folder, "-o", bundle_dir, "--backbone", "efficientnet_lite0",
                                 "--size", args.size)
        category = MvtecCategory(folder)
        for label, extra in precisions:
            path = os.path.join(work, "models", "{}_{}.onnx".format(name, label.replace(" ", "_")))
            argv = ["export", bundle_dir, "-o", path, "--force"]
            if label.startswith("int8"):
                argv += ["--precision", "int8", "--calib", os.path.join(folder, "train", "good")] + (extra or [])
            else:
                argv += ["--precision", label]
            export_s, export_rss, _ = edgead_cli(*argv)
            row = {"category": name, "model": label, "export_s": round(export_s, 1),
                   "export_peak_rss_mb": round(export_rss, 1), "mbytes": round(os.path.getsize(path) / 1e6, 2)}
            row.update({k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in quality(path, category, (args.size, args.size), args.threads).items()})
            if label.startswith("int8"):
                test = category.test_samples()
                frames = _frames([s.path for s in test if s.label][:args.parity_frames], args.size)
                row["parity_map_rel"], row["parity_score_rel"] = parity(path, frames, args.threads)
            rows.append(row)
            print("{:<8} {:<14} image {:.4f} pixel {:.4f} PRO {:.4f} FPR {:.3f} recall {:.3f} ({:.1f} MB)".format(
                name, label, row["image_auroc"], row["pixel_auroc"], row["pro"], row["fpr"], row["recall"],
                row["mbytes"]))
            if folder == folders[0]:
                timing_models[label] = path

    sessions = {label: _session(path, args.threads) for label, path in timing_models.items()}
    frame = _frames([MvtecCategory(folders[0]).test_samples()[0].path], args.size)[:1]
    timing = time_interleaved(sessions, {k: {"image": frame} for k in sessions}, args.rounds, args.block)
    latency = []
    for label, path in timing_models.items():
        rss = peak_rss(path, args.threads, 1)
        latency.append({"model": label, "median_ms": round(timing[label]["median_ms"], 3),
                        "p90_ms": round(timing[label]["p90_ms"], 3),
                        "ratio_vs_fp16": round(timing[label]["median_ms"] / timing["fp16"]["median_ms"], 3),
                        "peak_rss_mb": round(rss["peak_rss_mb"], 1), "mbytes": round(os.path.getsize(path) / 1e6, 2)})

    means = {}
    for label, _ in precisions:
        picked = [r for r in rows if r["model"] == label]
        means[label] = {k: float(np.mean([r[k] for r in picked])) for k in ("image_auroc", "pixel_auroc", "pro",
                                                                           "fpr", "recall")}
    print("\nmean over {} categories ({} px, Lite0 ImageNet; {}):".format(len(folders), args.size, cpu_name()))
    print("{:<14} {:>8} {:>8} {:>8} {:>7} {:>7}".format("model", "image", "pixel", "PRO", "FPR", "recall"))
    for label, m in means.items():
        print("{:<14} {:>8.4f} {:>8.4f} {:>8.4f} {:>7.3f} {:>7.3f}".format(
            label, m["image_auroc"], m["pixel_auroc"], m["pro"], m["fpr"], m["recall"]))
    delta = means["int8"]["pixel_auroc"] - means["fp32"]["pixel_auroc"]
    print("int8 - fp32 mean pixel AUROC: {:+.4f} (goal: within 0.01: {})".format(delta, "PASS" if abs(delta) <= 0.01
                                                                                 else "FAIL"))
    print("\nlatency ({}, batch 1, ORT CPU {} threads, {} rounds x {} runs; peak RSS: a fresh process):".format(
        os.path.basename(folders[0]), args.threads, args.rounds, args.block))
    for r in latency:
        print("  {:<14} {:>7.2f} ms  p90 {:>7.2f}  x{:.3f} of fp16  {:>6.1f} MB RSS  {:>6.1f} MB file".format(
            r["model"], r["median_ms"], r["p90_ms"], r["ratio_vs_fp16"], r["peak_rss_mb"], r["mbytes"]))
    for r in rows:
        if "parity_map_rel" in r:
            print("parity {} {}: ORT int8 kernels vs onnx.reference map {:.2e}, score {:.2e}".format(
                r["category"], r["model"], r["parity_map_rel"], r["parity_score_rel"]))

    payload = {"rows": rows, "means": means, "latency": latency, "cpu": cpu_name(), "size": args.size,
               "threads": args.threads, "int8_minus_fp32_pixel_auroc": delta, "onnxruntime": _ort_version()}
    write_outputs(args.out, "int8_quality" + ("_quick" if args.quick else ""), rows, payload,
                  _plot(rows, latency, [label for label, _ in precisions]))


def _frames(paths, size):
    from edgead.data import ImageBatches

    return np.concatenate([f for f, _ in ImageBatches(paths, (size, size), batch_size=8)])


def _plot(rows, latency, labels):
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    categories = sorted({r["category"] for r in rows}, key=[r["category"] for r in rows].index)
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        values = [next(r["pixel_auroc"] for r in rows if r["category"] == c and r["model"] == label) for c in categories]
        left.bar(np.arange(len(categories)) + i * width, values, width, label=label)
    left.set_xticks(np.arange(len(categories)) + width * (len(labels) - 1) / 2)
    left.set_xticklabels(categories)
    low = min(r["pixel_auroc"] for r in rows)
    left.set_ylim(max(0.0, low - 0.02), 1.0)
    left.set_ylabel("pixel AUROC")
    left.set_title("quality by export (ONNX Runtime)")
    left.legend()
    right.bar([r["model"] for r in latency], [r["median_ms"] for r in latency], color="tab:green")
    for i, r in enumerate(latency):
        right.text(i, r["median_ms"], "{:.1f} ms\n{:.0f} MB RSS".format(r["median_ms"], r["peak_rss_mb"]),
                   ha="center", va="bottom", fontsize=8)
    right.set_ylabel("median ms per frame (batch 1)")
    right.set_title("latency, {}".format(categories[0]))
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    main()
