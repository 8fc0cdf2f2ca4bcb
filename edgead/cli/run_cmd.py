"""``edgead run`` (stream a source through a model, overlay, save/show) and ``edgead bench`` (latency report).

Only click is imported at module level; OpenCV, onnxruntime and the runtime load inside the commands,
so both work on a torch-free device.

Both commands check every output path first (``edgead.output_paths``: no folder-for-a-file, no
overwriting a file edgead did not write without ``--force``, never into the source folder), then run.
SIGINT, SIGTERM and SIGHUP all stop them the same way: the frame in flight is finished, the video is
renamed into place, the report written and the table printed; the exit code is 128 + the signal number
(130, 143, 129). An unreadable image is skipped with a warning (``--on-error skip``) or ends the run
(``stop``); either way what was recorded is kept.
"""
import math
import os
import re
import signal
import threading
import time

import click

from edgead.errors import BackendError, ConfigError, EdgeadError, SourceError
from edgead.output_paths import VIDEO_OUTPUT_EXTENSIONS  # noqa: F401 (re-exported)

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
#: longest wait between MQTT reconnect attempts: a broker back after an outage gets events within ~5 s
MQTT_BACKOFF_MAX_S = 5.0


def _signal_name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "signal {}".format(signum)


class Interrupted(KeyboardInterrupt):
    """A stop signal that arrived outside the frame loop (or a second one): ``signum`` says which."""

    def __init__(self, signum):
        KeyboardInterrupt.__init__(self, _signal_name(signum))
        self.signum = signum


class _StopSignals(object):
    """SIGINT/SIGTERM/SIGHUP -> a graceful stop, for the duration of a command.

    Installed only in the main thread; signals that were ignored (``nohup``) stay ignored; the previous
    handlers come back on exit. While ``target`` (a Pipeline) streams, the first signal only asks it to
    stop after the batch in flight; while ``holding`` (finalising outputs) signals are only recorded;
    otherwise, or for a second signal, ``Interrupted`` is raised (a KeyboardInterrupt).
    """

    def __init__(self):
        self.signum = None
        self.target = None
        self.holding = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None or signal.getsignal(sig) == signal.SIG_IGN:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (OSError, ValueError):  # pragma: no cover - not allowed here
                pass
        return self

    def __exit__(self, *exc):
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum, frame):
        first = self.signum is None
        if first:
            self.signum = signum
        if self.holding:
            return
        target = self.target
        if first and target is not None and target.streaming:
            target.request_stop(_signal_name(signum))
            return
        raise Interrupted(signum)

    def exit_code(self, exc=None):
        signum = exc.signum if isinstance(exc, Interrupted) else self.signum
        return 128 + (signum if signum is not None else signal.SIGINT)


def _warn(message):
    click.echo("edgead: warning: {}".format(message), err=True)


def _source_files(source_uri):
    """(files the source reads, image root or None, recursive glob?) for the output checks; no frame is read."""
    from edgead.runtime import sources

    try:
        spec = sources.parse_uri(source_uri)
    except SourceError:
        return [], None, False  # make_source reports it, after the model loaded (as before)
    if spec.kind == "images":
        from edgead.data import list_images
        from edgead.errors import DataError

        try:
            files = list_images(spec.location)
        except DataError as exc:
            raise SourceError(str(exc))
        return files, sources.image_root(spec.location), "**" in str(spec.location)
    if spec.kind == "video":
        return [spec.location], None, False
    return [], None, False


def _open_engine(model, backend, providers, threads):
    from edgead.runtime.engines.base import open_engine

    options = {}
    path_is_engine = os.path.splitext(model)[1].lower() in (".engine", ".plan", ".trt")
    if backend == "onnxruntime" or (backend == "auto" and not path_is_engine):
        options = {"providers": providers, "threads": threads}
    try:
        return open_engine(model, backend, **options)
    except ImportError as exc:
        raise BackendError("{}: backend {!r} is not available here ({})".format(model, backend, exc))


def _backend_options(func):
    func = click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto",
                        show_default=True, help="auto: TensorRT for .engine/.plan, ONNX Runtime for .onnx.")(func)
    func = click.option("--providers", default="auto", show_default=True,
                        help="ONNX Runtime execution providers: cpu, cuda, tensorrt (comma-separated) or auto "
                             "(cuda if available, else cpu).")(func)
    func = click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="ONNX Runtime intra-op threads (default: all cores).")(func)
    func = click.option("--batch", "batch_size", type=click.IntRange(min=1), default=1, show_default=True,
                        help="Frames per inference call.")(func)
    func = click.option("--queue-size", type=click.IntRange(min=1), default=4, show_default=True,
                        help="Capture queue length (live sources drop the oldest frame when it is full).")(func)
    func = click.option("--open-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
                        show_default=True,
                        help="Seconds a camera/stream may take to open (and, for FFmpeg, to deliver a frame); "
                             "Ctrl-C works meanwhile.")(func)
    func = click.option("--force", is_flag=True,
                        help="Overwrite existing output files that edgead did not write.")(func)
    return func


class _Output(object):
    """Annotated frames -> an .mp4/.avi (cv2.VideoWriter mp4v, renamed into place at the end) or a folder of PNGs.

    plan: ``output_paths.check_save``'s SavePlan. Folder mode mirrors the source's sub-folders and never
    replaces an existing file (unless ``force``): names are unique within a run."""

    def __init__(self, plan, source, force=False):
        from edgead import atomic

        self.plan = plan
        self.target = plan.path
        self.source = source  # its fps is known once opened: read at the first frame
        self.is_video = plan.kind == "video"
        self.force = force
        self._atomic = atomic
        self._ctx = None
        self._writer = None
        self._size = None
        self.written = 0
        if not self.is_video:
            os.makedirs(self.target, exist_ok=True)

    def write(self, result):
        import cv2

        picture = result.annotated if result.annotated is not None else result.frame
        bgr = cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)
        if self.is_video:
            if self._writer is None:
                self._ctx = self._atomic.atomic_path(self.target)
                tmp = self._ctx.__enter__()
                self._size = (bgr.shape[1], bgr.shape[0])
                fps = self.source.fps if self.source.fps and 0 < self.source.fps <= 240 else 30.0
                self._writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), fps, self._size)
                if not self._writer.isOpened():
                    self._writer = None
                    self._ctx.__exit__(BackendError, BackendError(), None)
                    self._ctx = None
                    raise BackendError("{}: cv2.VideoWriter (mp4v) cannot write this file".format(self.target))
            if (bgr.shape[1], bgr.shape[0]) != self._size:
                bgr = cv2.resize(bgr, self._size, interpolation=cv2.INTER_AREA)
            self._writer.write(bgr)
        else:
            from edgead.output_paths import png_name

            rel = self.plan.names.get(result.name) if result.name else None
            rel = rel or png_name(result.name, result.index)
            if rel.startswith("../") or os.path.isabs(rel):
                rel = os.path.basename(rel)
            path = os.path.join(self.target, rel)
            if not self.force and os.path.lexists(path):
                raise ConfigError("{}: exists; --save will not overwrite it (pass --force, or choose another "
                                  "folder)".format(path))
            ok, encoded = cv2.imencode(".png", bgr)
            self._atomic.write_bytes(path, encoded.tobytes())
        self.written += 1

    def close(self):
        """Finish the video: rename it into place (what was recorded is always kept)."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)


def _show(result, window="edgead"):
    """Display one annotated frame; True when the user pressed q or Esc."""
    import cv2

    picture = result.annotated if result.annotated is not None else result.frame
    try:
        cv2.imshow(window, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        key = cv2.waitKey(1) & 0xFF
    except cv2.error:
        raise ConfigError("--show needs an OpenCV with GUI support (this one is headless, e.g. "
                          "opencv-python-headless); drop --show or use --save")
    return key in (ord("q"), 27)


def _frame_line(result, latency_ms, as_json, with_camera=False):
    """One line per frame: strict JSON (NaN/inf score -> ``"score": null, "invalid_score": true``) or text;
    ``with_camera``: the camera name first (several cameras)."""
    finite = math.isfinite(result.score)
    if as_json:
        from edgead.runtime.report import dumps

        line = {"camera": result.camera} if with_camera else {}
        line.update({"frame": result.index, "name": result.name, "score": round(result.score, 6) if finite else None})
        if not finite:
            line["invalid_score"] = True
        line.update({"anomalous": result.anomalous,
                     "boxes": [[int(b[0]), int(b[1]), int(b[2]), int(b[3]), round(float(b[4]), 4)]
                               for b in result.boxes],
                     "latency_ms": round(latency_ms, 3)})
        return dumps(line)
    verdict = {True: "ANOMALY", False: "ok", None: "-"}[result.anomalous] if finite else "INVALID"
    return "{}frame {:6d}  {}score {:10.4f}  {:<7}  boxes {:2d}  latency {:7.2f} ms".format(
        "{:<8} ".format(result.camera) if with_camera else "", result.index, (result.name + "  ") if result.name else "", result.score, verdict, len(result.boxes),
        latency_ms)


#: ``--source NAME=URI``: a camera name is letters, digits, ``_ . -`` (the part before ``=`` of a URI has ``:``/``/``)
_CAMERA_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def parse_camera(text):
    """``--source`` value -> (name or None, URI): ``left=rtsp://cam1/stream`` names the camera ``left``."""
    name, sep, uri = text.partition("=")
    if sep and uri and _CAMERA_NAME.match(name):
        return name, uri
    return None, text


def load_cameras_file(path):
    """``--cameras FILE`` (JSON) -> [(name, URI)]. Format: ``{"cameras": [{"name": "left", "source":
    "rtsp://..."}, ...]}`` (or the bare list); ``name`` optional. Raises ConfigError naming the file."""
    import json

    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except OSError as exc:
        raise ConfigError("{}: cannot read the cameras file ({})".format(path, exc.strerror or exc))
    except ValueError as exc:
        raise ConfigError("{}: not valid JSON ({})".format(path, str(exc).splitlines()[0]))
    cameras = data.get("cameras") if isinstance(data, dict) else data
    if not isinstance(cameras, list) or not cameras:
        raise ConfigError('{}: expected {{"cameras": [{{"name": "left", "source": "rtsp://..."}}, ...]}}'.format(path))
    found = []
    for i, entry in enumerate(cameras):
        if isinstance(entry, str):
            entry = {"source": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("source"), str) or not entry["source"]:
            raise ConfigError("{}: cameras[{}] needs a \"source\" string".format(path, i))
        unknown = sorted(set(entry) - {"name", "source"})
        if unknown:
            raise ConfigError("{}: cameras[{}]: unknown key {!r} (name, source)".format(path, i, unknown[0]))
        name = entry.get("name")
        if name is not None and (not isinstance(name, str) or not _CAMERA_NAME.match(name)):
            raise ConfigError("{}: cameras[{}]: name {!r} must be 1-64 letters, digits, '_', '.' or '-'".format(
                path, i, name))
        found.append((name, entry["source"]))
    return found


def camera_list(source_args, cameras_file):
    """[(name, URI)] from ``--source`` values and ``--cameras FILE``, with default names (the only camera:
    ``cam0``; several: ``cam0``, ``cam1``, ... by position) and the names checked distinct."""
    cameras = [parse_camera(text) for text in source_args]
    if cameras_file:
        cameras.extend(load_cameras_file(cameras_file))
    if not cameras:
        raise ConfigError("no source: pass --source URI (several for several cameras) or --cameras FILE")
    named = []
    for i, (name, uri) in enumerate(cameras):
        named.append((name or "cam{}".format(i), uri))
    seen = set()
    for name, _ in named:
        if name in seen:
            raise ConfigError("camera name {!r} is used twice (name them with --source NAME=URI)".format(name))
        seen.add(name)
    return named


def _camera_save_path(save, camera, several):
    """--save for one camera: itself with one camera; with several, ``out-<camera>.mp4`` / ``out/<camera>/``."""
    if not several:
        return save
    stem, ext = os.path.splitext(save.rstrip("/" + os.sep))
    from edgead.output_paths import VIDEO_OUTPUT_EXTENSIONS as videos

    if ext.lower() in videos:
        return "{}-{}{}".format(stem, camera, ext)
    return os.path.join(save, camera)


def _reconnect_attempts(text):
    if text.strip().lower() in ("forever", "inf", "infinite"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError("--reconnect-attempts {}: a number >= 0 or 'forever'".format(text))
    return value


@click.command("run")
@click.argument("model", type=click.Path())
@click.option("--source", "-s", "source_args", multiple=True,
              help="csi://0, /dev/video0 (or 0), v4l2:///dev/video0, rtsp://..., clip.mp4, images/ or "
                   "'imgs/*.png', synthetic://?defect=5. Repeat for several cameras (one capture thread each, "
                   "frames batched into one inference call); NAME=URI names a camera (default cam0, cam1, ...).")
@click.option("--cameras", "cameras_file", type=click.Path(), default=None,
              help='JSON file of cameras: {"cameras": [{"name": "left", "source": "rtsp://..."}, ...]} (adds to '
                   "--source).")
@click.option("--save", type=click.Path(), default=None,
              help="Annotated output: a video (.mp4/.avi/.mkv/.mov/.m4v, mp4v) or a folder of PNGs (source "
                   "sub-folders mirrored; never the source folder). Several cameras: out-<camera>.mp4 or "
                   "out/<camera>/.")
@click.option("--show", is_flag=True, help="Display annotated frames (q or Esc quits). Needs OpenCV with GUI.")
@click.option("--report", "report_path", type=click.Path(), default=None, help="Write the latency report JSON here.")
@_backend_options
@click.option("--max-frames", type=click.IntRange(min=1), default=None,
              help="Stop after N frames processed (all cameras together).")
@click.option("--on-error", type=click.Choice(["skip", "stop"]), default="skip", show_default=True,
              help="An unreadable image: skip it with a warning (counted in the report), or stop the run (the "
                   "video and report so far are kept; exit code 2).")
@click.option("--reconnect-attempts", default="5", show_default=True,
              help="Reopen attempts of a live camera that failed, with backoff 0.5 s doubling to 8 s (the budget "
                   "refills at each frame read); 'forever' for a service.")
@click.option("--mqtt", "mqtt_url", default=None,
              help="Publish one JSON event per anomalous frame to mqtt://[user:pass@]host[:port]/topic (QoS 1, "
                   "reconnects with backoff, bounded local queue while the broker is away). Needs edgead[line].")
@click.option("--mqtt-queue", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Events kept while the broker is unreachable (the oldest are dropped, and counted, beyond).")
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), default=None,
              help="Serve Prometheus metrics on this port (/metrics): stage latency histograms, FPS, drops, "
                   "reconnects, anomalies, model identity. Needs edgead[line].")
@click.option("--metrics-addr", default="0.0.0.0", show_default=True, help="Address the metrics server binds.")
@click.option("--quiet", "-q", is_flag=True,
              help="No line per frame (for services): a summary line on stderr every --log-every seconds.")
@click.option("--log-every", type=click.FloatRange(min=0), default=None,
              help="Seconds between summary lines on stderr (default: 60 with --quiet, else none).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines per frame, then {\"report\": ...}.")
def run(model, source_args, cameras_file, save, show, report_path, backend, providers, threads, batch_size,
        queue_size, open_timeout, force, max_frames, on_error, reconnect_attempts, mqtt_url, mqtt_queue,
        metrics_port, metrics_addr, quiet, log_every, as_json):
    """Stream frames from --source (one or several cameras) through MODEL (.onnx or .engine): scores, heatmaps,
    boxes, report; optionally events to MQTT and metrics for Prometheus.

    \b
    Example:
      edgead run bottle.onnx --source csi://0 --show
      edgead run bottle.onnx --source /dev/video0 --save out.mp4 --max-frames 300
      edgead run bottle.engine --source 'test/*.png' --save overlays/ --report run.json --json
      edgead run bottle.engine --source left=rtsp://cam1/s --source right=rtsp://cam2/s --batch 2 \\
          --mqtt mqtt://broker:1883/plant/line3 --metrics-port 9108 --quiet --reconnect-attempts forever
    """
    from edgead import output_paths

    cameras = camera_list(source_args, cameras_file)
    attempts = _reconnect_attempts(reconnect_attempts)
    line = {"mqtt": mqtt_url, "mqtt_queue": mqtt_queue, "metrics_port": metrics_port, "metrics_addr": metrics_addr,
            "quiet": quiet, "log_every": log_every if log_every is not None else (60.0 if quiet else 0.0),
            "reconnect_attempts": attempts}
    if mqtt_url:
        _line_module("mqtt_events", "--mqtt", "paho-mqtt").parse_mqtt_url(mqtt_url)  # fails before the model loads
    if metrics_port is not None:
        _line_module("metrics", "--metrics-port", "prometheus-client")
    all_files = []
    per_camera = []
    for _, uri in cameras:
        files, root, recursive = _source_files(uri)
        all_files.extend(files)
        per_camera.append((files, root, recursive))
    output_paths.check_outputs(model=model, report=report_path, force=force, source_files=all_files)
    plans = {}
    if save:
        several = len(cameras) > 1
        for (name, _), (files, root, recursive) in zip(cameras, per_camera):
            plans[name] = output_paths.check_save(_camera_save_path(save, name, several), force, model=model,
                                                  report=report_path, source_files=files, source_root=root,
                                                  recursive=recursive)
        for src in all_files if several else ():
            if output_paths.is_within(src, save):
                raise ConfigError("{}: --save folder contains the source images (e.g. {}); choose a folder "
                                  "outside them".format(save, src))
    with _StopSignals() as stop:
        try:
            _run(stop, model, cameras, plans, show, report_path, backend, providers, threads, batch_size,
                 queue_size, open_timeout, force, max_frames, on_error, as_json, line)
        except Interrupted as exc:  # before the frame loop (loading the model) or a second signal
            click.echo("edgead: interrupted ({})".format(exc), err=True)
            raise click.exceptions.Exit(stop.exit_code(exc))


def _line_module(name, option, package):
    """``edgead.runtime.<name>``, or a one-line ConfigError when its optional dependency is not installed."""
    import importlib

    try:
        return importlib.import_module("edgead.runtime." + name)
    except ImportError as exc:
        raise ConfigError("{} needs {} ({}): pip install 'edgead[line]'".format(option, package, exc))


class _LineOutputs(object):
    """The production-line side of a run: MQTT events and the Prometheus endpoint (each optional)."""

    def __init__(self, line, model, engine, cameras):
        self.publisher = None
        self.metrics = None
        self.builder = None
        self.pipeline = None
        if not (line["mqtt"] or line["metrics_port"] is not None):
            return
        from edgead.runtime import events

        info = engine.model_info
        identity = events.model_identity(model, info, (engine.info() or {}).get("backend"))
        if line["mqtt"]:
            self.builder = events.EventBuilder(identity, info, dict(cameras))
            self.publisher = _line_module("mqtt_events", "--mqtt", "paho-mqtt").MqttPublisher(
                line["mqtt"], queue_size=line["mqtt_queue"], backoff_max=MQTT_BACKOFF_MAX_S, warn=_warn)
            self.publisher.start()
        if line["metrics_port"] is not None:
            server = _line_module("metrics", "--metrics-port", "prometheus-client").MetricsServer
            self.metrics = server(line["metrics_port"], self.live_stats, identity, addr=line["metrics_addr"])
            try:
                self.metrics.start()
            except Exception:
                self.close()
                raise
            click.echo("edgead: Prometheus metrics on http://{}:{}/metrics".format(
                line["metrics_addr"], self.metrics.port), err=True)

    @property
    def on_timing(self):
        return self.metrics.observe if self.metrics is not None else None

    def live_stats(self):
        """Pipeline.stats() plus the MQTT publisher's counters (called by a metrics scrape)."""
        stats = dict(self.pipeline.stats()) if self.pipeline is not None else {"cameras": {}}
        stats["mqtt"] = self.publisher.stats() if self.publisher is not None else None
        return stats

    def result(self, result):
        if self.publisher is not None and result.anomalous:
            self.publisher.publish(self.builder.event(result))

    def close(self):
        """Flush MQTT (bounded wait) and stop the metrics server; returns the MQTT stats (or None)."""
        mqtt = None
        if self.publisher is not None:
            self.publisher.close(timeout=5.0)
            mqtt = self.publisher.stats()
        if self.metrics is not None:
            self.metrics.close()
        return mqtt


def _summary_line(pipeline, line_outputs, since, frames_before):
    """One line for the journal: totals, FPS since the previous line, p99 latency, drops, MQTT queue."""
    stats = pipeline.stats()
    elapsed = max(time.perf_counter() - since, 1e-9)
    fps = (stats["frames"] - frames_before) / elapsed
    latency = stats["timings"].get("latency")
    p99 = latency.quantile(0.99) * 1000.0 if latency is not None and latency.count else float("nan")
    text = "edgead: {} frames ({:.1f} fps), {} anomalous, dropped {}, reconnects {}, p99 latency {:.1f} ms".format(
        stats["frames"], fps, stats["anomalies"], stats["dropped"], stats["reconnects"], p99)
    down = [name for name, cam in stats["cameras"].items() if not cam["connected"] and not cam["ended"]]
    if down:
        text += ", reconnecting: " + ",".join(down)
    if line_outputs.publisher is not None:
        mqtt = line_outputs.publisher.stats()
        text += "; mqtt {}, queued {}, dropped {}".format("up" if mqtt["connected"] else "DOWN", mqtt["queued"],
                                                         mqtt["dropped"])
    return text


def _run(stop, model, cameras, plans, show, report_path, backend, providers, threads, batch_size, queue_size,
         open_timeout, force, max_frames, on_error, as_json, line):
    from edgead.runtime import report as rpt
    from edgead.runtime import sources
    from edgead.runtime.pipeline import Pipeline

    several = len(cameras) > 1
    engine = _open_engine(model, backend, providers, threads)
    with engine:
        _print_model_summary(model, engine.model_info)
        srcs = [sources.make_source(uri, size=engine.input_shape[1:3], open_timeout=open_timeout)
                for _, uri in cameras]
        line_outputs = _LineOutputs(line, model, engine, cameras)
        pipeline = Pipeline(engine, srcs, batch_size=batch_size, queue_size=queue_size, max_frames=max_frames,
                            annotate=bool(plans or show), on_error=on_error, warn=_warn,
                            names=[name for name, _ in cameras], on_timing=line_outputs.on_timing,
                            reconnect_attempts=line["reconnect_attempts"])
        line_outputs.pipeline = pipeline
        outputs = {name: _Output(plans[name], src, force) for (name, _), src in zip(cameras, srcs) if name in plans}
        interrupted = None
        lost = None
        mqtt_stats = None
        results = pipeline.run()
        stop.target = pipeline
        log_every = line["log_every"]
        last_log, frames_logged = time.perf_counter(), 0
        try:
            for result in results:
                t0 = time.perf_counter()
                output = outputs.get(result.camera)
                if output is not None:
                    output.write(result)
                quit_now = _show(result, "edgead " + result.camera if several else "edgead") if show else False
                if outputs or show:
                    pipeline.record("output", time.perf_counter() - t0)
                line_outputs.result(result)
                if not line["quiet"]:
                    click.echo(_frame_line(result, result.latency * 1000.0, as_json, several))
                if log_every and t0 - last_log >= log_every:
                    click.echo(_summary_line(pipeline, line_outputs, last_log, frames_logged), err=True)
                    last_log, frames_logged = t0, pipeline.frames
                if quit_now:
                    break
        except KeyboardInterrupt as exc:
            interrupted = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        except EdgeadError as exc:
            lost = exc  # a corrupt file (--on-error stop), a camera gone for good: keep what was recorded, then fail
        finally:
            stop.holding = True  # finalise undisturbed: a second signal is only recorded now
            stop.target = None
            results.close()
            for output in outputs.values():
                output.close()
            if show:
                _close_windows()
            mqtt_stats = line_outputs.close()
        if interrupted is None:
            interrupted = stop.signum  # stopped by a signal (pipeline.request_stop) or one during finalising
        extra = {"saved": (plans[cameras[0][0]].path if not several else
                           {name: plan.path for name, plan in plans.items()}) if plans else None,
                 "interrupted": interrupted is not None,
                 "signal": _signal_name(interrupted) if interrupted is not None else None,
                 "error": str(lost) if lost else None}
        if mqtt_stats is not None:
            extra["mqtt"] = mqtt_stats
        if line["metrics_port"] is not None:
            extra["metrics_port"] = line_outputs.metrics.port
        report = rpt.build_report(pipeline.stats(), engine.info(), model=model,
                                  source=cameras[0][1] if not several else [uri for _, uri in cameras],
                                  live=pipeline.live, extra=extra)
    if report_path:
        rpt.write_json(report_path, report)
    if as_json:
        click.echo(rpt.dumps({"report": report}))
    else:
        click.echo(rpt.format_table(report))
        if mqtt_stats is not None:
            click.echo("mqtt {}: {} published, {} acknowledged, {} still queued, {} dropped, {} reconnects".format(
                mqtt_stats.get("url"), mqtt_stats.get("published"), mqtt_stats.get("acknowledged"),
                mqtt_stats.get("queued"), mqtt_stats.get("dropped"), mqtt_stats.get("reconnects")))
        for output in outputs.values():
            click.echo("wrote {} frame(s) to {}".format(output.written, output.target))
    if lost is not None:
        raise lost
    if interrupted is not None:
        click.echo("edgead: stopped by {}".format(_signal_name(interrupted)), err=True)
        raise click.exceptions.Exit(128 + interrupted)


def _print_model_summary(model, info):
    """Threshold provenance and legacy-model warnings, once, on stderr (stdout carries the frames)."""
    from edgead.runtime import modelinfo

    click.echo("{}: {}".format(os.path.basename(model), modelinfo.describe_thresholds(info)), err=True)
    for warning in modelinfo.model_warnings(info):
        click.echo("edgead: warning: {}: {}".format(model, warning), err=True)


def _close_windows():
    import cv2

    try:
        cv2.destroyAllWindows()
    except cv2.error:
        pass


@click.command("bench")
@click.argument("model", type=click.Path())
@click.option("--frames", "n_frames", type=click.IntRange(min=1), default=200, show_default=True,
              help="Frames to time.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Untimed inference batches before timing.")
@click.option("--source", "source_uri", default="synthetic://", show_default=True,
              help="Any run source; synthetic:// defaults to the model size and --frames frames.")
@_backend_options
@click.option("--no-annotate", is_flag=True, help="Skip drawing overlays in postprocess (boxes are still found).")
@click.option("--report", "report_path", type=click.Path(), default=None, help="Write the report JSON here.")
@click.option("--plot", "plot_path", type=click.Path(), default=None, help="Write a latency histogram PNG here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
def bench(model, n_frames, warmup, source_uri, backend, providers, threads, batch_size, queue_size, open_timeout,
          force, no_annotate, report_path, plot_path, as_json):
    """Time MODEL end to end: per-stage p50/p90/p99/max latency, FPS, drops, backend and device.

    \b
    Example:
      edgead bench bottle.onnx --frames 300 --report bench.json --plot bench.png
      edgead bench bottle.onnx --providers cuda --batch 4 --json
      edgead bench bottle.engine --source csi://0 --frames 600
    """
    from edgead import output_paths

    files, _, _ = _source_files(source_uri)
    output_paths.check_outputs(model=model, report=report_path, plot=plot_path, force=force, source_files=files)
    with _StopSignals() as stop:
        try:
            _bench(stop, model, n_frames, warmup, source_uri, backend, providers, threads, batch_size, queue_size,
                   open_timeout, no_annotate, report_path, plot_path, as_json)
        except Interrupted as exc:
            click.echo("edgead: interrupted ({})".format(exc), err=True)
            raise click.exceptions.Exit(stop.exit_code(exc))


def _bench(stop, model, n_frames, warmup, source_uri, backend, providers, threads, batch_size, queue_size,
           open_timeout, no_annotate, report_path, plot_path, as_json):
    from edgead.runtime import pipeline as pl
    from edgead.runtime import report as rpt
    from edgead.runtime import sources

    engine = _open_engine(model, backend, providers, threads)
    with engine:
        source = sources.make_source(source_uri, size=engine.input_shape[1:3], open_timeout=open_timeout)
        if isinstance(source, sources.SyntheticSource) and "frames" not in sources.parse_uri(source_uri).params:
            source.frames = n_frames
        t0 = time.perf_counter()
        pl.warmup(engine, warmup, batch_size)
        warmup_s = time.perf_counter() - t0
        pipeline = pl.Pipeline(engine, source, batch_size=batch_size, queue_size=queue_size, max_frames=n_frames,
                               annotate=not no_annotate, on_error="skip", warn=_warn)
        interrupted = lost = None
        results = pipeline.run()
        stop.target = pipeline
        try:
            for _ in results:
                pass
        except KeyboardInterrupt as exc:
            interrupted = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        except EdgeadError as exc:
            lost = exc
        finally:
            stop.holding = True
            stop.target = None
            results.close()
        if interrupted is None:
            interrupted = stop.signum
        report = rpt.build_report(pipeline.stats(), engine.info(), model=model, source=source_uri,
                                  live=source.live, extra={
                                      "warmup_batches": warmup, "warmup_s": warmup_s,
                                      "interrupted": interrupted is not None,
                                      "signal": _signal_name(interrupted) if interrupted is not None else None,
                                      "error": str(lost) if lost else None})
    if report_path:
        rpt.write_json(report_path, report)
    if plot_path:
        used = rpt.plot_histogram(pipeline.timings, plot_path, title="edgead bench: {}".format(
            os.path.basename(model)))
        report["plot"] = plot_path if used else None
    if as_json:
        click.echo(rpt.dumps(report, indent=2))
    else:
        click.echo(rpt.format_table(report))
    if lost is not None:
        raise lost
    if interrupted is not None:
        click.echo("edgead: stopped by {}".format(_signal_name(interrupted)), err=True)
        raise click.exceptions.Exit(128 + interrupted)


COMMANDS = (run, bench)
