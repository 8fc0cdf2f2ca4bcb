"""Hostile inputs to ``edgead run`` / ``edgead bench``: output paths (edgead/output_paths.py), strict JSON with
NaN/inf scores, --max-frames / --frames counting processed frames on live sources, --open-timeout."""
import json
import os
import socket
import threading
import time

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from edgead import output_paths
from edgead.cli import cli
from edgead.cli import run_cmd

from fake_models import write_fake_model

MISSING_MODEL = "no_such_model.onnx"  # an output check that passes would fail on this model next


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_fake_model(tmp_path_factory.mktemp("rel_models") / "fake.onnx", batch=1)


def _invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_error(result, *fragments):
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("edgead: error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _png(path, value=90, size=(40, 50)):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    assert cv2.imwrite(str(path), np.full(size + (3,), value, np.uint8))


def _snapshot(folder):
    out = {}
    for root, _, files in os.walk(str(folder)):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, str(folder))] = fh.read()
    return out


# --- --save never overwrites its inputs -------------------------------------------------------------

def test_save_into_the_source_folder_is_refused_before_the_model_loads(tmp_path):
    src = tmp_path / "imgs"
    for name in ("a.png", "b.png"):
        _png(src / name)
    before = _snapshot(src)
    for save in (src, str(src) + os.sep, tmp_path):  # the folder itself, with a slash, a folder containing it
        result = _invoke(["run", MISSING_MODEL, "--source", src, "--save", save])
        _one_error(result, "--save folder contains the source images")
    result = _invoke(["run", MISSING_MODEL, "--source", str(src / "*.png"), "--save", src, "--force"])
    _one_error(result, "--save folder contains the source images")  # --force does not allow this either
    assert _snapshot(src) == before


def test_recursive_glob_mirrors_subfolders_and_keeps_every_frame(model, tmp_path):
    src = tmp_path / "imgs"
    for sub in ("a", "b", "c"):
        _png(src / sub / "x.png", 60)
        _png(src / sub / "y.png", 250)
    out = tmp_path / "out"
    result = _invoke(["run", model, "--source", str(src / "**" / "*.png"), "--save", out, "--json"])
    assert result.exit_code == 0, result.output
    frames = [json.loads(line) for line in result.stdout.splitlines()[:-1]]
    assert [f["name"] for f in frames] == ["a/x.png", "a/y.png", "b/x.png", "b/y.png", "c/x.png", "c/y.png"]
    written = sorted(os.path.relpath(os.path.join(r, f), str(out)) for r, _, fs in os.walk(str(out)) for f in fs)
    assert written == [os.path.join(s, n) for s in "abc" for n in ("x.png", "y.png")]
    # a second run must not silently replace them ...
    again = _invoke(["run", model, "--source", str(src / "**" / "*.png"), "--save", out])
    _one_error(again, os.path.join("a", "x.png"), "exists", "--force")
    # ... unless asked to
    forced = _invoke(["run", model, "--source", str(src / "**" / "*.png"), "--save", out, "--force"])
    assert forced.exit_code == 0, forced.output


def test_same_stem_different_extension_kept_apart(model, tmp_path):
    src = tmp_path / "imgs"
    _png(src / "a.png", 60)
    _png(src / "a.jpg", 250)
    out = tmp_path / "out"
    result = _invoke(["run", model, "--source", src, "--save", out])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(str(out))) == ["a.jpg.png", "a.png"]


def test_save_inside_a_recursive_glob_root_is_refused(tmp_path):
    src = tmp_path / "imgs"
    _png(src / "a" / "x.png")
    result = _invoke(["run", MISSING_MODEL, "--source", str(src / "**" / "*.png"), "--save", src / "overlays"])
    _one_error(result, "recursive source glob")


def test_save_folder_never_overwrites_foreign_files(model, tmp_path):
    out = tmp_path / "out"
    _png(out / "000001.png", 7)
    before = _snapshot(out)
    result = _invoke(["run", MISSING_MODEL, "--source", "synthetic://?frames=3", "--save", out])
    _one_error(result, "000001.png: exists", "--force")
    assert _snapshot(out) == before
    forced = _invoke(["run", model, "--source", "synthetic://?frames=3", "--save", out, "--force"])
    assert forced.exit_code == 0, forced.output
    assert sorted(os.listdir(str(out))) == ["000000.png", "000001.png", "000002.png"]


@pytest.mark.parametrize("save, fragment", [
    ("x.gif", "--save must be a video file"),
    ("x.PNG", "--save must be a video file"),
    ("x.webm", "--save cannot write .webm videos"),
    ("x.flv", "--save cannot write .flv videos"),
])
def test_save_extension_must_be_a_writable_video_or_a_folder(tmp_path, save, fragment):
    result = _invoke(["run", MISSING_MODEL, "--source", "synthetic://?frames=1", "--save", tmp_path / save])
    _one_error(result, fragment)
    assert os.listdir(str(tmp_path)) == []  # no folder named x.gif


def test_save_video_refuses_existing_file_model_and_report(model, tmp_path):
    video = tmp_path / "old.mp4"
    video.write_bytes(b"precious")
    _one_error(_invoke(["run", MISSING_MODEL, "--source", "synthetic://?frames=1", "--save", video]),
               "old.mp4: exists", "--force")
    assert video.read_bytes() == b"precious"
    forced = _invoke(["run", model, "--source", "synthetic://?frames=2", "--save", video, "--force"])
    assert forced.exit_code == 0 and video.read_bytes() != b"precious"
    _one_error(_invoke(["run", model, "--source", "synthetic://?frames=1", "--save", model, "--force"]),
               "--save and the model are the same file")
    same = tmp_path / "both.mp4"
    _one_error(_invoke(["run", MISSING_MODEL, "--source", "synthetic://?frames=1", "--save", same, "--report",
                        same]), "--save and --report are the same file")
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 24))
    writer.write(np.zeros((24, 32, 3), np.uint8))
    writer.release()
    _one_error(_invoke(["run", MISSING_MODEL, "--source", clip, "--save", clip, "--force"]),
               "would overwrite the source")


# --- --report / --plot ----------------------------------------------------------------------------

def test_report_never_replaces_a_foreign_file(model, tmp_path):
    onnx_copy = tmp_path / "big.onnx"
    with open(model, "rb") as fh:
        onnx_copy.write_bytes(fh.read())
    before = onnx_copy.read_bytes()
    _one_error(_invoke(["run", MISSING_MODEL, "--source", "synthetic://?frames=1", "--report", onnx_copy]),
               "big.onnx: exists and is not an edgead report", "--force")
    not_report = tmp_path / "other.json"
    not_report.write_text('{"edgead_version": "0.1.0"}')
    _one_error(_invoke(["run", MISSING_MODEL, "--source", "synthetic://?frames=1", "--report", not_report]),
               "not an edgead report")
    assert onnx_copy.read_bytes() == before
    # a previous report is ours: replaced without --force
    rep = tmp_path / "run.json"
    for _ in range(2):
        result = _invoke(["run", model, "--source", "synthetic://?frames=2", "--report", rep])
        assert result.exit_code == 0, result.output
    assert json.loads(rep.read_text())["frames"] == 2
    forced = _invoke(["run", model, "--source", "synthetic://?frames=1", "--report", not_report, "--force"])
    assert forced.exit_code == 0 and json.loads(not_report.read_text())["frames"] == 1
    _one_error(_invoke(["run", model, "--source", "synthetic://?frames=1", "--report", model, "--force"]),
               "--report and the model are the same file")


@pytest.mark.parametrize("command", ["run", "bench"])
def test_report_and_plot_path_errors(tmp_path, command, monkeypatch):
    base = ["run", MISSING_MODEL, "--source", "synthetic://?frames=1"] if command == "run" else \
        ["bench", MISSING_MODEL, "--frames", "1"]
    _one_error(_invoke(base + ["--report", tmp_path]), "--report is a folder")
    _one_error(_invoke(base + ["--report", tmp_path / "nope" / "r.json"]), "--report folder", "does not exist")
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_error(_invoke(base + ["--report", afile / "r.json"]), "does not exist")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(output_paths.os, "access",
                        lambda p, mode: False if os.path.abspath(p) == str(locked) else real_access(p, mode))
    _one_error(_invoke(base + ["--report", locked / "r.json"]), "cannot write in", "permission denied")
    if command == "bench":
        _one_error(_invoke(base + ["--plot", tmp_path]), "--plot is a folder")
        _one_error(_invoke(base + ["--plot", tmp_path / "nope" / "p.png"]), "--plot folder", "does not exist")
        _one_error(_invoke(base + ["--plot", locked / "p.png"]), "cannot write in")


def test_plot_replaces_only_its_own_png(model, tmp_path):
    photo = tmp_path / "photo.png"
    _png(photo, 33)
    before = photo.read_bytes()
    _one_error(_invoke(["bench", MISSING_MODEL, "--frames", "1", "--plot", photo]), "not an edgead plot", "--force")
    assert photo.read_bytes() == before
    plot = tmp_path / "lat.png"
    for _ in range(2):  # the second run replaces the first run's plot (it carries the edgead mark)
        result = _invoke(["bench", model, "--frames", "3", "--warmup", "0", "--plot", plot])
        assert result.exit_code == 0, result.output
    assert cv2.imread(str(plot)) is not None
    forced = _invoke(["bench", model, "--frames", "3", "--warmup", "0", "--plot", photo, "--force"])
    assert forced.exit_code == 0 and photo.read_bytes() != before


# --- NaN / inf scores: strict JSON, no silent verdict ----------------------------------------------

def _strict_loads(line):
    def bad(token):
        raise ValueError("non-standard JSON constant " + token)

    return json.loads(line, parse_constant=bad)


def test_non_finite_scores_give_strict_json_and_no_verdict(model, tmp_path, monkeypatch):
    real_open = run_cmd._open_engine

    def broken_engine(*args, **kwargs):
        engine = real_open(*args, **kwargs)
        infer = engine.infer
        calls = []

        def infer_with_nan(frames):
            maps, scores = infer(frames)
            calls.append(1)
            if len(calls) == 2:
                maps, scores = maps.copy(), scores.copy()
                maps[:] = np.nan
                scores[:] = np.nan
            elif len(calls) == 3:
                maps, scores = maps.copy(), scores.copy()
                maps[:] = np.inf
                scores[:] = np.inf
            return maps, scores

        engine.infer = infer_with_nan
        return engine

    monkeypatch.setattr(run_cmd, "_open_engine", broken_engine)
    rep = tmp_path / "r.json"
    result = _invoke(["run", model, "--source", "synthetic://?frames=4&defect=1", "--json", "--report", rep, "--save",
                      tmp_path / "o.mp4"])
    assert result.exit_code == 0, result.output
    lines = [_strict_loads(line) for line in result.stdout.splitlines()]
    frames, final = lines[:-1], lines[-1]["report"]
    assert [f["score"] is None for f in frames] == [False, True, True, False]
    assert [f.get("invalid_score", False) for f in frames] == [False, True, True, False]
    assert [f["anomalous"] for f in frames] == [True, None, None, True]
    assert frames[1]["boxes"] == [] and frames[2]["boxes"] == []
    assert final["invalid_scores"] == 2
    assert _strict_loads(rep.read_text())["invalid_scores"] == 2
    warnings = [line for line in result.stderr.splitlines() if "non-finite score" in line]
    assert len(warnings) == 1 and warnings[0].startswith("edgead: warning: frame 1")
    text = _invoke(["run", model, "--source", "synthetic://?frames=3&defect=1"])
    assert "INVALID" in text.stdout.splitlines()[1] and "invalid (NaN/inf) scores 2" in text.stdout


# --- processed frames on live sources ---------------------------------------------------------------

def test_bench_frames_counts_processed_frames_on_a_live_source(model, tmp_path, monkeypatch):
    real_open = run_cmd._open_engine

    def slow_engine(*args, **kwargs):
        engine = real_open(*args, **kwargs)
        infer = engine.infer

        def slow(frames):
            time.sleep(0.01)
            return infer(frames)

        engine.infer = slow
        return engine

    monkeypatch.setattr(run_cmd, "_open_engine", slow_engine)
    rep = tmp_path / "b.json"
    result = _invoke(["bench", model, "--source", "synthetic://?fps=1000&frames=0&width=64&height=64", "--frames",
                      "40", "--warmup", "0", "--queue-size", "1", "--no-annotate", "--report", rep])
    assert result.exit_code == 0, result.output
    saved = json.loads(rep.read_text())
    assert saved["frames"] == 40 and saved["stages"]["latency"]["count"] == 40
    assert saved["dropped"] > 0  # frames were dropped, yet 40 were processed
    run = _invoke(["run", model, "--source", "synthetic://?fps=1000&frames=0&width=64&height=64", "--max-frames",
                   "25", "--queue-size", "1", "--json"])
    assert run.exit_code == 0, run.output
    assert len(run.stdout.splitlines()) == 26 and json.loads(run.stdout.splitlines()[-1])["report"]["frames"] == 25


# --- --open-timeout -----------------------------------------------------------------------------------

def test_open_timeout_on_a_silent_rtsp_server(model):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    conns = []
    threading.Thread(target=lambda: [conns.append(server.accept()) for _ in range(8)], daemon=True).start()
    uri = "rtsp://127.0.0.1:{}/x".format(server.getsockname()[1])
    try:
        t0 = time.monotonic()
        result = _invoke(["run", model, "--source", uri, "--open-timeout", "1"])
        elapsed = time.monotonic() - t0
    finally:
        server.close()
    _one_error(result, uri, "no answer within 1 s (--open-timeout)")
    assert elapsed < 1 + 2.0
