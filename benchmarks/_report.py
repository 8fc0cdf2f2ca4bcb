"""Shared output of the benchmark scripts: ``OUT/<name>.json``, ``.csv`` and ``.png``, each written atomically."""
import csv
import io
import json
import os
import time


def write_outputs(out_dir, name, rows, payload, figure):
    """Write ``rows`` (list of flat dicts) as CSV, ``payload`` (+ date) as JSON, ``figure`` (matplotlib) as PNG."""
    from edgead import atomic

    os.makedirs(out_dir, exist_ok=True)
    atomic.write_text(os.path.join(out_dir, name + ".json"),
                      json.dumps(dict({"date": time.strftime("%Y-%m-%d")}, **payload), indent=2) + "\n")
    buffer = io.StringIO()
    fields = list(dict.fromkeys(key for row in rows for key in row))  # union, first-seen order
    writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(os.path.join(out_dir, name + ".csv"), buffer.getvalue())
    image = io.BytesIO()
    figure.tight_layout()
    figure.savefig(image, format="png", dpi=110)
    atomic.write_bytes(os.path.join(out_dir, name + ".png"), image.getvalue())
    print("wrote {}/{}.{{json,csv,png}}".format(out_dir, name))


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cpu_name():
    """The CPU model from /proc/cpuinfo (``"unknown"`` elsewhere), for the headers of benchmark tables."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
