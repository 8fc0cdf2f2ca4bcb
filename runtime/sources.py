"""Frame sources named by URI, the jetson-inference way.

==============================================  ======================================  =====
URI                                             opens                                   live
==============================================  ======================================  =====
``csi://0[?width=&height=&fps=&flip=]``         GStreamer nvarguscamerasrc (Jetson)     yes
``v4l2:///dev/video0``, ``/dev/video0``, ``0``  cv2.VideoCapture(..., CAP_V4L2)         yes
``rtsp://host/path[?backend=ffmpeg|gstreamer]`` FFmpeg (default) or GStreamer rtspsrc   yes
``http(s)://…``, ``rtmp://…``                   FFmpeg                                  yes
``clip.mp4`` (``file://`` optional)             FFmpeg (any backend OpenCV picks)       no
``folder/``, ``"imgs/*.png"``, ``one.png``      sorted image files                      no
``synthetic://?width=&height=&frames=&fps=``    deterministic generated frames          fps?
==============================================  ======================================  =====

A source yields ``Frame(image, index, timestamp, name)``: ``image`` RGB uint8 ``[H, W, 3]`` at the
source's own size, ``index`` 0, 1, 2 … (continues across reconnects), ``timestamp`` =
``time.perf_counter()`` seconds at capture, ``name`` = for image sources the file's path relative to
the folder/glob root (``ImageSource.root``, ``/``-separated, e.g. ``b/001.png`` for ``'imgs/**/*.png'``),
else None.

``Source.read()`` returns the next Frame, or None at the end of a finite stream; iterating an opened
source yields its frames. A live source that
stops delivering raises ``SourceError`` (the capture thread then reconnects with ``close(); open()``).
One unreadable file of an image source raises ``FrameError`` (a ``SourceError``); the source can go on
with the next file, so the capture thread may skip it (``on_error="skip"``).

Opening cameras and streams (``CvCaptureSource``) is bounded by ``open_timeout`` seconds (default
``DEFAULT_OPEN_TIMEOUT``): FFmpeg gets it as its open and read timeouts, and the open itself runs in a
daemon thread that the caller waits on in short slices, so Ctrl-C / SIGTERM are handled at once and a
host that never answers ends with ``SourceError("<uri>: no answer within N s (--open-timeout)")``.
"""
import collections
import os
import threading
import time

import numpy as np

from edgead.errors import DataError, SourceError

Frame = collections.namedtuple("Frame", ["image", "index", "timestamp", "name"])
Frame.__doc__ = """One captured frame: ``image`` RGB uint8 ``[H, W, 3]``, ``index`` int, ``timestamp``
``time.perf_counter()`` seconds at capture, ``name`` file name or None."""

SourceSpec = collections.namedtuple("SourceSpec", ["kind", "location", "params"])
SourceSpec.__doc__ = """Parsed URI: ``kind`` in csi/v4l2/network/video/images/synthetic, ``location``
(sensor id int, device int or path, URL, file/folder/glob), ``params`` dict of query values (str)."""

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".h264", ".h265",
                    ".wmv", ".flv")
NETWORK_SCHEMES = ("rtsp", "rtsps", "http", "https", "rtmp", "udp", "tcp")
#: seconds a camera/stream may take to open (and, for FFmpeg, to deliver one read)
DEFAULT_OPEN_TIMEOUT = 10.0
_OPEN_SLICE = 0.05


class FrameError(SourceError):
    """One frame (an image file) cannot be read; the source itself can go on with the next one."""


def _split_query(rest):
    """``"0?width=1280&fps=30"`` -> ("0", {"width": "1280", "fps": "30"})."""
    if "?" not in rest:
        return rest, {}
    base, query = rest.split("?", 1)
    params = {}
    for part in query.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        params[key.strip().lower()] = value.strip()
    return base, params


def parse_uri(uri):
    """URI or path -> SourceSpec (no I/O except checking whether a path is a file/folder).

    Raises SourceError for an unknown scheme or a malformed device.
    """
    if isinstance(uri, int) and not isinstance(uri, bool):
        return SourceSpec("v4l2", int(uri), {})
    text = str(uri).strip()
    if not text:
        raise SourceError("empty source URI (examples: csi://0, /dev/video0, clip.mp4, images/, synthetic://)")
    if text.isdigit():
        return SourceSpec("v4l2", int(text), {})
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower() if sep else ""
    if scheme == "csi":
        base, params = _split_query(rest)
        if not base.strip().isdigit():
            raise SourceError("{}: CSI sensor id must be a number, e.g. csi://0".format(text))
        return SourceSpec("csi", int(base), params)
    if scheme == "v4l2":
        base, params = _split_query(rest)
        device = base if base.startswith("/") else "/" + base
        return SourceSpec("v4l2", _v4l2_device(device, text), params)
    if scheme == "synthetic":
        base, params = _split_query(rest)
        return SourceSpec("synthetic", base, params)
    if scheme in NETWORK_SCHEMES:
        base, params = _split_query(text)
        backend_params = {k: params.pop(k) for k in ("backend", "latency", "codec", "decoder") if k in params}
        # keep the camera's own query string; only edgead's keys are stripped
        location = base + ("?" + "&".join("{}={}".format(k, v) for k, v in params.items()) if params else "")
        return SourceSpec("network", location, backend_params)
    if scheme == "file":
        text = rest
    elif sep:
        raise SourceError("{}: unknown source scheme {!r} (use csi://, v4l2://, rtsp://, synthetic://, a video "
                          "file, an image folder or glob)".format(text, scheme))
    if text.startswith("/dev/video"):
        return SourceSpec("v4l2", _v4l2_device(text, text), {})
    if os.path.isdir(text) or set("*?[") & set(text):
        return SourceSpec("images", text, {})
    ext = os.path.splitext(text)[1].lower()
    if ext in VIDEO_EXTENSIONS:
        return SourceSpec("video", text, {})
    if os.path.isfile(text):
        from edgead.data import is_image_file

        return SourceSpec("images" if is_image_file(text) else "video", text, {})
    raise SourceError("{}: no such file or folder (or unknown source; examples: csi://0, /dev/video0, "
                      "rtsp://cam/stream, clip.mp4, images/, synthetic://)".format(text))


def _v4l2_device(device, uri):
    if not device.startswith("/dev/"):
        raise SourceError("{}: expected a V4L2 device such as /dev/video0".format(uri))
    return device


def _int(params, key, default, uri, minimum=0):
    value = params.get(key)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise SourceError("{}: parameter {}={!r} must be an integer".format(uri, key, value))
    if number < minimum:
        raise SourceError("{}: parameter {}={} must be >= {}".format(uri, key, number, minimum))
    return number


def _float(params, key, default, uri):
    value = params.get(key)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise SourceError("{}: parameter {}={!r} must be a number".format(uri, key, value))
    if number <= 0:
        raise SourceError("{}: parameter {}={} must be > 0".format(uri, key, value))
    return number


# --- GStreamer pipeline strings ---------------------------------------------------------------------

def gstreamer_csi_pipeline(sensor_id=0, width=1280, height=720, fps=30, flip=0):
    """nvarguscamerasrc -> BGR appsink pipeline for ``cv2.VideoCapture(..., cv2.CAP_GSTREAMER)`` (Jetson CSI)."""
    return ("nvarguscamerasrc sensor-id={sid} ! "
            "video/x-raw(memory:NVMM), width=(int){w}, height=(int){h}, framerate=(fraction){fps}/1, "
            "format=(string)NV12 ! "
            "nvvidconv flip-method={flip} ! "
            "video/x-raw, width=(int){w}, height=(int){h}, format=(string)BGRx ! "
            "videoconvert ! video/x-raw, format=(string)BGR ! "
            "appsink drop=true max-buffers=1 sync=false").format(sid=int(sensor_id), w=int(width), h=int(height),
                                                                  fps=int(fps), flip=int(flip))


def gstreamer_rtsp_pipeline(url, latency=200, codec="h264", decoder="decodebin"):
    """rtspsrc -> BGR appsink. decoder ``decodebin`` (portable) or ``nvv4l2decoder`` (Jetson hardware)."""
    if decoder == "decodebin":
        decode = "decodebin ! videoconvert"
    else:
        codec = codec.lower()
        if codec not in ("h264", "h265"):
            raise SourceError("{}: codec must be h264 or h265, got {!r}".format(url, codec))
        decode = "rtp{c}depay ! {c}parse ! {d} ! nvvidconv ! video/x-raw, format=(string)BGRx ! videoconvert".format(
            c=codec, d=decoder)
    return ("rtspsrc location={url} latency={lat} ! {decode} ! video/x-raw, format=(string)BGR ! "
            "appsink drop=true max-buffers=1 sync=false").format(url=url, lat=int(latency), decode=decode)


def _has_gstreamer(cv2):
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line
    return False


# --- sources ----------------------------------------------------------------------------------------

class Source(object):
    """Base: ``open()``, ``read() -> Frame | None``, ``close()``; attributes ``uri``, ``live``, ``fps``."""

    live = False
    #: nominal frames per second (None if unknown / as fast as possible)
    fps = None

    def __init__(self, uri):
        self.uri = str(uri)
        self._index = 0

    def open(self):
        """Acquire the device/file. Raises SourceError naming the URI."""

    def read(self):
        raise NotImplementedError

    def close(self):
        """Release (idempotent)."""

    def _frame(self, image, name=None):
        frame = Frame(image, self._index, time.perf_counter(), name)
        self._index += 1
        return frame

    def __iter__(self):
        """Frames until the end of the stream (opened sources; errors propagate as SourceError)."""
        while True:
            frame = self.read()
            if frame is None:
                return
            yield frame

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "{}({!r})".format(type(self).__name__, self.uri)


class CvCaptureSource(Source):
    """``cv2.VideoCapture`` on a camera, stream or video file; BGR frames converted to RGB.

    target: device index/path, URL, file or GStreamer pipeline string; api: ``cv2.CAP_*`` name
    (``"CAP_V4L2"``, ``"CAP_GSTREAMER"``, ``"CAP_FFMPEG"`` or None for any); settings: dict of
    ``cv2.CAP_PROP_*`` name -> value applied after opening (V4L2 width/height/fps).
    """

    def __init__(self, uri, target, api=None, live=False, settings=None, hint="", open_timeout=DEFAULT_OPEN_TIMEOUT):
        Source.__init__(self, uri)
        self.target = target
        self.api = api
        self.live = live
        self.settings = dict(settings or {})
        self.hint = hint
        self.open_timeout = None if open_timeout is None else float(open_timeout)
        #: threading.Event: when set, a pending open gives up (the capture thread sets its stop event here)
        self.cancel = None
        self._cap = None

    def _timeout_params(self, cv2):
        """``[CAP_PROP_OPEN_TIMEOUT_MSEC, ms, CAP_PROP_READ_TIMEOUT_MSEC, ms]`` for FFmpeg, else []."""
        if self.open_timeout is None or self.api != "CAP_FFMPEG" or not hasattr(cv2, "CAP_PROP_OPEN_TIMEOUT_MSEC"):
            return []
        ms = max(1, int(self.open_timeout * 1000))
        return [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]

    def _create(self, cv2, api):
        params = self._timeout_params(cv2)
        if params:
            try:
                return cv2.VideoCapture(self.target, api, params)
            except (TypeError, cv2.error):  # OpenCV < 4.5.2: no params overload
                pass
        return cv2.VideoCapture(self.target, api)

    def _open_bounded(self, cv2, api):
        """``cv2.VideoCapture`` in a daemon thread, waited on in short slices (signals stay prompt).

        Returns the capture; raises SourceError when ``open_timeout`` (+ 1 s grace for OpenCV's own
        timeout to fire) passes or ``cancel`` is set. An abandoned open releases its capture itself."""
        box = {"cap": None, "error": None, "abandoned": False}
        lock = threading.Lock()
        done = threading.Event()

        def worker():
            try:
                cap = self._create(cv2, api)
            except Exception as exc:  # cv2.error and friends: reported by the caller
                cap, box["error"] = None, exc
            with lock:
                if box["abandoned"]:
                    if cap is not None:
                        cap.release()
                else:
                    box["cap"] = cap
            done.set()

        thread = threading.Thread(target=worker, name="edgead-open", daemon=True)
        t0 = time.monotonic()
        thread.start()
        deadline = None if self.open_timeout is None else t0 + self.open_timeout + 1.0
        try:
            while not done.wait(_OPEN_SLICE):
                if self.cancel is not None and self.cancel.is_set():
                    raise SourceError("{}: open cancelled".format(self.uri))
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._no_answer()
        except BaseException:
            with lock:
                box["abandoned"] = True
                cap = box["cap"]
                box["cap"] = None
            if cap is not None:
                cap.release()
            raise
        if box["error"] is not None:
            raise SourceError("{}: cannot open: {}".format(self.uri, box["error"]))
        cap = box["cap"]
        if cap is not None and not cap.isOpened() and self.open_timeout is not None \
                and time.monotonic() - t0 >= 0.9 * self.open_timeout:
            cap.release()  # OpenCV's own open timeout fired
            raise self._no_answer()
        return cap

    def _no_answer(self):
        return SourceError("{}: no answer within {:g} s (--open-timeout)".format(self.uri, self.open_timeout))

    def open(self):
        import cv2

        if not self.live and isinstance(self.target, str) and not os.path.isfile(self.target):
            raise SourceError("{}: video file not found".format(self.uri))
        if self.api == "CAP_GSTREAMER" and not _has_gstreamer(cv2):
            raise SourceError("{}: this OpenCV ({}) was built without GStreamer; on Jetson use the JetPack "
                              "OpenCV (python3-opencv), not the pip wheel".format(self.uri, cv2.__version__))
        api = getattr(cv2, self.api) if self.api else cv2.CAP_ANY
        cap = self._open_bounded(cv2, api) if self.live else cv2.VideoCapture(self.target, api)
        if not cap.isOpened():
            cap.release()
            raise SourceError("{}: cannot open{}".format(self.uri, self.hint))
        for prop, value in self.settings.items():
            cap.set(getattr(cv2, prop), value)
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and 0 < fps < 1000 else self.fps
        self._cap = cap

    def read(self):
        import cv2

        if self._cap is None:
            raise SourceError("{}: not open".format(self.uri))
        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            if self.live:
                raise SourceError("{}: stopped delivering frames".format(self.uri))
            return None
        if bgr.ndim == 2:
            rgb = cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
        else:
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return self._frame(rgb)

    def close(self):
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def image_root(spec):
    """The folder image names are relative to: the folder itself, a single file's folder, or a glob's
    leading folders without wildcards (``'imgs/**/*.png'`` -> ``imgs``; ``'*.png'`` -> ``.``)."""
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        return spec
    if not set("*?[") & set(spec):
        return os.path.dirname(spec) or "."
    parts = spec.replace(os.sep, "/").split("/")
    fixed = []
    for part in parts[:-1]:
        if set("*?[") & set(part):
            break
        fixed.append(part)
    if not fixed:
        return "."
    root = "/".join(fixed)
    return root or "/"


def relative_name(path, root):
    """``path`` relative to ``root``, ``/``-separated (the Frame name of an image source)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return rel.replace(os.sep, "/")


class ImageSource(Source):
    """Sorted image files of a folder (non-recursive), a glob (``**`` recurses) or one file.

    Frame names are paths relative to ``root`` (``image_root``), so equal file names in different
    sub-folders stay distinct. An unreadable file raises ``FrameError``; the next ``read`` goes on."""

    def __init__(self, uri, spec):
        Source.__init__(self, uri)
        self.spec = spec
        self.root = image_root(spec)
        self.paths = None
        self._pos = 0

    def open(self):
        from edgead.data import list_images

        try:
            self.paths = list_images(self.spec)
        except DataError as exc:
            raise SourceError(str(exc))
        self._pos = 0

    def read(self):
        from edgead.data import read_image

        if self.paths is None:
            self.open()
        if self._pos >= len(self.paths):
            return None
        path = self.paths[self._pos]
        self._pos += 1
        try:
            image = read_image(path)
        except DataError as exc:
            raise FrameError(str(exc))
        return self._frame(image, relative_name(path, self.root))

    def __len__(self):
        return len(self.paths) if self.paths is not None else 0


class SyntheticSource(Source):
    """Deterministic frames for tests and benchmarks, no I/O.

    Query parameters: ``width`` / ``height`` (pixels, default 256), ``frames`` (count, default 100;
    0 = endless), ``fps`` (pace like a camera and be *live*; default: as fast as possible, not live),
    ``defect`` (0: none; k: every k-th frame, i.e. ``index % k == 0``, carries a bright disk),
    ``seed`` (default 0). Background: smooth texture, values 40..160, shifted each frame.
    Blob: value 255, radius ``min(H, W) // 8``, position from ``blob(index)``.
    """

    def __init__(self, uri, params=None, sleep=time.sleep):
        Source.__init__(self, uri)
        params = params or {}
        self.width = _int(params, "width", 256, uri, minimum=8)
        self.height = _int(params, "height", 256, uri, minimum=8)
        self.frames = _int(params, "frames", 100, uri)
        self.fps = _float(params, "fps", None, uri)
        self.defect = _int(params, "defect", 0, uri)
        self.seed = _int(params, "seed", 0, uri)
        unknown = set(params) - {"width", "height", "frames", "fps", "defect", "seed"}
        if unknown:
            raise SourceError("{}: unknown synthetic parameter(s) {} (use width, height, frames, fps, defect, "
                              "seed)".format(uri, ", ".join(sorted(unknown))))
        self.live = self.fps is not None
        self._sleep = sleep
        self._background = None
        self._next_time = None

    def open(self):
        import cv2

        rng = np.random.default_rng(self.seed)
        h, w = self.height, self.width
        noise = rng.random((h, w, 3)).astype(np.float32)
        noise = cv2.GaussianBlur(noise, (0, 0), max(1.0, min(h, w) / 32.0))
        noise = (noise - noise.min()) / max(1e-6, float(noise.max() - noise.min()))
        ramp = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
        self._background = np.clip(40.0 + 80.0 * noise + 40.0 * ramp, 40, 160).astype(np.uint8)
        self._index = 0
        self._next_time = None

    def blob(self, index):
        """(cx, cy, radius) in pixels of the disk in frame ``index``, or None when it has none."""
        if self.defect <= 0 or index % self.defect:
            return None
        radius = max(2, min(self.height, self.width) // 8)
        rng = np.random.default_rng([self.seed, index])
        cx = int(rng.integers(radius, max(radius + 1, self.width - radius)))
        cy = int(rng.integers(radius, max(radius + 1, self.height - radius)))
        return cx, cy, radius

    def render(self, index):
        """The frame ``index`` as RGB uint8 ``[height, width, 3]`` (pure function of index and parameters)."""
        import cv2

        if self._background is None:
            self.open()
        image = np.roll(self._background, (index * 3) % self.width, axis=1).copy()
        blob = self.blob(index)
        if blob is not None:
            cv2.circle(image, (blob[0], blob[1]), blob[2], (255, 255, 255), -1)
        return image

    def read(self):
        if self._background is None:
            self.open()
        if self.frames and self._index >= self.frames:
            return None
        if self.fps:
            now = time.perf_counter()
            if self._next_time is None:
                self._next_time = now
            delay = self._next_time - now
            if delay > 0:
                self._sleep(delay)
            self._next_time = max(self._next_time + 1.0 / self.fps, time.perf_counter() - 1.0 / self.fps)
        return self._frame(self.render(self._index))

    def __len__(self):
        return self.frames


def make_source(uri, size=None, open_timeout=DEFAULT_OPEN_TIMEOUT):
    """Source object for ``uri`` (not opened yet). size: default (H, W) for ``synthetic://`` without width/height;
    open_timeout: seconds a camera/stream may take to open (None = no limit; see module doc)."""
    spec = parse_uri(uri)
    kind, loc, params = spec
    text = str(uri)
    if kind == "synthetic":
        params = dict(params)
        if size is not None:
            params.setdefault("height", str(size[0]))
            params.setdefault("width", str(size[1]))
        return SyntheticSource(text, params)
    if kind == "images":
        return ImageSource(text, loc)
    if kind == "video":
        return CvCaptureSource(text, loc, None, live=False, hint=" (corrupt video, or a codec this OpenCV lacks)")
    if kind == "csi":
        width = _int(params, "width", 1280, text, 1)
        height = _int(params, "height", 720, text, 1)
        fps = _int(params, "fps", 30, text, 1)
        flip = _int(params, "flip", 0, text)
        source = CvCaptureSource(text, gstreamer_csi_pipeline(loc, width, height, fps, flip), "CAP_GSTREAMER",
                                 live=True, hint=" (is the camera connected and nvargus-daemon running? "
                                                 "try: sudo systemctl restart nvargus-daemon)",
                                 open_timeout=open_timeout)
        source.fps = float(fps)
        return source
    if kind == "v4l2":
        settings = {}
        for key, prop in (("width", "CAP_PROP_FRAME_WIDTH"), ("height", "CAP_PROP_FRAME_HEIGHT"),
                          ("fps", "CAP_PROP_FPS")):
            if key in params:
                settings[prop] = _int(params, key, 0, text, 1)
        return CvCaptureSource(text, loc, "CAP_V4L2", live=True, settings=settings,
                               hint=" (does the device exist, and may this user read it? see v4l2-ctl "
                                    "--list-devices)", open_timeout=open_timeout)
    if kind == "network":
        backend = params.get("backend", "ffmpeg").lower()
        if backend == "gstreamer":
            target = gstreamer_rtsp_pipeline(loc, _int(params, "latency", 200, text), params.get("codec", "h264"),
                                             params.get("decoder", "decodebin"))
            return CvCaptureSource(text, target, "CAP_GSTREAMER", live=True, hint=" (check the URL and network)",
                                   open_timeout=open_timeout)
        if backend != "ffmpeg":
            raise SourceError("{}: backend must be ffmpeg or gstreamer, got {!r}".format(text, backend))
        return CvCaptureSource(text, loc, "CAP_FFMPEG", live=True, hint=" (check the URL and network)",
                               open_timeout=open_timeout)
    raise SourceError("{}: unsupported source kind {}".format(text, kind))  # pragma: no cover


def open_source(uri, size=None, open_timeout=DEFAULT_OPEN_TIMEOUT):
    """``make_source(uri, size, open_timeout)`` then ``open()``."""
    source = make_source(uri, size, open_timeout)
    source.open()
    return source
