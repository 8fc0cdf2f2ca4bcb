"""Several cameras on one device: one `edgead run` batching all cameras vs one `edgead run` process per camera.

For 1, 2, 4 and 8 synthetic live cameras (``synthetic://?fps=F``, 640x480, each paced like a real camera),
each configuration runs ``--duration`` seconds through the same exported model on ONNX Runtime CPU:

- ``batched``: one process, ``--source camK=...`` per camera, ``--batch N`` (the batcher takes what is
  queued, 1..N frames per call), ORT intra-op threads = all cores;
- ``per-process``: N processes, one camera each, ``--batch 1``, the cores split between them
  (``max(1, cores // N)`` threads each: what a careful user would set; all cores each oversubscribes).

Each process is stopped with SIGTERM (the graceful stop: its report is written) and its peak RSS read from
``wait4``. Per configuration: total frames/s processed (all cameras), frames/s offered, frames dropped by the
capture queues, per-frame latency capture -> result (p50/p99 over all cameras, ms; includes queueing), mean
frames per inference call, peak RSS (MB, summed over processes). The model is PaDiM with random-init weights
(latency does not depend on them), exported fp16 with a dynamic batch.

    python benchmarks/multicam.py --out bench_out [--backbone efficientnet_lite0 --size 256 --camera-fps 15
                                                   --duration 20 --cameras 1,2,4,8]
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _camera_uri(k, fps, width=640, height=480):
    return "synthetic://?fps={}&frames=0&width={}&height={}&seed={}&defect=7".format(fps, width, height, k)


def _start(model, cameras, batch, threads, report):
    argv = [sys.executable, "-m", "edgead", "run", model, "--batch", str(batch), "--threads", str(threads),
            "--quiet", "--log-every", "0", "--queue-size", "4", "--report", report]
    for name, uri in cameras:
        argv += ["--source", "{}={}".format(name, uri)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS=str(threads)))


def _stop_all(procs, duration):
    """Let ``procs`` run ``duration`` s, SIGTERM them, wait; [(returncode, peak RSS MB, stderr tail)]."""
    time.sleep(duration)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    done = []
    for proc in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode("utf-8", "replace")
        done.append((proc.returncode, usage.ru_maxrss * 1024 / 1e6, err[-2000:]))
    return done


def run_config(model, mode, n_cameras, fps, duration, cores, work):
    """One configuration -> row dict (see module doc)."""
    cams = [("cam{}".format(k), _camera_uri(k, fps)) for k in range(n_cameras)]
    if mode == "batched":
        groups = [(cams, n_cameras, cores)]
    else:
        groups = [([cam], 1, max(1, cores // n_cameras)) for cam in cams]
    reports = [os.path.join(work, "{}_{}_{}.json".format(mode, n_cameras, i)) for i in range(len(groups))]
    procs = [_start(model, group, batch, threads, rep) for (group, batch, threads), rep in zip(groups, reports)]
    results = _stop_all(procs, duration)
    frames = dropped = 0
    wall = []
    p50s, p99s, weights = [], [], []
    batches = []
    for (rc, _, err), rep in zip(results, reports):
        if rc != 128 + signal.SIGTERM or not os.path.exists(rep):
            sys.exit("edgead run ({} {} cameras) failed with rc {}:\n{}".format(mode, n_cameras, rc, err))
        with open(rep) as fh:
            data = json.load(fh)
        frames += data["frames"]
        dropped += data["dropped"]
        wall.append(data["wall_s"])
        batches.append(data["mean_batch"] or 0.0)
        for cam in data["cameras"].values():
            lat = cam["latency"]
            if lat["count"]:
                p50s.append(lat["p50"])
                p99s.append(lat["p99"])
                weights.append(lat["count"])
    seconds = float(np.mean(wall))
    return {"mode": mode, "cameras": n_cameras, "processes": len(groups), "threads_each": groups[0][2],
            "offered_fps": round(fps * n_cameras, 1), "total_fps": round(frames / seconds, 2),
            "dropped": dropped, "drop_pct": round(100.0 * dropped / max(1, dropped + frames), 1),
            # percentiles of the cameras, weighted by their frame counts (the per-camera sketches are in the reports)
            "latency_p50_ms": round(float(np.average(p50s, weights=weights)), 1) if weights else None,
            "latency_p99_ms": round(float(max(p99s)), 1) if p99s else None,
            "mean_batch": round(float(np.mean(batches)), 2),
            "peak_rss_mb": round(sum(r[1] for r in results), 1), "wall_s": round(seconds, 2)}


def _model(backbone, size, work):
    """Fit + export in a child process: this one stays small, so the ``edgead run`` children it forks start small
    (a forked child's peak RSS counts the parent's pages until exec)."""
    path = os.path.join(work, "multicam_{}_{}.onnx".format(backbone, size))
    code = "import sys; sys.path.insert(0, {!r}); import multicam; multicam.make_model({!r}, {}, {!r})".format(
        HERE, backbone, size, path)
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, TQDM_DISABLE="1"))
    return path


def make_model(backbone, size, path):
    """PaDiM with random-init weights on 4 random frames, exported fp16 with a dynamic batch, at ``path``."""
    import warnings

    from edgead.exporters import onnx_export
    from edgead.fit import fit_padim

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(4, size, size, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 4 frames: rank-deficient covariances, irrelevant to latency
        bundle = fit_padim([frames], backbone=backbone, weights="random", input_hw=(size, size))
    onnx_export.export_onnx(bundle, path, "onnx", "fp16", "dynamic")


def verdict(rows):
    """Where batching stops paying: sentences from the rows (ratios within this run)."""
    lines = []
    by = {(r["mode"], r["cameras"]): r for r in rows}
    counts = sorted({r["cameras"] for r in rows})
    for n in counts:
        b, p = by.get(("batched", n)), by.get(("per-process", n))
        if b and p:
            lines.append("{} camera(s): batched {:.1f} fps vs per-process {:.1f} fps ({:.2f}x), p50 latency {} vs {} ms, "
                         "peak RSS {:.0f} vs {:.0f} MB".format(n, b["total_fps"], p["total_fps"],
                                                              b["total_fps"] / max(p["total_fps"], 1e-9),
                                                              b["latency_p50_ms"], p["latency_p50_ms"],
                                                              b["peak_rss_mb"], p["peak_rss_mb"]))
    batched = [by[("batched", n)] for n in counts if ("batched", n) in by]
    for prev, cur in zip(batched, batched[1:]):
        if cur["total_fps"] < prev["total_fps"] * 1.1:
            lines.append("batched throughput stops growing at {} cameras ({:.1f} -> {:.1f} fps): the device is "
                         "saturated there; more cameras only add drops ({}%) and queueing latency".format(
                             cur["cameras"], prev["total_fps"], cur["total_fps"], cur["drop_pct"]))
            break
    else:
        if batched:
            lines.append("batched throughput still grows up to {} cameras".format(batched[-1]["cameras"]))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cameras", default="1,2,4,8")
    parser.add_argument("--camera-fps", type=float, default=15.0, help="frames/s each synthetic camera delivers")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per configuration")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="ORT threads to share")
    parser.add_argument("--quick", action="store_true", help="mobilenet_v1_050 at 128, 1 and 2 cameras, 5 s each")
    args = parser.parse_args()
    counts = [int(c) for c in args.cameras.split(",")]
    if args.quick:
        args.backbone, args.size, counts, args.duration = "mobilenet_v1_050", 128, [1, 2], 5.0

    sys.path.insert(0, HERE)
    from tqdm import tqdm

    from _report import cpu_name, pyplot, write_outputs

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgead_multicam_") as work:
        model = _model(args.backbone, args.size, work)
        jobs = [(mode, n) for n in counts for mode in ("batched", "per-process")]
        for mode, n in tqdm(jobs, desc="configurations"):
            rows.append(run_config(model, mode, n, args.camera_fps, args.duration, args.cores, work))
    import onnxruntime

    head = ("ORT {} CPU ({}), {} cores; PaDiM {} {}px fp16 (random init), cameras {:g} fps 640x480 each, "
            "{:g} s per configuration").format(onnxruntime.__version__, cpu_name(), args.cores, args.backbone,
                                               args.size, args.camera_fps, args.duration)
    header = "{:<12}{:>8}{:>7}{:>9}{:>11}{:>10}{:>9}{:>11}{:>11}{:>8}{:>10}".format(
        "mode", "cameras", "procs", "thr/proc", "offered/s", "total/s", "drop %", "p50 ms", "p99 ms", "batch",
        "RSS MB")
    print(head)
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print("{:<12}{:>8}{:>7}{:>9}{:>11.1f}{:>10.2f}{:>9.1f}{:>11}{:>11}{:>8.2f}{:>10.1f}".format(
            r["mode"], r["cameras"], r["processes"], r["threads_each"], r["offered_fps"], r["total_fps"],
            r["drop_pct"], r["latency_p50_ms"], r["latency_p99_ms"], r["mean_batch"], r["peak_rss_mb"]))
    notes = verdict(rows)
    for line in notes:
        print(line)
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("batched", "o-"), ("per-process", "s--")):
        pts = [r for r in rows if r["mode"] == mode]
        ax1.plot([r["cameras"] for r in pts], [r["total_fps"] for r in pts], style, label=mode)
        ax2.plot([r["cameras"] for r in pts], [r["latency_p50_ms"] for r in pts], style, label=mode + " p50")
        ax2.plot([r["cameras"] for r in pts], [r["latency_p99_ms"] for r in pts], style, alpha=0.4,
                 label=mode + " p99")
    ax1.plot(counts, [args.camera_fps * n for n in counts], ":", color="grey", label="offered")
    ax1.set_xlabel("cameras")
    ax1.set_ylabel("frames/s processed (all cameras)")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("cameras")
    ax2.set_ylabel("latency capture -> result, ms")
    ax2.set_yscale("log")
    ax2.legend(fontsize=7)
    fig.suptitle(head, fontsize=7)
    write_outputs(args.out, "multicam", rows, {"setup": head, "rows": rows, "verdict": notes}, fig)


if __name__ == "__main__":
    main()
