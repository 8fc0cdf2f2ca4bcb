"""Memory a fit needs, checked against what the machine has before the long work starts.

``--size 100000`` once asked torch for 500 GB half-way through a fit and died in a traceback; now the
estimate below is compared with the available memory first and the user gets one line with the
numbers and the fix. Torch-free.
"""
import os

from edgead import packing
from edgead.errors import ConfigError

#: Bytes per packed ``[P, T]`` element a PaDiM fit holds at the least: the float64 running sums (8) and the
#: float32 whitening the bundle keeps (4). A lower bound on purpose: refusing a fit that would have
#: worked is worse than the late failure this check exists to prevent.
STATS_BYTES_PER_PACKED_ELEMENT = 12
#: Backbone activations per input pixel and image, a rough bound from the layer shapes: float32 maps of
#: 64 channels at 1/2 resolution (64 B/px) and 64-256 channels at 1/4 (16-64 B/px) are alive at once.
ACTIVATION_BYTES_PER_PIXEL = 128


def available_memory_bytes(meminfo="/proc/meminfo"):
    """``MemAvailable`` (Linux), else physical memory; None when unknown."""
    try:
        with open(meminfo, "r") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def padim_fit_bytes(num_patches, dim, input_hw, batch_size):
    """Bytes a PaDiM fit needs at the least: the per-patch Gaussian statistics plus one batch through the backbone."""
    height, width = input_hw
    stats = num_patches * (dim * 8 + packing.packed_length(dim) * STATS_BYTES_PER_PACKED_ELEMENT)
    return int(stats + batch_size * height * width * ACTIVATION_BYTES_PER_PIXEL)


def _human(n):
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return "{:.3g} {}".format(n, unit)
        n /= 1000.0
    return "{} B".format(n)  # pragma: no cover


def check_padim_fit_memory(num_patches, dim, input_hw, batch_size, available=None):
    """Raise ConfigError when the fit would need more memory than is available (names the numbers and the fix)."""
    available = available_memory_bytes() if available is None else available
    needed = padim_fit_bytes(num_patches, dim, input_hw, batch_size)
    if available is not None and needed > available:
        raise ConfigError(
            "--size {}x{} with D = {} needs at least {} of memory ({} patches x {} statistics, plus a batch of {} "
            "through the backbone), but {} is available; use a smaller --size, --dim or --batch-size".format(
                input_hw[0], input_hw[1], dim, _human(needed), num_patches, packing.packed_length(dim),
                batch_size, _human(available)))
    return needed
