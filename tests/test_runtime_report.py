"""Latency report (runtime/report.py): percentiles, FPS, JSON, table, histogram (matplotlib and OpenCV)."""
import json
import sys

import cv2
import numpy as np
import pytest

from edgead.runtime import report


def _stats(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "frames": 120, "dropped": 7, "reconnects": 1, "wall_s": 2.0, "batch_size": 1, "mean_batch": 1.0,
        "timings": {"infer": list(rng.gamma(2.0, 0.004, 120)), "capture_wait": list(rng.random(120) * 1e-3),
                    "zzz_custom": [0.001, 0.002], "preprocess": []},
    }


def test_stage_stats_match_numpy():
    values = np.random.default_rng(1).gamma(2.0, 0.01, 1000)
    s = report.stage_stats(values)
    ms = values * 1000.0
    for q in (50, 90, 99):
        assert s["p{}".format(q)] == pytest.approx(np.percentile(ms, q), rel=1e-12)
    assert s["max"] == pytest.approx(ms.max()) and s["min"] == pytest.approx(ms.min())
    assert s["mean"] == pytest.approx(ms.mean()) and s["count"] == 1000
    assert report.stage_stats([])["p50"] is None


def test_build_report_fields_and_order():
    r = report.build_report(_stats(), {"backend": "onnxruntime", "providers": ["CPUExecutionProvider"]},
                            model="m.onnx", source="synthetic://", live=False, extra={"note": "x"})
    assert r["fps"] == pytest.approx(60.0)
    assert (r["frames"], r["dropped"], r["reconnects"], r["note"]) == (120, 7, 1, "x")
    assert list(r["stages"]) == ["capture_wait", "preprocess", "infer", "zzz_custom"]
    assert r["stages"]["infer"]["p99"] == pytest.approx(np.percentile(np.array(_stats()["timings"]["infer"]) * 1e3,
                                                                      99))
    assert r["stages"]["preprocess"]["count"] == 0
    for key in ("cpu", "cpu_count", "jetson", "nvpmodel", "python", "opencv"):
        assert key in r["device"]
    json.dumps(r)
    zero = report.build_report(dict(_stats(), wall_s=0.0))
    assert zero["fps"] is None


def test_write_json_and_table(tmp_path):
    r = report.build_report(_stats(), {"backend": "onnxruntime", "providers": ["CPUExecutionProvider"],
                                       "onnxruntime": "1.2.3"})
    path = tmp_path / "sub" / "r.json"
    report.write_json(path, r)
    assert json.loads(path.read_text())["stages"]["infer"]["count"] == 120
    table = report.format_table(r)
    lines = table.splitlines()
    assert lines[0].split() == ["stage", "(ms)", "n", "mean", "p50", "p90", "p99", "max"]
    infer = next(line for line in lines if line.startswith("infer"))
    assert "{:.2f}".format(r["stages"]["infer"]["p90"]) in infer
    assert "dropped 7" in table and "FPS 60.0" in table and "onnxruntime 1.2.3" in table


def test_cpu_and_jetson_model_parsing(tmp_path):
    x86 = tmp_path / "cpuinfo_x86"
    x86.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6230\n")
    assert report.cpu_model(str(x86)) == "Intel(R) Xeon(R) Gold 6230"
    arm = tmp_path / "cpuinfo_arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 62.50\nCPU implementer\t: 0x41\nCPU part\t: 0xd42\n")
    assert report.cpu_model(str(arm)) == "ARM implementer 0x41 part 0xd42"
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    assert report.jetson_model(str(model)) == "NVIDIA Jetson Orin Nano Developer Kit"
    assert report.jetson_model(str(tmp_path / "absent")) is None


def test_histogram_png_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "h.png"
    assert report.plot_histogram(_stats()["timings"], str(path)) == "matplotlib"
    img = cv2.imread(str(path))
    assert img is not None and img.shape[0] > 100 and img.std() > 5


def test_histogram_png_opencv_fallback(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = tmp_path / "h.png"
    assert report.plot_histogram(_stats()["timings"], str(path)) == "opencv"
    img = cv2.imread(str(path))
    assert img is not None and img.shape[1] == 640 and img.std() > 5


def test_histogram_nothing_to_plot(tmp_path, caplog):
    path = tmp_path / "h.png"
    assert report.plot_histogram({"infer": []}, str(path)) is None
    assert not path.exists() and "no timings" in caplog.text


# --- bounded stage statistics -----------------------------------------------------------------------

@pytest.mark.parametrize("dist", ["gamma", "lognormal", "bimodal"])
def test_stage_stats_sketch_within_relative_accuracy_of_numpy(dist):
    rng = np.random.default_rng(3)
    if dist == "gamma":
        values = rng.gamma(2.0, 0.004, 50000)
    elif dist == "lognormal":
        values = rng.lognormal(-5.0, 1.0, 50000)
    else:
        values = np.concatenate([rng.normal(0.002, 1e-4, 30000), rng.normal(0.040, 2e-3, 20000)]).clip(1e-6)
    s = report.StageStats()
    for v in values:
        s.add(v)
    got = report.stage_stats(s)
    exact = report.stage_stats(values)  # the list path: numpy linear percentiles
    alpha = report.RELATIVE_ACCURACY
    ms = np.sort(values) * 1000.0
    for q in (50, 90, 99):
        key = "p{}".format(q)
        # DDSketch: within alpha of the order statistic at rank q*(n-1); numpy interpolates next to it
        lower = np.percentile(ms, q, method="lower")
        higher = np.percentile(ms, q, method="higher")
        assert lower * (1 - alpha) <= got[key] <= higher * (1 + alpha)
        assert got[key] == pytest.approx(exact[key], rel=alpha + 1e-3)
    assert got["count"] == exact["count"] == 50000
    assert got["mean"] == pytest.approx(exact["mean"], rel=1e-9)
    assert got["min"] == exact["min"] and got["max"] == exact["max"]


def test_stage_stats_memory_is_bounded():
    s = report.StageStats()
    rng = np.random.default_rng(4)
    values = rng.gamma(2.0, 0.004, 200000)
    for v in values:
        s.add(v)
    s.add(float("nan"))  # ignored
    assert s.count == 200000 and len(s) == 200000 and len(s.recent) == report.RECENT_VALUES
    assert list(s.recent) == list(values[-report.RECENT_VALUES:])
    assert len(s._sketch._store.bins) <= 2048
    assert s.sum == pytest.approx(values.sum()) and s.max == values.max()
    empty = report.stage_stats(report.StageStats())
    assert empty["count"] == 0 and empty["p50"] is None


def test_report_from_stage_stats_table_and_histogram(tmp_path):
    stats = _stats()
    timings = {}
    for name, seconds in stats["timings"].items():
        timings[name] = report.StageStats()
        for v in seconds:
            timings[name].add(v)
    r = report.build_report(dict(stats, timings=timings, skipped=3, invalid_scores=2))
    assert r["stages"]["infer"]["count"] == 120 and r["stages"]["preprocess"]["count"] == 0
    assert (r["skipped"], r["invalid_scores"]) == (3, 2)
    table = report.format_table(r)
    assert "frames 120  skipped 3  dropped 7  reconnects 1" in table and "invalid (NaN/inf) scores 2" in table
    path = tmp_path / "h.png"
    assert report.plot_histogram(timings, str(path)) in ("matplotlib", "opencv")
    assert cv2.imread(str(path)) is not None


def test_reports_are_strict_json(tmp_path):
    r = report.build_report(dict(_stats(), wall_s=1.0))
    r["odd"] = {"nan": float("nan"), "inf": np.float32("inf"), "arr": np.array([1.0, np.nan]), "n": np.int64(3)}
    path = tmp_path / "r.json"
    report.write_json(path, r)

    def bad(token):
        raise ValueError(token)

    loaded = json.loads(path.read_text(), parse_constant=bad)
    assert loaded["odd"] == {"nan": None, "inf": None, "arr": [1.0, None], "n": 3}
    assert json.loads(report.dumps({"x": float("-inf")}), parse_constant=bad) == {"x": None}
    assert report.is_report(loaded) and not report.is_report({"edgead_version": "1"}) and not report.is_report([1])


@pytest.mark.parametrize("backend", ["matplotlib", "opencv"])
def test_histogram_png_is_marked_as_ours(tmp_path, monkeypatch, backend):
    if backend == "opencv":
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    else:
        pytest.importorskip("matplotlib")
    path = tmp_path / "h.png"
    assert report.plot_histogram(_stats()["timings"], str(path)) == backend
    assert report.is_our_png(str(path)) and cv2.imread(str(path)) is not None
    foreign = tmp_path / "f.png"
    cv2.imwrite(str(foreign), np.zeros((8, 8, 3), np.uint8))
    assert not report.is_our_png(str(foreign)) and not report.is_our_png(str(tmp_path / "absent.png"))
