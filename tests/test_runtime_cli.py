"""``edgead run`` / ``edgead bench`` end to end with the fake model (edgead/cli/run_cmd.py)."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from edgead.cli import cli

from fake_models import write_fake_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_fake_model(tmp_path_factory.mktemp("cli_models") / "fake.onnx", batch=4)


def _invoke(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_help_has_examples():
    for name in ("run", "bench"):
        result = _invoke([name, "--help"])
        assert result.exit_code == 0
        assert "Example:" in result.output and "edgead {} ".format(name) in result.output


def test_run_json_lines_video_and_report(model, tmp_path):
    video = tmp_path / "out.mp4"
    rep = tmp_path / "run.json"
    result = _invoke(["run", model, "--source", "synthetic://?width=96&height=80&frames=6&defect=3",
                      "--save", str(video), "--report", str(rep), "--json", "--threads", "1"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]  # stderr: the threshold line
    frames, final = lines[:-1], lines[-1]["report"]
    assert [f["frame"] for f in frames] == list(range(6))
    assert [f["anomalous"] for f in frames] == [True, False, False, True, False, False]
    assert len(frames[0]["boxes"]) == 1 and frames[1]["boxes"] == []
    assert final["frames"] == 6 and final["backend"]["backend"] == "onnxruntime"
    assert json.loads(rep.read_text())["frames"] == 6
    cap = cv2.VideoCapture(str(video))
    n = 0
    while True:
        ok, img = cap.read()
        if not ok:
            break
        assert img.shape == (80, 96, 3)
        n += 1
    cap.release()
    assert n == 6
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp.mp4")]


def test_run_images_to_folder_text_output(model, tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    for i, name in enumerate(("x.png", "y.jpg")):
        img = np.full((50, 40, 3), 90, np.uint8)
        if i == 1:
            cv2.circle(img, (20, 25), 10, (255, 255, 255), -1)
        cv2.imwrite(str(src / name), img)
    out = tmp_path / "annotated"
    result = _invoke(["run", model, "--source", str(src), "--save", str(out) + os.sep, "--providers", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == ["x.png", "y.png"]
    assert cv2.imread(str(out / "y.png")).shape == (50, 40, 3)
    lines = result.stdout.splitlines()
    assert "x.png" in lines[0] and " ok " in lines[0]
    assert "y.jpg" in lines[1] and "ANOMALY" in lines[1] and "boxes  1" in lines[1]
    assert any(line.startswith("infer") for line in lines) and "wrote 2 frame(s)" in result.output


def test_run_max_frames(model):
    result = _invoke(["run", model, "--source", "synthetic://?frames=0", "--max-frames", "3", "--json"])
    assert result.exit_code == 0
    assert len(result.stdout.strip().splitlines()) == 4


def test_bench_json_report_and_plot(model, tmp_path):
    rep, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    result = _invoke(["bench", model, "--frames", "20", "--warmup", "2", "--batch", "3", "--report", str(rep),
                      "--plot", str(plot), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    saved = json.loads(rep.read_text())
    assert printed["frames"] == saved["frames"] == 20
    assert printed["batch_size"] == 3 and printed["dropped"] == 0 and printed["fps"] > 0
    for stage in ("capture_wait", "preprocess", "infer", "postprocess", "latency"):
        assert {"p50", "p90", "p99", "max", "mean"} <= set(saved["stages"][stage])
    assert saved["stages"]["infer"]["count"] == 7  # ceil(20 / 3) batches
    assert saved["backend"]["batch"] == 4 and saved["warmup_batches"] == 2
    assert cv2.imread(str(plot)) is not None


def test_bench_table(model):
    result = _invoke(["bench", model, "--frames", "5", "--warmup", "0", "--no-annotate"])
    assert result.exit_code == 0
    assert result.output.splitlines()[0].split()[:3] == ["stage", "(ms)", "n"]
    assert "frames 5  skipped 0  dropped 0" in result.output


@pytest.mark.parametrize("args, message", [
    (["run", "missing.onnx", "--source", "synthetic://"], "missing.onnx: model file not found"),
    (["bench", "missing.onnx"], "missing.onnx: model file not found"),
    (["run", "{model}", "--source", "nowhere/"], "nowhere/: no such file or folder"),
    (["run", "{model}", "--source", "{empty}"], "no images found"),
    (["bench", "{model}", "--providers", "rocm"], "unknown execution provider 'rocm'"),
    (["run", "{model}", "--source", "synthetic://?frames=1", "--show"], "--show needs an OpenCV with GUI"),
    (["run", "{model}", "--source", "synthetic://?frames=1", "--save", "{empty}/x.png"],
     "--save must be a video file"),
])
def test_errors_exit_2_one_line(model, tmp_path, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.format(model=model, empty=empty) for a in args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    err_lines = [line for line in result.output.splitlines() if line.startswith("edgead: error:")]
    assert len(err_lines) == 1 and "Traceback" not in result.output


def test_subprocess_bad_model_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgead", "bench", str(tmp_path / "nope.onnx")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert proc.returncode == 2
    err = proc.stderr.decode().strip().splitlines()
    assert err == ["edgead: error: {}: model file not found".format(tmp_path / "nope.onnx")]


def test_ctrl_c_finishes_video_and_report(model, tmp_path, monkeypatch):
    from edgead.cli import run_cmd

    original = run_cmd._frame_line
    seen = []

    def interrupt_on_third(result, latency_ms, as_json, *rest):
        seen.append(result.index)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return original(result, latency_ms, as_json, *rest)

    monkeypatch.setattr(run_cmd, "_frame_line", interrupt_on_third)
    video, rep = tmp_path / "live.mp4", tmp_path / "live.json"
    result = CliRunner().invoke(cli, ["run", model, "--source", "synthetic://?frames=0&fps=200", "--save", str(video),
                                      "--report", str(rep)])
    assert result.exit_code == 130, result.output
    assert json.loads(rep.read_text())["interrupted"] is True
    cap = cv2.VideoCapture(str(video))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    cap.release()


def _frame_count(path):
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def _folder_with_corrupt_image(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), np.full((64, 64, 3), 90, np.uint8))
    (src / "b.png").write_bytes(b"corrupt")
    cv2.imwrite(str(src / "c.png"), np.full((64, 64, 3), 250, np.uint8))
    return src


def test_corrupt_image_is_skipped_by_default(model, tmp_path):
    src = _folder_with_corrupt_image(tmp_path)
    video, rep = tmp_path / "o.mp4", tmp_path / "o.json"
    result = CliRunner().invoke(cli, ["run", model, "--source", str(src), "--save", str(video), "--report", str(rep)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("edgead: warning:")]
    assert len(warnings) == 1 and "b.png: not a readable image" in warnings[0] and warnings[0].endswith("skipped")
    saved = json.loads(rep.read_text())
    assert (saved["frames"], saved["skipped"], saved["error"]) == (2, 1, None)
    assert "frames 2  skipped 1  dropped 0" in result.stdout
    assert _frame_count(video) == 2
    lines = [line for line in result.stdout.splitlines() if line.startswith("frame ")]
    assert ["a.png" in lines[0], "c.png" in lines[1], "ANOMALY" in lines[1]] == [True, True, True]


def test_on_error_stop_keeps_video_and_report_then_exit_2(model, tmp_path):
    src = _folder_with_corrupt_image(tmp_path)
    video, rep = tmp_path / "o.mp4", tmp_path / "o.json"
    result = CliRunner().invoke(cli, ["run", model, "--source", str(src), "--save", str(video), "--report", str(rep),
                                      "--on-error", "stop"])
    assert result.exit_code == 2
    err = [line for line in result.stderr.splitlines() if line.startswith("edgead: error:")]
    assert len(err) == 1 and err[0].startswith("edgead: error: {}: not a readable image".format(src / "b.png"))
    saved = json.loads(rep.read_text())
    assert saved["frames"] == 1 and "b.png: not a readable image" in saved["error"]
    assert _frame_count(video) == 1  # the partial recording is kept, renamed into place
    assert sorted(os.listdir(tmp_path)) == ["imgs", "o.json", "o.mp4"]


def test_lost_camera_keeps_video_and_report_then_exit_2(model, tmp_path, monkeypatch):
    from edgead.errors import SourceError
    from edgead.runtime import capture, sources

    class DyingCamera(sources.Source):
        live = True
        fps = 25.0

        def read(self):
            if self._index >= 4:
                raise SourceError("fake://cam: stopped delivering frames")
            return self._frame(np.full((64, 64, 3), 90, np.uint8))

    monkeypatch.setattr(sources, "make_source", lambda uri, size=None, **kwargs: DyingCamera(uri))
    monkeypatch.setattr(capture.CaptureThread, "__init__", _no_backoff(capture.CaptureThread.__init__))
    video, rep = tmp_path / "cam.mp4", tmp_path / "cam.json"
    result = CliRunner().invoke(cli, ["run", model, "--source", "fake://cam", "--save", str(video), "--report",
                                      str(rep), "--queue-size", "64"])
    assert result.exit_code == 2 and "fake://cam: stopped delivering frames" in result.output
    saved = json.loads(rep.read_text())
    assert saved["frames"] == 4 and "stopped delivering" in saved["error"]
    cap = cv2.VideoCapture(str(video))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    cap.release()


def _no_backoff(init):
    def wrapped(self, *args, **kwargs):
        kwargs.update(reconnect_attempts=2, sleep=lambda s: None)
        init(self, *args, **kwargs)
    return wrapped
