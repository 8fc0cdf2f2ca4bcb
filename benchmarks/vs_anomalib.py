"""edgead's exported PaDiM vs anomalib 2.7's exported PaDiM on ONNX Runtime CPU (the issue #3 bar).

Both: ResNet18 (random init, no downloads), layers 1-3, D = 100, 256x256, batch 1, ORT with
``--threads`` intra-op threads. anomalib runs in its own venv (``benchmarks/setup_anomalib_venv.sh``);
``_anomalib_export.py`` fits and exports it there. Both sessions are timed in the same process in
interleaved blocks (the first runs of each block are dropped, so one session's spinning threads
never overlap the other's timed runs). Also: file sizes, parity of our ONNX with our torch model,
and a per-op-type breakdown from ORT profiling.

    python benchmarks/vs_anomalib.py --out bench_out [--anomalib-python .venv-anomalib/bin/python]
"""
import argparse
import collections
import json
import os
import subprocess
import sys
import shutil
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _anomalib_export import synthetic_frames  # noqa: E402
from _report import pyplot, write_outputs  # noqa: E402
from edgead.runtime import ort_ops  # noqa: E402


def _session(path, threads, profile_prefix=None, custom_ops=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if custom_ops:
        options.register_custom_ops_library(custom_ops)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _model_bytes(path):
    """.onnx size plus any external-data files next to it (anomalib stores weights in model.onnx.data)."""
    import onnx

    total = os.path.getsize(path)
    model = onnx.load(path, load_external_data=False)
    folder = os.path.dirname(path)
    seen = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                total += os.path.getsize(os.path.join(folder, entry.value))
    return total


def time_interleaved(sessions, feeds, rounds, block, warm=3):
    """Median / p90 latency (ms) of each session, alternating blocks of ``block`` runs for ``rounds`` rounds."""
    from tqdm import tqdm

    samples = {name: [] for name in sessions}
    names = list(sessions)
    for round_index in tqdm(range(rounds), desc="timing (interleaved rounds)", leave=False):
        order = names[round_index % len(names):] + names[:round_index % len(names)]  # rotate: no fixed position
        for name in order:
            session = sessions[name]
            for i in range(block + warm):
                start = time.perf_counter()
                session.run(None, feeds[name])
                if i >= warm:
                    samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": float(np.median(v)), "p90_ms": float(np.percentile(v, 90)), "runs": len(v)}
            for name, v in samples.items()}


CONV_OPS = ("Conv", "FusedConv", "NchwcConv")


def _stage(op, shapes):
    """Pipeline stage of one profiled kernel, from its op type and input shapes (works for both graphs)."""
    if op in CONV_OPS:
        weight = list(shapes[1].values())[0] if len(shapes) > 1 else []
        return "blur (Conv, kernel >= 9)" if len(weight) == 4 and max(weight[2:]) >= 9 else "backbone Conv"
    if op in ("MatMul", "Gemm", "Einsum"):
        first = list(shapes[0].values())[0] if shapes else []
        if len(first) == 2 or (len(first) == 4 and first[1] == 1):  # edgead's [H, h] / [N, 1, H, w] operators
            return "upsample+blur MatMul"
        return "Mahalanobis MatMul"
    if op == "PadimMahalanobis":
        return "Mahalanobis (edgead CPU op)"
    if op == "Resize":
        return "Resize (embedding + map upsample)"
    return "other ops"


def op_breakdown(path, feed, threads, runs=20, custom_ops=None):
    """Mean ms per run by ONNX op type and by stage (ORT profiling), each sorted descending."""
    with tempfile.TemporaryDirectory() as tmp:
        session = _session(path, threads, os.path.join(tmp, "prof"), custom_ops)
        for _ in range(runs + 3):  # the first 3 are warm-up; their events are dropped below
            session.run(None, feed)
        with open(session.end_profiling()) as handle:
            events = json.load(handle)
    node_events = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(node_events) // (runs + 3)
    node_events = node_events[-per_run * runs:]  # the timed runs only (every run logs the same kernels)
    by_op, by_stage = collections.defaultdict(float), collections.defaultdict(float)
    for event in node_events:
        ms = event["dur"] / runs / 1000.0
        op = event["args"]["op_name"]
        by_op[op] += ms
        by_stage[_stage(op, event["args"].get("input_type_shape", []))] += ms

    def ordered(d):
        return {k: round(v, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}
    return {"by_op": ordered(by_op), "by_stage": ordered(by_stage)}


def export_anomalib(python, folder, n_train, seed, size):
    result = subprocess.run([python, os.path.join(HERE, "_anomalib_export.py"), folder, str(n_train), str(seed), str(size)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit("anomalib export failed (is {} the anomalib venv? run benchmarks/setup_anomalib_venv.sh):\n{}".format(
            python, result.stderr[-2000:]))
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--anomalib-python", default=os.environ.get(
        "EDGEAD_ANOMALIB_PYTHON", os.path.join(os.path.dirname(HERE), ".venv-anomalib", "bin", "python")),
        help="python of the anomalib 2.7 venv (benchmarks/setup_anomalib_venv.sh; env EDGEAD_ANOMALIB_PYTHON)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train", type=int, default=16, help="training frames for both fits")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds (runs per model = rounds x block)")
    parser.add_argument("--block", type=int, default=15, help="timed runs per model per round (after 3 dropped)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder with both .onnx files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ort-ops", action="store_true",
                        help="skip the plugin flavour even when libedgead_ort.so is found")
    parser.add_argument("--quick", action="store_true", help="2 rounds x 5 runs: checks the pipeline, timings not meaningful")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.block = 2, 5

    if not os.path.exists(args.anomalib_python):
        sys.exit("no anomalib venv at {}: run `bash benchmarks/setup_anomalib_venv.sh` (or pass --anomalib-python)".format(
            args.anomalib_python))
    work = tempfile.mkdtemp(prefix="edgead_vs_anomalib_")
    try:
        _run(args, work)
    finally:
        if args.keep:
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, work):
    from edgead.exporters import compare as cmp
    from edgead.exporters.onnx_export import export_onnx
    from edgead.fit import fit_padim

    anomalib = export_anomalib(args.anomalib_python, os.path.join(work, "anomalib"), args.train, args.seed, args.size)
    frames = synthetic_frames(args.train, args.size, args.seed)
    bundle = fit_padim([frames[i:i + 8] for i in range(0, args.train, 8)], backbone="resnet18", weights="random",
                       input_hw=(args.size, args.size), dim=100, seed=args.seed)
    ours, custom_ops = {}, {}
    for precision in ("fp16", "fp32"):
        path = os.path.join(work, "edgead_{}.onnx".format(precision))
        export_onnx(bundle, path, "onnx", precision, 1)
        ours["edgead " + precision] = path
    ops_library = None if args.no_ort_ops else ort_ops.find_ort_ops_library()
    if ops_library:  # the plugin flavour on ONNX Runtime CPU through libedgead_ort.so (make ort-ops)
        path = os.path.join(work, "edgead_plugin_fp16.onnx")
        export_onnx(bundle, path, "plugin", "fp16", 1)
        ours["edgead plugin fp16"] = path
        custom_ops["edgead plugin fp16"] = ops_library
    else:
        print("no {} (build it with `make ort-ops ORT_INCLUDE=...`): timing the standard-op flavour only".format(
            ort_ops.LIBRARY_NAME))

    test = synthetic_frames(4, args.size, args.seed + 1)
    test[0, 100:140, 60:120] = (255, 0, 255)
    sessions = {"anomalib 2.7": _session(anomalib["onnx"], args.threads)}
    feeds = {"anomalib 2.7": {sessions["anomalib 2.7"].get_inputs()[0].name:
                              (test[:1].transpose(0, 3, 1, 2) / 255.0).astype(np.float32)}}
    for name, path in ours.items():
        sessions[name] = _session(path, args.threads, custom_ops=custom_ops.get(name))
        feeds[name] = {"image": test[:1]}
    timing = time_interleaved(sessions, feeds, args.rounds, args.block)

    ref_maps, ref_scores = cmp.torch_outputs(bundle, test)  # torch, fp32 whitening
    same_precision = {"fp16": cmp.torch_outputs(bundle, test, "fp16"), "fp32": (ref_maps, ref_scores)}
    rows = []
    base = timing["anomalib 2.7"]["median_ms"]
    base_bytes = _model_bytes(anomalib["onnx"])
    for name, path in [("anomalib 2.7", anomalib["onnx"])] + list(ours.items()):
        row = {"model": name, "median_ms": round(timing[name]["median_ms"], 3), "p90_ms": round(timing[name]["p90_ms"], 3),
               "latency_ratio": round(timing[name]["median_ms"] / base, 3), "mbytes": round(_model_bytes(path) / 1e6, 1),
               "size_ratio": round(_model_bytes(path) / base_bytes, 3)}
        if name != "anomalib 2.7":
            outs = [sessions[name].run(None, {"image": test[i:i + 1]}) for i in range(len(test))]
            maps = np.concatenate([o[0] for o in outs])
            scores = np.concatenate([o[1] for o in outs])
            row["map_max_rel_vs_torch"] = float(np.abs(maps - ref_maps).max() / np.abs(ref_maps).max())
            row["score_max_rel_vs_torch"] = float(np.abs(scores - ref_scores).max() / np.abs(ref_scores).max())
            sp_maps = same_precision[name.split()[-1]][0]  # torch with the whitening rounded like the export
            row["map_max_rel_vs_torch_same_precision"] = float(np.abs(maps - sp_maps).max() / np.abs(sp_maps).max())
        rows.append(row)
    breakdown = {"anomalib 2.7": op_breakdown(anomalib["onnx"], feeds["anomalib 2.7"], args.threads)}
    for name in ("edgead fp16", "edgead plugin fp16"):
        if name in ours:
            breakdown[name] = op_breakdown(ours[name], feeds[name], args.threads, custom_ops=custom_ops.get(name))

    runs = timing["anomalib 2.7"]["runs"]
    print("PaDiM ResNet18 {0}x{0}, batch 1, ORT {1} CPU, {2} threads, {3} timed runs per model in {4} interleaved "
          "rounds; {5}".format(args.size, _ort_version(), args.threads, runs, args.rounds, _cpu_name()))
    header = "{:<19} {:>10} {:>8} {:>8} {:>9} {:>8} {:>14} {:>14}".format(
        "model", "median ms", "p90 ms", "ratio", "size MB", "size x", "map rel err", "same-W rel err")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print("{:<19} {:>10.2f} {:>8.2f} {:>8.3f} {:>9.1f} {:>8.3f} {:>14} {:>14}".format(
            r["model"], r["median_ms"], r["p90_ms"], r["latency_ratio"], r["mbytes"], r["size_ratio"],
            "%.1e" % r["map_max_rel_vs_torch"] if "map_max_rel_vs_torch" in r else "-",
            "%.1e" % r["map_max_rel_vs_torch_same_precision"] if "map_max_rel_vs_torch" in r else "-"))
    print("map rel err: max |onnx - torch| / max |torch| over {} frames, torch with fp32 whitening; "
          "same-W: torch with the whitening rounded to the export's precision".format(len(test)))
    verdict = {}
    for r in rows[1:]:
        verdict[r["model"]] = {"latency_ratio_le_0.6": r["latency_ratio"] <= 0.6, "size_ratio_le_0.5": r["size_ratio"] <= 0.5,
                               "parity_le_1e-4": r["map_max_rel_vs_torch"] <= 1e-4}
        print("bar, {:<19}: ".format(r["model"]) + ", ".join(
            "{} {}".format(k, "PASS" if v else "FAIL") for k, v in verdict[r["model"]].items()))
    print("\nwhere the time goes (ORT profiling on, 20 runs: wall ms per run of each node kernel, summed by stage / op type):")
    for name, parts in breakdown.items():
        print("  {:<19} by stage: ".format(name) + "  ".join("{} {:.2f}".format(k, v) for k, v in parts["by_stage"].items()))
        print("  {:<19} by op:    ".format("") + "  ".join("{} {:.2f}".format(k, v) for k, v in list(parts["by_op"].items())[:7]))

    payload = {"anomalib_version": anomalib["version"], "threads": args.threads, "size": args.size, "rows": rows,
               "verdict": verdict, "op_breakdown_ms": breakdown, "cpu": _cpu_name(),
               "onnxruntime": _ort_version(), "runs_per_model": runs, "rounds": args.rounds, "train_frames": args.train,
               "anomalib_export": "anomalib.models.Padim(...).to_onnx(root, input_size=(H, W)) (torch.onnx dynamo, opset 14)"}
    write_outputs(args.out, "vs_anomalib", rows, payload, _plot(rows, breakdown))


def _ort_version():
    import onnxruntime

    return onnxruntime.__version__


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _plot(rows, breakdown):
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar([r["model"] for r in rows], [r["median_ms"] for r in rows],
             yerr=[[0] * len(rows), [r["p90_ms"] - r["median_ms"] for r in rows]], color=["#888888", "#1f77b4", "#6baed6", "#2ca02c"][:len(rows)])
    left.set_ylabel("median latency, ms (ORT CPU, batch 1)")
    left.set_title("PaDiM ResNet18 256x256")
    for name, parts in breakdown.items():
        top = list(parts["by_stage"].items())
        right.barh([name + ": " + k for k, _ in top], [v for _, v in top])
    right.set_xlabel("ms per run by stage (ORT profiling)")
    return fig


if __name__ == "__main__":
    main()
