"""PaDiM fit time and peak memory vs number of training images: memory must stay flat.

Each fit runs in a fresh subprocess (so peak RSS of one fit never hides another's) and streams
generated uint8 frames batch by batch through ``edgead.fit.PadimFitter``.

    python benchmarks/fit_scaling.py --out bench_out [--counts 25,50,100,200,400] [--backbone resnet18]
"""
import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads(2)
from edgead.fit import PadimFitter
backbone, weights, size, count, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fitter = PadimFitter(backbone, weights, (size, size), None, 0)
rng = np.random.default_rng(0)
start = time.perf_counter()
for first in range(0, count, batch):
    n = min(batch, count - first)
    fitter.update(rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8))
bundle = fitter.bundle()
seconds = time.perf_counter() - start
acc = fitter.accumulator
print(json.dumps({"images": count, "fit_seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_after_model_load_mb": rss_before / 1024,
                  "accumulator_mb": (acc.sum.nbytes + acc.outer_packed.nbytes) / 1e6,
                  "patches": acc.num_patches, "dim": acc.dim}))
"""


def run_one(args, count):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-c", CHILD, args.backbone, args.weights, str(args.size), str(count),
                             str(args.batch)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit("fit of {} images failed:\n{}".format(count, result.stderr[-2000:]))
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--counts", default="25,50,100,200,400")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="counts 8,16,32 at 128x128")
    args = parser.parse_args()
    if args.quick:
        args.counts, args.size = "8,16,32", 128
    from tqdm import tqdm

    from _report import pyplot, write_outputs

    rows = [run_one(args, int(c)) for c in tqdm(args.counts.split(","), desc="fits")]
    header = "{:>7} {:>10} {:>12} {:>13} {:>15}".format("images", "fit s", "s / image", "peak RSS MB", "accumulator MB")
    print("{} @ {}x{}, D = {}, P = {}".format(args.backbone, args.size, args.size, rows[0]["dim"], rows[0]["patches"]))
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print("{:>7} {:>10.2f} {:>12.4f} {:>13.0f} {:>15.1f}".format(
            r["images"], r["fit_seconds"], r["fit_seconds"] / r["images"], r["peak_rss_mb"], r["accumulator_mb"]))
    growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print("\npeak RSS grows x{:.3f} while images grow x{:.0f} (flat = streaming statistics)".format(
        growth, rows[-1]["images"] / rows[0]["images"]))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    counts = [r["images"] for r in rows]
    ax.plot(counts, [r["peak_rss_mb"] for r in rows], "o-", label="peak RSS (MB)")
    ax.set_xlabel("training images")
    ax.set_ylabel("MB")
    ax.set_ylim(0, max(r["peak_rss_mb"] for r in rows) * 1.3)
    ax2 = ax.twinx()
    ax2.plot(counts, [r["fit_seconds"] for r in rows], "s--", color="tab:orange", label="fit time (s)")
    ax2.set_ylabel("seconds")
    fig.legend(loc="center right")
    ax.set_title("PaDiM fit: {} {}x{}".format(args.backbone, args.size, args.size))
    write_outputs(args.out, "fit_scaling", rows, {"backbone": args.backbone, "size": args.size, "rows": rows,
                                                  "peak_rss_growth": growth}, fig)


if __name__ == "__main__":
    main()
