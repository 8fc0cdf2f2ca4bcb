"""Image / pixel AUROC and PRO per backbone on the embedded demo dataset.

EfficientNet-Lite0 uses its real offline ImageNet weights. Other backbones use cached ImageNet weights
when the local timm/torchvision cache has them, else seeded random init, labelled "random init" in
the table: random-init scores say nothing about the backbone, only that the pipeline runs.

    python benchmarks/backbone_auroc.py --out bench_out [--backbones ...] [--categories brick,grass]
"""
import argparse
import os

import numpy as np

# Offline only: without this, huggingface_hub (imported by timm before edgead.weights sets the flag)
# retries the network for ~45 s per backbone that has no cached ImageNet weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RANDOM_NOTE = ("NOTE: rows marked 'random init' use a seeded random backbone (no cached ImageNet weights here). "
               "Their AUROC/PRO only show that the pipeline runs; they are NOT a comparison of backbones.")

BACKBONES = ["efficientnet_lite0", "resnet18", "mobilenet_v1_050", "mobilenetv2_100", "mobilenetv3_large_100"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--data", default=None, help="demo dataset folder (default OUT/demo_data)")
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--categories", default="brick,grass,gravel,coffee")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="1 category, 2 backbones, 128 px, few images")
    args = parser.parse_args()
    backbones, categories = args.backbones.split(","), args.categories.split(",")
    counts = {}
    if args.quick:
        backbones, categories, args.size = ["efficientnet_lite0", "resnet18"], ["brick"], 128
        counts = dict(n_train=12, n_test_good=4, n_defect_per_type=2)

    from _report import pyplot, write_outputs
    from edgead import demo_data
    from edgead.cli.fit_cmd import fit_bundle
    from edgead.data import MvtecCategory
    from edgead.errors import WeightsError
    from edgead.evaluate import evaluate_category

    data = args.data or os.path.join(args.out, "demo_data" + ("_quick" if args.quick else ""))
    demo_data.build_demo_dataset(data, categories=categories, size=args.size, progress=False, **counts)
    rows = []
    with_tmp = os.path.join(args.out, "backbone_auroc_models")
    for backbone in backbones:
        use_random = False  # decided once per backbone: ImageNet if cached, else random init
        for category in categories:
            folder = os.path.join(data, category)
            bundle = None
            if not use_random:
                try:
                    bundle, summary = fit_bundle(folder, os.path.join(with_tmp, backbone, category), backbone, "imagenet",
                                                 (args.size, args.size), None, 0, 16, folds=0)
                    weights = bundle.config["backbone"]["weights"]
                except WeightsError:
                    use_random = True
            if use_random:
                bundle, summary = fit_bundle(folder, os.path.join(with_tmp, backbone, category), backbone, "random",
                                             (args.size, args.size), None, 0, 16, folds=0)
                weights = "random init"
            result = evaluate_category(bundle, MvtecCategory(folder), overlays=False)
            rows.append({"backbone": backbone, "weights": weights, "category": category,
                         "image_auroc": round(result["image_auroc"], 4), "pixel_auroc": round(result["pixel_auroc"], 4),
                         "pro": round(result["pro"], 4), "fit_s": summary["fit_seconds"]})
    header = "{:<22} {:<44} {:<8} {:>7} {:>7} {:>6}".format("backbone", "weights", "category", "img AU", "pix AU", "PRO")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print("{:<22} {:<44} {:<8} {:>7.3f} {:>7.3f} {:>6.3f}".format(
            r["backbone"], r["weights"][:44], r["category"], r["image_auroc"], r["pixel_auroc"], r["pro"]))
    means = {}
    for backbone in backbones:
        sel = [r for r in rows if r["backbone"] == backbone]
        means[backbone] = {k: float(np.mean([r[k] for r in sel])) for k in ("image_auroc", "pixel_auroc", "pro")}
        print("mean {:<17} image AUROC {:.3f}  pixel AUROC {:.3f}  PRO {:.3f}  ({})".format(
            backbone, means[backbone]["image_auroc"], means[backbone]["pixel_auroc"], means[backbone]["pro"], sel[0]["weights"]))
    any_random = any(r["weights"] == "random init" for r in rows)
    if any_random:
        print("\n" + RANDOM_NOTE)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(backbones))
    for k, key in enumerate(("image_auroc", "pixel_auroc", "pro")):
        ax.bar(x + (k - 1) * 0.27, [means[b][key] for b in backbones], 0.27, label=key)
    ax.set_xticks(x)
    ax.set_xticklabels(["{}\n({})".format(b, "random" if "random" in next(r["weights"] for r in rows if r["backbone"] == b)
                                          else "ImageNet") for b in backbones], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("PaDiM on the demo dataset ({} px){}".format(
        args.size, "\n'random' = random-init backbone: not a backbone comparison" if any_random else ""), fontsize=9)
    write_outputs(args.out, "backbone_auroc", rows, {"size": args.size, "categories": categories, "rows": rows,
                                                     "means": means, "note": RANDOM_NOTE if any_random else None}, fig)


if __name__ == "__main__":
    main()
