"""Peak memory of ``edgead export`` against the size of the file it writes (issue #14): goal <= 2x.

A WideResNet50 PaDiM bundle at 256 px holds P = 4096 patches x T = D(D+1)/2 = 151525 packed whitening values
(D = 550): 2.48 GB of float32. The export streams them from the bundle's weights file into the .onnx (fp16,
inline, ~1.3 GB) or into its external data file (fp32, ~2.5 GB), so its peak resident memory must stay within
twice the size of what it writes.

The bundle is synthetic (no fit): the backbone with seeded random weights (``edgead.weights.load_backbone``),
the model.json of ``edgead.fit.make_config``, a random mean and a random lower-triangular packed whitening
(positive diagonal) generated block by block, saved with ``PadimBundle.save``. Each export then runs as the CLI
(``python -m edgead export``) in a fresh process; its peak RSS comes from ``os.wait4`` (the kernel's
``ru_maxrss`` of that child, as ``/usr/bin/time -v`` reports it), its wall time from the parent.

    python benchmarks/export_memory.py --out bench_out                  # wide_resnet50_2, 256 px, D = 550
    python benchmarks/export_memory.py --quick --out bench_out/quick    # 128 px: a smoke run (~1 min)
    python benchmarks/export_memory.py --in-memory ...                  # + the in-memory export, for contrast

``--in-memory`` also runs the export without streaming (eager ``load_bundle``, ``build_onnx`` holding every
byte, ``write_model`` without sources) on the same bundle: close to what ``edgead export`` did before
streaming (measured at full size: 8.8 GB for fp16, 8.5 GB for fp32 with external data; the code before the
change peaked at 8.8 GB and 11.0 GB). It needs ~9 GB of memory at full size.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

GOAL = 2.0  # peak RSS / bytes written

MAKE_BUNDLE = r"""
import sys, time
import numpy as np, torch
from edgead import packing
from edgead.bundle import PadimBundle
from edgead.fit import make_config
from edgead.weights import load_backbone
backbone, size, dim, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
dim = None if dim == "default" else int(dim)
extractor, description = load_backbone(backbone, "random", seed=0, input_hw=(size, size))
config = make_config(backbone, description, extractor, (size, size), dim, seed=0)
config["padim"]["n_train"] = 1000
grid_h, grid_w = config["embedding"]["grid"]
P, D = grid_h * grid_w, config["embedding"]["dim"]
T = packing.packed_length(D)
rng = np.random.default_rng(0)
mean = torch.from_numpy(rng.standard_normal((P, D), dtype=np.float32))
whitening = torch.empty((P, T), dtype=torch.float32)  # filled block by block: W = L^-1, lower triangular
diagonal = np.arange(D) * (np.arange(D) + 1) // 2 + np.arange(D)
view = whitening.numpy()
step = max(1, (64 << 20) // (T * 4))
for start in range(0, P, step):
    block = view[start:start + step]
    block[...] = rng.standard_normal(block.shape, dtype=np.float32)
    block *= 0.01
    block[:, diagonal] = rng.uniform(0.5, 2.0, (len(block), D)).astype(np.float32)
state = {k: v.clone() for k, v in extractor.state_dict().items()}
PadimBundle(config, state, mean, whitening).save(folder)
print(P, D, T)
"""

#: the export without streaming: eager load, whole ModelProto in memory, then write_model
IN_MEMORY = r"""
import sys
from edgead.bundle import load_bundle
from edgead.exporters import external_data, onnx_export
folder, out, precision, mode = sys.argv[1:5]
bundle = load_bundle(folder)
model = onnx_export.build_onnx(bundle, "onnx", precision, 1, check=False)
external_data.write_model(model, out, mode, check=True)
"""

LOAD_ONLY = r"""
import sys
import onnx, torch  # what the export imports
from edgead.bundle import load_bundle
from edgead.exporters import onnx_export
with load_bundle(sys.argv[1], lazy_statistics=True) as bundle:
    pass
"""


def run_measured(argv, env=None):
    """Run ``argv``; returns (returncode, peak RSS bytes of that child, wall seconds, stdout, stderr)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, usage.ru_maxrss * 1024, wall, out.read().decode(), err.read().decode()


def files_written(onnx_path):
    """(onnx bytes, data bytes): the .onnx and the external data files next to it that it names."""
    folder = os.path.dirname(onnx_path)
    name = os.path.basename(onnx_path)
    data = [n for n in os.listdir(folder) if n.startswith(name + ".") and n.endswith(".data")]
    return os.path.getsize(onnx_path), sum(os.path.getsize(os.path.join(folder, n)) for n in data)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--size", type=int, default=256, help="input size (px); the patch grid is size/4 squared")
    parser.add_argument("--dim", default="default", help="embedding dimension D (default: the backbone's, 550)")
    parser.add_argument("--plugin", action="store_true", help="also export the plugin flavour (fp16)")
    parser.add_argument("--in-memory", action="store_true",
                        help="also run the export without streaming, for contrast (fp16 and fp32; ~9 GB at full size)")
    parser.add_argument("--workdir", default=None, help="where the bundle and models go (default: a temp folder)")
    parser.add_argument("--quick", action="store_true", help="128 px (P = 1024): a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.size = 128
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _report import pyplot, write_outputs

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONWARNINGS="ignore")
    work = args.workdir or tempfile.mkdtemp(prefix="edgead_export_memory_")
    os.makedirs(work, exist_ok=True)
    try:
        bundle = os.path.join(work, "bundle.edgead")
        start = time.perf_counter()
        rc, _, _, stdout, stderr = run_measured([sys.executable, "-c", MAKE_BUNDLE, args.backbone, str(args.size),
                                                 str(args.dim), bundle], env)
        if rc != 0:
            sys.exit("building the synthetic bundle failed:\n" + stderr[-3000:])
        patches, dim, packed = (int(v) for v in stdout.split()[-3:])
        statistics = patches * packed * 4
        weights_bytes = sum(os.path.getsize(os.path.join(bundle, n)) for n in os.listdir(bundle))
        print("{} @ {}x{}: P = {}, D = {}, T = {}; packed whitening {:.2f} GB float32; bundle {:.2f} GB "
              "(built in {:.0f} s)".format(args.backbone, args.size, args.size, patches, dim, packed, statistics / 1e9,
                                          weights_bytes / 1e9, time.perf_counter() - start))

        # auto goes external above 1.8 GiB (the full-size fp32 model); a --quick model is smaller: force it
        external = "always" if args.quick else "auto"
        cases = [("fp16 inline (default)", ["--precision", "fp16"], "new"),
                 ("fp32 external data", ["--precision", "fp32", "--external-data", external], "new")]
        if args.plugin:
            cases.append(("plugin fp16", ["--precision", "fp16", "--mahalanobis", "plugin"], "new"))
        if args.in_memory:
            cases += [("in-memory fp16", ["fp16", "auto"], "in-memory"),
                      ("in-memory fp32 external", ["fp32", external], "in-memory")]
        rows = []
        rc, load_peak, load_wall, _, stderr = run_measured([sys.executable, "-c", LOAD_ONLY, bundle], env)
        if rc != 0:
            sys.exit("lazy load failed:\n" + stderr[-3000:])
        for label, options, kind in cases:
            folder = os.path.join(work, "case{}".format(len(rows)))
            os.makedirs(folder)
            onnx_path = os.path.join(folder, "model.onnx")
            if kind == "new":
                argv = [sys.executable, "-m", "edgead", "export", bundle, "-o", onnx_path, "--json"] + options
            else:
                argv = [sys.executable, "-c", IN_MEMORY, bundle, onnx_path] + options
            rc, peak, wall, stdout, stderr = run_measured(argv, env)
            if rc != 0:
                sys.exit("{} failed (rc {}):\n{}".format(label, rc, stderr[-3000:]))
            onnx_bytes, data_bytes = files_written(onnx_path)
            written = onnx_bytes + data_bytes
            rows.append({"case": label, "path": kind, "onnx_bytes": onnx_bytes, "data_bytes": data_bytes,
                         "file_bytes": written, "peak_rss_bytes": peak, "ratio": round(peak / written, 3),
                         "goal": GOAL, "meets_goal": peak <= GOAL * written, "wall_s": round(wall, 1),
                         "peak_minus_load_only_bytes": peak - load_peak,
                         "statistics_copies": round((peak - load_peak) / statistics, 2)})
            shutil.rmtree(folder)  # disk: the next case writes its own
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    header = "{:<24} {:>9} {:>9} {:>10} {:>13} {:>11} {:>6} {:>12} {:>8}".format(
        "case", "onnx GB", "data GB", "file GB", "peak RSS GB", "peak/file", "goal", "stats copies", "wall s")
    print("edgead export, one fresh process per case; peak RSS = ru_maxrss of the child (os.wait4); "
          "lazy bundle load alone (imports + backbone + mean): {:.2f} GB in {:.1f} s".format(load_peak / 1e9, load_wall))
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print("{:<24} {:>9.3f} {:>9.3f} {:>10.3f} {:>13.3f} {:>11.2f} {:>6} {:>12.2f} {:>8.1f}".format(
            r["case"], r["onnx_bytes"] / 1e9, r["data_bytes"] / 1e9, r["file_bytes"] / 1e9, r["peak_rss_bytes"] / 1e9,
            r["ratio"], "<= {:.0f}".format(GOAL) if r["path"] == "new" else "-", r["statistics_copies"], r["wall_s"]))
    print("stats copies = (peak RSS - lazy-load-only peak) / float32 statistics bytes: an upper bound on the copies of "
          "the statistics an export holds (it includes the ONNX trace of the backbone)")
    failing = [r["case"] for r in rows if r["path"] == "new" and not r["meets_goal"]]
    print("goal (peak RSS <= {:.0f}x the bytes written): {}{}".format(
        GOAL, "met by every streamed case" if not failing else "MISSED by " + ", ".join(failing),
        " (informational at --quick size: the fixed cost, ~1.2 GB, dominates small files)" if args.quick else ""))

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["file_bytes"] / 1e9 for r in rows], 0.4, label="bytes written (.onnx + data)")
    ax.bar([x + 0.2 for x in xs], [r["peak_rss_bytes"] / 1e9 for r in rows], 0.4, label="peak RSS of the export")
    for x, r in zip(xs, rows):
        ax.plot([x - 0.4, x + 0.4], [GOAL * r["file_bytes"] / 1e9] * 2, "k--", lw=1,
                label="goal: {:.0f}x bytes written".format(GOAL) if x == 0 else None)
        ax.text(x + 0.2, r["peak_rss_bytes"] / 1e9, "{:.2f}x".format(r["ratio"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["case"] for r in rows], fontsize=8)
    ax.set_ylabel("GB")
    ax.set_title("edgead export memory: {} {}x{}, D = {} (P = {})".format(args.backbone, args.size, args.size, dim,
                                                                         patches))
    ax.legend(fontsize=8)
    write_outputs(args.out, "export_memory", rows, {
        "backbone": args.backbone, "size": args.size, "patches": patches, "dim": dim, "packed_length": packed,
        "statistics_bytes": statistics, "bundle_bytes": weights_bytes, "goal_ratio": GOAL,
        "load_only_peak_rss_bytes": load_peak, "rows": rows, "goal_met": not failing}, fig)
    if failing and not args.quick:
        sys.exit(1)


if __name__ == "__main__":
    main()
