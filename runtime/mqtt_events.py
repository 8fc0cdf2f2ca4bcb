"""Anomaly events to an MQTT broker: ``edgead run --mqtt mqtt://[user[:pass]@]host[:port]/topic``.

Transport contract (what a consumer of the topic can rely on):

- **Topic**: exactly the URL's path (``mqtt://broker:1883/plant/line3`` -> ``plant/line3``), no wildcards.
  ``mqtt://`` is plain TCP (default port 1883), ``mqtts://`` is TLS verified against the system CAs (8883).
  MQTT 3.1.1, clean session, client id ``edgead-<host>-<pid>`` unless given; user/password from the URL.
- **Payload**: one UTF-8 JSON object per event (``events.anomaly_event``), strict JSON: NaN and +-inf are
  written as ``null``. The publisher adds ``"seq"``: 0, 1, 2, ... over the publisher's life (one process).
- **QoS 1, at-least-once**: an event counts as delivered when the broker's PUBACK arrives. At most
  ``max_inflight`` (20) events are handed to the client library at a time; those it has sent but not seen
  acknowledged when the connection drops stay in paho's session state and are re-sent (DUP flag) right after
  the reconnect (paho does this for QoS 1 whatever the clean-session flag), before any newer event. A consumer
  can therefore see an event twice (``seq`` repeats: de-duplicate on it) and, across a reconnect, never misses
  one that was handed over. Order is ``seq`` order except that re-sent events come before newer ones.
  An event the broker acknowledged is the broker's: if the broker dies before forwarding it, it is lost.
- **Local queue + drop policy**: while the broker is unreachable, events wait in a bounded in-memory queue
  (``queue_size``, ``--mqtt-queue``); when it is full the OLDEST queued event is dropped and counted
  (``stats()["dropped"]``), so the newest ``queue_size`` events survive an outage of any length. Memory is
  bounded by ``queue_size + max_inflight`` events. Nothing is written to disk; events still queued when the
  process ends (``close`` waits ``timeout`` for them) are lost and stay visible in ``stats()["queued"]``.
- **Reconnects**: a broker that is down at start, a DNS name that does not resolve, a refused login or a dropped
  connection are not errors: the client retries with exponential backoff ``backoff_min`` doubling to
  ``backoff_max`` (reset by a successful connection) and warns once per outage (plus one line when it is back).

Threads: paho's network thread (``loop_start``: all socket I/O, reconnects, callbacks) and one sender thread
(``edgead-mqtt-send``) that hands queued events to paho while connected. ``publish`` only serialises and appends
under a lock: it never waits for the network. ``stats`` may be called from any thread. Both threads are
daemons and end in ``close``.

Torch-free, Python 3.8; needs paho-mqtt >= 2.0 (``edgead[line]``).
"""
import collections
import json
import math
import os
import socket
import threading
import time
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho_client

from edgead.errors import ConfigError

#: (host, port, topic, username, password, tls) of an ``mqtt://`` / ``mqtts://`` URL
MqttTarget = collections.namedtuple("MqttTarget", "host port topic username password tls")

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
_FORM = "mqtt://[user[:pass]@]host[:port]/topic"
#: events handed to paho and not yet acknowledged, at most
MAX_INFLIGHT = 20
#: after a reconnect, wait this long at most for the re-sent events' PUBACKs before sending newer ones
_RESEND_WAIT_S = 10.0


def _masked(url):
    """The URL with its password replaced by ``***`` (for messages)."""
    url = str(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min([i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0] or [len(rest)])
    userinfo, at, hostport = rest[:end].rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return "{}://{}:***@{}{}".format(scheme, userinfo.split(":", 1)[0], hostport, rest[end:])


def parse_mqtt_url(url):
    """``mqtt://[user[:pass]@]host[:port]/topic/levels`` -> ``MqttTarget``; a one-line ``ConfigError`` otherwise.

    ``mqtts://`` means TLS (default port 8883; 1883 for ``mqtt://``). The topic is the whole path after the
    first ``/`` (percent-escapes decoded); it must be non-empty and free of the wildcards ``+`` and ``#`` and
    must not start with ``$`` (broker topics). Empty levels (``a//b``, ``a/``) are allowed, as in MQTT.
    """
    def bad(problem):
        return ConfigError("--mqtt {}: {} ({})".format(_masked(url), problem, _FORM))

    if not isinstance(url, str) or not url.strip():
        raise bad("empty URL")
    if any(ch.isspace() and ch != " " for ch in url) or "\x00" in url:
        raise bad("control characters in the URL")
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise bad("not a URL")
    scheme = scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise bad("scheme must be mqtt:// or mqtts://, not {}://".format(scheme))
    if "#" in url:
        raise bad("wildcards (+ #) are not allowed in a topic to publish to")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise bad("bad port or address ({})".format(exc))
    if parts.query or url.endswith("?"):
        raise bad("unexpected query string '?{}'".format(parts.query))
    host = parts.hostname
    if not host:
        raise bad("no host")
    if ":" not in host:  # a name or IPv4: each label must be encodable (a..b, 64+ characters fail)
        try:
            host.encode("idna")
        except UnicodeError:
            raise bad("bad host name '{}'".format(host))
    if port is None:
        port = _DEFAULT_PORTS[scheme]
    elif port == 0:
        raise bad("port 0")
    topic = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    if not topic:
        raise bad("no topic")
    if "+" in topic or "#" in topic:
        raise bad("wildcards (+ #) are not allowed in a topic to publish to")
    if topic.startswith("$"):
        raise bad("topics starting with '$' are reserved for the broker")
    if "\x00" in topic:
        raise bad("NUL character in the topic")
    if len(topic.encode("utf-8")) > 65535:
        raise bad("topic longer than 65535 bytes")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if password is not None and not username:
        raise bad("a password needs a user name")
    return MqttTarget(host, port, topic, username or None, password, scheme == "mqtts")


def _display_url(target):
    """``mqtt[s]://[user@]host:port/topic`` (never the password)."""
    host = "[{}]".format(target.host) if ":" in target.host else target.host
    user = "{}@".format(target.username) if target.username else ""
    return "{}://{}{}:{}/{}".format("mqtts" if target.tls else "mqtt", user, host, target.port, target.topic)


def _json_ready(value):
    """``value`` with NaN/inf -> None, tuples -> lists, numpy scalars/arrays -> Python (for strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if hasattr(value, "tolist"):  # numpy scalar or array, without importing numpy
        return _json_ready(value.tolist())
    return value  # json.dumps says what is wrong with it


def _reason(reason_code):
    """`` (reason)`` for a paho reason code, or nothing for paho's catch-all (a socket error)."""
    text = str(reason_code)
    return "" if text in ("Unspecified error", "Success") else " ({})".format(text)


def _client_id():
    host = (socket.gethostname() or "host").split(".")[0][:20]
    return "edgead-{}-{}".format(host, os.getpid())


class _Client(paho_client.Client):
    """paho's Client whose (re)connect attempts report their error to the publisher and never kill the network
    thread: paho's loop retries on OSError only, so any other exception is turned into one."""

    def __init__(self, owner, *args, **kwargs):
        super(_Client, self).__init__(*args, **kwargs)
        self._edgead_owner = owner

    def reconnect(self):
        owner = self._edgead_owner
        owner._before_connect()
        try:
            return super(_Client, self).reconnect()
        except Exception as exc:  # noqa: BLE001 - DNS, refused, TLS, bad host: all retried
            owner._connect_failed(exc)
            if isinstance(exc, OSError):
                raise
            raise OSError(str(exc))


class MqttPublisher(object):
    """Publishes event dicts as JSON to one topic, QoS 1, with a bounded local queue and reconnects.

    ``publish(event)`` from the frame loop never blocks and never raises because of the broker; ``close`` flushes
    for at most ``timeout`` seconds. ``warn(message)`` receives one-line warnings (outage, recovery, close with
    events left). See the module docstring for the delivery contract.
    """

    def __init__(self, url, client_id=None, qos=1, queue_size=1000, backoff_min=0.5, backoff_max=30.0,
                 keepalive=30, connect_timeout=5.0, warn=None):
        self.target = parse_mqtt_url(url)
        if qos not in (0, 1):
            raise ConfigError("--mqtt {}: QoS must be 0 or 1, not {}".format(_masked(url), qos))
        if int(queue_size) < 1:
            raise ConfigError("--mqtt-queue {}: must be at least 1".format(queue_size))
        if not 0 < backoff_min <= backoff_max:
            raise ConfigError("mqtt backoff: need 0 < min ({}) <= max ({})".format(backoff_min, backoff_max))
        self.url = _display_url(self.target)
        self.qos = int(qos)
        self.queue_size = int(queue_size)
        self.backoff_min = float(backoff_min)
        self.backoff_max = float(backoff_max)
        self.keepalive = int(keepalive)
        self.connect_timeout = float(connect_timeout)
        self.client_id = client_id or _client_id()
        self.max_inflight = MAX_INFLIGHT
        self._warn = warn
        self._cond = threading.Condition(threading.Lock())
        self._queue = collections.deque()
        self._seq = 0
        self._published = 0
        self._acknowledged = 0
        self._queued_max = 0
        self._dropped = 0
        self._reconnects = 0
        self._last_error = None
        self._connected = False
        self._ever_connected = False
        self._resend_until = None  # after a reconnect with events in flight: hold newer ones until then
        self._outage_since = None  # time of the first failure of the current outage (warned once)
        self._dropped_at_outage = 0
        self._started = False
        self._closing = False  # close() called (it may still be flushing)
        self._closed = False  # flushing over: publish() counts new events as dropped, the threads end
        self._sender = None
        self._connect_attempts = 0  # tests wait on it
        self._connect_gate = threading.Event()  # test hook: while cleared, (re)connect attempts fail
        self._connect_gate.set()
        self._client = self._make_client()

    # ---------------------------------------------------------------- public API

    def start(self):
        """Start the network and sender threads; returns at once (the first connection happens in the background)."""
        with self._cond:
            if self._started or self._closed:
                return
            self._started = True
        self._sender = threading.Thread(target=self._send_loop, name="edgead-mqtt-send", daemon=True)
        self._sender.start()
        self._client.connect_async(self.target.host, self.target.port, keepalive=self.keepalive)
        self._client.loop_start()

    def publish(self, event):
        """Queue ``event`` (a JSON-able dict; a copy gets ``"seq"``) for the broker. Never blocks on the network;
        raises only for an event that cannot be JSON (TypeError/ValueError: a caller bug)."""
        body = _json_ready(dict(event))
        with self._cond:
            seq = self._seq
            body["seq"] = seq
            payload = json.dumps(body, allow_nan=False, separators=(",", ":"))
            self._seq = seq + 1
            if self._closed:
                self._dropped += 1
                return seq
            if len(self._queue) >= self.queue_size:
                self._queue.popleft()
                self._dropped += 1
            self._queue.append((seq, payload))
            self._queued_max = max(self._queued_max, len(self._queue))
            self._cond.notify_all()
        return seq

    def close(self, timeout=5.0):
        """Wait up to ``timeout`` s for queued and in-flight events to be acknowledged, then disconnect and stop
        both threads, all within ``timeout``. Idempotent; events left over stay counted in ``stats``."""
        timeout = max(0.0, float(timeout))
        deadline = time.monotonic() + timeout
        flush_until = deadline - min(0.5, 0.25 * timeout)  # the rest is for the disconnect
        with self._cond:
            if self._closing:
                return
            self._closing = True
            started = self._started
            while started and (self._queue or self._published > self._acknowledged):
                remaining = flush_until - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.1))
            self._closed = True
            left = len(self._queue) + self._published - self._acknowledged
            self._cond.notify_all()
        if not started:
            return
        if left:
            self._say("mqtt {}: closing with {} event(s) not acknowledged by the broker".format(self.url, left))
        try:
            self._client.disconnect()
        except Exception:  # noqa: BLE001 - best effort
            pass
        # paho's loop_stop joins without a timeout (a DNS lookup or a backoff sleep can hold it ~1 s): both
        # threads are daemons and end by themselves once closed; wait for them only until the deadline
        stopper = threading.Thread(target=self._stop_network, name="edgead-mqtt-stop", daemon=True)
        stopper.start()
        for thread in (stopper, self._sender):
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._connected = False

    def stats(self):
        """Counters (a new dict, consistent snapshot): see the module docstring."""
        with self._cond:
            return {"url": self.url, "topic": self.target.topic, "qos": self.qos, "connected": self._connected,
                    "published": self._published, "acknowledged": self._acknowledged,
                    "inflight": self._published - self._acknowledged, "queued": len(self._queue),
                    "queued_max": self._queued_max, "dropped": self._dropped, "reconnects": self._reconnects,
                    "last_error": self._last_error}

    # ---------------------------------------------------------------- internals

    def _make_client(self):
        client = _Client(self, callback_api_version=paho_client.CallbackAPIVersion.VERSION2,
                         client_id=self.client_id, clean_session=True, protocol=paho_client.MQTTv311,
                         reconnect_on_failure=True)
        client.reconnect_delay_set(self.backoff_min, self.backoff_max)
        client.max_inflight_messages_set(0)  # unlimited in paho: ours (max_inflight) bounds it, and paho's
        client.max_queued_messages_set(0)    # "queued" state can stall its re-sends after a reconnect
        client.connect_timeout = self.connect_timeout
        if self.target.username:
            client.username_pw_set(self.target.username, self.target.password)
        if self.target.tls:
            client.tls_set()  # system CA certificates, hostname checked
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_connect_fail = self._on_connect_fail
        return client

    def _say(self, message):
        if self._warn is not None:
            try:
                self._warn(message)
            except Exception:  # noqa: BLE001 - a broken warn function must not break the publisher
                pass

    def _stop_network(self):
        try:
            self._client.loop_stop()
        except Exception:  # noqa: BLE001
            pass

    def _before_connect(self):
        """Runs in paho's thread before each connection attempt (an OSError here is a failed attempt)."""
        self._connect_attempts += 1
        if self._closed:
            raise OSError("publisher closed")
        if not self._connect_gate.is_set():
            raise OSError("connection attempts held (test hook)")

    def _outage(self, error):
        """Record a failure; the first one of an outage is warned (call with the lock held; returns the message)."""
        self._last_error = error
        if self._outage_since is not None:
            return None
        self._outage_since = time.monotonic()
        self._dropped_at_outage = self._dropped
        return ("mqtt {}: {}; keeping up to {} events, retrying every {:g}-{:g} s".format(
            self.url, error, self.queue_size, self.backoff_min, self.backoff_max))

    def _connect_failed(self, exc):
        try:
            if self._closed:
                return
            text = str(exc) or type(exc).__name__
            if isinstance(exc, socket.gaierror):
                text = "cannot resolve {} ({})".format(self.target.host, text)
            with self._cond:
                message = self._outage("cannot connect: {}".format(text))
            if message:
                self._say(message)
        except Exception:  # noqa: BLE001 - never let bookkeeping kill paho's thread
            pass

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        try:
            message = None
            with self._cond:
                if reason_code.is_failure:
                    message = self._outage("broker refused the connection: {}".format(reason_code))
                else:
                    if self._ever_connected:
                        self._reconnects += 1
                    self._ever_connected = True
                    self._connected = True
                    if self._published > self._acknowledged:  # paho re-sends these next: let them go first
                        self._resend_until = time.monotonic() + _RESEND_WAIT_S
                    if self._outage_since is not None:
                        message = "mqtt {}: connected after {:.1f} s, {} event(s) dropped meanwhile".format(
                            self.url, time.monotonic() - self._outage_since, self._dropped - self._dropped_at_outage)
                        self._outage_since = None
                    self._cond.notify_all()
            if message:
                self._say(message)
        except Exception:  # noqa: BLE001
            pass

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        try:
            message = None
            with self._cond:
                was = self._connected
                self._connected = False
                if was and not self._closed:
                    message = self._outage("connection lost" + _reason(reason_code))
                elif not self._closed and self._outage_since is None:
                    message = self._outage("the broker closed the connection before accepting it" +
                                           _reason(reason_code))
                self._cond.notify_all()
            if message:
                self._say(message)
        except Exception:  # noqa: BLE001
            pass

    def _on_connect_fail(self, client, userdata):
        pass  # the error was recorded by _Client.reconnect

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        if self.qos == 0:
            return  # counted when handed over (paho reports QoS 0 writes here too)
        try:
            with self._cond:
                self._acknowledged += 1
                if self._resend_until is not None and self._published <= self._acknowledged:
                    self._resend_until = None
                self._cond.notify_all()
        except Exception:  # noqa: BLE001
            pass

    def _may_send(self):
        if not (self._connected and self._queue and self._published - self._acknowledged < self.max_inflight):
            return False
        if self._resend_until is not None:
            if time.monotonic() < self._resend_until:
                return False
            self._resend_until = None
        return True

    def _send_loop(self):
        """Sender thread: hands queued events to paho, in order, while connected and under max_inflight."""
        while True:
            with self._cond:
                while not self._closed and not self._may_send():
                    self._cond.wait(0.5 if self._resend_until is not None else None)
                if self._closed:
                    return
                seq, payload = self._queue.popleft()
                self._published += 1  # before paho sees it: its PUBACK may come before publish() returns
            try:
                # paho takes its own locks here, never while we hold ours (its callbacks take ours)
                info = self._client.publish(self.target.topic, payload, qos=self.qos)
                if info.rc not in (paho_client.MQTT_ERR_SUCCESS, paho_client.MQTT_ERR_NO_CONN):
                    raise RuntimeError(paho_client.error_string(info.rc))
                if self.qos == 0:
                    with self._cond:
                        self._acknowledged += 1  # nothing to wait for
                        self._cond.notify_all()
            except Exception as exc:  # noqa: BLE001 - an event paho refused: counted as dropped, thread lives
                with self._cond:
                    self._published -= 1
                    self._dropped += 1
                    self._last_error = "event seq {} not sent: {}".format(seq, exc)
                self._say("mqtt {}: {}".format(self.url, self._last_error))
