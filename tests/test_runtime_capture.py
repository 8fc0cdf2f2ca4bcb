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
