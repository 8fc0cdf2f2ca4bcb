"""Out of the box: the project defaults, no calibration, on data the defaults were not tuned on.

For each category: `edgead fit` with the defaults (EfficientNet-Lite0, offline ImageNet weights,
256 px, D = 100, leave-one-out out-of-sample thresholds at quantile 0.995), then `edgead eval`.
The table has the threshold-free metrics (image AUROC, pixel AUROC, PRO) and, at the stored default
threshold, the false-positive rate on good test images and the recall on defective ones. No test
image sets anything.

Categories: the demo's (brick, grass, gravel, coffee) and the held-out-style ones built from other
bundled photos (tissue, moon, stars, cat, coins); or, with --data, every MVTec-layout category under
a folder of your own (e.g. MVTec AD).

    python benchmarks/default_thresholds.py --out bench_out [--quick] [--data /path/to/mvtec]

Writes OUT/default_thresholds.{json,csv,png}; the picture shows every test score over its
category's threshold.
"""
import argparse
import os
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--data", default=None, help="a folder of MVTec-layout categories (default: build the demo "
                        "and held-out-style categories under OUT/threshold_data)")
    parser.add_argument("--categories", default=None, help="comma-separated subset")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--folds", default="n", help="n (leave-one-out, the default) or K for K-fold")
    parser.add_argument("--quantile", type=float, default=0.995)
    parser.add_argument("--quick", action="store_true", help="2 categories, 128 px, few images (smoke run)")
    args = parser.parse_args()

    from _report import pyplot, write_outputs
    from edgead import demo_data
    from edgead.cli.fit_cmd import fit_bundle
    from edgead.data import MvtecCategory, find_categories
    from edgead.evaluate import evaluate_category, format_table

    if args.data:
        folders = find_categories(args.data)
        if args.categories:
            wanted = set(args.categories.split(","))
            folders = [f for f in folders if os.path.basename(f) in wanted]
        held_out = set()
    else:
        names = (args.categories.split(",") if args.categories
                 else list(demo_data.DEFAULT_CATEGORIES) + list(demo_data.HELDOUT_CATEGORIES))
        counts = {}
        if args.quick:
            names, args.size = names[:1] + [n for n in names if n in demo_data.HELDOUT_CATEGORIES][:1], 128
            counts = dict(n_train=16, n_test_good=6, n_defect_per_type=2)
        root = os.path.join(args.out, "threshold_data" + ("_quick" if args.quick else ""))
        folders = demo_data.build_demo_dataset(root, categories=names, size=args.size, **counts)
        held_out = set(demo_data.HELDOUT_CATEGORIES)

    rows, results, spread = [], [], []
    for folder in folders:
        name = os.path.basename(os.path.normpath(folder))
        started = time.perf_counter()
        bundle, summary = fit_bundle(folder, os.path.join(args.out, "threshold_models", name), args.backbone,
                                     "imagenet", (args.size, args.size), None, 0, 16, args.folds, args.quantile)
        fit_s = time.perf_counter() - started
        category = MvtecCategory(folder)
        result = evaluate_category(bundle, category, overlays=False, keep_scores=True)
        scores, labels = result.pop("scores"), result.pop("labels")
        results.append(result)
        prov = bundle.config["calibration_provenance"]
        rows.append({"category": name, "set": "held-out style" if name in held_out else "demo",
                     "n_train": summary["n_train"], "n_good": result["n_good"], "n_defect": result["n_defect"],
                     "image_auroc": round(result["image_auroc"], 4), "pixel_auroc": round(result["pixel_auroc"], 4),
                     "pro": round(result["pro"], 4), "threshold": round(result["threshold"], 3),
                     "fpr": round(result["fpr"], 4), "recall": round(result["recall"], 4),
                     "expected_fpr": prov["expected_fpr"], "fpr_upper95": prov["fpr_upper95"],
                     "fit_and_threshold_s": round(fit_s, 1)})
        spread.append((name, scores / result["threshold"], labels))
        print("{}: FPR {:.3f} recall {:.3f} (image AUROC {:.3f})".format(name, result["fpr"], result["recall"],
                                                                       result["image_auroc"]))

    print()
    print(format_table(results))
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("image_auroc", "pixel_auroc", "pro", "fpr", "recall")}
    print("\nmean over {} categories: FPR {:.3f}, recall {:.3f}".format(len(rows), mean["fpr"], mean["recall"]))

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(max(6, 1.1 * len(spread)), 4.5))
    rng = np.random.default_rng(0)
    for i, (_, ratio, labels) in enumerate(spread):
        jitter = rng.uniform(-0.18, 0.18, size=len(ratio))
        axis.scatter(i + jitter[labels == 0], ratio[labels == 0], s=12, c="tab:blue",
                     label="good" if i == 0 else None)
        axis.scatter(i + jitter[labels == 1], ratio[labels == 1], s=12, c="tab:red", marker="x",
                     label="defective" if i == 0 else None)
    axis.axhline(1.0, color="black", lw=1, ls="--", label="default threshold (out of sample)")
    axis.set_xticks(range(len(spread)), [name for name, _, _ in spread], rotation=30)
    axis.set_yscale("log")
    axis.set_ylabel("test score / threshold")
    axis.set_title("{} {}px: test scores vs the default threshold (mean FPR {:.2f}, recall {:.2f})".format(
        args.backbone, args.size, mean["fpr"], mean["recall"]), fontsize=9)
    axis.legend(fontsize=8)
    write_outputs(args.out, "default_thresholds", rows,
                  {"backbone": args.backbone, "size": args.size, "folds": args.folds, "quantile": args.quantile,
                   "rows": rows, "mean": mean}, figure)


if __name__ == "__main__":
    main()
