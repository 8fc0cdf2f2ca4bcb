"""PatchCore coreset selection time against the number of training images (2 cores: minutes, not hours).

Synthetic cases: for each image count and coreset ratio, seeded random float32 patch features ``[n, D]``
(``n = images x (size / stride)^2``; 256 px at stride 8: 1024 patches per image; D = 384, ResNet18
layer2 + layer3) with a low-rank structure plus noise (not degenerate, not isotropic), handed to
``edgead.patchcore.coreset.greedy_coreset(features, size, projection_dim=128, seed=0)`` in a fresh process
per case. Reports the seconds of the selection (projection included), the peak RSS of that process and of
the selection alone, n patches and the coreset size, and a least-squares fit ``seconds = a + b x n x size``
(each greedy step reads the projected ``[n, 128]`` bank once) with its extrapolation to larger counts.

End to end: one ``edgead fit DATA --method patchcore --backbone resnet18 --weights random --size 256
--folds 0`` per image count (the default coreset ratio), on generated frames written as PNGs into an
MVTec-style ``DATA/train/good``; its wall time and peak RSS (``os.wait4`` of the CLI process).

    python benchmarks/patchcore_coreset.py --out bench_out                 # images 25,50,100,200; ratios 0.1,0.01
    python benchmarks/patchcore_coreset.py --quick --out bench_out/quick   # images 4,8; ratio 0.1; one fit of 4
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _report import cpu_name, pyplot, write_outputs  # noqa: E402

#: One synthetic case in a fresh process. Peak RSS from VmHWM (this process image's own high-water mark; the
#: parent's carries over into ru_maxrss), reset through /proc/self/clear_refs before the selection where the
#: kernel allows it, so the selection's own peak is reported beside the whole process's.
CHILD = r"""
import json, math, sys, time
import numpy as np, torch
images, ratio, size, stride, dim, rank, projection_dim, threads, seed = (
    int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]),
    int(sys.argv[7]), int(sys.argv[8]), int(sys.argv[9]))
torch.set_num_threads(threads)
from edgead.patchcore.coreset import greedy_coreset
try:
    from edgead.patchcore.fit import coreset_size
except ImportError:
    def coreset_size(n, r):
        return max(1, min(n, math.ceil(r * n)))
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024 / 1e6  # MB = 10^6 B
n = images * (size // stride) ** 2
generator = torch.Generator().manual_seed(seed)
features = torch.empty(n, dim, dtype=torch.float32)
basis = torch.randn(rank, dim, generator=generator) / rank ** 0.5
for first in range(0, n, 65536):  # low-rank signal + isotropic noise, in blocks (no [n, D] temporaries)
    block = features[first:first + 65536]
    torch.matmul(torch.randn(len(block), rank, generator=generator), basis, out=block)
    block.add_(torch.randn(block.shape, generator=generator), alpha=0.25)
k = coreset_size(n, ratio)
rss_before, peak_before = status("VmRSS:"), status("VmHWM:")
try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    reset = True
except OSError:
    reset = False
start = time.perf_counter()
indices = greedy_coreset(features, k, projection_dim=projection_dim, seed=0)
seconds = time.perf_counter() - start
indices = np.asarray(indices)
assert indices.shape == (k,) and len(np.unique(indices)) == k, "greedy_coreset returned bad indices"
print(json.dumps({"images": images, "ratio": ratio, "n_patches": n, "dim": dim, "coreset_size": k,
                  "seconds": seconds, "peak_rss_mb": max(peak_before, status("VmHWM:")), "rss_before_mb": rss_before,
                  "selection_peak_rss_mb": status("VmHWM:") if reset else None,
                  "features_mb": n * dim * 4 / 1e6, "projected_mb": n * min(dim, projection_dim) * 4 / 1e6}))
"""

EXTRAPOLATE_IMAGES = (500, 1000)


def run_case(args, images, ratio):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-c", CHILD, str(images), repr(ratio), str(args.size), str(args.stride),
                             str(args.dim), str(args.rank), str(args.projection_dim), str(args.threads), str(args.seed)],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit("coreset of {} images at ratio {} failed:\n{}".format(images, ratio, result.stderr[-3000:]))
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_fit(args, images, work):
    """``edgead fit`` of ``images`` generated frames (PNG folder) -> row (wall s, peak RSS MB, bank size)."""
    from vs_anomalib import run_measured, synthetic_frames, write_png_folder

    data = write_png_folder(synthetic_frames(images, args.size, args.seed), os.path.join(work, "data{}".format(images)))
    bundle = os.path.join(work, "fit{}.edgead".format(images))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), TQDM_DISABLE="1")
    argv = [sys.executable, "-m", "edgead", "fit", data, "-o", bundle, "--method", "patchcore", "--backbone",
            args.backbone, "--weights", "random", "--size", str(args.size), "--folds", "0"]
    rc, peak, wall, out, err = run_measured(argv, env=env)
    if rc != 0:
        sys.exit("edgead fit of {} images failed (rc {}):\n{}{}".format(images, rc, out[-1500:], err[-3000:]))
    with open(os.path.join(bundle, "model.json")) as handle:
        config = json.load(handle)
    patchcore = config.get("patchcore", {})
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(bundle, ignore_errors=True)
    return {"images": images, "fit_seconds": round(wall, 2), "fit_peak_rss_mb": round(peak, 1),
            "n_patches": patchcore.get("n_patches"), "coreset_size": patchcore.get("coreset_size"),
            "coreset_ratio": patchcore.get("coreset_ratio"), "dim": config.get("embedding", {}).get("dim")}


def linear_fit(rows):
    """Least squares ``seconds = a + b x (n_patches x coreset_size)``; (a, b) (b in s per patch-centre)."""
    work = np.array([r["n_patches"] * r["coreset_size"] for r in rows], np.float64)
    seconds = np.array([r["seconds"] for r in rows], np.float64)
    if len(rows) < 2 or np.ptp(work) == 0:
        return 0.0, float(seconds.sum() / work.sum())
    b, a = np.polyfit(work, seconds, 1)
    if a < 0:  # a negative fixed cost means noise at the small end: fit through the origin instead
        a, b = 0.0, float((work * seconds).sum() / (work * work).sum())
    return float(a), float(b)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--images", default="25,50,100,200", help="image counts (comma-separated)")
    parser.add_argument("--ratios", default="0.1,0.01", help="coreset ratios of the synthetic cases")
    parser.add_argument("--size", type=int, default=256, help="input size (square)")
    parser.add_argument("--stride", type=int, default=8, help="patch grid stride (layer2 of ResNet18: 8)")
    parser.add_argument("--dim", type=int, default=384, help="feature dimension D (ResNet18 layer2+layer3: 384)")
    parser.add_argument("--rank", type=int, default=32, help="rank of the synthetic features' signal part")
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default="resnet18", help="backbone of the end-to-end fits")
    parser.add_argument("--fit-images", default=None,
                        help="image counts of the end-to-end `edgead fit` rows (default: --images; none: skip)")
    parser.add_argument("--quick", action="store_true", help="images 4,8, ratio 0.1, one end-to-end fit of 4 images")
    args = parser.parse_args()
    if args.quick:
        args.images, args.ratios = "4,8", "0.1"
        args.fit_images = args.fit_images or "4"
    counts = [int(v) for v in args.images.split(",") if v]
    ratios = [float(v) for v in args.ratios.split(",") if v]
    fit_counts = [] if args.fit_images == "none" else [int(v) for v in (args.fit_images or args.images).split(",") if v]

    rows = []
    for ratio in ratios:
        for images in counts:
            row = run_case(args, images, ratio)
            rows.append(row)
            print("  coreset: {:>4} images, ratio {:<5} n = {:>7}, size {:>6}: {:8.2f} s, peak RSS {:7.1f} MB".format(
                images, ratio, row["n_patches"], row["coreset_size"], row["seconds"], row["peak_rss_mb"]), flush=True)
    a, b = linear_fit(rows)
    for row in rows:
        row["predicted_seconds"] = round(a + b * row["n_patches"] * row["coreset_size"], 2)
    patches_per_image = (args.size // args.stride) ** 2
    extrapolation = [{"images": images, "ratio": ratio, "n_patches": images * patches_per_image,
                      "coreset_size": int(np.ceil(ratio * images * patches_per_image)),
                      "predicted_seconds": round(a + b * images * patches_per_image
                                                 * np.ceil(ratio * images * patches_per_image), 1)}
                     for ratio in ratios for images in EXTRAPOLATE_IMAGES]

    fits = []
    if fit_counts:
        work = tempfile.mkdtemp(prefix="edgead_patchcore_coreset_")
        try:
            for images in fit_counts:
                fit = run_fit(args, images, work)
                fits.append(fit)
                print("  edgead fit: {:>4} images: {:8.2f} s, peak RSS {:7.1f} MB (bank {} of {} patches)".format(
                    images, fit["fit_seconds"], fit["fit_peak_rss_mb"], fit["coreset_size"], fit["n_patches"]),
                    flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    print_tables(args, rows, fits, extrapolation, a, b)
    table = [dict(r, case="greedy_coreset") for r in rows] + [dict(f, case="edgead fit") for f in fits]
    payload = {"threads": args.threads, "size": args.size, "stride": args.stride, "dim": args.dim, "rank": args.rank,
               "projection_dim": args.projection_dim, "coreset": rows, "fits": fits,
               "fit": {"a_seconds": a, "b_ns_per_patch_centre": b * 1e9,
                       "model": "seconds = a + b x n_patches x coreset_size"},
               "extrapolation": extrapolation, "cpu": cpu_name(), "backbone": args.backbone}
    write_outputs(args.out, "patchcore_coreset", table, payload, plot(rows, fits, ratios))


def print_tables(args, rows, fits, extrapolation, a, b):
    print("\ngreedy_coreset (projection to {} dims + greedy k-center), {} threads, D = {}, {}x{} at stride {} "
          "({} patches per image); {}".format(args.projection_dim, args.threads, args.dim, args.size, args.size,
                                              args.stride, (args.size // args.stride) ** 2, cpu_name()))
    header = "{:>6} {:>6} {:>9} {:>8} {:>9} {:>10} {:>12} {:>14} {:>11}".format(
        "images", "ratio", "patches", "coreset", "seconds", "fit s", "peak RSS MB", "selection MB", "features MB")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print("{:>6} {:>6} {:>9} {:>8} {:>9.2f} {:>10.2f} {:>12.1f} {:>14} {:>11.1f}".format(
            r["images"], r["ratio"], r["n_patches"], r["coreset_size"], r["seconds"], r["predicted_seconds"],
            r["peak_rss_mb"], "-" if r["selection_peak_rss_mb"] is None else "%.1f" % r["selection_peak_rss_mb"],
            r["features_mb"]))
    print("fit: seconds = {:.3f} + {:.3f} ns x patches x coreset size; selection MB: peak RSS while selecting "
          "(VmHWM reset before it), features held by the caller included".format(a, b * 1e9))
    print("extrapolated: " + "; ".join("{} images ratio {}: {:.0f} s".format(e["images"], e["ratio"],
                                                                           e["predicted_seconds"]) for e in extrapolation))
    if fits:
        print("\nedgead fit --method patchcore --backbone {} --weights random --size {} --folds 0 (default coreset "
              "ratio), {} threads:".format(args.backbone, args.size, args.threads))
        header = "{:>6} {:>9} {:>8} {:>9} {:>12}".format("images", "patches", "coreset", "fit s", "peak RSS MB")
        print(header + "\n" + "-" * len(header))
        for f in fits:
            print("{:>6} {:>9} {:>8} {:>9.2f} {:>12.1f}".format(f["images"], f["n_patches"] or "-",
                                                               f["coreset_size"] or "-", f["fit_seconds"],
                                                               f["fit_peak_rss_mb"]))


def plot(rows, fits, ratios):
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for ratio in ratios:
        part = [r for r in rows if r["ratio"] == ratio]
        left.plot([r["images"] for r in part], [r["seconds"] for r in part], "o-", label="greedy_coreset, ratio {}".format(ratio))
        right.plot([r["images"] for r in part], [r["peak_rss_mb"] for r in part], "o-",
                   label="greedy_coreset process, ratio {}".format(ratio))
    if fits:
        left.plot([f["images"] for f in fits], [f["fit_seconds"] for f in fits], "s--", label="edgead fit (end to end)")
        right.plot([f["images"] for f in fits], [f["fit_peak_rss_mb"] for f in fits], "s--", label="edgead fit")
    left.set_xlabel("training images")
    left.set_ylabel("seconds")
    left.set_title("PatchCore coreset selection time")
    right.set_xlabel("training images")
    right.set_ylabel("peak RSS, MB")
    for axis in (left, right):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    return fig


if __name__ == "__main__":
    main()
