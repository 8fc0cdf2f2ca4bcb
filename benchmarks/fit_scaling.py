"""PaDiM fit time and peak memory vs number of training images, per backbone: memory must stay flat.

Each fit runs in a fresh subprocess (so peak RSS of one fit never hides another's) and does what
``edgead fit`` does by default: stream generated uint8 frames batch by batch through
``edgead.fit.PadimFitter``, the leave-one-out threshold pass (frames regenerated from their seed, never
all in memory), and the in-place finalize. Beside each row: the float64 accumulator ``P·(D+T)·8`` and the
float32 whitening ``P·T·4``, the two arrays the issue's goal is stated in (WideResNet50, D = 550, 256 px:
peak RSS <= 7.5 GB, flat from 3 to 200 images).

    python benchmarks/fit_scaling.py --out bench_out                      # resnet18, mobilenetv2_100, wide_resnet50_2
    python benchmarks/fit_scaling.py --backbones wide_resnet50_2 --counts 3,50,200 --out bench_out
    python benchmarks/fit_scaling.py --quick --out bench_out/quick        # small sizes, a minute
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[7]))
from edgead.fit import PadimFitter
backbone, weights, size, count, batch, folds = (sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                                int(sys.argv[5]), sys.argv[6])
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # ru_maxrss is KiB on Linux; MB
def frames(indices):  # image i is always the same frames: generated from its own seed
    return np.stack([np.random.default_rng(i).integers(0, 256, size=(size, size, 3), dtype=np.uint8) for i in indices])
def batches(indices):
    for first in range(0, len(indices), batch):
        yield frames(indices[first:first + batch])
fitter = PadimFitter(backbone, weights, (size, size), None, 0, batch)
with torch.no_grad():  # warm-up forward (oneDNN kernel selection), not accumulated, not timed
    fitter.embedding(torch.from_numpy(frames(range(min(batch, count)))))
rss_model = peak_mb()
start = time.perf_counter()
for chunk in batches(np.arange(count)):
    fitter.update(chunk)
stream_s = time.perf_counter() - start
rss_stream = peak_mb()
start = time.perf_counter()
calibration = fitter.calibrate_out_of_sample(batches, count, folds) if folds != "0" else None
calibrate_s = time.perf_counter() - start
start = time.perf_counter()
bundle = fitter.bundle()
finalize_s = time.perf_counter() - start
acc, plan = fitter.accumulator, fitter.memory
P, D = acc.num_patches, acc.dim
T = D * (D + 1) // 2
print(json.dumps({"backbone": backbone, "images": count, "dim": D, "patches": P, "size": size,
                  "calibrated": calibration is not None,
                  "loo_groups": -(-count // plan.group_images(count)) if calibration is not None else 0,
                  "stream_seconds": stream_s, "calibrate_seconds": calibrate_s, "finalize_seconds": finalize_s,
                  "fit_seconds": stream_s + calibrate_s + finalize_s, "peak_rss_mb": peak_mb(),
                  "peak_rss_streaming_mb": rss_stream, "rss_after_model_load_mb": rss_model,
                  "accumulator_mb": P * (D + T) * 8 / 1e6, "whitening_mb": P * T * 4 / 1e6,
                  "chunk_mb": plan.chunk_bytes / 1e6, "planned_peak_mb": plan.needed(plan.group_images(count)) / 1e6}))
"""

#: the issue's goal: WideResNet50, D = 550, 256 px, peak RSS <= 7.5 GB from 3 to 200 images
GOAL_MB = {("wide_resnet50_2", 256): 7500.0}


def run_one(args, backbone, count):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-c", CHILD, backbone, args.weights, str(args.size), str(count),
                             str(args.batch), args.folds, str(args.threads)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit("fit of {} images with {} failed:\n{}".format(count, backbone, result.stderr[-2000:]))
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(rows, args):
    header = "{:<18} {:>4} {:>5} {:>6} {:>7} {:>9} {:>11} {:>10} {:>8} {:>12} {:>12} {:>11} {:>8} {:>8}".format(
        "backbone", "D", "P", "images", "groups", "stream s", "calibrate s", "finalize s", "fit s", "peak RSS MB",
        "accum. MB", "whiten. MB", "peak/acc", "goal")
    print("PaDiM fit ({} weights) @ {}x{}, batch {}, folds {} (leave-one-out thresholds unless 0), {} threads".format(
        args.weights, args.size, args.size, args.batch, args.folds, args.threads))
    print(header + "\n" + "-" * len(header))
    for r in rows:
        goal = GOAL_MB.get((r["backbone"], r["size"]))
        verdict = "-" if goal is None else ("<= {:.1f} GB {}".format(goal / 1000, "ok" if r["peak_rss_mb"]
                                                                       <= goal else "MISSED"))
        print("{:<18} {:>4} {:>5} {:>6} {:>7} {:>9.1f} {:>11.1f} {:>10.1f} {:>8.1f} {:>12.0f} {:>12.0f} {:>11.0f} "
              "{:>8.2f} {:>8}".format(r["backbone"], r["dim"], r["patches"], r["images"], r["loo_groups"],
                                      r["stream_seconds"], r["calibrate_seconds"], r["finalize_seconds"],
                                      r["fit_seconds"], r["peak_rss_mb"], r["accumulator_mb"],
                                      r["whitening_mb"], r["peak_rss_mb"] / r["accumulator_mb"], verdict))
    print("peak RSS in MB (10^6 bytes); accumulator = float64 sums P(D+T)8, whitening = float32 P*T*4 (written over "
          "the sums)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--backbones", default="resnet18,mobilenetv2_100,wide_resnet50_2")
    parser.add_argument("--counts", default="3,25,50,100,200")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--folds", default="n", help="n (leave-one-out, the fit's default), K, or 0 (no thresholds)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="resnet18 and mobilenetv2_100, counts 3,16,32 at 128x128")
    args = parser.parse_args()
    if args.quick:
        args.backbones, args.counts, args.size = "resnet18,mobilenetv2_100", "3,16,32", 128
    from tqdm import tqdm

    from _report import pyplot, write_outputs

    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    counts = [int(c) for c in args.counts.split(",")]
    jobs = [(b, c) for b in backbones for c in counts]
    rows = [run_one(args, b, c) for b, c in tqdm(jobs, desc="fits (one fresh process each)")]
    print_table(rows, args)
    summary = {}
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, backbone in enumerate(backbones):
        mine = [r for r in rows if r["backbone"] == backbone]
        x = np.array([r["images"] for r in mine], float)
        peak = np.array([r["peak_rss_mb"] for r in mine])
        growth = float(peak.max() / peak.min())
        summary[backbone] = {"peak_rss_growth": growth, "peak_rss_max_mb": float(peak.max()),
                             "accumulator_mb": mine[0]["accumulator_mb"], "dim": mine[0]["dim"]}
        print("{}: peak RSS {:.0f}..{:.0f} MB over {:.0f}..{:.0f} images (x{:.3f}); accumulator {:.0f} MB".format(
            backbone, peak.min(), peak.max(), x.min(), x.max(), growth, mine[0]["accumulator_mb"]))
        color = "C{}".format(i)
        ax.plot(x, peak, "o-", color=color, label="{} (D = {}) peak RSS".format(backbone, mine[0]["dim"]))
        ax.axhline(mine[0]["accumulator_mb"], color=color, ls=":", lw=1)
        ax2.plot(x, [r["fit_seconds"] for r in mine], "s-", color=color, label=backbone)
    for (backbone, size), goal in GOAL_MB.items():
        if backbone in backbones and size == args.size:
            ax.axhline(goal, color="red", ls="--", lw=1, label="goal {} ({:.1f} GB)".format(backbone, goal / 1000))
    ax.set_xlabel("training images")
    ax.set_ylabel("MB (dotted: float64 accumulator)")
    ax.set_ylim(0, None)
    ax.legend(fontsize=7, loc="center right")
    ax.set_title("peak RSS (fresh process per fit)")
    ax2.set_xlabel("training images")
    ax2.set_ylabel("seconds (stream + thresholds + finalize)")
    ax2.set_ylim(0, None)
    ax2.legend(fontsize=7, loc="upper left")
    ax2.set_title("time")
    fig.suptitle("PaDiM fit, {} weights, {}x{}, folds {}".format(args.weights, args.size, args.size, args.folds))
    write_outputs(args.out, "fit_scaling", rows, {"size": args.size, "weights": args.weights, "batch": args.batch,
                                                  "folds": args.folds, "threads": args.threads, "rows": rows,
                                                  "summary": summary}, fig)


if __name__ == "__main__":
    main()
