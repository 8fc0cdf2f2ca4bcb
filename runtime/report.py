"""Latency report: percentiles per stage, FPS, drops, backend and device info; JSON, table, histogram PNG.

Report dict (``build_report``), all times in milliseconds::

    {"edgead_version", "created" (UTC ISO 8601), "model", "source", "live",
     "frames", "skipped", "dropped", "reconnects", "invalid_scores", "batch_size", "mean_batch", "wall_s", "fps",
     "anomalies", "cameras": {name: {"source", "frames", "anomalies", "invalid_scores", "dropped", "skipped",
                                     "reconnects", "ended", "error", "fps", "latency": {"count", "p50", ...}}},
     "stages": {stage: {"count", "mean", "p50", "p90", "p99", "max", "min"}},
     "backend": engine.info(), "device": device_info()}

``frames`` = frames processed (results produced); ``skipped`` = unreadable frames skipped
(``--on-error skip``); ``dropped`` = live frames the capture queue discarded. ``fps`` = frames / wall_s
(end to end, including capture and output). Stage statistics are per batch (per frame when batch_size
is 1), except ``latency``, which is per frame (capture -> result).

Timings are summarised in bounded memory (``StageStats``: exact count/sum/min/max, a DDSketch with
0.5 % relative accuracy for the percentiles, the last 4096 raw values for the histogram), so a run
of months costs the same memory as a run of seconds. Reports are strict JSON: NaN/inf become null.
"""
import collections
import datetime
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import struct
import zlib

import numpy as np

from edgead import __version__, atomic

log = logging.getLogger("edgead.runtime.report")

PERCENTILES = (50, 90, 99)
STAGE_ORDER = ("capture_wait", "preprocess", "infer", "postprocess", "output", "latency")
#: DDSketch relative accuracy of the stage percentiles (0.5 %)
RELATIVE_ACCURACY = 0.005
#: raw values kept per stage for the histogram (the most recent ones)
RECENT_VALUES = 4096
#: keys that identify a JSON file as an edgead report (``edgead.output_paths`` lets a run replace one)
REPORT_KEYS = ("edgead_version", "stages")
#: PNG text chunk that marks a histogram as ours (``--plot`` may replace it without ``--force``)
PNG_MARK_KEY = "Software"
PNG_MARK_VALUE = "edgead"


# --- device information -----------------------------------------------------------------------------

def _read_text(path):
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "replace").replace("\x00", "").strip()
    except OSError:
        return None


def cpu_model(cpuinfo="/proc/cpuinfo"):
    """CPU model name from /proc/cpuinfo (x86 ``model name``; ARM ``Hardware``/``Model``/CPU part), else
    ``platform.processor()``; None if unknown."""
    text = _read_text(cpuinfo)
    if text:
        fields = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and value.strip():
                fields.setdefault(key.strip().lower(), value.strip())
        for key in ("model name", "hardware", "model", "cpu model", "processor"):
            value = fields.get(key)
            if value and not value.isdigit():
                return value
        if "cpu part" in fields:
            return "ARM implementer {} part {}".format(fields.get("cpu implementer", "?"), fields["cpu part"])
    return platform.processor() or None


def jetson_model(path="/proc/device-tree/model"):
    """e.g. ``NVIDIA Jetson Orin Nano Developer Kit``; None when not on a Jetson/device-tree board."""
    return _read_text(path) or None


def _run(cmd, timeout=3.0):
    if not shutil.which(cmd[0]):
        return None
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode("utf-8", "replace").strip() if out.returncode == 0 else None


def nvpmodel():
    """Jetson power mode (``nvpmodel -q``, e.g. ``MAXN``) or None."""
    out = _run(["nvpmodel", "-q"])
    if not out:
        return None
    for line in out.splitlines():
        if "Power Mode" in line:
            return line.split(":", 1)[-1].strip()
    return out.splitlines()[0].strip()


def gpu_name():
    """GPU name: ``nvidia-smi`` on discrete GPUs, the board model on Jetson; None if unknown."""
    out = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    if out:
        return out.splitlines()[0].strip()
    return jetson_model()


def device_info():
    """JSON-able dict: cpu, cpu_count, jetson, nvpmodel, machine, system, python, numpy, opencv versions."""
    try:
        import cv2

        opencv = cv2.__version__
    except ImportError:  # pragma: no cover
        opencv = None
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "jetson": jetson_model(),
        "nvpmodel": nvpmodel(),
        "machine": platform.machine(),
        "system": "{} {}".format(platform.system(), platform.release()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": opencv,
    }


# --- statistics -------------------------------------------------------------------------------------

class StageStats(object):
    """Bounded summary of one stage's timings (seconds), whatever the number of values.

    Exact ``count``, ``sum``, ``min``, ``max``; percentiles from a DDSketch (``quantile(q)`` is within
    ``relative_accuracy`` of the exact order statistic at rank ``q * (count - 1)``, bins capped at
    ``bin_limit`` so memory is fixed); ``recent``: the last ``recent_values`` raw values (histograms).
    """

    def __init__(self, relative_accuracy=RELATIVE_ACCURACY, recent_values=RECENT_VALUES, bin_limit=2048):
        from ddsketch import LogCollapsingLowestDenseDDSketch

        self.relative_accuracy = float(relative_accuracy)
        self._sketch = LogCollapsingLowestDenseDDSketch(self.relative_accuracy, bin_limit=bin_limit)
        self.recent = collections.deque(maxlen=int(recent_values))
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, seconds):
        value = float(seconds)
        if not math.isfinite(value):
            return
        value = max(value, 0.0)
        self._sketch.add(value)
        self.recent.append(value)
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value

    def quantile(self, q):
        """Approximate q-quantile (0..1) in seconds, clamped to [min, max]; None when empty."""
        if not self.count:
            return None
        value = self._sketch.get_quantile_value(q)
        return min(max(float(value), self.min), self.max)

    @property
    def mean(self):
        return self.sum / self.count if self.count else None

    def __len__(self):
        return self.count

    def __repr__(self):
        return "StageStats(count={}, mean={})".format(self.count, self.mean)


def _recent(values):
    """Raw values of a StageStats (its recent window) or of a sequence."""
    return values.recent if isinstance(values, StageStats) else values


def stage_stats(seconds):
    """Seconds -> {"count", "mean", "p50", "p90", "p99", "max", "min"} in ms.

    ``seconds``: a ``StageStats`` (exact count/mean/min/max, DDSketch percentiles) or a sequence
    (numpy linear percentiles)."""
    empty = {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None, "min": None}
    if isinstance(seconds, StageStats):
        if not seconds.count:
            return empty
        stats = {"count": seconds.count, "mean": seconds.mean * 1000.0}
        for q in PERCENTILES:
            stats["p{}".format(q)] = seconds.quantile(q / 100.0) * 1000.0
        stats["max"] = seconds.max * 1000.0
        stats["min"] = seconds.min * 1000.0
        return stats
    values = np.asarray(seconds, dtype=np.float64) * 1000.0
    if values.size == 0:
        return empty
    stats = {"count": int(values.size), "mean": float(values.mean())}
    for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES)):
        stats["p{}".format(q)] = float(v)
    stats["max"] = float(values.max())
    stats["min"] = float(values.min())
    return stats


def _ordered(stages):
    known = [s for s in STAGE_ORDER if s in stages]
    return known + sorted(s for s in stages if s not in STAGE_ORDER)


def build_report(stats, backend_info=None, model=None, source=None, live=None, extra=None):
    """Report dict from ``Pipeline.stats()`` (timings in seconds) plus engine/device info."""
    frames = int(stats.get("frames", 0))
    wall = float(stats.get("wall_s", 0.0))
    timings = stats.get("timings", {})
    report = {
        "edgead_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "model": model,
        "source": source,
        "live": live,
        "frames": frames,
        "skipped": int(stats.get("skipped", 0)),
        "dropped": int(stats.get("dropped", 0)),
        "reconnects": int(stats.get("reconnects", 0)),
        "invalid_scores": int(stats.get("invalid_scores", 0)),
        "batch_size": stats.get("batch_size"),
        "mean_batch": stats.get("mean_batch"),
        "wall_s": wall,
        "fps": frames / wall if wall > 0 else None,
        "anomalies": int(stats.get("anomalies", 0)),
        "stages": {name: stage_stats(timings[name]) for name in _ordered(timings)},
        "cameras": camera_reports(stats.get("cameras") or {}, wall),
        "backend": backend_info,
        "device": device_info(),
    }
    if extra:
        report.update(extra)
    return report


def camera_reports(cameras, wall_s):
    """``Pipeline.stats()["cameras"]`` -> {name: {"source", "frames", "anomalies", "invalid_scores", "dropped",
    "skipped", "reconnects", "ended", "error", "fps", "latency": stage_stats (ms)}} (``fps``: frames / the run's
    wall time)."""
    out = collections.OrderedDict()
    for name, cam in cameras.items():
        entry = {key: cam.get(key) for key in ("source", "frames", "anomalies", "invalid_scores", "dropped",
                                              "skipped", "reconnects", "ended", "error")}
        entry["fps"] = cam.get("frames", 0) / wall_s if wall_s > 0 else None
        entry["latency"] = stage_stats(cam.get("latency") or [])
        out[name] = entry
    return out


def jsonable(value):
    """A copy of ``value`` that strict JSON accepts: NaN/inf floats (numpy ones too) -> None, numpy
    scalars/arrays -> Python numbers/lists, tuples -> lists, other objects -> str."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def dumps(value, **kwargs):
    """``json.dumps`` of ``jsonable(value)`` with ``allow_nan=False``: always strict JSON."""
    return json.dumps(jsonable(value), allow_nan=False, **kwargs)


def is_report(data):
    """True when ``data`` (parsed JSON) looks like an edgead report (a dict with ``REPORT_KEYS``)."""
    return isinstance(data, dict) and all(key in data for key in REPORT_KEYS)


def write_json(path, report):
    """Atomically write ``report`` as indented strict JSON (NaN/inf written as null)."""
    atomic.write_text(path, dumps(report, indent=2) + "\n")


def _fmt(value, spec="{:9.2f}"):
    return "{:>9}".format("-") if value is None else spec.format(value)


def format_table(report):
    """Plain-text table: one row per stage (ms), then FPS / frames / drops / backend / device lines."""
    header = "{:<14}{:>7}{:>9}{:>9}{:>9}{:>9}{:>9}".format("stage (ms)", "n", "mean", "p50", "p90", "p99", "max")
    lines = [header, "-" * len(header)]
    for name, s in report["stages"].items():
        lines.append("{:<14}{:>7}{}{}{}{}{}".format(name, s["count"], _fmt(s["mean"]), _fmt(s["p50"]),
                                                     _fmt(s["p90"]), _fmt(s["p99"]), _fmt(s["max"])))
    lines.append("-" * len(header))
    fps = report.get("fps")
    lines.append("frames {}  skipped {}  dropped {}  reconnects {}  batch {}  wall {:.2f} s  FPS {}".format(
        report["frames"], report.get("skipped", 0), report["dropped"], report.get("reconnects", 0),
        report.get("batch_size"), report["wall_s"], "-" if fps is None else "{:.1f}".format(fps)))
    if report.get("invalid_scores"):
        lines.append("invalid (NaN/inf) scores {}".format(report["invalid_scores"]))
    cameras = report.get("cameras") or {}
    if len(cameras) > 1:
        head = "{:<12}{:>8}{:>8}{:>9}{:>9}{:>11}{:>9}{:>9}  {}".format(
            "camera", "frames", "FPS", "dropped", "reconn.", "anomalies", "p50 ms", "p99 ms", "source")
        lines.extend(["", head, "-" * len(head)])
        for name, cam in cameras.items():
            lat = cam.get("latency") or {}
            lines.append("{:<12}{:>8}{:>8}{:>9}{:>9}{:>11}{}{}  {}{}".format(
                name[:12], cam.get("frames", 0), "-" if cam.get("fps") is None else "{:.1f}".format(cam["fps"]),
                cam.get("dropped", 0), cam.get("reconnects", 0), cam.get("anomalies", 0), _fmt(lat.get("p50")),
                _fmt(lat.get("p99")), cam.get("source") or "", "  (ended: {})".format(cam["error"])
                if cam.get("error") else ""))
        lines.append("")
    backend = report.get("backend") or {}
    if backend:
        lines.append("backend {}  providers {}  {}".format(
            backend.get("backend"), ",".join(backend.get("providers", []) or []) or "-",
            " ".join("{} {}".format(k, backend[k]) for k in ("onnxruntime", "tensorrt") if backend.get(k))))
    device = report.get("device") or {}
    parts = [device.get("jetson"), device.get("cpu"), backend.get("gpu")]
    if device.get("nvpmodel"):
        parts.append("nvpmodel " + device["nvpmodel"])
    lines.append("device " + "; ".join(str(p) for p in parts if p) if any(parts) else "device unknown")
    return "\n".join(lines)


# --- histogram ----------------------------------------------------------------------------------------

def plot_histogram(timings, path, title="edgead latency"):
    """Per-stage latency histograms (ms) as one PNG, written atomically.

    ``timings``: stage -> ``StageStats`` (its last ``RECENT_VALUES`` values are plotted) or a sequence
    of seconds. Uses matplotlib (Agg) when installed, else draws with OpenCV. The PNG carries a
    ``Software: edgead`` text chunk (``is_our_png``). Returns the backend used (``"matplotlib"`` /
    ``"opencv"``), or None when there was nothing to plot (warning logged).
    """
    stages = [s for s in _ordered(timings) if len(_recent(timings[s]))]
    if not stages:
        log.warning("%s: no timings to plot", path)
        return None
    data = [np.asarray(list(_recent(timings[s])), np.float64) * 1000.0 for s in stages]
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_opencv(stages, data, path, title)
        return "opencv"
    cols = min(3, len(stages))
    rows = (len(stages) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name, values in zip(axes.ravel(), stages, data):
        ax.hist(values, bins=min(50, max(5, values.size // 4)), color="#3b75af")
        p50, p99 = np.percentile(values, [50, 99])
        ax.axvline(p50, color="k", linestyle="--", linewidth=1, label="p50 {:.2f}".format(p50))
        ax.axvline(p99, color="r", linestyle=":", linewidth=1, label="p99 {:.2f}".format(p99))
        ax.set_title(name)
        ax.set_xlabel("ms")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(stages):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, metadata={PNG_MARK_KEY: PNG_MARK_VALUE})
    finally:
        plt.close(fig)
    return "matplotlib"


def _plot_opencv(stages, data, path, title):
    """Fallback: bar histograms drawn with OpenCV, one row per stage."""
    import cv2

    width, row_h, bins = 640, 140, 40
    canvas = np.full((30 + row_h * len(stages), width, 3), 255, np.uint8)
    cv2.putText(canvas, title, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    for r, (name, values) in enumerate(zip(stages, data)):
        top = 30 + r * row_h
        counts, edges = np.histogram(values, bins=bins)
        bar_w = (width - 20) / float(bins)
        peak = max(1, counts.max())
        for i, c in enumerate(counts):
            h = int((row_h - 40) * c / peak)
            x0 = int(10 + i * bar_w)
            cv2.rectangle(canvas, (x0, top + row_h - 20 - h), (int(x0 + bar_w) - 1, top + row_h - 20),
                          (175, 117, 59), -1)
        label = "{}: {:.2f}..{:.2f} ms, p50 {:.2f}".format(name, edges[0], edges[-1], float(np.median(values)))
        cv2.putText(canvas, label, (10, top + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    ok, encoded = cv2.imencode(".png", canvas)
    atomic.write_bytes(path, mark_png(encoded.tobytes()))


def mark_png(data):
    """PNG bytes with a ``Software: edgead`` tEXt chunk inserted after IHDR."""
    body = PNG_MARK_KEY.encode("latin-1") + b"\x00" + PNG_MARK_VALUE.encode("latin-1")
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    ihdr_end = 8 + 4 + 4 + 13 + 4  # signature, length, type, IHDR data, crc
    return data[:ihdr_end] + chunk + data[ihdr_end:]


def is_our_png(path, limit=1 << 16):
    """True when ``path`` is a PNG whose first ``limit`` bytes hold the ``Software: edgead`` tEXt chunk."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(limit)
    except OSError:
        return False
    mark = b"tEXt" + PNG_MARK_KEY.encode("latin-1") + b"\x00" + PNG_MARK_VALUE.encode("latin-1")
    return head.startswith(b"\x89PNG\r\n\x1a\n") and mark in head
