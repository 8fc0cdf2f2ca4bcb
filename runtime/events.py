"""What one anomalous frame tells the plant: the event dict (MQTT payload) and the model's identity.

``anomaly_event(result, ...)`` -> JSON-able dict, one per anomalous frame (``Result.anomalous is True``)::

    {"type": "anomaly", "camera": "left", "source": "rtsp://...",
     "time": "2026-11-23T23:59:01.123Z"      (UTC, capture time, ms),
     "frame_index": 1234, "frame_name": null, "score": 3.41,
     "threshold": {"image": 2.9, "pixel": 2.6, "source": "normal-oos", "provenance": "image threshold 2.9, ..."},
     "boxes": [{"x": 10, "y": 20, "w": 30, "h": 12, "peak": 4.2}], "box_frame": {"width": 1920, "height": 1080},
     "latency_ms": 41.2,
     "model": {"name", "sha256", "method", "backbone", "precision", "backend"}, "host": "jetson-line3"}

``boxes`` are in the pixels of the frame they refer to (``box_frame``: the camera frame, or the model
input with ``annotate_on="input"``); ``peak``/``score``/thresholds are in anomaly-map units;
``threshold.provenance`` is ``modelinfo.describe_thresholds``' sentence. The MQTT publisher adds ``seq``.

Torch-free, Python 3.8.
"""
import datetime
import hashlib
import math
import os
import socket
import time

from edgead import __version__
from edgead.runtime import modelinfo

#: bytes read at a time while hashing a model file
_HASH_CHUNK = 1 << 20


def file_sha256(path):
    """Hex SHA-256 of the file at ``path`` (streamed: a 2 GB model costs 1 MB of memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_identity(path, info, backend=None):
    """dict of str: ``name`` (the file name without extension), ``sha256`` (of the model file as loaded),
    ``method``, ``backbone``, ``precision`` (``export.precision``), ``backend``, ``edgead_version`` (of this
    runtime). ``info``: the model's edgead metadata."""
    export = info.get("export") or {}
    backbone = info.get("backbone") or {}
    return {"name": os.path.splitext(os.path.basename(os.fspath(path)))[0],
            "sha256": file_sha256(path),
            "method": str(info.get("method") or ""),
            "backbone": str(backbone.get("name") or ""),
            "precision": str(export.get("precision") or ""),
            "backend": str(backend or ""),
            "edgead_version": __version__}


def wall_clock(perf_timestamp, now_perf=None, now_wall=None):
    """A ``time.perf_counter()`` timestamp (``Frame.timestamp``) -> seconds since the epoch."""
    now_perf = time.perf_counter() if now_perf is None else now_perf
    now_wall = time.time() if now_wall is None else now_wall
    return now_wall - (now_perf - perf_timestamp)


def utc_iso(epoch_seconds):
    """Seconds since the epoch -> ``2026-11-23T23:59:01.123Z``."""
    moment = datetime.datetime.fromtimestamp(epoch_seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "{:03d}Z".format(moment.microsecond // 1000)


def _number(value, digits=6):
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


class EventBuilder(object):
    """Builds the events of one run: the model identity, thresholds and provenance are computed once.

    identity: ``model_identity(...)``; info: the model metadata; sources: camera name -> source URI."""

    def __init__(self, identity, info, sources=None, host=None):
        self.identity = dict(identity)
        limits = modelinfo.thresholds(info)
        self.threshold = {"image": limits["image_threshold"], "pixel": limits["pixel_threshold"],
                          "source": limits["source"], "provenance": modelinfo.describe_thresholds(info)}
        self.sources = dict(sources or {})
        self.host = host if host is not None else socket.gethostname()

    def event(self, result, now_perf=None, now_wall=None):
        """``pipeline.Result`` -> event dict (see module doc)."""
        height, width = result.frame.shape[:2]
        return {
            "type": "anomaly",
            "camera": result.camera,
            "source": self.sources.get(result.camera),
            "time": utc_iso(wall_clock(result.timestamp, now_perf, now_wall)),
            "frame_index": int(result.index),
            "frame_name": result.name,
            "score": _number(result.score),
            "threshold": dict(self.threshold),
            "boxes": [{"x": int(b[0]), "y": int(b[1]), "w": int(b[2]), "h": int(b[3]), "peak": _number(b[4], 4)}
                      for b in result.boxes],
            "box_frame": {"width": int(width), "height": int(height)},
            "latency_ms": None if result.latency is None else round(result.latency * 1000.0, 3),
            "model": dict(self.identity),
            "host": self.host,
        }
