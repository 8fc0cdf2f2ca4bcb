"""Pipeline end to end (runtime/pipeline.py) with the fake ONNX model on synthetic frames."""
import cv2
import numpy as np
import pytest

from edgead.errors import SourceError
from edgead.runtime import pipeline as pl
from edgead.runtime.engines.ort_engine import OrtEngine
from edgead.runtime.sources import Source, make_source

from fake_models import write_fake_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe_models")
    return {b: write_fake_model(root / "fake_{}.onnx".format(b), batch=b) for b in (1, 4, "dynamic")}


def _run(engine, uri, **kwargs):
    source = make_source(uri, size=engine.input_shape[1:3])
    pipe = pl.Pipeline(engine, source, **kwargs)
    return pipe, source, list(pipe.run())


def test_resize_matches_workstation_reader(tmp_path):
    from edgead.data import read_image

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    path = str(tmp_path / "x.png")
    cv2.imwrite(path, img[:, :, ::-1])
    for mode, size in (("area", (64, 64)), ("area", (128, 160)), ("bilinear", (64, 64)), ("nearest", (50, 70))):
        np.testing.assert_array_equal(pl.resize_frame(img, size, mode), read_image(path, size, mode))
    assert pl.resize_frame(img, (90, 120)) is img


@pytest.mark.parametrize("batch_model, batch_size", [(1, 1), (4, 3), ("dynamic", 4)])
def test_boxes_where_the_blob_is(models, batch_model, batch_size):
    engine = OrtEngine(models[batch_model])
    uri = "synthetic://?width=128&height=96&frames=9&defect=2&seed=5"
    pipe, source, results = _run(engine, uri, batch_size=batch_size)
    assert [r.index for r in results] == list(range(9))
    for r in results:
        assert r.frame.shape == (96, 128, 3) and r.annotated.shape == (96, 128, 3)
        assert r.anomaly_map.shape == (64, 64) and r.anomaly_map.dtype == np.float32
        blob = source.blob(r.index)
        if blob is None:
            assert r.anomalous is False and r.boxes == [] and r.score < 200
            continue
        cx, cy, rad = blob
        assert r.anomalous is True and r.score == pytest.approx(255.0)
        assert len(r.boxes) == 1
        x, y, w, h, peak = r.boxes[0]
        assert peak == pytest.approx(255.0)
        # the box (frame pixels) hugs the disk: within 3 px of its bounding square
        assert abs(x - (cx - rad)) <= 3 and abs(y - (cy - rad)) <= 3
        assert abs((x + w) - (cx + rad + 1)) <= 3 and abs((y + h) - (cy + rad + 1)) <= 3
        # annotated frame: red box pixels on the box's top edge
        top = r.annotated[y, x:x + w]
        assert ((top[:, 0] > 200) & (top[:, 1] < 60)).mean() > 0.5
    stats = pipe.stats()
    n_batches = -(-9 // batch_size)
    assert stats["frames"] == 9 and stats["dropped"] == 0 and stats["wall_s"] > 0
    for stage in pl.STAGES:
        assert pipe.timings[stage].count == n_batches and pipe.timings[stage].min >= 0
        assert len(pipe.timings[stage].recent) == n_batches
    assert list(pipe.timings["latency"].recent) == [r.latency for r in results] and all(r.latency > 0 for r in results)
    assert pipe.timings["latency"].max == max(r.latency for r in results)
    assert (pipe.batches, pipe.batch_frames, pipe.max_batch) == (n_batches, 9, batch_size)
    assert stats["mean_batch"] == pytest.approx(9 / n_batches)


def test_annotate_on_input_and_no_annotation(models):
    engine = OrtEngine(models[1])
    _, _, results = _run(engine, "synthetic://?width=128&height=96&frames=2&defect=1", annotate_on="input")
    assert results[0].frame.shape == (64, 64, 3) and results[0].annotated.shape == (64, 64, 3)
    x, y, w, h, _ = results[0].boxes[0]
    assert x + w <= 64 and y + h <= 64
    _, _, results = _run(engine, "synthetic://?frames=2&defect=1", annotate=False)
    assert results[0].annotated is None and len(results[0].boxes) == 1


def test_uncalibrated_model_has_no_verdict(tmp_path):
    engine = OrtEngine(write_fake_model(tmp_path / "u.onnx", calibration=None))
    _, _, results = _run(engine, "synthetic://?frames=2&defect=1")
    assert all(r.anomalous is None and r.boxes == [] for r in results)
    assert results[0].annotated is not None


def test_image_folder_names_and_source_error_after_good_frames(models, tmp_path):
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(tmp_path / name), rng.integers(0, 150, size=(40, 50, 3), dtype=np.uint8))
    (tmp_path / "c.png").write_bytes(b"broken")
    engine = OrtEngine(models[1])
    pipe = pl.Pipeline(engine, make_source(str(tmp_path)))
    seen = []
    with pytest.raises(SourceError, match="c.png: not a readable image"):
        for r in pipe.run():
            seen.append(r.name)
    assert seen == ["a.png", "b.png"]
    assert not pipe.capture.alive


def test_max_frames_and_early_close(models):
    engine = OrtEngine(models[1])
    pipe, _, results = _run(engine, "synthetic://?frames=0", max_frames=7)  # endless source
    assert len(results) == 7
    pipe = pl.Pipeline(engine, make_source("synthetic://?frames=0", size=(64, 64)))
    gen = pipe.run()
    next(gen)
    gen.close()  # consumer stops early: the capture thread must not hang
    assert not pipe.capture.alive


class _FastLive(Source):
    """Live source producing frames as fast as possible, ``n`` in total."""

    live = True

    def __init__(self, n):
        Source.__init__(self, "fake://live")
        self.n = n
        self.image = np.full((64, 64, 3), 100, np.uint8)

    def read(self):
        if self._index >= self.n:
            return None
        return self._frame(self.image)


def test_live_source_with_slow_engine_drops_and_stays_fresh(models):
    engine = OrtEngine(models["dynamic"])
    infer = engine.infer

    def slow(frames):
        import time

        time.sleep(0.003)
        return infer(frames)

    engine.infer = slow
    pipe = pl.Pipeline(engine, _FastLive(300), batch_size=4, queue_size=2, annotate=False)
    results = list(pipe.run())
    assert pipe.dropped > 0 and len(results) + pipe.dropped == 300
    assert [r.index for r in results] == sorted(r.index for r in results)
    assert pipe.max_batch <= 4


def test_warmup_runs_engine(models):
    engine = OrtEngine(models[4])
    calls = []
    infer = engine.infer
    engine.infer = lambda frames: calls.append(frames.shape) or infer(frames)
    pl.warmup(engine, iterations=3, batch_size=2)
    assert calls == [(2, 64, 64, 3)] * 3


def _slow(engine, seconds):
    infer = engine.infer

    def slow(frames):
        import time

        time.sleep(seconds)
        return infer(frames)

    engine.infer = slow
    return engine


def test_max_frames_counts_processed_frames_on_a_live_source(models):
    """Drop-oldest discards frames, yet exactly max_frames results come out (not max_frames captured)."""
    engine = _slow(OrtEngine(models[1]), 0.01)
    source = make_source("synthetic://?fps=1000&frames=0", size=(64, 64))
    pipe = pl.Pipeline(engine, source, queue_size=1, max_frames=30, annotate=False)
    results = list(pipe.run())
    assert len(results) == 30 and pipe.frames == 30 and pipe.stats()["frames"] == 30
    assert pipe.dropped > 0 and pipe.capture.captured > 30
    assert pipe.timings["latency"].count == 30
    engine = OrtEngine(models["dynamic"])
    pipe = pl.Pipeline(engine, make_source("synthetic://?frames=0", size=(64, 64)), batch_size=4, max_frames=10)
    assert len(list(pipe.run())) == 10 and pipe.batch_frames == 10  # the last batch is cut to 2


def test_request_stop_finishes_the_batch_in_flight(models):
    engine = OrtEngine(models["dynamic"])
    for batch_size, stop_after, expected in ((1, 5, 5), (4, 2, 4)):
        pipe = pl.Pipeline(engine, make_source("synthetic://?frames=0", size=(64, 64)), batch_size=batch_size)
        seen = []
        for r in pipe.run():
            seen.append(r.index)
            if len(seen) == stop_after:
                pipe.request_stop("SIGTERM")
        assert seen == list(range(expected)) and pipe.stop_reason == "SIGTERM"
        assert not pipe.capture.alive and pipe.capture.error is None and not pipe.streaming


def test_request_stop_wakes_a_consumer_waiting_for_frames(models):
    """A stalled live source: the stop request is seen within a poll slice, not never."""
    import threading
    import time

    class Stuck(Source):
        live = True

        def read(self):
            if self._index == 0:
                return self._frame(np.full((64, 64, 3), 90, np.uint8))
            while not pipe.capture._stop.is_set():  # a camera that hangs without an error
                time.sleep(0.02)
            return None

    pipe = pl.Pipeline(OrtEngine(models[1]), Stuck("fake://stuck"))
    results = []
    threading.Timer(0.5, pipe.request_stop).start()
    t0 = time.perf_counter()
    for r in pipe.run():
        results.append(r)
    assert len(results) == 1 and time.perf_counter() - t0 < 0.5 + 2 * pl.POLL_S + 0.5


def test_non_finite_score_has_no_verdict_and_warns_once(models):
    engine = OrtEngine(models[1])
    infer = engine.infer
    calls = []

    def nan_infer(frames):
        maps, scores = infer(frames)
        calls.append(1)
        if len(calls) in (2, 3):
            maps, scores = maps.copy(), scores.copy()
            maps[:], scores[:] = (np.nan, np.nan) if len(calls) == 2 else (np.inf, np.inf)
        return maps, scores

    engine.infer = nan_infer
    warnings = []
    pipe = pl.Pipeline(engine, make_source("synthetic://?frames=4&defect=1", size=(64, 64)), warn=warnings.append)
    results = list(pipe.run())
    assert [r.anomalous for r in results] == [True, None, None, True]
    assert results[1].boxes == [] and results[2].boxes == [] and results[2].annotated is not None
    assert np.isnan(results[1].score) and np.isinf(results[2].score)
    assert pipe.invalid_scores == 2 and pipe.stats()["invalid_scores"] == 2
    assert len(warnings) == 1 and "frame 1" in warnings[0] and "non-finite score (nan)" in warnings[0]


def test_unreadable_images_skipped_or_stop(models, tmp_path):
    rng = np.random.default_rng(2)
    for name in ("a.png", "c.png"):
        cv2.imwrite(str(tmp_path / name), rng.integers(0, 150, size=(40, 50, 3), dtype=np.uint8))
    (tmp_path / "b.png").write_bytes(b"")
    engine = OrtEngine(models[1])
    warnings = []
    pipe = pl.Pipeline(engine, make_source(str(tmp_path)), on_error="skip", warn=warnings.append)
    assert [r.name for r in pipe.run()] == ["a.png", "c.png"]
    assert pipe.skipped == 1 and pipe.stats()["skipped"] == 1 and pipe.frames == 2
    assert len(warnings) == 1 and "b.png: file is empty" in warnings[0] and warnings[0].endswith("skipped")
    pipe = pl.Pipeline(engine, make_source(str(tmp_path)), on_error="stop")
    seen = []
    with pytest.raises(SourceError, match="b.png: file is empty"):
        for r in pipe.run():
            seen.append(r.name)
    assert seen == ["a.png"] and pipe.skipped == 0


def test_timings_are_bounded_summaries(models):
    from edgead.runtime.report import StageStats

    engine = OrtEngine(models[1])
    pipe, _, results = _run(engine, "synthetic://?frames=5", annotate=False)
    pipe.record("output", 0.002)
    assert all(isinstance(t, StageStats) for t in pipe.timings.values())
    assert pipe.timings["output"].count == 1 and pipe.timings["output"].recent.maxlen == 4096
    assert pipe.timings["infer"].recent.maxlen == 4096
