"""Atomic file output: write to a temp file in the same folder, then rename.

A crash or a bad input half-way never leaves a truncated file where a good one was.
Torch-free: the runtime imports this module.

Fault injection (tests only): every writer calls ``fault_point(name)`` between its steps. When the
environment variable ``EDGEAD_FAULT_AT`` equals ``name`` (or ``name@K``: the K-th time that point is
reached, 1-based), the process kills itself with SIGKILL right there, as a power cut or ``kill -9``
would. ``tests/test_fault_injection.py`` runs every writer under every point and checks that the
previous output still loads.
"""
import contextlib
import errno
import glob
import os
import signal
import tempfile

try:
    import fcntl
except ImportError:  # pragma: no cover - not Linux/macOS: no locks, no stale-temp cleanup
    fcntl = None

FAULT_ENV = "EDGEAD_FAULT_AT"
_fault_hits = {}


def fault_point(name):
    """Test hook: SIGKILL this process here when ``EDGEAD_FAULT_AT`` names this point (see module doc)."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def temp_path(final_path):
    """Yield a fresh temporary path next to ``final_path`` (``.<stem>.<random>.tmp<ext>``, same folder, so a
    rename is atomic); the caller renames it. It is removed if still there when the block ends, on an
    exception or not. The temp file is ``flock``-ed while the block runs, so ``remove_stale_temps`` can tell
    a crashed writer's leftover (lock released by the kernel) from a live one's."""
    final_path = os.fspath(final_path)
    folder = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(final_path))
    fd, tmp = tempfile.mkstemp(prefix="." + stem + ".", suffix=".tmp" + ext, dir=folder)
    try:
        if fcntl is not None:
            _flock(fd, fcntl.LOCK_EX)
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        os.close(fd)


def remove_stale_temps(final_path):
    """Delete the temp files of ``final_path`` that killed writers left (unlocked ones); returns their paths."""
    if fcntl is None:
        return []
    final_path = os.fspath(final_path)
    folder = os.path.dirname(os.path.abspath(final_path))
    stem, ext = os.path.splitext(os.path.basename(final_path))
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), glob.escape("." + stem + ".") + "*" + glob.escape(
            ".tmp" + ext))):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live writer holds it
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.remove(path)
            removed.append(path)
    return removed


def _flock(fd, operation):
    """flock, or nothing where the file system has no locks (some NFS/CIFS mounts: ENOLCK, EOPNOTSUPP)."""
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, operation)
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise


@contextlib.contextmanager
def locked(path, shared=False):
    """``flock`` on ``path`` (a file or a folder) for the block: exclusive for writers, ``shared`` for readers.
    The kernel releases it if the process dies."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if fcntl is not None:
            _flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def reading_folder_of(path):
    """Shared ``flock`` on the folder of ``path`` while a reader loads a file that names siblings (an .onnx and
    its external data file ``bottle.onnx.<sha16>.data``): ``edgead export`` holds the folder exclusively while it
    replaces the pair, so it never removes the data file mid-read. No lock where the folder cannot be opened
    (a folder without read permission)."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locked(os.path.dirname(os.path.abspath(os.fspath(path))), shared=True))
        except OSError:
            pass
        yield


def _read_umask():
    umask = os.umask(0o022)  # the only way to read it; set and restored at once, at import (no threads yet)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def set_default_mode(path, like=None):
    """chmod ``path`` to the mode of the file ``like`` when it exists (a replaced file keeps its permissions),
    else to 0666 & ~umask (what ``open()`` would have made)."""
    try:
        mode = os.stat(like).st_mode & 0o7777 if like is not None else None
    except OSError:
        mode = None
    os.chmod(path, mode if mode is not None else 0o666 & ~_UMASK)


def fsync_path(path):
    """Flush a file's (or a folder's: its entries, i.e. renames) data to disk, so a power cut after we
    return cannot leave a renamed-but-empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final_path):
    """Yield a temporary path next to ``final_path``; rename it over ``final_path`` on success.

    On an exception the temporary file is removed and ``final_path`` is untouched. Temp files of
    ``final_path`` left by killed writers are removed first. The file gets the usual mode
    (0666 & ~umask) whatever the writer did (mkstemp and safetensors make 0600).
    """
    final_path = os.fspath(final_path)
    remove_stale_temps(final_path)
    with temp_path(final_path) as tmp:
        yield tmp
        set_default_mode(tmp, like=final_path)
        fault_point("atomic.before-rename")
        os.replace(tmp, final_path)
        fsync_path(os.path.dirname(os.path.abspath(final_path)))
        fault_point("atomic.after-rename")


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
