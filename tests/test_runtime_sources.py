"""Frame sources by URI (runtime/sources.py): parsing, GStreamer strings, image folders, video files, synthetic."""
import os
import time

import cv2
import numpy as np
import pytest

from edgead.errors import SourceError
from edgead.runtime import sources
from edgead.runtime.sources import SourceSpec, make_source, parse_uri

CSI0 = ("nvarguscamerasrc sensor-id=0 ! "
        "video/x-raw(memory:NVMM), width=(int)1280, height=(int)720, framerate=(fraction)30/1, format=(string)NV12 ! "
        "nvvidconv flip-method=0 ! "
        "video/x-raw, width=(int)1280, height=(int)720, format=(string)BGRx ! "
        "videoconvert ! video/x-raw, format=(string)BGR ! "
        "appsink drop=true max-buffers=1 sync=false")


def _write_png(path, value, size=(24, 32)):
    img = np.full(size + (3,), 0, np.uint8)
    img[..., 0] = value  # B channel in the file = R after RGB conversion... checked below
    assert cv2.imwrite(str(path), img)


# --- URI parsing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("uri, kind, location, params", [
    ("csi://0", "csi", 0, {}),
    ("csi://1?width=1920&height=1080&fps=60&flip=2", "csi", 1,
     {"width": "1920", "height": "1080", "fps": "60", "flip": "2"}),
    ("v4l2:///dev/video0", "v4l2", "/dev/video0", {}),
    ("v4l2:///dev/video2?width=640&fps=15", "v4l2", "/dev/video2", {"width": "640", "fps": "15"}),
    ("/dev/video1", "v4l2", "/dev/video1", {}),
    ("0", "v4l2", 0, {}),
    (3, "v4l2", 3, {}),
    ("rtsp://user:pw@10.0.0.2:554/stream1", "network", "rtsp://user:pw@10.0.0.2:554/stream1", {}),
    ("rtsp://cam/live?channel=1&backend=gstreamer&latency=50", "network", "rtsp://cam/live?channel=1",
     {"backend": "gstreamer", "latency": "50"}),
    ("https://host/video.m3u8", "network", "https://host/video.m3u8", {}),
    ("clip.mp4", "video", "clip.mp4", {}),
    ("file://clip.MKV", "video", "clip.MKV", {}),
    ("imgs/*.png", "images", "imgs/*.png", {}),
    ("synthetic://?width=32&frames=5", "synthetic", "", {"width": "32", "frames": "5"}),
    ("synthetic://", "synthetic", "", {}),
])
def test_parse_uri(uri, kind, location, params):
    assert parse_uri(uri) == SourceSpec(kind, location, params)


def test_parse_uri_paths(tmp_path):
    assert parse_uri(str(tmp_path)).kind == "images"
    img = tmp_path / "a.png"
    _write_png(img, 10)
    assert parse_uri(str(img)) == SourceSpec("images", str(img), {})


@pytest.mark.parametrize("uri, message", [
    ("ftp://host/x", "unknown source scheme 'ftp'"),
    ("csi://front", "CSI sensor id must be a number"),
    ("v4l2://camera", "expected a V4L2 device"),
    ("does/not/exist", "does/not/exist: no such file or folder"),
    ("", "empty source URI"),
])
def test_parse_uri_errors(uri, message):
    with pytest.raises(SourceError, match=message):
        parse_uri(uri)


def test_csi_gstreamer_string_exact():
    assert sources.gstreamer_csi_pipeline(0) == CSI0
    source = make_source("csi://0")
    assert source.target == CSI0 and source.api == "CAP_GSTREAMER" and source.live and source.fps == 30.0
    custom = make_source("csi://1?width=1920&height=1080&fps=60&flip=2").target
    assert custom.startswith("nvarguscamerasrc sensor-id=1 ! ")
    assert "width=(int)1920, height=(int)1080, framerate=(fraction)60/1" in custom
    assert "nvvidconv flip-method=2 !" in custom


def test_rtsp_gstreamer_strings():
    assert sources.gstreamer_rtsp_pipeline("rtsp://cam/s", 100) == (
        "rtspsrc location=rtsp://cam/s latency=100 ! decodebin ! videoconvert ! video/x-raw, format=(string)BGR ! "
        "appsink drop=true max-buffers=1 sync=false")
    hw = sources.gstreamer_rtsp_pipeline("rtsp://cam/s", 0, "h265", "nvv4l2decoder")
    assert "rtph265depay ! h265parse ! nvv4l2decoder ! nvvidconv ! video/x-raw, format=(string)BGRx" in hw
    src = make_source("rtsp://cam/s?backend=gstreamer&latency=10")
    assert src.api == "CAP_GSTREAMER" and "latency=10" in src.target and src.live
    src = make_source("rtsp://cam/s")
    assert (src.api, src.target, src.live) == ("CAP_FFMPEG", "rtsp://cam/s", True)
    with pytest.raises(SourceError, match="backend must be ffmpeg or gstreamer"):
        make_source("rtsp://cam/s?backend=vlc")


def test_device_sources_are_live_v4l2():
    for uri, target in (("0", 0), ("/dev/video3", "/dev/video3"), ("v4l2:///dev/video1?width=640", "/dev/video1")):
        src = make_source(uri)
        assert (src.target, src.api, src.live) == (target, "CAP_V4L2", True)
    assert make_source("v4l2:///dev/video1?width=640&height=480").settings == {
        "CAP_PROP_FRAME_WIDTH": 640, "CAP_PROP_FRAME_HEIGHT": 480}


def test_missing_camera_error_names_uri():
    with pytest.raises(SourceError, match="/dev/video97: cannot open"):
        make_source("/dev/video97").open()


def test_csi_without_gstreamer_is_clear(monkeypatch):
    monkeypatch.setattr(sources, "_has_gstreamer", lambda cv2: False)
    with pytest.raises(SourceError, match="csi://0: this OpenCV .* without GStreamer"):
        make_source("csi://0").open()


# --- image folders and globs ---------------------------------------------------------------------

def test_image_folder_sorted_rgb_and_names(tmp_path):
    for i, name in enumerate(["b.png", "a.png", "c.jpg", "10.png", "2.png"]):
        _write_png(tmp_path / name, 10 * (i + 1))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"")
    source = make_source(str(tmp_path))
    assert not source.live
    with source:
        frames = []
        while True:
            frame = source.read()
            if frame is None:
                break
            frames.append(frame)
    assert [f.name for f in frames] == ["10.png", "2.png", "a.png", "b.png", "c.jpg"]
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert all(f.image.dtype == np.uint8 and f.image.shape == (24, 32, 3) for f in frames)
    # written as BGR with the blue channel set -> RGB channel 2
    assert frames[2].image[0, 0, 2] == 20 and frames[2].image[0, 0, 0] == 0
    assert frames[0].timestamp <= frames[-1].timestamp


def test_glob_recursive_and_ordering(tmp_path):
    (tmp_path / "x").mkdir()
    _write_png(tmp_path / "x" / "b.png", 1)
    _write_png(tmp_path / "a.png", 2)
    _write_png(tmp_path / "x" / "c.bmp", 3)
    source = make_source(str(tmp_path / "**" / "*.png"))
    source.open()
    assert [os.path.relpath(p, str(tmp_path)) for p in source.paths] == ["a.png", os.path.join("x", "b.png")]


def test_empty_folder_error_names_path(tmp_path):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(SourceError, match="empty_dir: no images found"):
        make_source(str(empty)).open()
    with pytest.raises(SourceError, match=r"nothing_\*.png: no images found"):
        make_source(str(tmp_path / "nothing_*.png")).open()


def test_corrupt_image_error_names_file(tmp_path):
    _write_png(tmp_path / "a.png", 1)
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    source = make_source(str(tmp_path))
    source.open()
    assert source.read().name == "a.png"
    with pytest.raises(SourceError, match="b.png: not a readable image"):
        source.read()


# --- video files -----------------------------------------------------------------------------------

def test_video_file_roundtrip(tmp_path):
    path = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 24))
    assert writer.isOpened()
    for i in range(5):
        writer.write(np.full((24, 32, 3), (0, 0, 40 * i), np.uint8))  # red ramp in BGR
    writer.release()
    source = make_source(path)
    assert not source.live
    with source:
        frames = [source.read() for _ in range(5)]
        assert source.read() is None
    assert source.fps == pytest.approx(10.0)
    assert [f.index for f in frames] == list(range(5))
    reds = [int(f.image[..., 0].mean()) for f in frames]
    assert reds == sorted(reds) and reds[-1] > 140 and frames[-1].image[..., 2].mean() < 20


def test_missing_video_file(tmp_path):
    with pytest.raises(SourceError, match="gone.mp4: video file not found"):
        make_source(str(tmp_path / "gone.mp4")).open()


# --- synthetic ---------------------------------------------------------------------------------------

def _read_all(source):
    out = []
    with source:
        while True:
            f = source.read()
            if f is None:
                return out
            out.append(f)


def test_iterating_an_open_source():
    source = sources.open_source("synthetic://?width=16&height=8&frames=3")
    frames = list(source)
    assert [f.index for f in frames] == [0, 1, 2] and frames[0].image.shape == (8, 16, 3)
    assert list(source) == []


def test_synthetic_deterministic_and_blob():
    uri = "synthetic://?width=48&height=40&frames=6&defect=2&seed=3"
    a, b = _read_all(make_source(uri)), _read_all(make_source(uri))
    assert len(a) == 6 and [f.index for f in a] == list(range(6))
    for fa, fb in zip(a, b):
        np.testing.assert_array_equal(fa.image, fb.image)
        assert fa.image.shape == (40, 48, 3) and fa.image.dtype == np.uint8
    other = _read_all(make_source("synthetic://?width=48&height=40&frames=6&defect=2&seed=4"))
    assert not np.array_equal(a[0].image, other[0].image)
    source = make_source(uri)
    for f in a:
        blob = source.blob(f.index)
        if f.index % 2:
            assert blob is None and f.image.max() <= 160
        else:
            cx, cy, r = blob
            assert f.image[cy, cx].tolist() == [255, 255, 255]
            assert (f.image == 255).all(axis=2).sum() > 0.5 * np.pi * r * r


def test_synthetic_size_default_and_live_pacing():
    source = make_source("synthetic://?frames=2", size=(30, 20))
    assert (source.height, source.width, source.live) == (30, 20, False)
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        time.sleep(seconds)

    live = sources.SyntheticSource("synthetic://?fps=50", {"fps": "50", "frames": "3"}, sleep=sleep)
    assert live.live and live.fps == 50.0
    frames = _read_all(live)
    assert len(frames) == 3
    assert sleeps and all(0 < s <= 0.02 + 1e-6 for s in sleeps)
    assert frames[2].timestamp - frames[0].timestamp >= 0.035  # paced at 50 fps


def test_synthetic_bad_params():
    with pytest.raises(SourceError, match="unknown synthetic parameter"):
        make_source("synthetic://?colour=red")
    with pytest.raises(SourceError, match="width='abc' must be an integer"):
        make_source("synthetic://?width=abc")
    with pytest.raises(SourceError, match="fps=0 must be > 0"):
        make_source("synthetic://?fps=0")


# --- image names relative to the root, unreadable files --------------------------------------------

def test_image_names_are_relative_to_the_glob_root(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        _write_png(tmp_path / sub / "x.png", 1)
    _write_png(tmp_path / "top.png", 2)
    source = make_source(str(tmp_path / "**" / "*.png"))
    assert source.root == str(tmp_path)
    assert [f.name for f in _read_all(source)] == ["a/x.png", "b/x.png", "top.png"]
    assert [f.name for f in _read_all(make_source(str(tmp_path / "a")))] == ["x.png"]
    assert [f.name for f in _read_all(make_source(str(tmp_path / "*" / "x.png")))] == ["a/x.png", "b/x.png"]
    assert [f.name for f in _read_all(make_source(str(tmp_path / "a" / "x.png")))] == ["x.png"]


@pytest.mark.parametrize("spec, root", [
    ("imgs/**/*.png", "imgs"), ("imgs/*.png", "imgs"), ("*.png", "."), ("data/*/test/*.png", "data"),
    ("/abs/x/**/*.jpg", "/abs/x"), ("/*.png", "/"), ("one/two.png", "one"), ("two.png", "."),
])
def test_image_root(spec, root):
    assert sources.image_root(spec) == root


def test_corrupt_image_is_a_frame_error_and_the_source_goes_on(tmp_path):
    _write_png(tmp_path / "a.png", 1)
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _write_png(tmp_path / "c.png", 3)
    source = make_source(str(tmp_path))
    source.open()
    assert source.read().name == "a.png"
    with pytest.raises(sources.FrameError, match="b.png: not a readable image"):
        source.read()
    frame = source.read()
    assert (frame.name, frame.index) == ("c.png", 1) and source.read() is None


# --- opening streams: timeouts, interruptible ---------------------------------------------------------

def test_ffmpeg_sources_get_open_and_read_timeouts():
    src = make_source("rtsp://cam/s", open_timeout=2.5)
    assert src.open_timeout == 2.5
    assert src._timeout_params(cv2) == [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 2500, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 2500]
    assert make_source("rtsp://cam/s").open_timeout == sources.DEFAULT_OPEN_TIMEOUT
    assert make_source("rtsp://cam/s?backend=gstreamer", open_timeout=3)._timeout_params(cv2) == []
    assert make_source("csi://0", open_timeout=4).open_timeout == 4.0
    assert make_source("/dev/video3", open_timeout=5).open_timeout == 5.0
    assert make_source("rtsp://cam/s", open_timeout=None)._timeout_params(cv2) == []


class _SilentServer(object):
    """TCP server on 127.0.0.1 that accepts connections and never says a word."""

    def __init__(self):
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()
        self.uri = "rtsp://127.0.0.1:{}/x".format(self.sock.getsockname()[1])

    def _accept(self):
        try:
            while True:
                self.conns.append(self.sock.accept())
        except OSError:
            pass

    def close(self):
        self.sock.close()
        for conn, _ in self.conns:
            conn.close()


def test_open_timeout_on_a_server_that_never_answers():
    server = _SilentServer()
    try:
        source = make_source(server.uri, open_timeout=1.0)
        t0 = time.monotonic()
        with pytest.raises(SourceError, match=r"127\.0\.0\.1:\d+/x: no answer within 1 s \(--open-timeout\)"):
            source.open()
        assert time.monotonic() - t0 < 1.0 + 2.0
        assert server.conns  # it really connected and waited
    finally:
        server.close()


def test_open_is_interruptible():
    """A signal in the main thread is handled at once while a stream opens (OpenCV's call blocks in C)."""
    import signal
    import threading

    class Interrupt(Exception):
        pass

    def handler(signum, frame):
        raise Interrupt()

    server = _SilentServer()
    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        source = make_source(server.uri, open_timeout=30)
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
        t0 = time.monotonic()
        timer.start()
        with pytest.raises(Interrupt):
            source.open()
        assert time.monotonic() - t0 < 1.5
        assert source._cap is None
    finally:
        signal.signal(signal.SIGUSR1, previous)
        server.close()


def test_cancel_event_abandons_an_open():
    import threading

    server = _SilentServer()
    try:
        source = make_source(server.uri, open_timeout=30)
        source.cancel = threading.Event()
        threading.Timer(0.2, source.cancel.set).start()
        t0 = time.monotonic()
        with pytest.raises(SourceError, match="open cancelled"):
            source.open()
        assert time.monotonic() - t0 < 1.5
    finally:
        server.close()
