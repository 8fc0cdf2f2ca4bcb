"""MQTT events (runtime/mqtt_events.py, ``edgead run --mqtt``) against a real broker: amqtt as a subprocess on a
free localhost port (tests/mqtt_broker.py), a paho subscriber at QoS 1, and the broker killed with SIGKILL and
restarted mid-stream."""
import json
import math
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from edgead.errors import ConfigError
from edgead.runtime.mqtt_events import MqttPublisher, MqttTarget, parse_mqtt_url

from mqtt_broker import AmqttBroker, free_port

TOPIC = "plant/line3/events"
WAIT_S = 15.0  # generous: every wait polls and returns as soon as its condition holds


def wait_until(condition, what, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.01)


class Subscriber(object):
    """paho QoS 1 subscriber on TOPIC that reconnects fast (0.05-0.2 s) and re-subscribes on every connect."""

    def __init__(self, port, topic=TOPIC):
        self.cond = threading.Condition()
        self.messages = []  # decoded payloads, in arrival order
        self.raw = []
        self.subscriptions = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-sub-{}".format(port))
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.cond:
            self.subscriptions += 1
            self.cond.notify_all()

    def _on_message(self, client, userdata, message):
        with self.cond:
            self.raw.append(message.payload)
            self.messages.append(json.loads(message.payload.decode("utf-8")))
            self.cond.notify_all()

    def wait(self, predicate, what, timeout=WAIT_S):
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self), timeout), "timed out waiting for " + what

    def seqs(self):
        with self.cond:
            return [m["seq"] for m in self.messages]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(tmp_path):
    with AmqttBroker(free_port(), tmp_path) as running:
        yield running


@pytest.fixture
def closing():
    """Collects publishers and subscribers and closes them at teardown, whatever the test did."""
    things = []
    yield things.append
    for thing in reversed(things):
        thing.close(**({"timeout": 0.5} if isinstance(thing, MqttPublisher) else {}))


def url(port):
    return "mqtt://127.0.0.1:{}/{}".format(port, TOPIC)


# ------------------------------------------------------------------------------------------------ URL parsing

@pytest.mark.parametrize("text, expected", [
    ("mqtt://broker/plant/line3", MqttTarget("broker", 1883, "plant/line3", None, None, False)),
    ("mqtts://broker.example.com/t", MqttTarget("broker.example.com", 8883, "t", None, None, True)),
    ("mqtts://broker:9999/t", MqttTarget("broker", 9999, "t", None, None, True)),
    ("mqtt://user:p%40ss@10.0.0.5:1884/a//b/", MqttTarget("10.0.0.5", 1884, "a//b/", "user", "p@ss", False)),
    ("mqtt://user@host/t", MqttTarget("host", 1883, "t", "user", None, False)),
    ("mqtt://[::1]:1883/x/y", MqttTarget("::1", 1883, "x/y", None, None, False)),
    ("MQTT://Broker/Line%203/caf%C3%A9", MqttTarget("broker", 1883, "Line 3/café", None, None, False)),
])
def test_parse_good_urls(text, expected):
    assert parse_mqtt_url(text) == expected


@pytest.mark.parametrize("text, problem", [
    ("", "empty URL"),
    ("broker:1883/t", "not a URL"),
    ("http://broker/t", "scheme must be mqtt:// or mqtts://"),
    ("mqtt://broker", "no topic"),
    ("mqtt://broker:1883/", "no topic"),
    ("mqtt:///t", "no host"),
    ("mqtt://broker:99999/t", "bad port"),
    ("mqtt://broker:abc/t", "bad port"),
    ("mqtt://broker:0/t", "port 0"),
    ("mqtt://a..b/t", "bad host name"),
    ("mqtt://broker/a/+/b", "wildcards"),
    ("mqtt://broker/a/#", "wildcards (+ #)"),
    ("mqtt://broker/$SYS/x", "reserved"),
    ("mqtt://broker/t?retain=1", "query string"),
    ("mqtt://:pw@broker/t", "password needs a user name"),
])
def test_parse_bad_urls_one_line(text, problem):
    with pytest.raises(ConfigError) as info:
        parse_mqtt_url(text)
    message = str(info.value)
    assert "\n" not in message
    prefix = "--mqtt {}: ".format(text.replace(":pw@", ":***@"))  # the password is never shown
    assert message.startswith(prefix) and problem in message[len(prefix):], message
    assert "(mqtt://[user[:pass]@]host[:port]/topic)" in message


def test_password_never_shown():
    with pytest.raises(ConfigError) as info:
        parse_mqtt_url("mqtt://ops:s3cret@broker:0/t")
    assert "s3cret" not in str(info.value) and "ops:***@broker:0/t" in str(info.value)
    publisher = MqttPublisher("mqtt://ops:s3cret@127.0.0.1:1/t")  # never started: nothing to close
    stats = publisher.stats()
    assert stats["url"] == "mqtt://ops@127.0.0.1:1/t" and "s3cret" not in repr(stats)
    assert stats == {"url": "mqtt://ops@127.0.0.1:1/t", "topic": "t", "qos": 1, "connected": False, "published": 0,
                     "acknowledged": 0, "inflight": 0, "queued": 0, "queued_max": 0, "dropped": 0, "reconnects": 0,
                     "last_error": None}


# ------------------------------------------------------------------------------------------------ with a broker

def test_happy_path_in_order_exactly_once(broker, closing):
    subscriber = Subscriber(broker.port)
    closing(subscriber)
    subscriber.wait(lambda s: s.subscriptions == 1, "the subscription")
    publisher = MqttPublisher(url(broker.port))
    closing(publisher)
    publisher.start()
    events = [{"type": "anomaly", "camera": "cam{}".format(i % 3), "score": 2.5 + i, "boxes": [{"x": i, "y": 1}]}
              for i in range(60)]
    for event in events:
        publisher.publish(event)
    subscriber.wait(lambda s: len(s.messages) >= 60, "60 events")
    wait_until(lambda: publisher.stats()["acknowledged"] == 60, "60 PUBACKs")
    assert subscriber.messages == [dict(event, seq=i) for i, event in enumerate(events)]
    assert "seq" not in events[0]  # the caller's dict is not modified
    stats = publisher.stats()
    assert stats["published"] == stats["acknowledged"] == 60 and stats["dropped"] == 0 and stats["queued"] == 0
    assert stats["connected"] is True and stats["reconnects"] == 0 and stats["last_error"] is None
    assert 1 <= stats["queued_max"] <= 60
    publisher.close()
    assert publisher.stats()["connected"] is False
    publisher.close()  # idempotent
    time.sleep(0.2)  # nothing else may arrive (no duplicates without a reconnect)
    assert len(subscriber.messages) == 60


def test_nan_and_inf_become_null(broker, closing):
    subscriber = Subscriber(broker.port)
    closing(subscriber)
    subscriber.wait(lambda s: s.subscriptions == 1, "the subscription")
    publisher = MqttPublisher(url(broker.port))
    closing(publisher)
    publisher.start()
    event = {"score": float("nan"), "boxes": [{"peak": float("inf")}], "range": (1.5, float("-inf")), "ok": 2.0}
    publisher.publish(event)
    subscriber.wait(lambda s: len(s.messages) == 1, "the event")
    assert subscriber.messages[0] == {"score": None, "boxes": [{"peak": None}], "range": [1.5, None], "ok": 2.0,
                                      "seq": 0}
    assert b"NaN" not in subscriber.raw[0] and b"Infinity" not in subscriber.raw[0]
    assert math.isnan(event["score"])  # the caller's event is untouched


def test_broker_down_at_start_then_up(tmp_path, closing):
    port = free_port()
    warnings = []

    def warn(message):  # a warn function that raises must not hurt the publisher
        warnings.append(message)
        raise RuntimeError("broken warn")

    publisher = MqttPublisher(url(port), backoff_min=0.05, backoff_max=0.1, warn=warn)
    closing(publisher)
    publisher.start()
    for i in range(7):
        publisher.publish({"i": i})
    stats = publisher.stats()
    assert stats["queued"] == 7 and stats["connected"] is False and stats["published"] == 0
    wait_until(lambda: publisher._connect_attempts >= 4, "4 refused connection attempts")
    stats = publisher.stats()
    assert "refused" in stats["last_error"].lower(), stats["last_error"]
    assert len(warnings) == 1 and "cannot connect" in warnings[0] and str(port) in warnings[0]  # once, not per retry
    assert "\n" not in warnings[0]
    publisher._connect_gate.clear()  # the subscriber first, or it would miss the events
    with AmqttBroker(port, tmp_path):
        subscriber = Subscriber(port)
        closing(subscriber)
        subscriber.wait(lambda s: s.subscriptions == 1, "the subscription")
        publisher._connect_gate.set()
        subscriber.wait(lambda s: len(s.messages) >= 7, "the 7 queued events")
        wait_until(lambda: publisher.stats()["acknowledged"] == 7, "7 PUBACKs")
        assert subscriber.seqs() == list(range(7)) and [m["i"] for m in subscriber.messages] == list(range(7))
        stats = publisher.stats()
        assert stats["connected"] is True and stats["queued"] == 0 and stats["queued_max"] == 7
        assert stats["dropped"] == 0 and stats["reconnects"] == 0  # the first connection is not a reconnect
        assert len(warnings) == 2 and "connected after" in warnings[1] and "0 event(s) dropped" in warnings[1]
        publisher.close()


def test_full_queue_drops_the_oldest_without_blocking(tmp_path, closing):
    port = free_port()
    publisher = MqttPublisher(url(port), queue_size=100, backoff_min=0.05, backoff_max=0.1)
    closing(publisher)
    publisher.start()
    for i in range(10000):
        publisher.publish({"i": i, "score": 1.0})
    stats = publisher.stats()
    assert stats["queued"] == stats["queued_max"] == 100 and stats["dropped"] == 9900 and stats["published"] == 0
    publisher._connect_gate.clear()
    with AmqttBroker(port, tmp_path):
        subscriber = Subscriber(port)
        closing(subscriber)
        subscriber.wait(lambda s: s.subscriptions == 1, "the subscription")
        publisher._connect_gate.set()
        subscriber.wait(lambda s: len(s.messages) >= 100, "the 100 kept events")
        assert subscriber.seqs() == list(range(9900, 10000))  # the newest survive, in order
        assert [m["i"] for m in subscriber.messages] == list(range(9900, 10000))
        wait_until(lambda: publisher.stats()["acknowledged"] == 100, "100 PUBACKs")
        assert publisher.stats()["dropped"] == 9900
        publisher.close()


def test_unresolvable_host_is_retried_and_warned_once(closing):
    warnings = []
    publisher = MqttPublisher("mqtt://no-such-broker.invalid/t", backoff_min=0.05, backoff_max=0.1,
                              warn=warnings.append)
    closing(publisher)
    publisher.start()
    publisher.publish({"i": 0})
    wait_until(lambda: publisher._connect_attempts >= 3, "3 connection attempts")
    stats = publisher.stats()
    assert "cannot resolve no-such-broker.invalid" in stats["last_error"], stats["last_error"]
    assert stats["queued"] == 1 and stats["connected"] is False
    assert len(warnings) == 1 and "cannot resolve" in warnings[0]


def test_tls_url_talks_tls(broker, closing):
    """mqtts:// to a plain-TCP listener: the TLS handshake fails (so TLS is on), retried, nothing crashes."""
    warnings = []
    publisher = MqttPublisher("mqtts://127.0.0.1:{}/{}".format(broker.port, TOPIC), backoff_min=0.05,
                              backoff_max=0.1, connect_timeout=0.5, warn=warnings.append)
    closing(publisher)
    publisher.start()
    publisher.publish({"i": 0})
    wait_until(lambda: publisher._connect_attempts >= 2 and publisher.stats()["last_error"], "2 TLS attempts")
    stats = publisher.stats()
    assert stats["connected"] is False and stats["acknowledged"] == 0 and stats["queued"] == 1
    assert publisher._client._ssl_context is not None
    assert len(warnings) == 1


def test_close_with_broker_down_returns_within_timeout(closing):
    publisher = MqttPublisher(url(free_port()), backoff_min=5.0, backoff_max=30.0)  # in a long backoff sleep
    closing(publisher)
    publisher.start()
    for i in range(5):
        publisher.publish({"i": i})
    wait_until(lambda: publisher._connect_attempts >= 1 and publisher.stats()["last_error"], "a failed attempt")
    start = time.monotonic()
    publisher.close(timeout=1.0)
    elapsed = time.monotonic() - start
    assert elapsed < 1.5, elapsed  # the contract (+ scheduling slack on a loaded machine), not a speed test
    stats = publisher.stats()
    assert stats["queued"] == 5 and stats["connected"] is False and stats["published"] == 0
    start = time.monotonic()
    publisher.close(timeout=1.0)  # idempotent, immediate
    assert time.monotonic() - start < 0.5
    publisher.publish({"i": 5})  # after close: no exception, counted as dropped
    assert publisher.stats()["dropped"] == 1


# ------------------------------------------------------------------------------------------------ kill -9 mid-stream

def test_broker_killed_and_restarted_mid_stream(broker, closing):
    """Events at 50/s; the broker hangs (SIGSTOP) until the publisher has 20 events in flight and its queue (25)
    overflows, is then killed (SIGKILL), and restarted on the same port; the subscriber is back (re-subscribed)
    before the publisher reconnects.

    What must hold (at-least-once, drop-oldest): the 20 events in flight at the kill (sent, never acknowledged)
    are re-sent after the restart and received; the only events missing are the ``dropped`` oldest of the local
    queue - exactly seqs [handed over at the kill, + dropped) - plus at most 1 event the broker acknowledged just
    before it hung without forwarding it (an acknowledged event is the broker's; amqtt acknowledges after
    queueing the forward, so a signal can land in between). Duplicates come only from re-sends."""
    queue_size = 25
    subscriber = Subscriber(broker.port)
    closing(subscriber)
    subscriber.wait(lambda s: s.subscriptions == 1, "the subscription")
    warnings = []
    publisher = MqttPublisher(url(broker.port), queue_size=queue_size, backoff_min=0.2, backoff_max=0.4,
                              warn=warnings.append)
    closing(publisher)
    publisher.start()
    wait_until(lambda: publisher.stats()["connected"], "the publisher's connection")
    inflight = publisher.max_inflight

    stop = threading.Event()
    sent = []

    def produce():
        while not stop.is_set():
            sent.append(publisher.publish({"type": "anomaly", "score": 3.0}))
            stop.wait(0.02)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_until(lambda: publisher.stats()["acknowledged"] >= 20, "20 events acknowledged before the outage")
        publisher._connect_gate.clear()  # its reconnect waits until the subscriber is back
        broker.freeze()
        frozen_at = len(sent)
        wait_until(lambda: publisher.stats()["inflight"] == inflight and publisher.stats()["dropped"] >= 10,
                   "20 events in flight and the queue overflowing", timeout=30)
        at_kill = publisher.stats()
        broker.kill()
        wait_until(lambda: not publisher.stats()["connected"], "the publisher to notice the outage")
        wait_until(lambda: publisher.stats()["dropped"] >= at_kill["dropped"] + 5, "more drops while down")
        broker.start()
        subscriber.wait(lambda s: s.subscriptions == 2, "the subscriber's re-subscription")
        publisher._connect_gate.set()
        wait_until(lambda: publisher.stats()["connected"], "the publisher's reconnection")
        back_at = len(sent)
        wait_until(lambda: len(sent) >= back_at + 20, "20 more events after the reconnection")
    finally:
        stop.set()
        producer.join()
    total = len(sent)
    assert sent == list(range(total))
    wait_until(lambda: publisher.stats()["acknowledged"] == publisher.stats()["published"]
               and publisher.stats()["queued"] == 0, "everything acknowledged")
    subscriber.wait(lambda s: total - 1 in s.seqs(), "the last event")
    stats = publisher.stats()
    publisher.close()

    received = subscriber.seqs()
    unique = set(received)
    dropped = stats["dropped"]
    assert stats["published"] + dropped == total  # every event was either handed over or dropped
    assert stats["queued_max"] == queue_size and stats["reconnects"] == 1
    # in flight at the kill: seqs [handed - 20, handed), none acknowledged; all received after the restart
    handed = at_kill["published"]
    assert at_kill["acknowledged"] == handed - inflight and frozen_at <= handed - inflight + 1
    assert set(range(handed - inflight, handed)) <= unique
    # the dropped ones: exactly the oldest of the queue, right after the in-flight ones
    missing = sorted(set(range(total)) - unique)
    lost = [seq for seq in missing if seq < handed]
    assert [seq for seq in missing if seq >= handed] == list(range(handed, handed + dropped)), (missing, handed)
    assert handed + dropped + queue_size <= back_at  # the newest queue_size of the outage survived
    assert len(lost) <= 1 and all(seq < frozen_at for seq in lost), (lost, frozen_at)
    # first arrivals are in seq order (re-sent events go before newer ones); duplicates only from re-sends
    assert sorted(unique, key=received.index) == sorted(unique)
    assert len(received) - len(unique) <= inflight
    assert len(warnings) == 2 and "connection lost" in warnings[0] and "event(s) dropped meanwhile" in warnings[1]
