"""edgead.runtime.metrics: the ``edgead run --metrics-port`` Prometheus endpoint, scraped over real HTTP on
localhost and parsed with prometheus-client's own text parser; every value is pinned."""
import copy
import logging
import threading
import urllib.request

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgead.errors import ConfigError
from edgead.runtime.metrics import DEFAULT_BUCKETS, IDENTITY_KEYS, MetricsServer, bind_error, mask_uri

IDENTITY = {"name": "bottle", "sha256": "ab" * 32, "method": "padim", "backbone": "resnet18",
            "precision": "fp16", "backend": "ort-cpu", "edgead_version": "9.9.9"}

STATS = {
    "frames": 30, "skipped": 1, "dropped": 4, "reconnects": 2, "invalid_scores": 1, "anomalies": 3,
    "wall_s": 12.5, "streaming": True,
    "cameras": {
        "left": {"source": "rtsp://op:hunter2@10.0.0.7/stream", "frames": 20, "anomalies": 2, "invalid_scores": 1,
                 "dropped": 4, "skipped": 0, "reconnects": 2, "connected": True},
        "right": {"source": "/data/right", "frames": 10, "anomalies": 1, "invalid_scores": 0, "dropped": 0,
                  "skipped": 1, "reconnects": 0, "connected": False},
    },
    "mqtt": None,
}


class Clock(object):
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def served():
    """(server, live stats dict the test mutates, clock); the server listens on 127.0.0.1, a free port."""
    stats = copy.deepcopy(STATS)
    clock = Clock()
    server = MetricsServer(0, lambda: stats, IDENTITY, addr="127.0.0.1", clock=clock).start()
    try:
        yield server, stats, clock
    finally:
        server.close()


def scrape(port, query=""):
    """{(sample name, ((label, value), ...) sorted): value} and {family name: type} of one GET /metrics."""
    with urllib.request.urlopen("http://127.0.0.1:{}/metrics{}".format(port, query), timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode("utf-8")
    samples, types = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, key
            samples[key] = sample.value
    return samples, types


def value(samples, metric, **labels):
    return samples[(metric, tuple(sorted(labels.items())))]


def names(samples):
    return {name for name, _ in samples}


def test_counters_gauges_and_info_per_camera(served):
    server, _, _ = served
    assert server.port > 0
    samples, types = scrape(server.port)
    expected = {"edgead_frames_total": (20, 10), "edgead_anomalies_total": (2, 1),
                "edgead_invalid_scores_total": (1, 0), "edgead_dropped_frames_total": (4, 0),
                "edgead_skipped_frames_total": (0, 1), "edgead_reconnects_total": (2, 0),
                "edgead_camera_connected": (1, 0)}
    for name, (left, right) in expected.items():
        assert value(samples, name, camera="left") == left, name
        assert value(samples, name, camera="right") == right, name
    for family in ("edgead_frames", "edgead_anomalies", "edgead_dropped_frames", "edgead_reconnects",
                   "edgead_stats_errors"):
        assert types[family] == "counter", family
    assert types["edgead_camera_connected"] == types["edgead_fps"] == "gauge"
    assert value(samples, "edgead_camera_info", camera="left", source="rtsp://op:***@10.0.0.7/stream") == 1
    assert value(samples, "edgead_camera_info", camera="right", source="/data/right") == 1
    assert value(samples, "edgead_model_info", **IDENTITY) == 1
    assert value(samples, "edgead_up") == 1
    assert value(samples, "edgead_streaming") == 1
    assert value(samples, "edgead_run_seconds") == 12.5
    assert value(samples, "edgead_stats_errors_total") == 0
    assert not [n for n in names(samples) if n.startswith("edgead_mqtt_")]
    assert not [n for n in names(samples) if n.startswith("python_") or n.startswith("process_")]  # own registry
    assert prometheus_client.REGISTRY.get_sample_value("edgead_up") is None
    # /metrics?name[]=... (prometheus-client's filter) reaches the scrape-time metrics too
    only, _ = scrape(server.port, "?name[]=edgead_frames_total&name[]=edgead_up")
    assert only == {("edgead_frames_total", (("camera", "left"),)): 20, ("edgead_frames_total", (("camera", "right"),)): 10,
                    ("edgead_up", ()): 1}


def test_histograms_count_sum_and_buckets(served):
    server, _, _ = served
    for seconds in (0.0004, 0.004, 0.004, 0.3, 20.0, float("nan"), float("inf")):  # NaN/inf ignored
        server.observe("preprocess", seconds)
    server.observe("infer", -1.0)  # negative -> 0
    server.observe("latency", 0.012, camera="left")
    server.observe("latency", 0.04, camera="left")
    server.observe("latency", 0.0009, camera="right")
    server.observe("latency", 0.5)  # no camera
    samples, types = scrape(server.port)
    assert types["edgead_stage_seconds"] == types["edgead_frame_latency_seconds"] == "histogram"
    assert value(samples, "edgead_stage_seconds_count", stage="preprocess") == 5
    assert value(samples, "edgead_stage_seconds_sum", stage="preprocess") == pytest.approx(20.3084, abs=1e-12)
    buckets = {float(dict(labels)["le"]): v for (n, labels), v in samples.items()
               if n == "edgead_stage_seconds_bucket" and dict(labels)["stage"] == "preprocess"}
    assert sorted(buckets) == sorted(DEFAULT_BUCKETS + (float("inf"),))
    expected = {0.0005: 1, 0.001: 1, 0.003: 1, 0.005: 3, 0.2: 3, 0.3: 4, 10.0: 4, float("inf"): 5}
    for le, count in expected.items():
        assert buckets[le] == count, le
    assert value(samples, "edgead_stage_seconds_count", stage="infer") == 1
    assert value(samples, "edgead_stage_seconds_sum", stage="infer") == 0.0
    assert value(samples, "edgead_stage_seconds_bucket", stage="infer", le="0.0005") == 1
    assert value(samples, "edgead_frame_latency_seconds_count", camera="left") == 2
    assert value(samples, "edgead_frame_latency_seconds_sum", camera="left") == pytest.approx(0.052, abs=1e-12)
    assert value(samples, "edgead_frame_latency_seconds_bucket", camera="left", le="0.01") == 0
    assert value(samples, "edgead_frame_latency_seconds_bucket", camera="left", le="0.015") == 1
    assert value(samples, "edgead_frame_latency_seconds_bucket", camera="left", le="0.05") == 2
    assert value(samples, "edgead_frame_latency_seconds_bucket", camera="right", le="0.001") == 1
    assert value(samples, "edgead_frame_latency_seconds_count", camera="") == 1
    assert ("edgead_stage_seconds_count", (("stage", "latency"),)) not in samples


def test_values_move_between_scrapes(served):
    server, stats, clock = served
    server.observe("infer", 0.01)
    first, _ = scrape(server.port)
    left = stats["cameras"]["left"]
    left.update(frames=35, anomalies=5, dropped=6, reconnects=3, connected=False)
    stats["cameras"]["right"]["skipped"] = 4
    stats["streaming"] = False
    server.observe("infer", 0.02)
    server.observe("output", 0.001)
    clock.t += 1.0
    second, _ = scrape(server.port)
    assert value(first, "edgead_frames_total", camera="left") == 20
    assert value(second, "edgead_frames_total", camera="left") == 35
    assert value(second, "edgead_anomalies_total", camera="left") == 5
    assert value(second, "edgead_dropped_frames_total", camera="left") == 6
    assert value(second, "edgead_reconnects_total", camera="left") == 3
    assert value(second, "edgead_camera_connected", camera="left") == 0
    assert value(second, "edgead_skipped_frames_total", camera="right") == 4
    assert value(second, "edgead_streaming") == 0
    assert value(first, "edgead_stage_seconds_count", stage="infer") == 1
    assert value(second, "edgead_stage_seconds_count", stage="infer") == 2
    assert value(second, "edgead_stage_seconds_sum", stage="infer") == pytest.approx(0.03, abs=1e-12)
    assert ("edgead_stage_seconds_count", (("stage", "output"),)) not in first
    assert value(second, "edgead_stage_seconds_count", stage="output") == 1


def test_fps_from_the_previous_scrape_with_a_controlled_clock():
    stats = {"cameras": {"a": {"frames": 0}, "b": {"frames": 0}}}
    clock = Clock(100.0)
    server = MetricsServer(0, lambda: stats, {}, addr="127.0.0.1", clock=clock)
    clock.t = 104.0  # start() is the first baseline, not construction
    server.start()
    try:
        stats["cameras"]["a"]["frames"] = 50
        stats["cameras"]["b"]["frames"] = 20
        clock.t = 114.0
        s1, _ = scrape(server.port)  # first scrape: since start (10 s)
        assert value(s1, "edgead_camera_fps", camera="a") == 5.0
        assert value(s1, "edgead_camera_fps", camera="b") == 2.0
        assert value(s1, "edgead_fps") == 7.0
        s2, _ = scrape(server.port)  # same clock reading: the previous values again
        assert value(s2, "edgead_camera_fps", camera="a") == 5.0
        assert value(s2, "edgead_fps") == 7.0
        stats["cameras"]["a"]["frames"] = 60
        stats["cameras"]["c"] = {"frames": 8}  # a camera first seen now counts from 0
        clock.t = 118.0
        s3, _ = scrape(server.port)
        assert value(s3, "edgead_camera_fps", camera="a") == 2.5
        assert value(s3, "edgead_camera_fps", camera="b") == 0.0
        assert value(s3, "edgead_camera_fps", camera="c") == 2.0
        assert value(s3, "edgead_fps") == 4.5
        # model_info with an empty identity: every label present, empty
        assert value(s3, "edgead_model_info", **{key: "" for key in IDENTITY_KEYS}) == 1
    finally:
        server.close()


def test_mqtt_metrics_only_when_given(served):
    server, stats, _ = served
    without, _ = scrape(server.port)
    assert not [n for n in names(without) if n.startswith("edgead_mqtt_")]
    stats["mqtt"] = {"connected": True, "published": 7, "acknowledged": 6, "queued": 1, "dropped": 2,
                     "reconnects": 1}
    with_mqtt, types = scrape(server.port)
    assert value(with_mqtt, "edgead_mqtt_connected") == 1
    assert value(with_mqtt, "edgead_mqtt_events_published_total") == 7
    assert value(with_mqtt, "edgead_mqtt_events_acknowledged_total") == 6
    assert value(with_mqtt, "edgead_mqtt_events_dropped_total") == 2
    assert value(with_mqtt, "edgead_mqtt_queue_length") == 1
    assert value(with_mqtt, "edgead_mqtt_reconnects_total") == 1
    assert types["edgead_mqtt_events_published"] == "counter" and types["edgead_mqtt_queue_length"] == "gauge"


def test_a_raising_stats_fn_does_not_break_the_scrape(caplog):
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("pipeline gone")

    server = MetricsServer(0, broken, IDENTITY, addr="127.0.0.1").start()
    try:
        server.observe("infer", 0.01)
        with caplog.at_level(logging.DEBUG, logger="edgead.runtime.metrics"):
            first, _ = scrape(server.port)
            second, _ = scrape(server.port)
    finally:
        server.close()
    assert len(calls) == 2  # called at scrape time only (not at registration)
    assert value(first, "edgead_stats_errors_total") == 1
    assert value(second, "edgead_stats_errors_total") == 2
    assert value(second, "edgead_up") == 1
    assert value(second, "edgead_stage_seconds_count", stage="infer") == 1
    assert value(second, "edgead_model_info", **IDENTITY) == 1
    assert not [n for n in names(second) if n.startswith("edgead_frames") or n.startswith("edgead_fps")]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pipeline gone" in warnings[0].getMessage()


def test_port_in_use_is_one_line_and_close_frees_the_port():
    first = MetricsServer(0, dict, IDENTITY, addr="127.0.0.1").start()
    port = first.port
    second = MetricsServer(port, dict, IDENTITY, addr="127.0.0.1")
    try:
        with pytest.raises(ConfigError) as info:
            second.start()
        assert str(info.value) == "--metrics-port {}: address already in use".format(port)
        second.close()  # never started: a no-op
    finally:
        first.close()
    first.close()  # idempotent
    third = MetricsServer(port, dict, IDENTITY, addr="127.0.0.1").start()
    try:
        assert third.port == port
        samples, _ = scrape(port)
        assert value(samples, "edgead_up") == 1
        assert not [n for n in names(samples) if n.startswith("edgead_frames")]  # {} stats: no cameras, no error
        assert value(samples, "edgead_stats_errors_total") == 0
    finally:
        third.close()


def test_bind_errors_are_one_line():
    import errno
    import socket

    denied = bind_error(PermissionError(errno.EACCES, "Permission denied"), 80, "0.0.0.0")
    assert str(denied) == "--metrics-port 80: permission denied (ports below 1024 need root; choose e.g. 9108)"
    unknown = bind_error(socket.gaierror(-2, "Name or service not known"), 9108, "nohost")
    assert str(unknown) == "--metrics-port 9108: cannot listen on nohost (Name or service not known)"
    with pytest.raises(ConfigError) as info:  # TEST-NET-1: never an address of this machine
        MetricsServer(0, dict, {}, addr="192.0.2.1").start()
    assert str(info.value) == "--metrics-addr 192.0.2.1: not an address of this machine (Cannot assign requested " \
                              "address)"


def test_observe_is_thread_safe():
    server = MetricsServer(0, dict, {})  # never started: observe works without the HTTP server
    threads = [threading.Thread(target=lambda: [server.observe("infer", 0.002) for _ in range(500)])
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    registry = server.registry
    assert registry.get_sample_value("edgead_stage_seconds_count", {"stage": "infer"}) == 2000
    assert registry.get_sample_value("edgead_stage_seconds_bucket", {"stage": "infer", "le": "0.002"}) == 2000
    assert registry.get_sample_value("edgead_stage_seconds_bucket", {"stage": "infer", "le": "0.001"}) == 0


def test_mask_uri():
    assert mask_uri("rtsp://op:hunter2@10.0.0.7:554/s?x=1") == "rtsp://op:***@10.0.0.7:554/s?x=1"
    assert mask_uri("rtsp://10.0.0.7/s") == "rtsp://10.0.0.7/s"
    assert mask_uri("rtsp://op@10.0.0.7/s") == "rtsp://op@10.0.0.7/s"
    assert mask_uri("/data/a@b") == "/data/a@b"
    assert mask_uri(None) == ""
