"""Capture thread and bounded queue (runtime/capture.py): drop-oldest vs never-drop, reconnect, shutdown."""
import threading
import time

import numpy as np
import pytest

from edgead.errors import SourceError
from edgead.runtime.capture import CaptureThread, FrameQueue, QueueClosed
from edgead.runtime.sources import Source

TINY = np.zeros((2, 2, 3), np.uint8)


class CountingSource(Source):
    """Yields ``n`` frames as fast as possible (``live`` configurable)."""

    def __init__(self, n, live):
        Source.__init__(self, "fake://count")
        self.n = n
        self.live = live
        self.opened = 0
        self.closed = 0

    def open(self):
        self.opened += 1

    def read(self):
        if self._index >= self.n:
            if self.live:
                raise SourceError("fake://count: stopped delivering frames")
            return None
        return self._frame(TINY)

    def close(self):
        self.closed += 1


class FlakySource(Source):
    """Live source: delivers ``first`` frames, then read fails; the next ``failed_opens`` reopen attempts fail,
    then it recovers, delivers ``after`` more frames and ends the stream (read returns None)."""

    live = True

    def __init__(self, first=3, failed_opens=2, after=3):
        Source.__init__(self, "fake://flaky")
        self.first, self.failed_opens, self.after = first, failed_opens, after
        self.opens = 0
        self.broken = False
        self.recovered = False

    def open(self):
        self.opens += 1
        if self.broken:
            if self.failed_opens > 0:
                self.failed_opens -= 1
                raise SourceError("fake://flaky: cannot open")
            self.broken = False
            self.recovered = True
            self.first = self._index + self.after

    def read(self):
        if self._index >= self.first:
            if self.recovered:
                return None
            self.broken = True
            raise SourceError("fake://flaky: stopped delivering frames")
        return self._frame(TINY)


def _drain(capture, delay=0.0):
    frames = []
    while True:
        frame = capture.get(timeout=10)
        if frame is None:
            return frames
        frames.append(frame)
        if delay:
            time.sleep(delay)


# --- FrameQueue ----------------------------------------------------------------------------------------

def test_queue_drop_oldest():
    q = FrameQueue(3, drop_oldest=True)
    for i in range(7):
        q.put(i)
    assert len(q) == 3 and q.dropped == 4
    q.finish()
    assert [q.get(), q.get(), q.get(), q.get()] == [4, 5, 6, None]


def test_queue_never_drop_blocks_until_consumed():
    q = FrameQueue(2, drop_oldest=False)
    q.put(0)
    q.put(1)
    done = threading.Event()

    def producer():
        q.put(2)
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    assert not done.wait(0.1)  # blocked: queue full
    assert q.get() == 0
    assert done.wait(2)
    t.join()
    assert [q.get_nowait(), q.get_nowait(), q.get_nowait()] == [1, 2, None]
    assert q.dropped == 0


def test_queue_timeout_and_close_wakes_producer():
    q = FrameQueue(1)
    with pytest.raises(TimeoutError):
        q.get(timeout=0.01)
    q.put("a")
    errors = []

    def producer():
        try:
            q.put("b")
        except QueueClosed:
            errors.append("closed")

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(0.05)
    q.close()
    t.join(2)
    assert not t.is_alive() and errors == ["closed"]
    assert q.get() is None


# --- capture thread semantics -------------------------------------------------------------------------

def test_live_source_drops_oldest_with_slow_consumer():
    source = CountingSource(200, live=False)
    source.live = True  # live, but ends cleanly: read returns None at the end for this test
    source.read = lambda: None if source._index >= 200 else source._frame(TINY)
    capture = CaptureThread(source, queue_size=4, reconnect_attempts=0).start()
    frames = _drain(capture, delay=0.002)
    capture.stop()
    assert capture.queue.drop_oldest
    assert capture.dropped > 0
    assert len(frames) + capture.dropped == 200
    indices = [f.index for f in frames]
    assert indices == sorted(indices) and indices[-1] == 199  # the newest frame always survives


def test_file_source_never_drops_with_slow_consumer():
    source = CountingSource(30, live=False)
    capture = CaptureThread(source, queue_size=2).start()
    frames = _drain(capture, delay=0.002)
    capture.stop()
    assert not capture.queue.drop_oldest
    assert [f.index for f in frames] == list(range(30))
    assert capture.dropped == 0 and capture.error is None
    assert source.opened == 1 and source.closed >= 1


def test_max_frames_stops_capture():
    capture = CaptureThread(CountingSource(100, live=False), queue_size=2, max_frames=5).start()
    assert len(_drain(capture)) == 5
    capture.stop()
    assert not capture.alive


def test_reconnect_with_exponential_backoff(caplog):
    waits = []
    source = FlakySource(first=3, failed_opens=2, after=3)
    capture = CaptureThread(source, queue_size=100, reconnect_attempts=5, backoff=0.5, backoff_max=1.5,
                            sleep=waits.append)
    with caplog.at_level("WARNING", logger="edgead.runtime.capture"):
        capture.start()
        frames = _drain(capture)
        capture.stop()
    # 3 frames, lost; waits 0.5 (open fails), 1.0 (open fails), 1.5 (capped; open ok) -> 3 more frames, end
    assert [f.index for f in frames] == list(range(6))
    assert waits == [0.5, 1.0, 1.5]
    assert capture.reconnects == 1 and capture.error is None
    assert source.opens == 4
    attempts = [r.getMessage() for r in caplog.records if "reconnect attempt" in r.getMessage()]
    assert attempts and "attempt 1/5 in 0.50 s" in attempts[0]


def test_reconnect_gives_up_after_bounded_attempts(caplog):
    waits = []
    source = FlakySource(first=2, failed_opens=100)
    capture = CaptureThread(source, queue_size=10, reconnect_attempts=4, backoff=0.1, backoff_max=0.25,
                            sleep=waits.append)
    with caplog.at_level("WARNING", logger="edgead.runtime.capture"):
        capture.start()
        frames = _drain(capture)
        capture.stop()
    assert len(frames) == 2
    assert waits == [0.1, 0.2, 0.25, 0.25]
    assert isinstance(capture.error, SourceError) and "fake://flaky" in str(capture.error)
    assert any("giving up after 4" in r.getMessage() for r in caplog.records)


def test_no_reconnect_for_files():
    class Broken(CountingSource):
        def read(self):
            raise SourceError("fake://count: corrupt")

    waits = []
    capture = CaptureThread(Broken(5, live=False), sleep=waits.append).start()
    assert _drain(capture) == []
    capture.stop()
    assert waits == [] and "corrupt" in str(capture.error)


def test_stop_interrupts_blocked_producer_and_backoff():
    # producer blocked on a full never-drop queue
    capture = CaptureThread(CountingSource(10 ** 6, live=False), queue_size=1).start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    capture.stop(join_timeout=2)
    assert not capture.alive and time.perf_counter() - t0 < 1.0
    # producer waiting in a long backoff (default sleep waits on the stop event)
    capture = CaptureThread(FlakySource(first=0, failed_opens=100), backoff=30.0).start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    capture.stop(join_timeout=2)
    assert not capture.alive and time.perf_counter() - t0 < 1.0
    assert capture.error is None  # stopping is not an error


def test_unexpected_exception_becomes_source_error():
    class Boom(CountingSource):
        def read(self):
            raise RuntimeError("driver exploded")

    capture = CaptureThread(Boom(1, live=False)).start()
    assert _drain(capture) == []
    capture.stop()
    assert isinstance(capture.error, SourceError) and "driver exploded" in str(capture.error)


def test_reopens_but_never_delivers_gives_up():
    class Zombie(CountingSource):
        def read(self):
            if self._index >= 2:
                raise SourceError("fake://count: no frame")
            return self._frame(TINY)

    waits = []
    source = Zombie(0, live=True)
    capture = CaptureThread(source, reconnect_attempts=3, backoff=0.1, sleep=waits.append).start()
    assert len(_drain(capture)) == 2
    capture.stop()
    assert waits == [0.1, 0.2, 0.4] and source.opened == 4
    assert capture.reconnects == 3 and "no frame" in str(capture.error)


# --- unreadable frames: skip or stop -------------------------------------------------------------------

class BadFileSource(CountingSource):
    """Finite source whose frames listed in ``bad`` are unreadable files (FrameError)."""

    def __init__(self, n, bad, live=False):
        CountingSource.__init__(self, n, live)
        self.bad = set(bad)
        self.pos = 0

    def read(self):
        from edgead.runtime.sources import FrameError

        if self.pos >= self.n:
            return None
        self.pos += 1
        if self.pos - 1 in self.bad:
            raise FrameError("img{}.png: not a readable image".format(self.pos - 1))
        return self._frame(TINY, "img{}.png".format(self.pos - 1))


def test_skip_unreadable_frames_counts_and_warns():
    warnings = []
    capture = CaptureThread(BadFileSource(6, bad=(1, 4)), on_error="skip", warn=warnings.append).start()
    frames = _drain(capture)
    capture.stop()
    assert [f.name for f in frames] == ["img0.png", "img2.png", "img3.png", "img5.png"]
    assert [f.index for f in frames] == [0, 1, 2, 3]
    assert capture.skipped == 2 and capture.error is None
    assert warnings == ["img1.png: not a readable image; skipped", "img4.png: not a readable image; skipped"]


def test_stop_on_unreadable_frame_delivers_what_came_before():
    from edgead.runtime.sources import FrameError

    capture = CaptureThread(BadFileSource(6, bad=(2,)), on_error="stop").start()
    frames = _drain(capture)
    capture.stop()
    assert [f.name for f in frames] == ["img0.png", "img1.png"]
    assert isinstance(capture.error, FrameError) and capture.skipped == 0
    with pytest.raises(ValueError):
        CaptureThread(CountingSource(1, live=False), on_error="ignore")


# --- a real stream: MJPEG over HTTP, dropped and reconnected ---------------------------------------

class _MjpegServer(object):
    """``multipart/x-mixed-replace`` JPEG stream on 127.0.0.1 (port 0). Connection k (1-based) serves
    ``per_connection`` frames whose grey level encodes the global frame number, then drops the connection.
    After ``connections`` connections the server shuts down for good (connection refused)."""

    def __init__(self, per_connection=5, connections=2, interval=0.01):
        import http.server
        import socketserver

        owner = self
        self.per_connection, self.connections, self.interval = per_connection, connections, interval
        self.served = 0
        self.count = 0
        self.gone = threading.Event()
        self.closed = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                import cv2

                owner.count += 1
                last = owner.count >= owner.connections
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    for _ in range(owner.per_connection):
                        value = min(255, 10 * owner.served)
                        ok, buf = cv2.imencode(".jpg", np.full((48, 64, 3), value, np.uint8))
                        data = buf.tobytes()
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                         + str(len(data)).encode() + b"\r\n\r\n" + data + b"\r\n")
                        self.wfile.flush()
                        owner.served += 1
                        time.sleep(owner.interval)
                except OSError:
                    return
                if last:
                    owner.gone.set()  # the test shuts the listening socket before this connection drops
                    owner.closed.wait(5)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:{}/stream.mjpg".format(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()
        self.closer = threading.Thread(target=self._close_when_gone, daemon=True)
        self.closer.start()

    def _close_when_gone(self):
        self.gone.wait(30)
        self.shutdown()

    def shutdown(self):
        if not self.closed.is_set():
            self.server.shutdown()
            self.server.server_close()
            self.closed.set()


def test_mjpeg_over_http_reconnects_then_gives_up():
    """FFmpeg reads the stream; the server drops it after 5 frames (reconnect, backoff), serves 5 more, then
    disappears for good: SourceError after the bounded attempts. Indices continue across the reconnect."""
    from edgead.runtime.sources import make_source

    server = _MjpegServer(per_connection=5, connections=2)
    try:
        source = make_source(server.url, open_timeout=3)
        assert source.live and source.api == "CAP_FFMPEG"
        capture = CaptureThread(source, queue_size=100, reconnect_attempts=3, backoff=0.05, backoff_max=0.2)
        t0 = time.perf_counter()
        capture.start()
        frames = _drain(capture)
        capture.stop()
        elapsed = time.perf_counter() - t0
    finally:
        server.shutdown()
    assert [f.index for f in frames] == list(range(10))
    levels = [int(round(f.image.mean() / 10.0)) for f in frames]  # JPEG is lossy: the grey level, /10
    assert levels == list(range(10))  # no frame lost or repeated across the reconnect
    assert capture.reconnects == 1
    # drop 1: wait 0.05, reopen ok; drop 2: 0.05 (budget refilled by frames), 0.1, 0.2, all refused
    assert list(capture.backoff_waits) == [0.05, 0.05, 0.1, 0.2]
    assert isinstance(capture.error, SourceError) and server.url in str(capture.error)
    assert elapsed < 10
