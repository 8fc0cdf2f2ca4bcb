"""ONNX Runtime CPU latency and file size across backbones x input sizes x Mahalanobis flavour.

Sizes 224/192/160/128 are the MobileNet resolution multiplier; 256 is the PaDiM default. Bundles are
fitted on a few generated frames with random weights (statistics do not change latency). The plugin
flavour runs on CPU through edgead's ONNX Runtime op (``libedgead_ort.so``, ``make ort-ops``) when it is
found, else with its node swapped for standard ops (``plugin_substitute``); the row says which.

    python benchmarks/latency_table.py --out bench_out [--backbones ...] [--sizes 256,224,192,160,128]
"""
import argparse
import glob
import os
import tempfile
import time

import numpy as np

BACKBONES = ["resnet18", "mobilenet_v1_025", "mobilenet_v1_050", "mobilenet_v1_100", "mobilenetv2_100",
             "mobilenetv3_large_100", "efficientnet_lite0"]


def median_latency(path, frame, threads, runs, warmup=5, custom_ops=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if custom_ops:
        options.register_custom_ops_library(custom_ops)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    start = time.perf_counter()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - start
    for _ in range(warmup):
        session.run(None, {"image": frame})
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"image": frame})
        samples.append((time.perf_counter() - start) * 1e3)
    del session
    return float(np.median(samples)), float(np.percentile(samples, 90)), load_s


def ort_version():
    import onnxruntime

    return onnxruntime.__version__


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--sizes", default="256,224,192,160,128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model (after 5 warm-ups)")
    parser.add_argument("--precisions", default="fp16,fp32", help="whitening storage precisions to export and time")
    parser.add_argument("--include-wrn", action="store_true", help="add wide_resnet50_2 (slow)")
    parser.add_argument("--quick", action="store_true", help="2 backbones x 2 sizes, 10 runs (timings too short to trust)")
    args = parser.parse_args()
    backbones = args.backbones.split(",") + (["wide_resnet50_2"] if args.include_wrn else [])
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        backbones, sizes, args.runs = ["resnet18", "mobilenet_v1_050"], [160, 128], 10

    import onnx
    from tqdm import tqdm

    from _report import pyplot, write_outputs
    from edgead.exporters import external_data, onnx_export, plugin_substitute
    from edgead.fit import fit_padim

    from edgead.runtime import ort_ops

    ops_library = ort_ops.find_ort_ops_library()
    precisions = args.precisions.split(",")
    rng = np.random.default_rng(0)
    rows = []
    jobs = [(b, s) for b in backbones for s in sizes]
    with tempfile.TemporaryDirectory(prefix="edgead_latency_") as tmp:
        for backbone, size in tqdm(jobs, desc="backbone x size"):
            frames = rng.integers(0, 256, size=(4, size, size, 3), dtype=np.uint8)
            bundle = fit_padim([frames], backbone=backbone, weights="random", input_hw=(size, size))
            for flavour in ("onnx", "plugin"):
                for precision in precisions:
                    path = os.path.join(tmp, "{}_{}_{}_{}.onnx".format(backbone, size, flavour, precision))
                    onnx_export.export_onnx(bundle, path, flavour, precision, 1)  # > 1.8 GiB: + a data file
                    file_mb = sum(os.path.getsize(f) for f in glob.glob(path + "*")) / 1e6
                    run_path, label = path, flavour
                    if flavour == "plugin" and ops_library:
                        label = "plugin (edgead CPU op)"
                    elif flavour == "plugin":  # no custom-op library: time its standard-op substitute
                        run_path, label = path + ".cpu.onnx", "plugin (CPU substitute)"
                        substitute = plugin_substitute.substitute_plugin(onnx.load(path))  # data loaded back in
                        external_data.write_model(substitute, run_path, check=False)
                    median, p90, load_s = median_latency(run_path, frames[:1], args.threads, args.runs,
                                                         custom_ops=ops_library if flavour == "plugin" else None)
                    rows.append({"backbone": backbone, "size": size, "flavour": label,
                                 "precision": precision, "dim": bundle.config["embedding"]["dim"],
                                 "file_mb": round(file_mb, 2), "load_s": round(load_s, 3),
                                 "median_ms": round(median, 2), "p90_ms": round(p90, 2), "runs": args.runs})
                    for written in glob.glob(path + "*"):  # the model, its substitute and their data files
                        os.remove(written)
    header = "{:<22} {:>5} {:<24} {:<5} {:>8} {:>7} {:>10} {:>8}".format(
        "backbone", "size", "flavour", "W", "file MB", "load s", "median ms", "p90 ms")
    print("ORT {} CPU, batch 1, {} intra-op threads, sequential, median/p90 of {} runs after 5 warm-ups; "
          "random-init weights (latency does not depend on them)".format(ort_version(), args.threads, args.runs))
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print("{:<22} {:>5} {:<24} {:<5} {:>8.1f} {:>7.2f} {:>10.2f} {:>8.2f}".format(
            r["backbone"], r["size"], r["flavour"], r["precision"], r["file_mb"], r["load_s"], r["median_ms"], r["p90_ms"]))
    print("plugin rows: 'edgead CPU op' = the PadimMahalanobis node run by libedgead_ort.so; 'CPU substitute' = "
          "the node replaced by standard ops (no library found), timing the graph around it, not the plugin.")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ref = precisions[0]
    for backbone in backbones:
        pts = sorted((r["size"], r["median_ms"]) for r in rows
                     if r["backbone"] == backbone and r["flavour"] == "onnx" and r["precision"] == ref)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=backbone)
    ax.set_xlabel("input size (px)")
    ax.set_ylabel("median latency, ms (ORT CPU, {} threads, batch 1)".format(args.threads))
    ax.set_title("edgead PaDiM export, onnx flavour, {} whitening".format(ref))
    ax.legend(fontsize=8)
    write_outputs(args.out, "latency_table", rows, {"threads": args.threads, "runs": args.runs, "onnxruntime": ort_version(),
                                                     "rows": rows}, fig)


if __name__ == "__main__":
    main()
