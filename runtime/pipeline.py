"""capture -> preprocess -> engine.infer -> postprocess, with per-stage timings, for one or several cameras.

``Pipeline(engine, source).run()`` yields one ``Result`` per frame. ``source`` may be a list: one
capture thread (and bounded queue) per camera, frames from all cameras batched into one ``infer`` call,
each result routed back with its ``camera`` name, and per-camera frames/anomalies/drops/reconnects and
latency in ``stats()["cameras"]``.

Batching across cameras (``batch_size`` frames at most per call): the batcher sweeps the camera queues
round-robin, one frame per camera per sweep, starting one camera later at every sweep, so no camera
starves when there are more cameras than batch slots. Live sources take what is queued now (1 ..
batch_size frames: never wait to fill a batch); finite sources fill every batch. A camera whose stream
ends (end of file, or a live camera whose reconnects all failed) leaves the others running; the run
ends when every stream ended, and then raises the first camera's error, if any.

 Stages are timed per batch with
``time.perf_counter`` (seconds, summarised in ``Pipeline.timings``: stage -> ``report.StageStats``,
bounded memory - exact count/sum/min/max, DDSketch percentiles, the last 4096 raw values):

- ``capture_wait``: time blocked waiting for the batch's frames from the capture queue;
- ``preprocess``: resize to the model's ``H x W`` (metadata ``input.resize``) and stack ``[N, H, W, 3]``;
- ``infer``: ``engine.infer``;
- ``postprocess``: per frame verdict, ``anomaly_boxes`` and (when annotating) ``annotate``;
- ``latency`` (per frame): capture timestamp -> result ready, including queueing.

Callers may add their own stages (e.g. ``output``) with ``Pipeline.record``.

``max_frames`` counts frames *processed* (results yielded), not captured: a live source keeps being
captured (dropping the oldest) until that many results came out. ``request_stop()`` (signal-safe: it
only sets a flag) ends ``run()`` after the batch in flight, as the end of the stream would.
A non-finite score (NaN/inf) gives ``anomalous=None`` and no boxes, is counted in ``invalid_scores``
and warned about once.
"""
import collections
import logging
import math
import threading
import time

import numpy as np

from edgead.runtime import modelinfo, overlay
from edgead.runtime.capture import CaptureThread
from edgead.runtime.report import StageStats

log = logging.getLogger("edgead.runtime.pipeline")

STAGES = ("capture_wait", "preprocess", "infer", "postprocess")
#: seconds between checks of ``request_stop`` while waiting for a frame
POLL_S = 0.1

Result = collections.namedtuple("Result", [
    "index", "name", "timestamp", "frame", "anomaly_map", "score", "anomalous", "boxes", "annotated", "latency",
    "camera"])
Result.__doc__ = """One processed frame.

``frame``: the picture boxes and ``annotated`` refer to, RGB uint8 ``[h, w, 3]`` (the source frame,
or the model input with ``annotate_on="input"``); ``anomaly_map``: f32 ``[H, W]`` at model size;
``score``: float (may be NaN/inf if the model misbehaves); ``anomalous``: bool, or None (no image
threshold, or a non-finite score); ``boxes``: list of
``(x, y, w, h, peak)`` in ``frame`` pixels; ``annotated``: uint8 ``[h, w, 3]`` RGB or None;
``index``/``name``/``timestamp``: from the source Frame; ``latency``: seconds from capture to result ready;
``camera``: the name of the camera (source) it came from."""


class Camera(object):
    """One source of a Pipeline: its name, CaptureThread and per-camera counters.

    ``frames``/``anomalies``/``invalid_scores``: results produced; ``latency``: StageStats of capture ->
    result (seconds); ``ended``: its stream ended and its queue was drained."""

    def __init__(self, name, source, capture):
        self.name = name
        self.source = source
        self.capture = capture
        self.frames = 0
        self.anomalies = 0
        self.invalid_scores = 0
        self.latency = StageStats()
        self.ended = False

    @property
    def connected(self):
        """True while its capture thread runs and is not reopening the source."""
        return self.capture.alive and not self.capture.reconnecting

    def stats(self):
        capture = self.capture
        return {"source": getattr(self.source, "uri", None), "frames": self.frames, "anomalies": self.anomalies,
                "invalid_scores": self.invalid_scores, "dropped": capture.dropped, "skipped": capture.skipped,
                "reconnects": capture.reconnects, "connected": self.connected, "ended": self.ended,
                "error": str(capture.error) if capture.error is not None else None, "latency": self.latency}


def camera_names(count):
    """Default camera names: ``cam0``, ``cam1``, ..."""
    return ["cam{}".format(i) for i in range(count)]


def resize_frame(image, size, resize="area"):
    """RGB uint8 ``[h, w, 3]`` -> ``[H, W, 3]`` (size = (H, W)), the same rule as ``edgead.data.read_image``:
    ``area`` = INTER_AREA to shrink and INTER_LINEAR to enlarge, ``bilinear`` = INTER_LINEAR,
    ``nearest`` = INTER_NEAREST."""
    import cv2

    height, width = size
    if image.shape[:2] == (height, width):
        return image
    if resize == "nearest":
        interp = cv2.INTER_NEAREST
    elif resize == "bilinear":
        interp = cv2.INTER_LINEAR
    elif height <= image.shape[0] and width <= image.shape[1]:
        interp = cv2.INTER_AREA
    else:
        interp = cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interp)


def warmup(engine, iterations=10, batch_size=1):
    """Run ``iterations`` batches of mid-grey frames through ``engine`` (lazy init, autotuning, caches),
    and the overlay drawing once (OpenCV's first text/colormap calls are slow). Untimed."""
    _, height, width, _ = engine.input_shape
    frames = np.full((batch_size, height, width, 3), 128, np.uint8)
    for i in range(int(iterations)):
        maps, scores = engine.infer(frames)
        if i == 0:
            overlay.annotate(frames[0], maps[0, 0], float(scores[0]), None)


class Pipeline(object):
    """Streams ``source`` (one or several cameras) through ``engine``.

    Args:
        engine: a ``base.Engine`` (``model_info`` supplies size, resize mode and thresholds).
        source: a ``sources.Source`` or a list of them (opened by ``run``).
        names: camera names, one per source (default ``cam0``, ``cam1``, ...).
        batch_size: frames per ``infer`` call. Finite sources fill every batch; live sources take what
            is queued (1..batch_size) so waiting never adds latency.
        queue_size, drop, reconnect_attempts, backoff, sleep, on_error: passed to ``CaptureThread``
            (``on_error="skip"`` skips unreadable image files, counted in ``skipped``).
        max_frames: stop after this many frames processed (results yielded).
        annotate: draw heatmap/boxes/score on each frame (``Result.annotated``).
        annotate_on: ``frame`` (source resolution) or ``input`` (model resolution).
        min_area: smallest box, in model-map pixels.
        warn: function(message) for skipped frames, a camera that ended with an error while others go on, and
            the first non-finite score (default: log.warning).
        on_timing: function(stage, seconds, camera) called for every timing recorded (e.g. Prometheus
            histograms); ``camera`` is the camera name for per-frame ``latency``, else None.
        reconnect_attempts: per camera; None = for ever.
    """

    def __init__(self, engine, source, batch_size=1, queue_size=4, drop=None, max_frames=None, annotate=True,
                 annotate_on="frame", min_area=16, reconnect_attempts=5, backoff=0.5, sleep=None, on_error="stop",
                 warn=None, names=None, on_timing=None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if annotate_on not in ("frame", "input"):
            raise ValueError("annotate_on must be 'frame' or 'input'")
        sources_list = list(source) if isinstance(source, (list, tuple)) else [source]
        if not sources_list:
            raise ValueError("no source")
        names = list(names) if names is not None else camera_names(len(sources_list))
        if len(names) != len(sources_list) or len(set(names)) != len(names):
            raise ValueError("one distinct camera name per source")
        self.engine = engine
        self.source = sources_list[0]
        self.live = any(src.live for src in sources_list)
        self.batch_size = int(batch_size)
        self.max_frames = max_frames
        self.annotate = annotate
        self.annotate_on = annotate_on
        self.min_area = min_area
        info = engine.model_info
        self.input_hw = modelinfo.input_hw(info)
        self.resize = info["input"].get("resize", "area")
        self.thresholds = modelinfo.thresholds(info)
        self._warn = warn if warn is not None else log.warning
        self.on_timing = on_timing
        self._wakeup = threading.Event()
        # one finite source never drops, so capturing max_frames is exact; otherwise counted at the output
        capture_limit = max_frames if len(sources_list) == 1 and not self.live else None
        self.cameras = [Camera(name, src, CaptureThread(
            src, queue_size=queue_size, drop=drop, max_frames=capture_limit, reconnect_attempts=reconnect_attempts,
            backoff=backoff, sleep=sleep, on_error=on_error, warn=self._warn, wakeup=self._wakeup,
            name=name if len(sources_list) > 1 else None)) for name, src in zip(names, sources_list)]
        self.capture = self.cameras[0].capture
        self._next_camera = 0
        self.timings = {stage: StageStats() for stage in STAGES + ("latency",)}
        self.batches = 0
        self.batch_frames = 0
        self.max_batch = 0
        self.frames = 0
        self.anomalies = 0
        self.invalid_scores = 0
        self.wall_s = 0.0
        #: True while frames flow (after the source opened); ``request_stop`` is honoured from then on
        self.streaming = False
        self.stop_requested = False
        self.stop_reason = None
        self._t_start = None

    @property
    def dropped(self):
        return sum(cam.capture.dropped for cam in self.cameras)

    @property
    def skipped(self):
        return sum(cam.capture.skipped for cam in self.cameras)

    @property
    def reconnects(self):
        return sum(cam.capture.reconnects for cam in self.cameras)

    def record(self, stage, seconds, camera=None):
        """Add one timing (seconds) to ``stage`` (created on first use); ``camera``: name, for per-frame stages."""
        stats = self.timings.get(stage)
        if stats is None:
            stats = self.timings[stage] = StageStats()
        stats.add(seconds)
        if self.on_timing is not None:
            self.on_timing(stage, seconds, camera)

    def request_stop(self, reason=None):
        """End ``run()`` after the batch in flight. Only sets flags: safe in a signal handler."""
        self.stop_reason = reason
        self.stop_requested = True

    def _sweep(self, batch, limit):
        """One round-robin pass over the cameras: at most one queued frame from each, appended to ``batch`` as
        (Camera, Frame) until it holds ``limit``; marks drained cameras ended. Returns how many it took."""
        took = 0
        count = len(self.cameras)
        for k in range(count):
            if len(batch) >= limit:
                break
            cam = self.cameras[(self._next_camera + k) % count]
            if cam.ended:
                continue
            frame = cam.capture.get_nowait()
            if frame is None:
                queue = cam.capture.queue
                if queue.finished and len(queue) == 0:  # finished first: no put can follow it
                    self._camera_ended(cam)
                continue
            batch.append((cam, frame))
            took += 1
        self._next_camera = (self._next_camera + 1) % count
        return took

    def _camera_ended(self, cam):
        cam.ended = True
        error = cam.capture.error
        if error is not None and len(self.cameras) > 1 and not all(c.ended for c in self.cameras):
            self._warn("camera {}: its stream ended ({}); the other cameras go on".format(cam.name, error))

    def _next_batch(self):
        """(list of (Camera, Frame), seconds waited); empty at the end of every stream or on request_stop."""
        limit = self.batch_size
        if self.max_frames is not None:
            limit = min(limit, self.max_frames - self.frames)
        t0 = time.perf_counter()
        batch = []
        while True:
            self._wakeup.clear()  # before the sweep: a frame queued after it sets the event again
            took = self._sweep(batch, limit)
            if len(batch) >= limit or all(cam.ended for cam in self.cameras) or self.stop_requested:
                break
            if took:
                continue
            if batch and self.live:
                break  # live: what is queued now, never wait to fill a batch
            self._wakeup.wait(POLL_S)
        return batch, time.perf_counter() - t0

    def run(self):
        """Generator of Result, one per frame, in capture order.

        Ends at the end of the stream, after ``max_frames`` results, or after ``request_stop()``. When the
        stream itself ended with an error, raises the capture's SourceError after the last good frame."""
        self._t_start = time.perf_counter()
        stream_ended = False
        try:
            for cam in self.cameras:
                cam.capture.start()
            self.streaming = True
            while not self.stop_requested:
                if self.max_frames is not None and self.frames >= self.max_frames:
                    break
                batch, waited = self._next_batch()
                if not batch:
                    stream_ended = not self.stop_requested
                    break
                self.record("capture_wait", waited)
                for result in self._process(batch):
                    self.frames += 1
                    yield result
        finally:
            self.streaming = False
            for cam in self.cameras:
                cam.capture.stop()
            self.wall_s = time.perf_counter() - self._t_start
        if stream_ended:
            for cam in self.cameras:
                if cam.capture.error is not None:
                    raise cam.capture.error

    def _process(self, batch):
        """batch: list of (Camera, Frame) -> list of Result, in batch order."""
        t0 = time.perf_counter()
        inputs = np.stack([resize_frame(f.image, self.input_hw, self.resize) for _, f in batch])
        t1 = time.perf_counter()
        maps, scores = self.engine.infer(inputs)
        t2 = time.perf_counter()
        results = [self._postprocess(cam, frame, inputs[i], maps[i, 0], float(scores[i]))
                   for i, (cam, frame) in enumerate(batch)]
        t3 = time.perf_counter()
        self.record("preprocess", t1 - t0)
        self.record("infer", t2 - t1)
        self.record("postprocess", t3 - t2)
        self.batches += 1
        self.batch_frames += len(batch)
        self.max_batch = max(self.max_batch, len(batch))
        results = [r._replace(latency=t3 - r.timestamp) for r in results]
        for (cam, _), result in zip(batch, results):
            cam.frames += 1
            if result.anomalous:
                cam.anomalies += 1
                self.anomalies += 1
            cam.latency.add(result.latency)
            self.record("latency", result.latency, cam.name)
        return results

    def _postprocess(self, cam, frame, model_input, amap, score):
        th = self.thresholds
        picture = model_input if self.annotate_on == "input" else frame.image
        if math.isfinite(score):
            anomalous = None if th["image_threshold"] is None else bool(score > th["image_threshold"])
            boxes = overlay.anomaly_boxes(amap, th["pixel_threshold"], self.min_area)
            if picture.shape[:2] != amap.shape:
                boxes = overlay.scale_boxes(boxes, amap.shape, picture.shape)
            shown = amap
        else:  # a broken model (NaN/inf): no verdict, no boxes, never a silent "ok"/"ANOMALY"
            self.invalid_scores += 1
            cam.invalid_scores += 1
            if self.invalid_scores == 1:
                self._warn("{}frame {}{}: the model returned a non-finite score ({}); no verdict for such frames "
                           "(anomalous=None), counted in the report's invalid_scores".format(
                               "camera {}: ".format(cam.name) if len(self.cameras) > 1 else "", frame.index, " ({})".format(frame.name) if frame.name else "", score))
            anomalous, boxes = None, []
            shown = np.nan_to_num(amap, nan=0.0, posinf=1e30, neginf=-1e30)  # drawable, saturates the colormap
        annotated = None
        if self.annotate:
            annotated = overlay.annotate(picture, shown, score, th["pixel_threshold"], th["vmin"], th["vmax"],
                                         image_threshold=th["image_threshold"], boxes=boxes)
        return Result(frame.index, frame.name, frame.timestamp, picture, amap, score, anomalous, boxes, annotated,
                      None, cam.name)

    def stats(self):
        """dict: frames (processed), anomalies, skipped, dropped, reconnects, invalid_scores (sums over cameras),
        wall_s (so far, while running), streaming, batch_size, mean_batch, timings (stage -> StageStats, seconds),
        cameras (name -> ``Camera.stats()``: source, frames, anomalies, invalid_scores, dropped, skipped,
        reconnects, connected, ended, error, latency StageStats). Safe to call from another thread while
        running (a metrics scrape)."""
        wall = self.wall_s
        if self.streaming and self._t_start is not None:
            wall = time.perf_counter() - self._t_start
        return {
            "frames": self.frames,
            "anomalies": self.anomalies,
            "skipped": self.skipped,
            "dropped": self.dropped,
            "reconnects": self.reconnects,
            "invalid_scores": self.invalid_scores,
            "wall_s": wall,
            "streaming": self.streaming,
            "batch_size": self.batch_size,
            "mean_batch": self.batch_frames / float(self.batches) if self.batches else 0.0,
            "timings": self.timings,
            "cameras": collections.OrderedDict((cam.name, cam.stats()) for cam in self.cameras),
        }
