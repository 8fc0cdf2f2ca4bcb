"""Several cameras, one engine: batching across cameras, routing back, per-camera counters (runtime/pipeline.py,
``edgead run --source A --source B``)."""
import collections
import json
import threading

import numpy as np
import pytest

from edgead.cli import cli
from edgead.errors import SourceError
from edgead.runtime import pipeline as pl
from edgead.runtime.engines.ort_engine import OrtEngine
from edgead.runtime.sources import Frame, Source, make_source

from conftest import assert_refused_in_one_line, cli_runner
from fake_models import write_fake_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("multicam_models")
    return {b: write_fake_model(root / "fake_{}.onnx".format(b), batch=b) for b in (1, 4, "dynamic")}


class RecordingEngine(object):
    """Wraps an engine and records the size of every infer call."""

    def __init__(self, engine):
        self.engine = engine
        self.calls = []
        self.model_info = engine.model_info
        self.input_shape = engine.input_shape

    def infer(self, frames):
        self.calls.append(len(frames))
        return self.engine.infer(frames)


def _check_blob(result, source):
    """The result is the one its camera's synthetic source drew at that index: verdict and box on its blob."""
    blob = source.blob(result.index)
    if blob is None:
        assert result.anomalous is False and result.boxes == []
        return
    cx, cy, rad = blob
    assert result.anomalous is True and len(result.boxes) == 1
    x, y, w, h, _ = result.boxes[0]
    assert abs(x - (cx - rad)) <= 3 and abs(y - (cy - rad)) <= 3


@pytest.mark.parametrize("batch_model, batch_size", [(4, 4), ("dynamic", 3), (1, 2)])
def test_finite_cameras_batched_and_routed_back(models, batch_model, batch_size):
    engine = RecordingEngine(OrtEngine(models[batch_model]))
    counts = {"a": 5, "b": 3, "c": 7}
    sources = [make_source("synthetic://?width=96&height=80&frames={}&defect={}&seed={}".format(n, k + 2, k),
                           size=(64, 64)) for k, n in enumerate(counts.values())]
    pipe = pl.Pipeline(engine, sources, batch_size=batch_size, names=list(counts))
    results = list(pipe.run())
    by_camera = collections.defaultdict(list)
    for r in results:
        by_camera[r.camera].append(r.index)
        _check_blob(r, sources[list(counts).index(r.camera)])
    assert {name: idx for name, idx in by_camera.items()} == {name: list(range(n)) for name, n in counts.items()}
    # finite sources fill every batch but the last ones; never more than batch_size frames per call
    assert sum(engine.calls) == 15 and max(engine.calls) <= batch_size
    assert engine.calls.count(batch_size) >= 15 // batch_size - 1
    stats = pipe.stats()
    assert stats["frames"] == 15 and stats["anomalies"] == sum(r.anomalous for r in results)
    assert {name: cam["frames"] for name, cam in stats["cameras"].items()} == counts
    assert all(cam["ended"] and cam["latency"].count == counts[name] for name, cam in stats["cameras"].items())


class LiveCounter(Source):
    """A live camera delivering frames as fast as asked, each a flat image of value ``level``."""

    def __init__(self, uri, level, fail_after=None):
        Source.__init__(self, uri)
        self.live = True
        self.level = level
        self.fail_after = fail_after
        self.index = 0
        self.gate = threading.Event()

    def open(self):
        pass

    def read(self):
        if self.fail_after is not None and self.index >= self.fail_after:
            raise SourceError("{}: device unplugged".format(self.uri))
        self.gate.wait(0.002)
        frame = Frame(np.full((64, 64, 3), self.level, np.uint8), self.index, pl.time.perf_counter(), None)
        self.index += 1
        return frame

    def close(self):
        pass


def test_live_cameras_share_batches_fairly(models):
    """8 live cameras, batch 2: every camera is served, none starves (round-robin start rotates)."""
    engine = RecordingEngine(OrtEngine(models["dynamic"]))
    sources = [LiveCounter("fake://cam{}".format(k), 20 * k + 10) for k in range(8)]
    pipe = pl.Pipeline(engine, sources, batch_size=2, max_frames=160, queue_size=2)
    results = list(pipe.run())
    assert len(results) == 160 and max(engine.calls) <= 2
    per_cam = collections.Counter(r.camera for r in results)
    assert set(per_cam) == {"cam{}".format(k) for k in range(8)}
    assert min(per_cam.values()) >= 10, per_cam  # a fair share is 20
    for r in results:  # the fake map is the mean brightness: each result carries its own camera's level
        k = int(r.camera[3:])
        assert r.score == pytest.approx(20 * k + 10, abs=0.5)
    stats = pipe.stats()
    assert stats["dropped"] == sum(cam["dropped"] for cam in stats["cameras"].values())


def test_a_dead_camera_leaves_the_others_running(models):
    warnings = []
    engine = OrtEngine(models["dynamic"])
    dead = LiveCounter("fake://dead", 50, fail_after=3)
    files = make_source("synthetic://?width=64&height=64&frames=40")
    pipe = pl.Pipeline(engine, [dead, files], batch_size=2, names=["dead", "ok"], reconnect_attempts=0,
                       warn=warnings.append)
    results = []
    with pytest.raises(SourceError, match="device unplugged"):
        for r in pipe.run():
            results.append(r)
    per_cam = collections.Counter(r.camera for r in results)
    assert per_cam["ok"] == 40 and per_cam["dead"] == 3
    assert any(w.startswith("camera dead: its stream ended") and "the other cameras go on" in w for w in warnings)
    cams = pipe.stats()["cameras"]
    assert cams["dead"]["error"].endswith("device unplugged") and cams["ok"]["error"] is None


def test_timings_reach_the_observer_with_camera_names(models):
    seen = []
    engine = OrtEngine(models[1])
    sources = [make_source("synthetic://?width=64&height=64&frames=3") for _ in range(2)]
    pipe = pl.Pipeline(engine, sources, names=["l", "r"], on_timing=lambda *a: seen.append(a))
    list(pipe.run())
    latency = [a for a in seen if a[0] == "latency"]
    assert sorted(a[2] for a in latency) == ["l", "l", "l", "r", "r", "r"]
    assert {a[0] for a in seen} >= {"capture_wait", "preprocess", "infer", "postprocess"}
    assert all(a[2] is None for a in seen if a[0] != "latency")


def test_names_must_match_sources(models):
    engine = OrtEngine(models[1])
    sources = [make_source("synthetic://?frames=1") for _ in range(2)]
    with pytest.raises(ValueError):
        pl.Pipeline(engine, sources, names=["a", "a"])
    with pytest.raises(ValueError):
        pl.Pipeline(engine, sources, names=["a"])


# --- edgead run with several cameras ------------------------------------------------------------------

def test_cli_two_cameras_report_and_json_lines(models, tmp_path):
    report = tmp_path / "r.json"
    result = cli_runner().invoke(cli, [
        "run", models[4], "--source", "left=synthetic://?width=64&height=64&frames=6&defect=2",
        "--source", "synthetic://?width=64&height=64&frames=4&defect=3", "--batch", "4", "--json",
        "--report", str(report)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{\"camera")]
    assert collections.Counter(x["camera"] for x in lines) == {"left": 6, "cam1": 4}
    assert [x["frame"] for x in lines if x["camera"] == "left"] == list(range(6))
    assert [x["anomalous"] for x in lines if x["camera"] == "left"] == [True, False] * 3
    assert [x["anomalous"] for x in lines if x["camera"] == "cam1"] == [True, False, False, True]
    data = json.loads(report.read_text())
    assert data["frames"] == 10 and data["anomalies"] == 5
    assert data["source"] == ["synthetic://?width=64&height=64&frames=6&defect=2",
                              "synthetic://?width=64&height=64&frames=4&defect=3"]
    cams = data["cameras"]
    assert list(cams) == ["left", "cam1"]
    assert (cams["left"]["frames"], cams["left"]["anomalies"], cams["cam1"]["frames"]) == (6, 3, 4)
    assert cams["left"]["latency"]["count"] == 6 and cams["left"]["dropped"] == 0


def test_cli_cameras_file_save_folders_and_quiet(models, tmp_path):
    cfg = tmp_path / "cams.json"
    cfg.write_text(json.dumps({"cameras": [
        {"name": "top", "source": "synthetic://?width=64&height=64&frames=2"},
        {"name": "side", "source": "synthetic://?width=64&height=64&frames=3"}]}))
    out = tmp_path / "out"
    result = cli_runner().invoke(cli, ["run", models[1], "--cameras", str(cfg), "--save", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert not [x for x in result.stdout.splitlines() if " frame " in x or x.startswith("frame ")]
    assert sorted(p.name for p in (out / "top").iterdir()) == ["000000.png", "000001.png"]
    assert len(list((out / "side").iterdir())) == 3
    table = [x.split() for x in result.stdout.splitlines() if x.startswith(("top ", "side "))]
    assert [(row[0], row[1]) for row in table] == [("top", "2"), ("side", "3")]  # the per-camera table


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"cameras": []}', 'expected {"cameras"'),
    ('{"cameras": [{"name": "a"}]}', 'cameras[0] needs a "source" string'),
    ('{"cameras": [{"source": "synthetic://", "fps": 3}]}', "cameras[0]: unknown key 'fps'"),
    ('{"cameras": [{"source": "synthetic://", "name": "bad name"}]}', "cameras[0]: name 'bad name' must be"),
    ('["synthetic://", {"name": "cam0", "source": "synthetic://"}]', "camera name 'cam0' is used twice"),
])
def test_cli_bad_cameras_file(models, tmp_path, content, message):
    cfg = tmp_path / "cams.json"
    cfg.write_text(content)
    result = cli_runner().invoke(cli, ["run", models[1], "--cameras", str(cfg)])
    assert_refused_in_one_line(result, message)


def test_cli_no_source_and_bad_reconnect(models):
    assert_refused_in_one_line(cli_runner().invoke(cli, ["run", models[1]]), "no source: pass --source")
    result = cli_runner().invoke(cli, ["run", models[1], "--source", "synthetic://", "--reconnect-attempts", "-3"])
    assert_refused_in_one_line(result, "--reconnect-attempts -3: a number >= 0 or 'forever'")


def test_parse_camera():
    from edgead.cli.run_cmd import parse_camera

    assert parse_camera("left=rtsp://h/s?a=b") == ("left", "rtsp://h/s?a=b")
    assert parse_camera("synthetic://?defect=5") == (None, "synthetic://?defect=5")
    assert parse_camera("/data/a=b.png") == (None, "/data/a=b.png")
    assert parse_camera("0") == (None, "0")
