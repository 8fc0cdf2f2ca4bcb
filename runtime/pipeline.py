"""capture -> preprocess -> engine.infer -> postprocess, with per-stage timings.

``Pipeline(engine, source).run()`` yields one ``Result`` per frame. Stages are timed per batch with
``time.perf_counter`` (seconds, kept in ``Pipeline.timings``):

- ``capture_wait``: time blocked waiting for the batch's frames from the capture queue;
- ``preprocess``: resize to the model's ``H x W`` (metadata ``input.resize``) and stack ``[N, H, W, 3]``;
- ``infer``: ``engine.infer``;
- ``postprocess``: per frame verdict, ``anomaly_boxes`` and (when annotating) ``annotate``;
- ``latency`` (per frame): capture timestamp -> result ready, including queueing.

Callers may add their own stages (e.g. ``output``) with ``Pipeline.record``.
"""
import collections
import time

import numpy as np

from edgead.runtime import modelinfo, overlay
from edgead.runtime.capture import CaptureThread

STAGES = ("capture_wait", "preprocess", "infer", "postprocess")

Result = collections.namedtuple("Result", [
    "index", "name", "timestamp", "frame", "anomaly_map", "score", "anomalous", "boxes", "annotated", "latency"])
Result.__doc__ = """One processed frame.

``frame``: the picture boxes and ``annotated`` refer to, RGB uint8 ``[h, w, 3]`` (the source frame,
or the model input with ``annotate_on="input"``); ``anomaly_map``: f32 ``[H, W]`` at model size;
``score``: float; ``anomalous``: bool or None (no image threshold); ``boxes``: list of
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
        queue_size, drop, reconnect_attempts, backoff, sleep: passed to ``CaptureThread``.
        max_frames: stop after this many frames.
        annotate: draw heatmap/boxes/score on each frame (``Result.annotated``).
        annotate_on: ``frame`` (source resolution) or ``input`` (model resolution).
        min_area: smallest box, in model-map pixels.
    """

    def __init__(self, engine, source, batch_size=1, queue_size=4, drop=None, max_frames=None, annotate=True,
                 annotate_on="frame", min_area=16, reconnect_attempts=5, backoff=0.5, sleep=None):
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
        self.capture = CaptureThread(source, queue_size=queue_size, drop=drop, max_frames=max_frames,
                                     reconnect_attempts=reconnect_attempts, backoff=backoff, sleep=sleep)
        self.timings = {stage: [] for stage in STAGES}
        self.timings["latency"] = []
        self.batch_sizes = []
        self.frames = 0
        self.wall_s = 0.0
        self._t_start = None

    @property
    def dropped(self):
        return self.capture.dropped

    def record(self, stage, seconds):
        """Add one timing (seconds) to ``stage`` (created on first use)."""
        self.timings.setdefault(stage, []).append(float(seconds))

    def _next_batch(self):
        t0 = time.perf_counter()
        first = self.capture.get()
        if first is None:
            return [], time.perf_counter() - t0
        batch = [first]
        while len(batch) < self.batch_size:
            frame = self.capture.get_nowait() if self.source.live else self.capture.get()
            if frame is None:
                break
            batch.append(frame)
        return batch, time.perf_counter() - t0

    def run(self):
        """Generator of Result, one per frame, in capture order. Raises the capture's SourceError at the end."""
        self._t_start = time.perf_counter()
        self.capture.start()
        try:
            while True:
                batch, waited = self._next_batch()
                if not batch:
                    break
                self.record("capture_wait", waited)
                for result in self._process(batch):
                    yield result
        finally:
            self.capture.stop()
            self.wall_s = time.perf_counter() - self._t_start
        if self.capture.error is not None:
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
        self.batch_sizes.append(len(batch))
        results = [r._replace(latency=t3 - r.timestamp) for r in results]
        for result in results:
            self.record("latency", result.latency)
        self.frames += len(batch)
        return results

    def _postprocess(self, frame, model_input, amap, score):
        th = self.thresholds
        anomalous = None if th["image_threshold"] is None else bool(score > th["image_threshold"])
        boxes = overlay.anomaly_boxes(amap, th["pixel_threshold"], self.min_area)
        picture = model_input if self.annotate_on == "input" else frame.image
        if picture.shape[:2] != amap.shape:
            boxes = overlay.scale_boxes(boxes, amap.shape, picture.shape)
        annotated = None
        if self.annotate:
            annotated = overlay.annotate(picture, amap, score, th["pixel_threshold"], th["vmin"], th["vmax"],
                                         image_threshold=th["image_threshold"], boxes=boxes)
        return Result(frame.index, frame.name, frame.timestamp, picture, amap, score, anomalous, boxes, annotated,
                      None)

    def stats(self):
        """dict: frames, dropped, reconnects, wall_s, batch_size, mean_batch, timings (seconds lists)."""
        return {
            "frames": self.frames,
            "dropped": self.dropped,
            "reconnects": self.capture.reconnects,
            "wall_s": self.wall_s,
            "batch_size": self.batch_size,
            "mean_batch": float(np.mean(self.batch_sizes)) if self.batch_sizes else 0.0,
            "timings": self.timings,
        }
