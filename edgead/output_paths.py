"""Where ``edgead run`` / ``bench`` / ``export`` may write: every check is done before a model or a frame is touched.

Rules (DESIGN.md: nothing writes over a file it did not create without ``--force``):

- ``--report`` / ``--plot``: a file path whose folder exists and is writable; never a folder. An existing
  file is replaced only when it is ours (a previous edgead report: a JSON object with ``edgead_version``
  and ``stages``; a PNG carrying the ``Software: edgead`` text chunk) or with ``--force``.
- ``--save``: a video (``VIDEO_OUTPUT_EXTENSIONS``) or a folder of PNGs. An image-like or unwritable video
  extension is refused (it would silently become a folder). An existing video is replaced only with
  ``--force``. A PNG folder is never the source folder, never a folder containing source images, never
  inside the root a recursive glob reads; frames keep their path relative to the source root (sub-folders
  mirrored), and an existing file there is replaced only with ``--force`` (no manifest: an mp4 cannot
  say who wrote it either, so both outputs follow one rule).
- ``--save``, ``--report``, ``--plot``, the model and the source files are pairwise different paths.
- ``export -o``: a ``.onnx`` file, replaced only when it is an edgead model (it has our metadata) or with
  ``--force``.

Torch-free (the device-side CLI imports it). Every problem is one ``ConfigError`` line naming the path.
"""
import collections
import json
import os
import re

from edgead.errors import ConfigError

VIDEO_OUTPUT_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".m4v")
#: extensions that name a picture, never a folder of PNGs (IMAGE_EXTENSIONS of edgead.data plus more)
IMAGE_LIKE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".apng", ".avif",
                         ".heic", ".heif", ".jxl", ".jp2", ".ico", ".svg", ".pgm", ".ppm", ".pbm", ".pnm", ".exr",
                         ".hdr")
_MAX_REPORT_BYTES = 16 << 20
_INDEX_NAME = re.compile(r"^\d{6,}\.png$")

SavePlan = collections.namedtuple("SavePlan", ["kind", "path", "names"])
SavePlan.__doc__ = """``kind``: ``video`` or ``folder``; ``path``: the --save path; ``names``: frame name -> PNG path
relative to the folder (image sources; other sources use ``png_name``)."""


def _real(path):
    return os.path.normcase(os.path.realpath(os.path.abspath(os.fspath(path))))


def same_path(a, b):
    """True when ``a`` and ``b`` name the same file (symlinks and ``..`` resolved; need not exist)."""
    return _real(a) == _real(b)


def is_within(path, folder):
    """True when ``path`` is ``folder`` or inside it (resolved)."""
    path, folder = _real(path), _real(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _existing_ancestor(path):
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return folder


def check_parent(path, option):
    """The folder of ``path`` exists, is a folder and is writable."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError("{}: {} folder {} does not exist".format(path, option, parent))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError("{}: {}: cannot write in {} (permission denied)".format(path, option, parent))


def is_previous_report(path):
    """True when ``path`` is a JSON object with the keys of an edgead report (``report.REPORT_KEYS``)."""
    from edgead.runtime.report import is_report

    try:
        if os.path.getsize(path) > _MAX_REPORT_BYTES:
            return False
        with open(path, "rb") as fh:
            head = fh.read(1).lstrip()
            if head not in (b"{", b""):
                return False
            data = json.loads((head + fh.read()).decode("utf-8"))
    except (OSError, ValueError):
        return False
    return is_report(data)


_EXAMPLE_NAMES = {"--report": "report.json", "--plot": "latency.png", "-o": "model.onnx"}


def _check_file_target(path, option, force, ours, what):
    if os.path.isdir(path):
        raise ConfigError("{}: {} is a folder; give a file name, e.g. {}".format(
            path, option, os.path.join(path, _EXAMPLE_NAMES.get(option, "output"))))
    check_parent(path, option)
    if os.path.lexists(path):
        if not os.path.isfile(path):
            raise ConfigError("{}: {} exists and is not a regular file".format(path, option))
        if not force and not ours(path):
            raise ConfigError("{}: exists and is not {}; {} will not replace it (pass --force to overwrite)".format(
                path, what, option))


def check_report_path(path, force=False):
    """``--report``: see module doc."""
    _check_file_target(path, "--report", force, is_previous_report, "an edgead report")


def is_edgead_onnx(path):
    """True when ``path`` is an ONNX file carrying edgead metadata (a model ``edgead export`` wrote)."""
    from edgead.errors import EdgeadError
    from edgead.runtime.modelinfo import read_onnx_metadata_raw

    try:
        read_onnx_metadata_raw(path)
    except EdgeadError:
        return False
    return True


def check_model_path(path, force=False):
    """``export -o``: a ``.onnx`` file path (same rules as ``--report``; ours = an edgead ONNX model)."""
    if os.path.splitext(path)[1].lower() != ".onnx" and not os.path.isdir(path):
        raise ConfigError("{}: -o must name a .onnx file".format(path))
    _check_file_target(path, "-o", force, is_edgead_onnx, "an edgead model")


def check_plot_path(path, force=False):
    """``--plot``: see module doc."""
    from edgead.runtime.report import is_our_png

    _check_file_target(path, "--plot", force, is_our_png, "an edgead plot")


def png_name(name, index):
    """Relative PNG path of one frame: its source name with ``.png`` (sub-folders kept), else ``000123.png``."""
    if name:
        return os.path.splitext(name)[0] + ".png"
    return "{:06d}.png".format(index)


def png_names(names):
    """Frame name -> relative PNG path, with ``a.png``/``a.jpg`` in one folder kept apart (``a.jpg.png``)."""
    counts = collections.Counter(png_name(n, 0) for n in names)
    out = {}
    for name in names:
        target = png_name(name, 0)
        if counts[target] > 1 and os.path.splitext(name)[1].lower() != ".png":
            target = name + ".png"
        out[name] = target
    return out


def _check_distinct(save=None, model=None, report=None, plot=None, source_files=()):
    named = [("--save", save), ("--report", report), ("--plot", plot), ("the model", model)]
    named = [(label, p) for label, p in named if p]
    for i, (label_a, a) in enumerate(named):
        for label_b, b in named[i + 1:]:
            if same_path(a, b):
                raise ConfigError("{}: {} and {} are the same file".format(a, label_a, label_b))
        if label_a in ("--save", "--report", "--plot"):
            for src in source_files:
                if same_path(a, src):
                    raise ConfigError("{}: {} would overwrite the source {}".format(a, label_a, src))


def check_outputs(model=None, report=None, plot=None, force=False, source_files=()):
    """``--report`` / ``--plot`` targets plus pairwise distinctness (bench, and run without --save)."""
    _check_distinct(model=model, report=report, plot=plot, source_files=source_files)
    if report:
        check_report_path(report, force)
    if plot:
        check_plot_path(plot, force)


def check_save(save, force=False, model=None, report=None, plot=None, source_files=(), source_root=None,
               recursive=False):
    """Validate ``--save`` (see module doc); returns a ``SavePlan``.

    source_files: the image files (or video file) the source reads; source_root: the folder image names
    are relative to (``sources.image_root``); recursive: the source is a ``**`` glob.
    """
    _check_distinct(save=save, model=model, report=report, plot=plot, source_files=source_files)
    ext = os.path.splitext(save.rstrip("/" + os.sep))[1].lower()
    if ext in IMAGE_LIKE_EXTENSIONS:
        raise ConfigError("{}: --save must be a video file ({}) or a folder, not a {} image".format(
            save, ", ".join(VIDEO_OUTPUT_EXTENSIONS), ext))
    if ext in _video_input_extensions() and ext not in VIDEO_OUTPUT_EXTENSIONS:
        raise ConfigError("{}: --save cannot write {} videos; use {}".format(
            save, ext, ", ".join(VIDEO_OUTPUT_EXTENSIONS)))
    if ext in VIDEO_OUTPUT_EXTENSIONS:
        if os.path.isdir(save):
            raise ConfigError("{}: --save names a video but this is a folder".format(save))
        kind = "video"
    elif os.path.isdir(save):
        kind = "folder"
    elif os.path.lexists(save):
        raise ConfigError("{}: --save must be a video file ({}) or a folder; this is an existing file".format(
            save, ", ".join(VIDEO_OUTPUT_EXTENSIONS)))
    else:
        kind = "folder"
    ancestor = _existing_ancestor(save if kind == "folder" else os.path.dirname(os.path.abspath(save)))
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError("{}: --save: cannot write in {}".format(save, ancestor))
    if kind == "video":
        if os.path.lexists(save) and not force:
            raise ConfigError("{}: exists; --save will not overwrite it (pass --force to overwrite)".format(save))
        return SavePlan("video", save, {})
    for src in source_files:
        if is_within(src, save):
            raise ConfigError("{}: --save folder contains the source images (e.g. {}); choose a folder outside "
                              "them".format(save, src))
    if recursive and source_root is not None and is_within(save, source_root):
        raise ConfigError("{}: --save folder is inside {}, which the recursive source glob reads; choose a folder "
                          "outside it".format(save, source_root))
    names = {}
    if source_root is not None and source_files:
        from edgead.runtime.sources import relative_name

        names = png_names([relative_name(p, source_root) for p in source_files])
        planned = names.values()
    elif os.path.isdir(save):
        planned = [n for n in os.listdir(save) if _INDEX_NAME.match(n)]
    else:
        planned = []
    if not force:
        for rel in planned:
            target = os.path.join(save, rel)
            if os.path.lexists(target):
                raise ConfigError("{}: exists; --save will not overwrite it (pass --force, or choose another "
                                  "folder)".format(target))
    return SavePlan("folder", save, names)


def _video_input_extensions():
    from edgead.runtime.sources import VIDEO_EXTENSIONS

    return VIDEO_EXTENSIONS
