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
import signal
import threading
import time

import click

from edgead.errors import BackendError, ConfigError, EdgeadError, SourceError
from edgead.output_paths import VIDEO_OUTPUT_EXTENSIONS  # noqa: F401 (re-exported)

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


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


def _frame_line(result, latency_ms, as_json):
    """One line per frame: strict JSON (NaN/inf score -> ``"score": null, "invalid_score": true``) or text."""
    finite = math.isfinite(result.score)
    if as_json:
        from edgead.runtime.report import dumps

        line = {"frame": result.index, "name": result.name, "score": round(result.score, 6) if finite else None}
        if not finite:
            line["invalid_score"] = True
        line.update({"anomalous": result.anomalous,
                     "boxes": [[int(b[0]), int(b[1]), int(b[2]), int(b[3]), round(float(b[4]), 4)]
                               for b in result.boxes],
                     "latency_ms": round(latency_ms, 3)})
        return dumps(line)
    verdict = {True: "ANOMALY", False: "ok", None: "-"}[result.anomalous] if finite else "INVALID"
    return "frame {:6d}  {}score {:10.4f}  {:<7}  boxes {:2d}  latency {:7.2f} ms".format(
        result.index, (result.name + "  ") if result.name else "", result.score, verdict, len(result.boxes),
        latency_ms)


@click.command("run")
@click.argument("model", type=click.Path())
@click.option("--source", "-s", "source_uri", required=True,
              help="csi://0, /dev/video0 (or 0), v4l2:///dev/video0, rtsp://..., clip.mp4, images/ or "
                   "'imgs/*.png', synthetic://?defect=5")
@click.option("--save", type=click.Path(), default=None,
              help="Annotated output: a video (.mp4/.avi/.mkv/.mov/.m4v, mp4v) or a folder of PNGs (source "
                   "sub-folders mirrored; never the source folder).")
@click.option("--show", is_flag=True, help="Display annotated frames (q or Esc quits). Needs OpenCV with GUI.")
@click.option("--report", "report_path", type=click.Path(), default=None, help="Write the latency report JSON here.")
@_backend_options
@click.option("--max-frames", type=click.IntRange(min=1), default=None, help="Stop after N frames processed.")
@click.option("--on-error", type=click.Choice(["skip", "stop"]), default="skip", show_default=True,
              help="An unreadable image: skip it with a warning (counted in the report), or stop the run (the "
                   "video and report so far are kept; exit code 2).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines per frame, then {\"report\": ...}.")
def run(model, source_uri, save, show, report_path, backend, providers, threads, batch_size, queue_size, open_timeout,
        force, max_frames, on_error, as_json):
    """Stream frames from --source through MODEL (.onnx or .engine): scores, heatmaps, boxes, report.

    \b
    Example:
      edgead run bottle.onnx --source csi://0 --show
      edgead run bottle.onnx --source /dev/video0 --save out.mp4 --max-frames 300
      edgead run bottle.engine --source 'test/*.png' --save overlays/ --report run.json --json
    """
    from edgead import output_paths

    files, root, recursive = _source_files(source_uri)
    output_paths.check_outputs(model=model, report=report_path, force=force, source_files=files)
    plan = None
    if save:
        plan = output_paths.check_save(save, force, model=model, report=report_path, source_files=files,
                                       source_root=root, recursive=recursive)
    with _StopSignals() as stop:
        try:
            _run(stop, model, source_uri, plan, show, report_path, backend, providers, threads, batch_size,
                 queue_size, open_timeout, force, max_frames, on_error, as_json)
        except Interrupted as exc:  # before the frame loop (loading the model) or a second signal
            click.echo("edgead: interrupted ({})".format(exc), err=True)
            raise click.exceptions.Exit(stop.exit_code(exc))


def _run(stop, model, source_uri, plan, show, report_path, backend, providers, threads, batch_size, queue_size,
         open_timeout, force, max_frames, on_error, as_json):
    from edgead.runtime import report as rpt
    from edgead.runtime import sources
    from edgead.runtime.pipeline import Pipeline

    save = plan.path if plan is not None else None
    engine = _open_engine(model, backend, providers, threads)
    with engine:
        _print_model_summary(model, engine.model_info)
        source = sources.make_source(source_uri, size=engine.input_shape[1:3], open_timeout=open_timeout)
        pipeline = Pipeline(engine, source, batch_size=batch_size, queue_size=queue_size, max_frames=max_frames,
                            annotate=bool(save or show), on_error=on_error, warn=_warn)
        output = _Output(plan, source, force) if plan is not None else None
        interrupted = None
        lost = None
        results = pipeline.run()
        stop.target = pipeline
        try:
            for result in results:
                t0 = time.perf_counter()
                if output is not None:
                    output.write(result)
                quit_now = _show(result) if show else False
                if save or show:
                    pipeline.record("output", time.perf_counter() - t0)
                click.echo(_frame_line(result, result.latency * 1000.0, as_json))
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
            if output is not None:
                output.close()
            if show:
                _close_windows()
        if interrupted is None:
            interrupted = stop.signum  # stopped by a signal (pipeline.request_stop) or one during finalising
        report = rpt.build_report(pipeline.stats(), engine.info(), model=model, source=source_uri,
                                  live=source.live, extra={
                                      "saved": save, "interrupted": interrupted is not None,
                                      "signal": _signal_name(interrupted) if interrupted is not None else None,
                                      "error": str(lost) if lost else None})
    if report_path:
        rpt.write_json(report_path, report)
    if as_json:
        click.echo(rpt.dumps({"report": report}))
    else:
        click.echo(rpt.format_table(report))
        if output is not None:
            click.echo("wrote {} frame(s) to {}".format(output.written, save))
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
