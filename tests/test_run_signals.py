"""SIGTERM / SIGHUP / SIGINT stop ``edgead run`` / ``edgead bench`` gracefully (edgead/cli/run_cmd.py).

Real subprocesses (``python -m edgead run``) with the tiny fake ONNX model, so the signal reaches the
process the way systemd (SIGTERM), a closed terminal (SIGHUP) or Ctrl-C (SIGINT) would send it.
"""
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import cv2
import pytest
from click.testing import CliRunner

from edgead.cli import cli
from edgead.cli import run_cmd

from fake_models import write_fake_model

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_fake_model(tmp_path_factory.mktemp("sig_models") / "fake.onnx", batch=1)


def _start(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "edgead"] + args, cwd=str(cwd), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    lines = queue.Queue()

    def pump(stream, tag):
        for raw in iter(stream.readline, b""):
            lines.put((tag, raw.decode("utf-8", "replace").rstrip("\n")))
        lines.put((tag, None))

    threads = [threading.Thread(target=pump, args=(proc.stdout, "out"), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, "err"), daemon=True)]
    for t in threads:
        t.start()
    return proc, lines, threads


def _wait_for(lines, predicate, timeout, seen):
    """Collect (tag, line) into ``seen`` until predicate(tag, line) or timeout; True when it matched."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            tag, line = lines.get(timeout=0.1)
        except queue.Empty:
            continue
        if line is None:
            continue
        seen.append((tag, line))
        if predicate(tag, line):
            return True
    return False


def _finish(proc, lines, threads, seen, timeout=30):
    proc.wait(timeout=timeout)
    for t in threads:
        t.join(5)
    while not lines.empty():
        tag, line = lines.get_nowait()
        if line is not None:
            seen.append((tag, line))
    return [line for tag, line in seen if tag == "out"], [line for tag, line in seen if tag == "err"]


def _video_frames(path):
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened()
    n = 0
    while True:
        ok, img = cap.read()
        if not ok:
            break
        n += 1
    cap.release()
    return n


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_signal_finalises_video_and_report(model, tmp_path, signame, code):
    video, rep = tmp_path / "rec.mp4", tmp_path / "rec.json"
    proc, lines, threads = _start(["run", model, "--source", "synthetic://?fps=30&frames=0", "--save", str(video),
                                   "--report", str(rep), "--threads", "1"], tmp_path)
    seen = []
    try:
        frame_lines = []
        flowing = _wait_for(lines, lambda tag, line: tag == "out" and line.startswith("frame ")
                            and frame_lines.append(line) is None and len(frame_lines) >= 3, 60, seen)
        assert flowing, seen
        proc.send_signal(getattr(signal, signame))
        out, err = _finish(proc, lines, threads, seen)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert "edgead: stopped by {}".format(signame) in err
    printed = [line for line in out if line.startswith("frame ")]
    assert any(line.startswith("infer") for line in out)  # the table was printed
    saved = json.loads(rep.read_text())
    assert saved["interrupted"] is True and saved["signal"] == signame
    assert saved["frames"] == len(printed) >= 3 and saved["error"] is None
    assert video.exists() and _video_frames(video) == len(printed)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p], os.listdir(tmp_path)


def test_sigterm_during_a_silent_stream_open_exits_at_once(model, tmp_path):
    """Opening an RTSP host that never answers (30 s open timeout) must not delay SIGTERM."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []
    threading.Thread(target=lambda: [accepted.append(server.accept()) for _ in range(8)], daemon=True).start()
    rep = tmp_path / "r.json"
    uri = "rtsp://127.0.0.1:{}/x".format(server.getsockname()[1])
    proc, lines, threads = _start(["run", model, "--source", uri, "--open-timeout", "30", "--report", str(rep)],
                                  tmp_path)
    seen = []
    try:
        # the threshold line goes to stderr after the model loaded, right before the source opens
        assert _wait_for(lines, lambda tag, line: tag == "err" and "threshold" in line, 60, seen), seen
        deadline = time.monotonic() + 10
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert accepted, "the source never connected"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = _finish(proc, lines, threads, seen, timeout=20)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        server.close()
    assert proc.returncode == 143, err
    assert elapsed < 3.0
    saved = json.loads(rep.read_text())
    assert saved["frames"] == 0 and saved["interrupted"] is True and saved["signal"] == "SIGTERM"


def test_handlers_installed_only_during_the_command_and_restored(model, tmp_path):
    seen_inside = {}
    original = run_cmd._frame_line

    def spy(result, latency_ms, as_json, *rest):
        seen_inside[result.index] = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
        return original(result, latency_ms, as_json, *rest)

    def custom(signum, frame):  # pragma: no cover - never called
        pass

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGTERM, custom)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup: must stay ignored
    try:
        run_cmd._frame_line = spy
        result = CliRunner().invoke(cli, ["run", model, "--source", "synthetic://?frames=2"])
        assert result.exit_code == 0, result.output
        inside = seen_inside[0]
        assert inside[signal.SIGTERM] not in (custom, signal.SIG_DFL)  # ours while running
        assert inside[signal.SIGHUP] == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is custom and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        run_cmd._frame_line = original
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_bench_sigterm_writes_report(model, tmp_path):
    rep = tmp_path / "b.json"
    proc, lines, threads = _start(["bench", model, "--source", "synthetic://?fps=30&frames=0", "--frames", "100000",
                                   "--warmup", "0", "--report", str(rep)], tmp_path)
    seen = []
    try:
        time.sleep(1.5)  # bench prints nothing per frame: give it time to load the model and time frames
        assert proc.poll() is None, _finish(proc, lines, threads, seen)
        proc.send_signal(signal.SIGTERM)
        out, err = _finish(proc, lines, threads, seen)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    saved = json.loads(rep.read_text())
    assert saved["interrupted"] is True and saved["signal"] == "SIGTERM" and saved["frames"] >= 1
