"""Memory a fit needs, checked against a budget before the long work starts, and the sizes of the
pieces of work that budget allows.

``--size 100000`` once asked torch for 500 GB half-way through a fit and died in a traceback, and a
WideResNet50 fit (P = 4096, D = 550) peaked at 21.6 GB where its statistics are 4.96 GB. Now
``FitMemoryPlan`` adds up what a fit holds (the float64 sums, the backbone, one batch, the patch-chunk
temporaries, the images a calibration pass keeps), compares it with the budget (``--max-memory``,
default ``DEFAULT_FRACTION`` of the memory available at start) and refuses in one line that states the
need, or hands out chunk and group sizes that stay inside it. Torch-free.
"""
import ctypes
import ctypes.util
import math
import os
import re
import sys

from edgead import packing
from edgead.errors import ConfigError

#: Default budget: this fraction of the memory available when the fit starts (the rest is the system's).
DEFAULT_FRACTION = 0.85
#: Python, torch, timm and the rest of the process before any model exists (measured: ~0.5 GB).
RUNTIME_BYTES = 500 << 20
#: Backbone activations per input pixel and image, a rough bound from the layer shapes: float32 maps of
#: 64 channels at 1/2 resolution (64 B/px) and 64-256 channels at 1/4 (16-64 B/px) are alive at once.
ACTIVATION_BYTES_PER_PIXEL = 128
#: Target bytes of one float64 ``[chunk, D, D]`` temporary (the issue's 100-200 MB); smaller when the budget is tight.
CHUNK_TARGET_BYTES = 128 << 20
#: Chunk temporaries alive at once: dense covariance, Cholesky factor, the triangular solve's right-hand side and
#: result, the packed copy (finalize); bmm + gather (update).
CHUNK_TEMPORARIES = 4
#: Float32 embeddings one leave-one-out group may hold (each group costs one Cholesky sweep over the patches):
#: ``GROUP_FRACTION`` of the statistics, at least ``GROUP_FLOOR_BYTES``, at most ``GROUP_TARGET_BYTES``, so the
#: peak stays within ~10 % of what does not depend on the number of images (WideResNet50: 498 MB, 55 images;
#: D = 100 at 256 px: 64 MB, 40 images).
GROUP_TARGET_BYTES = 512 << 20
GROUP_FRACTION = 0.1
GROUP_FLOOR_BYTES = 64 << 20
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000 ** 2, "mb": 1000 ** 2, "mib": 1 << 20,
          "g": 1000 ** 3, "gb": 1000 ** 3, "gib": 1 << 30, "t": 1000 ** 4, "tb": 1000 ** 4, "tib": 1 << 40,
          "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def _proc_kib(path, key):
    """Bytes of the ``key:`` line (a value in kB) of a /proc status-style file; None when absent or unreadable."""
    try:
        with open(path, "r") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory_bytes(meminfo="/proc/meminfo"):
    """``MemAvailable`` (Linux), else physical memory; None when unknown."""
    available = _proc_kib(meminfo, "MemAvailable")
    if available is not None:
        return available
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def human_bytes(n):
    """``4960000000`` -> ``'4.96 GB'`` (decimal units, 3 significant digits)."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return "{:.3g} {}".format(n, unit)
        n /= 1000.0
    return "{} B".format(n)  # pragma: no cover


def parse_memory_size(text, option="--max-memory"):
    """``'8G'``, ``'7.5GB'``, ``'6GiB'``, ``'512M'``, ``'123456'`` (bytes) or ``'70%'`` (of the memory available now)
    -> bytes (int). ConfigError (one line) for anything else."""
    value = str(text).strip().lower().replace(" ", "")
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(%|[kmgt]i?b?|b)?", value)
    if not match:
        raise ConfigError("{} must look like 8G, 7.5GB, 512MB or 70% (of available memory), not {!r}".format(
            option, text))
    number, unit = float(match.group(1)), match.group(2) or ""
    if unit == "%":
        if not 0 < number <= 100:
            raise ConfigError("{} {}: a percentage must be in (0, 100]".format(option, text))
        available = available_memory_bytes()
        if available is None:
            raise ConfigError("{} {}: the available memory is unknown on this system; give a size such as 8G".format(
                option, text))
        return int(available * number / 100)
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ConfigError("{} must be positive, not {!r}".format(option, text))
    return size


def fit_budget(budget=None, available=None, held=None):
    """``(bytes or None, one-line description)``: the memory a fit may use. ``budget``: ``--max-memory`` in bytes;
    None: ``DEFAULT_FRACTION`` of the available memory plus ``held``, what this process holds already (its resident
    set by default: the runtime and backbone are not in MemAvailable); unlimited when the available memory is
    unknown. Every method's memory plan uses it."""
    if budget is not None:
        return int(budget), "--max-memory {}".format(human_bytes(budget))
    available = available_memory_bytes() if available is None else available
    held = process_rss_bytes() if held is None else held
    if available is None:
        return None, "unlimited"
    return int(available * DEFAULT_FRACTION) + held, "{:.0f}% of the {} available + the {} this process holds (set " \
        "--max-memory)".format(DEFAULT_FRACTION * 100, human_bytes(available), human_bytes(held))


class FitMemoryPlan:
    """What a PaDiM fit of ``num_patches`` x ``dim`` holds, against a budget.

    budget: bytes the whole process may use (None: ``DEFAULT_FRACTION`` of the available memory plus ``held``,
    what the process holds already, default its resident set; unlimited when the available memory is unknown);
    backbone_bytes: parameters and buffers of the feature extractor.
    Sizes, all in bytes: ``statistics`` (float64 sums: ``P·(D + T)·8``, the float32 whitening is written
    over them), ``chunk_bytes`` (one ``[p, D, D]`` float64 temporary), ``image_bytes`` (one float32
    embedding ``D·P·4``, what a calibration pass keeps per image).
    """

    def __init__(self, num_patches, dim, input_hw, batch_size, backbone_bytes=0, budget=None, available=None,
                 held=None):
        self.num_patches, self.dim = int(num_patches), int(dim)
        self.input_hw = tuple(int(v) for v in input_hw)
        self.batch_size, self.backbone_bytes = int(batch_size), int(backbone_bytes)
        self.budget, self.budget_source = fit_budget(budget, available, held)
        self.statistics = self.num_patches * (self.dim + packing.packed_length(self.dim)) * 8
        self.image_bytes = self.num_patches * self.dim * 4
        self.one_patch = 8 * self.dim * self.dim
        self.fixed = RUNTIME_BYTES + self.backbone_bytes + self.statistics
        self.batch_bytes = self.batch_size * (self.input_hw[0] * self.input_hw[1] * ACTIVATION_BYTES_PER_PIXEL
                                              + self.image_bytes * 2)  # float32 embedding + its assembly
        # what is left once the fit and one calibration image (leave-one-out's least) are in
        spare = math.inf if self.budget is None else self.budget - self.fixed - self.batch_bytes - self.image_bytes
        self.chunk_bytes = int(max(self.one_patch, min(CHUNK_TARGET_BYTES, spare // CHUNK_TEMPORARIES)))

    def needed(self, held_images=0):
        """Bytes at the peak when a calibration pass holds ``held_images`` embeddings (0: no calibration)."""
        return self.fixed + self.batch_bytes + CHUNK_TEMPORARIES * self.chunk_bytes + held_images * self.image_bytes

    def group_images(self, n_images):
        """Images per leave-one-out group: embeddings of ``GROUP_FRACTION`` of the statistics (between
        ``GROUP_FLOOR_BYTES`` and ``GROUP_TARGET_BYTES``) and no more than the budget leaves; at least one."""
        target = min(GROUP_TARGET_BYTES, max(GROUP_FLOOR_BYTES, int(GROUP_FRACTION * self.statistics)))
        spare = target if self.budget is None else min(target, self.budget - self.needed())
        return int(max(1, min(int(n_images), spare // self.image_bytes)))

    def check(self, what, held_images=0, reason=""):
        """ConfigError when ``needed(held_images)`` exceeds the budget: one line with the need, its parts and the fixes."""
        needed = self.needed(held_images)
        if self.budget is None or needed <= self.budget:
            return needed
        held = " + {} embeddings of {}".format(human_bytes(held_images * self.image_bytes), reason) if held_images else ""
        raise ConfigError(
            "{} needs about {} of memory ({} float64 statistics for {} patches x D = {}{} + {} backbone, batch and "
            "working set), but the budget is {} ({}); use a smaller --size, --dim{} or more memory".format(
                what, human_bytes(needed), human_bytes(self.statistics), self.num_patches, self.dim, held,
                human_bytes(needed - self.statistics - held_images * self.image_bytes), human_bytes(self.budget),
                self.budget_source, ", --batch-size" if self.batch_size > 1 else ""))

    def describe(self):
        """A dict for reports and benchmarks (bytes)."""
        return {"budget": self.budget, "statistics": self.statistics, "chunk_bytes": self.chunk_bytes,
                "image_bytes": self.image_bytes, "needed_without_calibration": self.needed()}


def process_rss_bytes(status="/proc/self/status"):
    """Resident memory of this process now (``VmRSS``), 0 when unknown."""
    return _proc_kib(status, "VmRSS") or 0


def release_pages(address, nbytes):
    """Give the whole pages inside ``[address, address + nbytes)`` back to the system (``madvise(MADV_DONTNEED)``)
    while the allocation stays valid: they read as zeros if touched again. A no-op off Linux. Returns bytes released."""
    if not sys.platform.startswith("linux") or nbytes <= 0:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    first = -(-int(address) // page) * page
    last = (int(address) + int(nbytes)) // page * page
    if last <= first:
        return 0
    libc = _libc()
    if libc is None or libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4) != 0:  # MADV_DONTNEED
        return 0
    return last - first


_LIBC = []


def _libc():
    if not _LIBC:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _LIBC.append(lib)
        except (OSError, AttributeError):
            _LIBC.append(None)
    return _LIBC[0]
