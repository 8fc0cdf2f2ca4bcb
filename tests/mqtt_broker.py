"""A real MQTT broker for tests and benchmarks: amqtt (``pip install amqtt``, in the ``test`` extra) as a
subprocess on 127.0.0.1, anonymous logins, no persistence; ``kill()`` is ``kill -9``, ``freeze()`` is
``kill -STOP``, and ``start()`` again reuses the same port. Used by tests/test_mqtt_events.py and benchmarks/mqtt_outage.py.
"""
import os
import signal
import socket
import subprocess
import sys
import time

_CONFIG = """\
listeners:
  default:
    type: tcp
    bind: 127.0.0.1:{port}
plugins:
  amqtt.plugins.authentication.AnonymousAuthPlugin:
    allow_anonymous: true
"""


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port, timeout=0.2):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


class AmqttBroker(object):
    """``with AmqttBroker(port, workdir) as broker: ... broker.kill(); broker.start()``."""

    def __init__(self, port, workdir):
        self.port = port
        self.workdir = str(workdir)
        self.config = os.path.join(self.workdir, "amqtt_{}.yaml".format(port))
        self.log = os.path.join(self.workdir, "amqtt_{}.log".format(port))
        self.proc = None
        with open(self.config, "w") as fh:
            fh.write(_CONFIG.format(port=port))

    def start(self, timeout=20.0):
        """Start the broker and return once its port accepts connections (RuntimeError with its log if not)."""
        if self.running():
            return self
        log = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "amqtt.scripts.broker_script", "-c", self.config],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(self.log, "rb") as fh:
                    tail = fh.read()[-2000:].decode("utf-8", "replace")
                raise RuntimeError("amqtt did not start on port {}:\n{}".format(self.port, tail))
            time.sleep(0.02)
        return self

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """``kill -9``: no goodbye to the clients, the kernel resets their connections."""
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    stop = kill

    def freeze(self):
        """``kill -STOP``: a hung broker; the kernel still accepts bytes for it, nobody answers."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()
