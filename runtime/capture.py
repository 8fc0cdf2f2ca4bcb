"""Capture thread: reads a Source into a bounded queue, reconnecting live sources with backoff.

Queue semantics (``FrameQueue``):

- live sources (cameras, streams, ``synthetic://?fps=``): ``drop_oldest`` - when the queue is full the
  OLDEST queued frame is discarded (and counted in ``dropped``), so the consumer always gets the
  freshest frames and latency stays bounded;
- finite sources (files, folders, synthetic without fps): never drop - the capture thread blocks
  until the consumer takes a frame.

A live source that raises ``SourceError`` while reading is closed and reopened up to
``reconnect_attempts`` times, waiting ``backoff``, ``2*backoff``, ... (capped at ``backoff_max``)
seconds before each attempt; every attempt is logged. The budget is refilled only by a frame read
successfully, so a device that reopens but never delivers still gives up. When they all fail, or a finite source fails,
the error is kept in ``CaptureThread.error`` and the stream ends. ``stop()`` always returns within
``join_timeout`` seconds; the thread is a daemon so a source stuck in a driver call cannot hang exit.

One unreadable frame (``sources.FrameError``, e.g. a corrupt image in a folder) is skipped with
``on_error="skip"``: counted in ``skipped``, reported through ``warn(message)`` and the stream goes on;
with ``on_error="stop"`` it ends the stream like any other error (frames before it are delivered).
"""
import collections
import logging
import threading
import time

from edgead.errors import SourceError
from edgead.runtime.sources import FrameError

log = logging.getLogger("edgead.runtime.capture")


class QueueClosed(Exception):
    """Raised by ``FrameQueue.put`` after ``close()`` (the consumer went away)."""


class FrameQueue(object):
    """Bounded FIFO between one producer and one consumer.

    maxsize: capacity (>= 1). drop_oldest: True = a put on a full queue evicts the oldest item
    (``dropped`` += 1) and never blocks; False = put blocks until there is room.
    """

    def __init__(self, maxsize=4, drop_oldest=False):
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = int(maxsize)
        self.drop_oldest = bool(drop_oldest)
        self.dropped = 0
        self._items = collections.deque()
        self._cond = threading.Condition()
        self._finished = False
        self._closed = False

    def put(self, item):
        """Add ``item`` (see class doc). Raises QueueClosed after ``close()``."""
        with self._cond:
            while True:
                if self._closed:
                    raise QueueClosed()
                if len(self._items) < self.maxsize:
                    break
                if self.drop_oldest:
                    self._items.popleft()
                    self.dropped += 1
                    break
                self._cond.wait()
            self._items.append(item)
            self._cond.notify_all()

    def get(self, timeout=None):
        """Next item; None when the producer has finished and the queue is drained, or after close().

        timeout: seconds to wait (None = forever); raises TimeoutError when it expires.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self._finished or self._closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("no frame within {:.3f} s".format(timeout))
                self._cond.wait(remaining)
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def get_nowait(self):
        """Next item if one is queued, else None (never blocks)."""
        with self._cond:
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def finish(self):
        """Producer: no more items; ``get`` returns None once drained."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def close(self):
        """Consumer: stop; discard queued items and wake a blocked producer (its put raises QueueClosed)."""
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()

    @property
    def finished(self):
        return self._finished

    def __len__(self):
        with self._cond:
            return len(self._items)


class CaptureThread(object):
    """Reads ``source`` in a background thread into a FrameQueue.

    Args:
        source: an (unopened or opened) ``sources.Source``; ``start()`` opens it in the caller's
            thread so a missing camera fails fast with SourceError.
        queue_size: FrameQueue capacity.
        drop: None = ``source.live``; True = drop oldest; False = block.
        max_frames: stop after this many frames (None = until the end of the stream).
        reconnect_attempts: live sources only; 0 disables reconnecting.
        backoff, backoff_max: seconds before the first retry, cap of the doubling delay.
        sleep: function(seconds) used for the backoff waits (tests inject a fake); default waits on
            the stop event so ``stop()`` interrupts a backoff.
        on_error: ``"stop"`` (default) or ``"skip"``: what an unreadable frame (FrameError) does.
        warn: function(message) told about each skipped frame (default: ``log.warning``).
        wakeup: a ``threading.Event`` set after every queued frame and at the end of the stream (a consumer
            reading several CaptureThreads waits on one shared Event).
        name: label for the thread and log lines (a camera name).
        reconnect_attempts: ``None`` = retry for ever (a service on a production line).
    """

    def __init__(self, source, queue_size=4, drop=None, max_frames=None, reconnect_attempts=5, backoff=0.5,
                 backoff_max=8.0, sleep=None, on_error="stop", warn=None, wakeup=None, name=None):
        if on_error not in ("skip", "stop"):
            raise ValueError("on_error must be 'skip' or 'stop'")
        self.source = source
        self.queue = FrameQueue(queue_size, source.live if drop is None else drop)
        self.max_frames = max_frames
        self.reconnect_attempts = None if reconnect_attempts is None else int(reconnect_attempts)
        self.wakeup = wakeup
        self.name = name
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self._stop = threading.Event()
        if hasattr(source, "cancel"):
            source.cancel = self._stop  # stop() also abandons an open/reopen in progress
        self._sleep = sleep if sleep is not None else self._stop.wait
        self.on_error = on_error
        self._warn = warn if warn is not None else log.warning
        self.skipped = 0
        self._thread = None
        self._opened = False
        self.error = None
        self._failures = 0
        self.captured = 0
        self.reconnects = 0
        #: True while a live source is being reopened (between its failure and the next frame)
        self.reconnecting = False
        #: the most recent backoff waits (seconds), bounded for months-long runs
        self.backoff_waits = collections.deque(maxlen=256)

    @property
    def dropped(self):
        return self.queue.dropped

    def start(self):
        if not self._opened:
            self.source.open()
            self._opened = True
        self._thread = threading.Thread(target=self._run, name="edgead-capture" + (
            "-" + self.name if self.name else ""), daemon=True)
        self._thread.start()
        return self

    def _run(self):
        try:
            while not self._stop.is_set():
                if self.max_frames is not None and self.captured >= self.max_frames:
                    break
                try:
                    frame = self.source.read()
                except SourceError as exc:
                    if isinstance(exc, FrameError) and not self.source.live and self.on_error == "skip" \
                            and not self._stop.is_set():
                        self.skipped += 1
                        self._warn("{}; skipped".format(exc))
                        continue
                    if self.source.live and not self._stop.is_set() and self._reconnect(exc):
                        continue
                    if not self._stop.is_set():
                        self.error = exc
                    break
                if frame is None:
                    break
                self._failures = 0
                self.reconnecting = False
                self.captured += 1
                self.queue.put(frame)
                if self.wakeup is not None:
                    self.wakeup.set()
        except QueueClosed:
            pass
        except Exception as exc:  # never let the thread die silently
            self.error = SourceError("{}: capture failed: {}: {}".format(self.source.uri, type(exc).__name__, exc))
        finally:
            self.reconnecting = False
            self.queue.finish()
            if self.wakeup is not None:
                self.wakeup.set()
            try:
                self.source.close()
            except Exception:  # pragma: no cover - a driver failing at release must not mask the result
                log.exception("%s: error while closing", self.source.uri)

    def _reconnect(self, exc):
        """close + open with exponential backoff; True when the source is back.

        The attempt budget is shared by consecutive failures and only refilled by a frame actually
        read, so a device that reopens fine but never delivers still ends after ``reconnect_attempts``.
        """
        self.reconnecting = True
        while self.reconnect_attempts is None or self._failures < self.reconnect_attempts:
            self._failures += 1
            delay = min(self.backoff * 2.0 ** min(self._failures - 1, 30), self.backoff_max)
            log.warning("%s: %s; reconnect attempt %d/%s in %.2f s", self.source.uri, exc, self._failures,
                        "inf" if self.reconnect_attempts is None else self.reconnect_attempts, delay)
            self.backoff_waits.append(delay)
            self._sleep(delay)
            if self._stop.is_set():
                return False
            try:
                self.source.close()
                self.source.open()
            except SourceError as again:
                exc = again
                continue
            self.reconnects += 1
            log.warning("%s: reopened after attempt %d", self.source.uri, self._failures)
            return True
        log.error("%s: giving up after %d reconnect attempts", self.source.uri, self.reconnect_attempts)
        return False

    def get(self, timeout=None):
        """Next Frame, or None at the end of the stream (check ``error`` then)."""
        return self.queue.get(timeout)

    def get_nowait(self):
        return self.queue.get_nowait()

    def stop(self, join_timeout=5.0):
        """Stop capturing, wake everything, join the thread (bounded). Idempotent."""
        self._stop.set()
        self.queue.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(join_timeout)

    @property
    def alive(self):
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
