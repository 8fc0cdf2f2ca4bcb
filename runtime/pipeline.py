"""capture -> preprocess -> engine.infer -> postprocess, with per-stage timings.

``Pipeline(engine, source).run()`` yields one ``Result`` per frame. Stages are timed per batch with
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
    "index", "name", "timestamp", "frame", "anomaly_map", "score", "anomalous", "boxes", "annotated", "latency"])
Result.__doc__ = """One processed frame.

``frame``: the picture boxes and ``annotated`` refer to, RGB uint8 ``[h, w, 3]`` (the source frame,
or the model input with ``annotate_on="input"``); ``anomaly_map``: f32 ``[H, W]`` at model size;
``score``: float (may be NaN/inf if the model misbehaves); ``anomalous``: bool, or None (no image
threshold, or a non-finite score); ``boxes``: list of
``(x, y, w, h, peak)`` in ``frame`` pixels; ``annotated``: uint8 ``[h, w, 3]`` RGB or None;
``index``/``name``/``timestamp``: from the source Frame; ``latency``: seconds from capture to result ready."""


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
    """Streams ``source`` through ``engine``.

    Args:
        engine: a ``base.Engine`` (``model_info`` supplies size, resize mode and thresholds).
        source: a ``sources.Source`` (opened by ``run``).
        batch_size: frames per ``infer`` call. Finite sources fill every batch; live sources take what
            is queued (1..batch_size) so waiting never adds latency.
        queue_size, drop, reconnect_attempts, backoff, sleep, on_error: passed to ``CaptureThread``
            (``on_error="skip"`` skips unreadable image files, counted in ``skipped``).
        max_frames: stop after this many frames processed (results yielded).
        annotate: draw heatmap/boxes/score on each frame (``Result.annotated``).
        annotate_on: ``frame`` (source resolution) or ``input`` (model resolution).
        min_area: smallest box, in model-map pixels.
        warn: function(message) for skipped frames and the first non-finite score (default: log.warning).
    """

    def __init__(self, engine, source, batch_size=1, queue_size=4, drop=None, max_frames=None, annotate=True,
                 annotate_on="frame", min_area=16, reconnect_attempts=5, backoff=0.5, sleep=None, on_error="stop",
                 warn=None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if annotate_on not in ("frame", "input"):
            raise ValueError("annotate_on must be 'frame' or 'input'")
        self.engine = engine
        self.source = source
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
        # files never drop, so capturing max_frames is exact; live sources are counted at the output
        self.capture = CaptureThread(source, queue_size=queue_size, drop=drop,
                                     max_frames=None if source.live else max_frames,
                                     reconnect_attempts=reconnect_attempts, backoff=backoff, sleep=sleep,
                                     on_error=on_error, warn=self._warn)
        self.timings = {stage: StageStats() for stage in STAGES + ("latency",)}
        self.batches = 0
        self.batch_frames = 0
        self.max_batch = 0
        self.frames = 0
        self.invalid_scores = 0
        self.wall_s = 0.0
        #: True while frames flow (after the source opened); ``request_stop`` is honoured from then on
        self.streaming = False
        self.stop_requested = False
        self.stop_reason = None
        self._t_start = None

    @property
    def dropped(self):
        return self.capture.dropped

    @property
    def skipped(self):
        return self.capture.skipped

    def record(self, stage, seconds):
        """Add one timing (seconds) to ``stage`` (created on first use)."""
        stats = self.timings.get(stage)
        if stats is None:
            stats = self.timings[stage] = StageStats()
        stats.add(seconds)

    def request_stop(self, reason=None):
        """End ``run()`` after the batch in flight. Only sets flags: safe in a signal handler."""
        self.stop_reason = reason
        self.stop_requested = True

    def _get(self):
        """Next frame from the capture queue, waiting in POLL_S slices; None at the end or on request_stop."""
        while True:
            try:
                return self.capture.get(timeout=POLL_S)
            except TimeoutError:
                if self.stop_requested:
                    return None

    def _next_batch(self):
        limit = self.batch_size
        if self.max_frames is not None:
            limit = min(limit, self.max_frames - self.frames)
        t0 = time.perf_counter()
        first = self._get()
        if first is None:
            return [], time.perf_counter() - t0
        batch = [first]
        while len(batch) < limit:
            frame = self.capture.get_nowait() if self.source.live else self._get()
            if frame is None:
                break
            batch.append(frame)
        return batch, time.perf_counter() - t0

    def run(self):
        """Generator of Result, one per frame, in capture order.

        Ends at the end of the stream, after ``max_frames`` results, or after ``request_stop()``. When the
        stream itself ended with an error, raises the capture's SourceError after the last good frame."""
        self._t_start = time.perf_counter()
        stream_ended = False
        try:
            self.capture.start()
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
            self.capture.stop()
            self.wall_s = time.perf_counter() - self._t_start
        if stream_ended and self.capture.error is not None:
            raise self.capture.error

    def _process(self, batch):
        t0 = time.perf_counter()
        inputs = np.stack([resize_frame(f.image, self.input_hw, self.resize) for f in batch])
        t1 = time.perf_counter()
        maps, scores = self.engine.infer(inputs)
        t2 = time.perf_counter()
        results = [self._postprocess(frame, inputs[i], maps[i, 0], float(scores[i])) for i, frame in enumerate(batch)]
        t3 = time.perf_counter()
        self.record("preprocess", t1 - t0)
        self.record("infer", t2 - t1)
        self.record("postprocess", t3 - t2)
        self.batches += 1
        self.batch_frames += len(batch)
        self.max_batch = max(self.max_batch, len(batch))
        results = [r._replace(latency=t3 - r.timestamp) for r in results]
        for result in results:
            self.record("latency", result.latency)
        return results

    def _postprocess(self, frame, model_input, amap, score):
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
            if self.invalid_scores == 1:
                self._warn("frame {}{}: the model returned a non-finite score ({}); no verdict for such frames "
                           "(anomalous=None), counted in the report's invalid_scores".format(
                               frame.index, " ({})".format(frame.name) if frame.name else "", score))
            anomalous, boxes = None, []
            shown = np.nan_to_num(amap, nan=0.0, posinf=1e30, neginf=-1e30)  # drawable, saturates the colormap
        annotated = None
        if self.annotate:
            annotated = overlay.annotate(picture, shown, score, th["pixel_threshold"], th["vmin"], th["vmax"],
                                         image_threshold=th["image_threshold"], boxes=boxes)
        return Result(frame.index, frame.name, frame.timestamp, picture, amap, score, anomalous, boxes, annotated,
                      None)

    def stats(self):
        """dict: frames (processed), skipped, dropped, reconnects, invalid_scores, wall_s, batch_size, mean_batch,
        timings (stage -> StageStats, seconds)."""
        return {
            "frames": self.frames,
            "skipped": self.skipped,
            "dropped": self.dropped,
            "reconnects": self.capture.reconnects,
            "invalid_scores": self.invalid_scores,
            "wall_s": self.wall_s,
            "batch_size": self.batch_size,
            "mean_batch": self.batch_frames / float(self.batches) if self.batches else 0.0,
            "timings": self.timings,
        }
