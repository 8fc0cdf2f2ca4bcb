"""``edgead run`` (stream a source through a model, overlay, save/show) and ``edgead bench`` (latency report).

Only click is imported at module level; OpenCV, onnxruntime and the runtime load inside the commands,
so both work on a torch-free device.
"""
import json
import os
import time

import click

from edgead.errors import BackendError, ConfigError, SourceError

VIDEO_OUTPUT_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".m4v")


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
    return func


class _Output(object):
    """Annotated frames -> an .mp4/.avi (cv2.VideoWriter mp4v, renamed into place at the end) or a folder of PNGs."""

    def __init__(self, target, source):
        from edgead import atomic

        self.target = target
        self.source = source  # its fps is known once opened: read at the first frame
        self.is_video = os.path.splitext(target)[1].lower() in VIDEO_OUTPUT_EXTENSIONS
        self._atomic = atomic
        self._ctx = None
        self._writer = None
        self._size = None
        self.written = 0
        if not self.is_video:
            from edgead.data import is_image_file

            if is_image_file(target) or (os.path.exists(target) and not os.path.isdir(target)):
                raise ConfigError("{}: --save must be a video file ({}) or a folder".format(
                    target, ", ".join(VIDEO_OUTPUT_EXTENSIONS)))
            os.makedirs(target, exist_ok=True)

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
            stem = os.path.splitext(result.name)[0] if result.name else "{:06d}".format(result.index)
            ok, encoded = cv2.imencode(".png", bgr)
            self._atomic.write_bytes(os.path.join(self.target, stem + ".png"), encoded.tobytes())
        self.written += 1

    def close(self, failed=False):
        """Finish the video (rename into place), or drop the partial file when ``failed``."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            if failed:
                ctx.__exit__(RuntimeError, RuntimeError("failed"), None)
            else:
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
    if as_json:
        return json.dumps({"frame": result.index, "name": result.name, "score": round(result.score, 6),
                           "anomalous": result.anomalous,
                           "boxes": [[int(b[0]), int(b[1]), int(b[2]), int(b[3]), round(float(b[4]), 4)]
                                     for b in result.boxes],
                           "latency_ms": round(latency_ms, 3)})
    verdict = {True: "ANOMALY", False: "ok", None: "-"}[result.anomalous]
    return "frame {:6d}  {}score {:10.4f}  {:<7}  boxes {:2d}  latency {:7.2f} ms".format(
        result.index, (result.name + "  ") if result.name else "", result.score, verdict, len(result.boxes),
        latency_ms)


@click.command("run")
@click.argument("model", type=click.Path())
@click.option("--source", "-s", "source_uri", required=True,
              help="csi://0, /dev/video0 (or 0), v4l2:///dev/video0, rtsp://..., clip.mp4, images/ or "
                   "'imgs/*.png', synthetic://?defect=5")
@click.option("--save", type=click.Path(), default=None,
              help="Annotated output: a video (.mp4/.avi/.mkv/.mov, mp4v) or a folder of PNGs.")
@click.option("--show", is_flag=True, help="Display annotated frames (q or Esc quits). Needs OpenCV with GUI.")
@click.option("--report", "report_path", type=click.Path(), default=None, help="Write the latency report JSON here.")
@_backend_options
@click.option("--max-frames", type=click.IntRange(min=1), default=None, help="Stop after N frames.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines per frame, then {\"report\": ...}.")
def run(model, source_uri, save, show, report_path, backend, providers, threads, batch_size, queue_size, max_frames,
        as_json):
    """Stream frames from --source through MODEL (.onnx or .engine): scores, heatmaps, boxes, report.

    \b
    Example:
      edgead run bottle.onnx --source csi://0 --show
      edgead run bottle.onnx --source /dev/video0 --save out.mp4 --max-frames 300
      edgead run bottle.engine --source 'test/*.png' --save overlays/ --report run.json --json
    """
    from edgead.runtime import report as rpt
    from edgead.runtime import sources
    from edgead.runtime.pipeline import Pipeline

    engine = _open_engine(model, backend, providers, threads)
    with engine:
        _print_model_summary(model, engine.model_info)
        source = sources.make_source(source_uri, size=engine.input_shape[1:3])
        pipeline = Pipeline(engine, source, batch_size=batch_size, queue_size=queue_size, max_frames=max_frames,
                            annotate=bool(save or show))
        output = _Output(save, source) if save else None
        interrupted = failed = False
        lost = None
        results = pipeline.run()
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
        except KeyboardInterrupt:
            interrupted = True
        except SourceError as exc:
            if not source.live:
                failed = True  # a corrupt file/folder: do not leave a video silently missing frames
                raise
            lost = exc  # a camera/stream gone for good: keep what was recorded, report, then fail
        except BaseException:
            failed = True
            raise
        finally:
            results.close()
            if output is not None:
                output.close(failed=failed)
            if show:
                _close_windows()
        report = rpt.build_report(pipeline.stats(), engine.info(), model=model, source=source_uri,
                                  live=source.live, extra={"saved": save, "interrupted": interrupted,
                                                           "error": str(lost) if lost else None})
    if report_path:
        rpt.write_json(report_path, report)
    if as_json:
        click.echo(json.dumps({"report": report}, default=str))
    else:
        click.echo(rpt.format_table(report))
        if output is not None:
            click.echo("wrote {} frame(s) to {}".format(output.written, save))
    if lost is not None:
        raise lost
    if interrupted:
        raise click.exceptions.Exit(130)


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
def bench(model, n_frames, warmup, source_uri, backend, providers, threads, batch_size, queue_size, no_annotate,
          report_path, plot_path, as_json):
    """Time MODEL end to end: per-stage p50/p90/p99/max latency, FPS, drops, backend and device.

    \b
    Example:
      edgead bench bottle.onnx --frames 300 --report bench.json --plot bench.png
      edgead bench bottle.onnx --providers cuda --batch 4 --json
      edgead bench bottle.engine --source csi://0 --frames 600
    """
    from edgead.runtime import pipeline as pl
    from edgead.runtime import report as rpt
    from edgead.runtime import sources

    engine = _open_engine(model, backend, providers, threads)
    with engine:
        source = sources.make_source(source_uri, size=engine.input_shape[1:3])
        if isinstance(source, sources.SyntheticSource) and "frames" not in sources.parse_uri(source_uri).params:
            source.frames = n_frames
        t0 = time.perf_counter()
        pl.warmup(engine, warmup, batch_size)
        warmup_s = time.perf_counter() - t0
        pipeline = pl.Pipeline(engine, source, batch_size=batch_size, queue_size=queue_size, max_frames=n_frames,
                               annotate=not no_annotate)
        results = pipeline.run()
        try:
            for _ in results:
                pass
        finally:
            results.close()
        report = rpt.build_report(pipeline.stats(), engine.info(), model=model, source=source_uri,
                                  live=source.live, extra={"warmup_batches": warmup, "warmup_s": warmup_s})
    if report_path:
        rpt.write_json(report_path, report)
    if plot_path:
        used = rpt.plot_histogram(pipeline.timings, plot_path, title="edgead bench: {}".format(
            os.path.basename(model)))
        report["plot"] = plot_path if used else None
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        click.echo(rpt.format_table(report))


COMMANDS = (run, bench)
