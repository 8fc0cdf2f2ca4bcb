"""Prometheus endpoint of ``edgead run --metrics-port N``: stage latency histograms, FPS, drops, reconnects,
anomaly counts and the model identity, served with prometheus-client on ``http://ADDR:N/metrics``.

``MetricsServer(port, stats_fn, identity)`` owns its ``CollectorRegistry`` (never the global default one, so
several servers can live in one process and nothing else leaks in). The pipeline feeds the histograms with
``observe(stage, seconds, camera)`` (its ``on_timing`` hook); everything else is read from ``stats_fn()`` when
Prometheus scrapes (in the HTTP server's thread), so the frame loop pays nothing for it.

Metrics (base unit seconds; counters are monotonic over the run and end in ``_total``):

===================================== ========= ============== ====== ==============================================
metric                                type      labels         unit   meaning
===================================== ========= ============== ====== ==============================================
edgead_stage_seconds                  histogram stage          s      one pipeline stage (capture_wait, preprocess,
                                                                      infer, postprocess, output, ...), per batch
edgead_frame_latency_seconds          histogram camera         s      capture -> result, per frame
edgead_frames_total                   counter   camera         frames frames processed (results produced)
edgead_anomalies_total                counter   camera         frames frames judged anomalous
edgead_invalid_scores_total           counter   camera         frames frames whose score was NaN/inf
edgead_dropped_frames_total           counter   camera         frames live frames the capture queue dropped
edgead_skipped_frames_total           counter   camera         frames unreadable frames skipped
edgead_reconnects_total               counter   camera         1      source reconnects
edgead_camera_connected               gauge     camera         0/1    capture running and not reconnecting
edgead_camera_fps                     gauge     camera         1/s    frames per second since the previous scrape
edgead_fps                            gauge     -              1/s    sum of edgead_camera_fps over the cameras
edgead_camera_info                    gauge     camera, source 1      camera name -> source URI (password masked)
edgead_streaming                      gauge     -              0/1    frames are flowing (the frame loop runs)
edgead_run_seconds                    gauge     -              s      time since the frame loop started (wall_s)
edgead_up                             gauge     -              1      the process answers (always 1)
edgead_stats_errors_total             counter   -              1      scrapes whose stats_fn raised
edgead_model_info                     gauge     name, sha256,  1      the model being run
                                                method,
                                                backbone,
                                                precision,
                                                backend,
                                                edgead_version
edgead_mqtt_connected                 gauge     -              0/1    MQTT client connected (only with --mqtt)
edgead_mqtt_events_published_total    counter   -              events events handed to the broker
edgead_mqtt_events_acknowledged_total counter   -              events events the broker acknowledged
edgead_mqtt_events_dropped_total      counter   -              events events dropped (queue full)
edgead_mqtt_queue_length              gauge     -              events events waiting to be sent
edgead_mqtt_reconnects_total          counter   -              1      MQTT reconnects
===================================== ========= ============== ====== ==============================================

Histogram buckets (``DEFAULT_BUCKETS``): 0.5 ms .. 10 s, 22 upper bounds plus ``+Inf``. ``observe`` sends
``stage="latency"`` to ``edgead_frame_latency_seconds{camera}`` (camera ``""`` when not given); any other stage
goes to ``edgead_stage_seconds{stage}`` (its ``camera`` is ignored). NaN/inf timings are ignored, negative ones
count as 0 (as ``report.StageStats`` does).

FPS, precisely: at each scrape, ``edgead_camera_fps{camera}`` = (that camera's ``frames`` now - its ``frames``
at the previous scrape) / (seconds between the two scrapes); the first scrape measures from ``start()``. A
camera first seen at a scrape counts from 0 frames at the previous scrape. ``edgead_fps`` = the sum over
cameras (all frames processed in the interval / the interval). "Previous scrape" means any scrape of this
server: two Prometheus servers scraping the same run each see shorter intervals, so for dashboards prefer
``rate(edgead_frames_total[1m])``; the gauges are for a quick look (``curl``) and simple scrapers. A scrape
at the same clock reading as the previous one repeats the previous values.

Per-camera counters only (no unlabelled totals: ``sum()`` them). ``stats_fn`` raising (or returning something
that is not a stats dict) never breaks a scrape: the histograms, ``edgead_model_info``, ``edgead_up`` and
``edgead_stats_errors_total`` still come out; the first failure is logged as a warning, later ones at debug.

Example PromQL::

    # p99 capture -> result latency per camera over 5 minutes
    histogram_quantile(0.99, sum by (camera, le) (rate(edgead_frame_latency_seconds_bucket[5m])))
    # frames per second per camera (and in total: sum without (camera))
    rate(edgead_frames_total[1m])
    # share of frames judged anomalous, per camera, over the last hour
    increase(edgead_anomalies_total[1h]) / clamp_min(increase(edgead_frames_total[1h]), 1)

Torch-free, Python 3.8; needs prometheus-client (``edgead[line]``; >= 0.20 for ``close()`` to stop the server).
"""
import errno
import logging
import math
import threading
import time

from urllib.parse import urlsplit, urlunsplit

import prometheus_client
from prometheus_client import CollectorRegistry, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from edgead.errors import ConfigError

log = logging.getLogger("edgead.runtime.metrics")

#: histogram upper bounds (seconds), suited to 0.5 ms .. 10 s edge latencies
DEFAULT_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
                   0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
#: keys of the identity dict, in label order of ``edgead_model_info``
IDENTITY_KEYS = ("name", "sha256", "method", "backbone", "precision", "backend", "edgead_version")
#: the stage ``observe`` routes to ``edgead_frame_latency_seconds{camera}``
LATENCY_STAGE = "latency"

#: per-camera counters: (stats key, metric name, help)
_CAMERA_COUNTERS = (
    ("frames", "edgead_frames_total", "Frames processed (results produced)."),
    ("anomalies", "edgead_anomalies_total", "Frames judged anomalous."),
    ("invalid_scores", "edgead_invalid_scores_total", "Frames whose anomaly score was NaN/inf (no verdict)."),
    ("dropped", "edgead_dropped_frames_total", "Live frames the capture queue dropped (oldest first)."),
    ("skipped", "edgead_skipped_frames_total", "Unreadable frames skipped (--on-error skip)."),
    ("reconnects", "edgead_reconnects_total", "Source reconnects."),
)
#: MQTT: (stats key, metric name, type, help)
_MQTT_METRICS = (
    ("connected", "edgead_mqtt_connected", "gauge", "1 while the MQTT client is connected to the broker."),
    ("published", "edgead_mqtt_events_published_total", "counter", "Anomaly events handed to the broker."),
    ("acknowledged", "edgead_mqtt_events_acknowledged_total", "counter", "Anomaly events the broker acknowledged."),
    ("dropped", "edgead_mqtt_events_dropped_total", "counter", "Anomaly events dropped (publish queue full)."),
    ("queued", "edgead_mqtt_queue_length", "gauge", "Anomaly events waiting to be sent."),
    ("reconnects", "edgead_mqtt_reconnects_total", "counter", "MQTT reconnects."),
)
#: every metric the stats collector may yield: (name, type)
_STATS_METRICS = tuple([(metric, "counter") for _, metric, _ in _CAMERA_COUNTERS] + [
    ("edgead_camera_connected", "gauge"), ("edgead_camera_info", "gauge"), ("edgead_camera_fps", "gauge"),
    ("edgead_fps", "gauge"), ("edgead_streaming", "gauge"), ("edgead_run_seconds", "gauge"), ("edgead_up", "gauge"),
    ("edgead_stats_errors_total", "counter")] + [(metric, kind) for _, metric, kind, _ in _MQTT_METRICS])


def _number(value):
    """float(value) for a finite number or bool; None otherwise (the sample is left out)."""
    if value is None or isinstance(value, str):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def mask_uri(uri):
    """``rtsp://user:secret@host/x`` -> ``rtsp://user:***@host/x``; other values unchanged (as str, None -> "")."""
    if uri is None:
        return ""
    uri = str(uri)
    if "@" not in uri or "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
        if parts.password is None:
            return uri
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc="{}:***@{}".format(parts.username or "", host)))
    except ValueError:
        return uri


def bind_error(exc, port, addr):
    """One-line ConfigError for an OSError raised while binding ``addr:port``."""
    code = getattr(exc, "errno", None)
    reason = " ".join(str(getattr(exc, "strerror", None) or exc).split())
    if code == errno.EADDRINUSE:
        return ConfigError("--metrics-port {}: address already in use".format(port))
    if code == errno.EACCES:
        return ConfigError("--metrics-port {}: permission denied (ports below 1024 need root; choose e.g. 9108)"
                           .format(port))
    if code == errno.EADDRNOTAVAIL:
        return ConfigError("--metrics-addr {}: not an address of this machine ({})".format(addr, reason))
    return ConfigError("--metrics-port {}: cannot listen on {} ({})".format(port, addr, reason))


class _StatsCollector(object):
    """Registry collector: the stats_fn metrics, read at scrape time."""

    def __init__(self, server):
        self._server = server

    def describe(self):
        """Sample-less families naming what ``collect`` may yield: the registry maps these names to this
        collector (``/metrics?name[]=...`` filtering) without calling stats_fn at registration."""
        return [CounterMetricFamily(name, "") if kind == "counter" else GaugeMetricFamily(name, "")
                for name, kind in _STATS_METRICS]

    def collect(self):
        return self._server._collect()


class MetricsServer(object):
    """Prometheus endpoint of one run (see module doc for the metrics).

    Args:
        port: TCP port; 0 = any free one (``port`` tells which after ``start``).
        stats_fn: called at every scrape (from the HTTP thread); returns the live stats dict: ``frames``,
            ``skipped``, ``dropped``, ``reconnects``, ``invalid_scores``, ``anomalies``, ``wall_s``, ``streaming``,
            ``cameras`` {name: {``source``, ``frames``, ``anomalies``, ``invalid_scores``, ``dropped``, ``skipped``,
            ``reconnects``, ``connected``}}, ``mqtt`` (None or {``connected``, ``published``, ``acknowledged``,
            ``queued``, ``dropped``, ``reconnects``}).
        identity: ``events.model_identity(...)``: {name, sha256, method, backbone, precision, backend,
            edgead_version}; missing keys are "".
        addr: address to bind (``0.0.0.0``: every IPv4 interface; ``::`` for IPv6).
        stage_buckets: histogram upper bounds in seconds.
        clock: monotonic seconds for the FPS gauges (tests inject one).
    """

    def __init__(self, port, stats_fn, identity, addr="0.0.0.0", stage_buckets=DEFAULT_BUCKETS, clock=None):
        self.requested_port = int(port)
        self.port = self.requested_port
        self.addr = addr
        self.stats_fn = stats_fn
        self.identity = {key: str((identity or {}).get(key) or "") for key in IDENTITY_KEYS}
        self._clock = clock if clock is not None else time.monotonic
        self.registry = CollectorRegistry()
        buckets = tuple(stage_buckets)
        self._stage_hist = Histogram("edgead_stage_seconds", "Time spent in one pipeline stage, per batch.",
                                     ["stage"], registry=self.registry, buckets=buckets)
        self._latency_hist = Histogram("edgead_frame_latency_seconds",
                                       "Capture -> result latency of one frame (queueing included).",
                                       ["camera"], registry=self.registry, buckets=buckets)
        Info("edgead_model", "The model being run (value 1).", registry=self.registry).info(self.identity)
        self.registry.register(_StatsCollector(self))
        self._stage_children = {}
        self._latency_children = {}
        self._scrape_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._stats_errors = 0
        self._last_t = self._clock()
        self._last_frames = {}
        self._last_fps = {}
        self._server = None
        self._thread = None

    # --- feeding --------------------------------------------------------------------------------------

    def observe(self, stage, seconds, camera=None):
        """Add one timing (seconds). Thread-safe; ``stage == "latency"`` goes to the per-camera frame latency."""
        try:
            value = float(seconds)
        except (TypeError, ValueError):
            return
        if not math.isfinite(value):
            return
        value = max(value, 0.0)
        if stage == LATENCY_STAGE:
            key = "" if camera is None else str(camera)
            child = self._latency_children.get(key)
            if child is None:
                child = self._latency_children[key] = self._latency_hist.labels(key)
        else:
            key = str(stage)
            child = self._stage_children.get(key)
            if child is None:
                child = self._stage_children[key] = self._stage_hist.labels(key)
        child.observe(value)

    # --- serving --------------------------------------------------------------------------------------

    def start(self):
        """Listen on ``addr:port`` (a daemon thread serves ``/metrics``); returns self.

        Raises ConfigError (one line) when the port is taken, needs root, or the address is not local."""
        if self._server is not None:
            return self
        try:
            served = prometheus_client.start_http_server(self.requested_port, addr=self.addr, registry=self.registry)
        except OSError as exc:  # socket.gaierror included (an address that does not resolve)
            raise bind_error(exc, self.requested_port, self.addr)
        with self._scrape_lock:
            self._last_t = self._clock()
        if isinstance(served, tuple):  # prometheus-client >= 0.20: (server, thread)
            self._server, self._thread = served
            self.port = int(self._server.server_address[1])
        else:
            self._server = True  # started, but this client cannot stop it
            log.warning("prometheus-client < 0.20: the metrics server on port %s runs until the process exits",
                        self.requested_port)
        return self

    def close(self):
        """Stop serving and free the port. Idempotent; a no-op when never started."""
        with self._close_lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None or server is True:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # --- scraping -------------------------------------------------------------------------------------

    def _collect(self):
        """Metric families from stats_fn (called by the registry at each scrape)."""
        with self._scrape_lock:
            families = []
            try:
                stats = self.stats_fn()
                if not isinstance(stats, dict):
                    raise TypeError("stats_fn returned {}, not a dict".format(type(stats).__name__))
                families = self._stats_families(stats)
            except Exception as exc:  # a broken stats_fn must not break the scrape
                self._stats_errors += 1
                if self._stats_errors == 1:
                    log.warning("metrics: reading the run's statistics failed (%s: %s); the scrape goes on without "
                                "them (counted in edgead_stats_errors_total)", type(exc).__name__, exc)
                else:
                    log.debug("metrics: stats_fn failed again: %r", exc)
                families = []
            up = GaugeMetricFamily("edgead_up", "1: the edgead process answers.", value=1)
            errors = CounterMetricFamily("edgead_stats_errors_total", "Scrapes whose statistics could not be read.",
                                         value=self._stats_errors)
            return [up] + families + [errors]

    def _stats_families(self, stats):
        cameras = stats.get("cameras") or {}
        names = [str(name) for name in cameras]
        entries = [cam if isinstance(cam, dict) else {} for cam in cameras.values()]
        families = []
        for key, metric, doc in _CAMERA_COUNTERS:
            family = CounterMetricFamily(metric, doc, labels=["camera"])
            for name, cam in zip(names, entries):
                value = _number(cam.get(key))
                if value is not None:
                    family.add_metric([name], value)
            families.append(family)
        connected = GaugeMetricFamily("edgead_camera_connected", "1 while the camera's capture runs and is not "
                                      "reconnecting.", labels=["camera"])
        info = GaugeMetricFamily("edgead_camera_info", "Camera name -> source URI (password masked), value 1.",
                                 labels=["camera", "source"])
        for name, cam in zip(names, entries):
            value = _number(cam.get("connected"))
            if value is not None:
                connected.add_metric([name], value)
            info.add_metric([name, mask_uri(cam.get("source"))], 1)
        families.extend([connected, info])
        families.extend(self._fps_families(names, entries))
        streaming = _number(stats.get("streaming"))
        if streaming is not None:
            families.append(GaugeMetricFamily("edgead_streaming", "1 while frames flow (the frame loop runs).",
                                              value=streaming))
        wall = _number(stats.get("wall_s"))
        if wall is not None:
            families.append(GaugeMetricFamily("edgead_run_seconds", "Seconds since the frame loop started.",
                                              value=wall, unit="seconds"))
        mqtt = stats.get("mqtt")
        if isinstance(mqtt, dict):
            for key, metric, kind, doc in _MQTT_METRICS:
                value = _number(mqtt.get(key))
                if value is None:
                    continue
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                families.append(cls(metric, doc, value=value))
        return families

    def _fps_families(self, names, entries):
        """edgead_camera_fps{camera} and edgead_fps: frames since the previous scrape / seconds since it."""
        now = self._clock()
        elapsed = now - self._last_t
        frames = {}
        for name, cam in zip(names, entries):
            value = _number(cam.get("frames"))
            if value is not None:
                frames[name] = value
        if elapsed > 0:
            fps = {name: max(value - self._last_frames.get(name, 0.0), 0.0) / elapsed
                   for name, value in frames.items()}
            self._last_t = now
            self._last_frames = frames
            self._last_fps = fps
        else:  # same clock reading as the previous scrape: repeat its values
            fps = {name: self._last_fps.get(name, 0.0) for name in frames}
        per_camera = GaugeMetricFamily("edgead_camera_fps", "Frames per second of one camera since the previous "
                                       "scrape (the first: since the server started).", labels=["camera"])
        for name in names:
            if name in fps:
                per_camera.add_metric([name], fps[name])
        total = GaugeMetricFamily("edgead_fps", "Frames per second over all cameras since the previous scrape "
                                  "(sum of edgead_camera_fps).", value=sum(fps.values()))
        return [per_camera, total]
