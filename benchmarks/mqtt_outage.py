"""MQTT events through a broker outage: what ``edgead run --mqtt`` delivers when the broker is killed and restarted.

For each ``--queue-sizes`` value, an amqtt broker runs as a subprocess on a free localhost port
(tests/mqtt_broker.py) and ``runtime/mqtt_events.MqttPublisher`` (production defaults: QoS 1, backoff 0.5 s
doubling to 30 s, 20 events in flight) publishes anomaly-sized events at ``--rate`` per second for
``--duration`` s. At ``--kill-at`` s the broker gets SIGKILL, stays down ``--outage`` s and is restarted on the
same port. A paho subscriber (QoS 1, reconnect 0.05-0.2 s, re-subscribes on connect) records every event; the
publisher's connection attempts fail (as if the broker were still down) until the subscriber has re-subscribed
(it is normally first anyway: its backoff is shorter), so "missing" measures the publisher, not the subscriber.

Per queue size: publish() calls, events acknowledged by the broker (PUBACK), distinct events received,
duplicates received (re-sends after the reconnect; consumers de-duplicate on ``seq``), the local queue's
high-water mark, events dropped (oldest first, queue full), missing (sent - received), missing beyond the dropped
ones (must be 0, or the broker lost an event it had acknowledged), and times: broker down (kill -> listening
again), detection (kill -> publisher disconnected), recovery (broker listening -> publisher connected: the backoff
at work), drain (publisher connected -> queue empty and all acknowledged), worst delivery delay of one event.

    python benchmarks/mqtt_outage.py --out bench_out [--queue-sizes 1000,50] [--quick]
"""
import argparse
import json
import os
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOPIC = "plant/line3/events"


def _wait(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


class _Subscriber(object):
    def __init__(self, port):
        import paho.mqtt.client as mqtt

        self.lock = threading.Lock()
        self.seqs = []
        self.delays = []
        self.subscriptions = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sub-{}".format(port))
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(TOPIC, qos=1)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.lock:
            self.subscriptions += 1

    def _on_message(self, client, userdata, message):
        now = time.monotonic()
        event = json.loads(message.payload.decode("utf-8"))
        with self.lock:
            self.seqs.append(event["seq"])
            self.delays.append(now - event["sent"])

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def _event(i):
    """An anomaly event of realistic size (~700 bytes of JSON); ``sent`` is the monotonic send time."""
    return {"type": "anomaly", "camera": "line3", "source": "rtsp://cam3/stream", "time": "2026-11-24T10:00:00.000Z",
            "frame_index": i, "frame_name": None, "score": 3.41,
            "threshold": {"image": 2.9, "pixel": 2.6, "source": "normal-oos",
                          "provenance": "image threshold 2.9 = quantile 0.995 of 200 out-of-sample normal scores"},
            "boxes": [{"x": 10 + k, "y": 20, "w": 30, "h": 12, "peak": 4.2} for k in range(3)],
            "box_frame": {"width": 1920, "height": 1080}, "latency_ms": 41.2,
            "model": {"name": "bottle.onnx", "sha256": "0" * 64, "method": "padim", "backbone": "resnet18",
                      "precision": "fp16", "backend": "onnxruntime"}, "host": "bench", "sent": time.monotonic()}


def run_one(queue_size, rate, duration, kill_at, outage, workdir):
    from edgead.runtime.mqtt_events import MqttPublisher
    from mqtt_broker import AmqttBroker, free_port

    port = free_port()
    broker = AmqttBroker(port, workdir).start()
    subscriber = _Subscriber(port)
    warnings = []
    samples = []  # (t, queued, dropped, acknowledged, connected)
    try:
        if not _wait(lambda: subscriber.subscriptions == 1, 15):
            raise RuntimeError("the subscriber did not subscribe")
        publisher = MqttPublisher("mqtt://127.0.0.1:{}/{}".format(port, TOPIC), queue_size=queue_size,
                                  warn=warnings.append)
        publisher.start()
        if not _wait(lambda: publisher.stats()["connected"], 15):
            raise RuntimeError("the publisher did not connect")
        t0 = time.monotonic()
        times = {}
        sent = 0
        killed = restarted = False
        while True:
            now = time.monotonic() - t0
            if now >= duration:
                break
            if not killed and now >= kill_at:
                publisher._connect_gate.clear()  # its reconnection comes after the subscriber's (see docstring)
                broker.kill()
                times["kill"] = time.monotonic()
                killed = True
            if killed and not restarted and now >= kill_at + outage:
                broker.start()
                times["broker_up"] = time.monotonic()
                restarted = True
            if restarted and "sub_back" not in times and subscriber.subscriptions >= 2:
                times["sub_back"] = time.monotonic()
                publisher._connect_gate.set()
            stats = publisher.stats()
            samples.append((now, stats["queued"], stats["dropped"], stats["acknowledged"], stats["connected"]))
            if killed and "detected" not in times and not stats["connected"]:
                times["detected"] = time.monotonic()
            if "sub_back" in times and "reconnected" not in times and stats["connected"]:
                times["reconnected"] = time.monotonic()
            if "reconnected" in times and "drained" not in times and stats["queued"] == 0 \
                    and stats["acknowledged"] == stats["published"]:
                times["drained"] = time.monotonic()
            while sent <= (time.monotonic() - t0) * rate:
                publisher.publish(_event(sent))
                sent += 1
            time.sleep(0.005)
        publisher._connect_gate.set()
        _wait(lambda: publisher.stats()["queued"] == 0 and publisher.stats()["acknowledged"]
              == publisher.stats()["published"], 30)
        publisher.close(timeout=5.0)
        stats = publisher.stats()
        _wait(lambda: sent - 1 in subscriber.seqs, 5)
        time.sleep(0.3)  # late duplicates
    finally:
        subscriber.close()
        broker.kill()
    with subscriber.lock:
        seqs = list(subscriber.seqs)
        delays = list(subscriber.delays)
    unique = set(seqs)
    missing = sent - len(unique & set(range(sent)))

    def span(a, b):
        return round(times[b] - times[a], 3) if a in times and b in times else None

    return {"queue_size": queue_size, "rate_per_s": rate, "duration_s": duration, "sent": sent,
            "acknowledged": stats["acknowledged"], "received": len(unique), "duplicates": len(seqs) - len(unique),
            "queued_max": stats["queued_max"], "dropped": stats["dropped"], "missing": missing,
            "missing_not_dropped": missing - stats["dropped"], "reconnects": stats["reconnects"],
            "broker_down_s": span("kill", "broker_up"), "detect_s": span("kill", "detected"),
            "recovery_s": span("broker_up", "reconnected"), "subscriber_back_s": span("broker_up", "sub_back"),
            "drain_s": span("reconnected", "drained"), "worst_delay_s": round(max(delays), 3) if delays else None,
            "warnings": warnings}, samples, {k: v - t0 for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for mqtt_outage.{json,csv,png}")
    parser.add_argument("--queue-sizes", default="1000,50", help="local queue sizes to compare (--mqtt-queue)")
    parser.add_argument("--rate", type=float, default=30.0, help="events per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of publishing per queue size")
    parser.add_argument("--kill-at", type=float, default=7.5, help="seconds into the run when the broker is killed")
    parser.add_argument("--outage", type=float, default=5.0, help="seconds the broker stays down")
    parser.add_argument("--quick", action="store_true", help="8 s runs, broker down 3 s from 2.5 s")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.kill_at, args.outage = 8.0, 2.5, 3.0
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import paho.mqtt

    from _report import cpu_name, pyplot, write_outputs

    sizes = [int(s) for s in args.queue_sizes.split(",")]
    rows, curves = [], {}
    with tempfile.TemporaryDirectory(prefix="edgead_mqtt_outage_") as work:
        for size in sizes:
            row, samples, times = run_one(size, args.rate, args.duration, args.kill_at, args.outage, work)
            rows.append(row)
            curves[size] = (samples, times)
    head = ("paho-mqtt {} -> amqtt (subprocess, localhost), {}; {:g} events/s for {:g} s, broker SIGKILLed at "
            "{:g} s for {:g} s; QoS 1, backoff 0.5-30 s").format(paho.mqtt.__version__, cpu_name(), args.rate,
                                                                 args.duration, args.kill_at, args.outage)
    cols = [("queue_size", "queue"), ("sent", "sent"), ("acknowledged", "acked"), ("received", "received"),
            ("duplicates", "dups"), ("queued_max", "queued max"), ("dropped", "dropped"), ("missing", "missing"),
            ("missing_not_dropped", "lost"), ("broker_down_s", "down s"), ("detect_s", "detect s"),
            ("recovery_s", "recover s"), ("drain_s", "drain s"), ("worst_delay_s", "worst delay s")]

    def cell(value):
        return "-" if value is None else "{:.2f}".format(value) if isinstance(value, float) else str(value)

    widths = [max(len(title), 5) + 2 for _, title in cols]
    header = "".join("{:>{}}".format(title, w) for (_, title), w in zip(cols, widths))
    print(head)
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print("".join("{:>{}}".format(cell(r[key]), w) for (key, _), w in zip(cols, widths)))
    notes = []
    for r in rows:
        notes.append("queue {}: {} of {} events received ({} dropped oldest-first, {} lost otherwise, {} duplicates); "
                     "publisher back {} s after the broker (backoff), queue drained in {} s".format(
                         r["queue_size"], r["received"], r["sent"], r["dropped"], r["missing_not_dropped"],
                         r["duplicates"], r["recovery_s"], r["drain_s"]))
    for line in notes:
        print(line)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 3.6), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        samples, times = curves[size]
        t = [s[0] for s in samples]
        ax.plot(t, [s[1] for s in samples], label="queued")
        ax.plot(t, [s[2] for s in samples], label="dropped")
        ax.plot(t, [s[3] for s in samples], label="acknowledged")
        if "kill" in times and "broker_up" in times:
            ax.axvspan(times["kill"], times["broker_up"], color="red", alpha=0.15, label="broker down")
        if "reconnected" in times:
            ax.axvline(times["reconnected"], color="grey", ls=":", label="publisher back")
        ax.set_title("--mqtt-queue {}".format(size), fontsize=9)
        ax.set_xlabel("s")
        ax.set_ylabel("events")
        ax.legend(fontsize=7)
    fig.suptitle(head, fontsize=7)
    write_outputs(args.out, "mqtt_outage", [{k: v for k, v in r.items() if k != "warnings"} for r in rows],
                  {"setup": head, "rows": rows, "notes": notes}, fig)


if __name__ == "__main__":
    main()
