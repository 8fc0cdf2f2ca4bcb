"""Atomic file output: write to a temp file in the same folder, then rename.

A crash or a bad input half-way never leaves a truncated file where a good one was.
Torch-free: the runtime imports this module.
"""
import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(final_path):
    """Yield a temporary path next to ``final_path``; rename it over ``final_path`` on success.

    On an exception the temporary file is removed and ``final_path`` is untouched.
    """
    final_path = os.fspath(final_path)
    folder = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(final_path)
    stem, ext = os.path.splitext(base)
    fd, tmp = tempfile.mkstemp(prefix="." + stem + ".", suffix=".tmp" + ext, dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp
        os.replace(tmp, final_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_bytes(path, data):
    """Atomically write ``data`` (bytes) to ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def write_text(path, text):
    """Atomically write ``text`` (str, UTF-8) to ``path``."""
    write_bytes(path, text.encode("utf-8"))
