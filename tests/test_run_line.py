"""``edgead run`` on a production line, end to end in a subprocess: two live cameras batched into one engine,
events to a real MQTT broker (amqtt on localhost), Prometheus metrics scraped over HTTP while it runs, SIGTERM to
stop; then the events, the scrape and the report must agree with each other and with the model file."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from mqtt_broker import AmqttBroker, free_port
from test_mqtt_events import Subscriber, wait_until

prometheus_parser = pytest.importorskip("prometheus_client.parser")
from fake_models import FAKE_CALIBRATION, write_fake_model  # noqa: E402

TOPIC = "plant/line3/events"


def _scrape(port):
    with urllib.request.urlopen("http://127.0.0.1:{}/metrics".format(port), timeout=10) as resp:
        text = resp.read().decode("utf-8")
    samples = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _get(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def broker(tmp_path):
    with AmqttBroker(free_port(), tmp_path) as running:
        yield running


def test_two_cameras_events_metrics_and_report_agree(broker, tmp_path):
    model = write_fake_model(tmp_path / "line3.onnx", batch="dynamic")
    report = tmp_path / "line3.json"
    metrics_port = free_port()
    sub = Subscriber(broker.port, TOPIC)
    wait_until(lambda: sub.subscriptions >= 1, "the test subscriber")
    argv = [sys.executable, "-m", "edgead", "run", str(model),
            "--source", "left=synthetic://?width=96&height=80&fps=40&frames=0&defect=4",
            "--source", "right=synthetic://?width=96&height=80&fps=40&frames=0&defect=5&seed=3",
            "--batch", "2", "--mqtt", "mqtt://127.0.0.1:{}/{}".format(broker.port, TOPIC),
            "--metrics-port", str(metrics_port), "--metrics-addr", "127.0.0.1", "--quiet", "--log-every", "0.5",
            "--report", str(report)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ,
                                                                                          TQDM_DISABLE="1"))
    try:
        first = second = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                samples = _scrape(metrics_port)
            except OSError:
                continue
            if ("edgead_frames_total", (("camera", "left"),)) not in samples:
                continue
            if first is None:
                if _get(samples, "edgead_frames_total", camera="left") >= 5:
                    first = samples
            elif _get(samples, "edgead_frames_total", camera="left") >= \
                    _get(first, "edgead_frames_total", camera="left") + 10:
                second = samples
                break
        assert second is not None, "metrics never moved"
        wait_until(lambda: len(sub.messages) >= 6, "events from both cameras")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    out, err = out.decode(), err.decode()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert not re.search(r"^\s*frame\s+\d+", out, re.M)  # --quiet: no per-frame lines
    assert re.search(r"^edgead: \d+ frames \([\d.]+ fps\), \d+ anomalous, dropped \d+, reconnects 0, p99 latency "
                     r"[\d.]+ ms; mqtt up, queued \d+, dropped 0$", err, re.M), err

    data = json.loads(report.read_text())
    cams = data["cameras"]
    assert list(cams) == ["left", "right"] and data["frames"] == cams["left"]["frames"] + cams["right"]["frames"]
    # synthetic defects: every 4th (left) / 5th (right) frame, and the fake model flags exactly those
    for name, period in (("left", 4), ("right", 5)):
        n = cams[name]["frames"]
        assert cams[name]["anomalies"] == (n + period - 1) // period
    mqtt = data["mqtt"]
    assert mqtt["published"] == mqtt["acknowledged"] == data["anomalies"] and mqtt["dropped"] == 0

    # every anomalous frame arrived once, with its camera, index, threshold provenance and the model's identity
    wait_until(lambda: len(sub.messages) >= data["anomalies"], "all events")
    time.sleep(0.3)
    events = sub.messages
    assert sorted(e["seq"] for e in events) == list(range(data["anomalies"]))
    sha = hashlib.sha256(open(model, "rb").read()).hexdigest()
    for e in events:
        period = {"left": 4, "right": 5}[e["camera"]]
        assert e["type"] == "anomaly" and e["frame_index"] % period == 0
        assert e["score"] > FAKE_CALIBRATION["image_threshold"]
        assert e["threshold"]["image"] == FAKE_CALIBRATION["image_threshold"]
        assert e["threshold"]["source"] == "validation" and "F1-max" in e["threshold"]["provenance"]
        assert e["model"]["sha256"] == sha and e["model"]["name"] == "line3" and e["model"]["method"] == "padim"
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", e["time"])
        assert e["box_frame"] == {"width": 96, "height": 80} and len(e["boxes"]) == 1
        assert e["source"].startswith("synthetic://")
    assert {e["camera"] for e in events} == {"left", "right"}

    # the scrape: counters per camera moved between scrapes, model identity, histograms, MQTT counters
    for name in ("left", "right"):
        assert _get(second, "edgead_frames_total", camera=name) > _get(first, "edgead_frames_total", camera=name)
        assert _get(second, "edgead_camera_connected", camera=name) == 1
        assert _get(second, "edgead_frame_latency_seconds_count", camera=name) == \
            _get(second, "edgead_frames_total", camera=name)
    assert _get(second, "edgead_stage_seconds_count", stage="infer") > _get(first, "edgead_stage_seconds_count",
                                                                            stage="infer")
    info = [k for k in second if k[0] == "edgead_model_info"]
    assert len(info) == 1 and dict(info[0][1])["sha256"] == sha and dict(info[0][1])["backend"] == "onnxruntime"
    assert _get(second, "edgead_mqtt_connected") == 1
    assert _get(second, "edgead_anomalies_total", camera="left") <= data["cameras"]["left"]["anomalies"]
    sub.client.loop_stop()
