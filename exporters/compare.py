"""Run the same frames through several backends and report how far they are from the torch model.

Polygraphy-style: the bundle's torch model (``bundle.model()``, whatever its method) is the reference; ONNX
Runtime and TensorRT (``.engine``, when TensorRT is installed) are compared against it. Errors are reported as
``max_abs`` (max |a - b|) and ``max_rel`` (max |a - b| / max |b|, relative to the reference range)
for the anomaly maps and the scores.
"""
import numpy as np
import torch

from edgead import packing
from edgead.errors import DataError


def _errors(candidate, reference):
    diff = np.abs(np.asarray(candidate, np.float64) - np.asarray(reference, np.float64))
    scale = float(np.abs(reference).max()) or 1.0
    return {"max_abs": float(diff.max()), "max_rel": float(diff.max() / scale)}


def torch_outputs(bundle, frames, precision="fp32"):
    """(maps ``[N, 1, H, W]``, scores ``[N]``) float32 numpy from the bundle's torch model.

    precision ``fp16`` first rounds the statistics as an fp16 export stores them
    (``bundle.with_storage_precision``; PaDiM: the packed whitening), i.e. the exact statistics that export
    carries, so backend differences are separated from storage rounding.
    """
    model = bundle.with_storage_precision(precision).model()
    maps, scores = [], []
    with torch.no_grad():
        for start in range(0, len(frames), 8):
            amap, score = model(torch.from_numpy(np.ascontiguousarray(frames[start:start + 8])))
            maps.append(amap.numpy())
            scores.append(score.numpy())
    return np.concatenate(maps), np.concatenate(scores)


def engine_outputs(path, frames, backend="auto", **options):
    """(maps, scores) from a runtime engine (ONNX Runtime or TensorRT) and its info dict."""
    from edgead.runtime.engines import open_engine

    with open_engine(path, backend=backend, **options) as engine:
        maps, scores = engine.infer(np.ascontiguousarray(frames))
        info = dict(engine.info(), model_info=engine.model_info)
        return np.asarray(maps), np.asarray(scores), info


def compare(bundle, model_paths, frames, backend_options=None):
    """Compare every model in ``model_paths`` against the bundle's torch model on ``frames`` (uint8 ``[N,H,W,3]``).

    Returns a list of row dicts: ``{"backend", "model", "reference", "map": {max_abs, max_rel},
    "score": {...}}``.
    """
    backend_options = backend_options or {}
    references = {"torch fp32": torch_outputs(bundle, frames)}
    rows = []
    for path in model_paths:
        maps, scores, info = engine_outputs(path, frames, **backend_options)
        precision = ((info.get("model_info") or {}).get("export") or {}).get("precision", "fp32")
        if precision == "int8":
            raise DataError("{}: an int8 export carries statistics refitted on its int8 features, so the bundle's "
                            "torch model is no reference for it; measure it with edgead eval (or "
                            "benchmarks/int8_quality.py)".format(path))
        if precision == "fp16" and "torch fp16-stats" not in references:
            references["torch fp16-stats"] = torch_outputs(bundle, frames, "fp16")
        for name, (ref_maps, ref_scores) in references.items():
            if name == "torch fp16-stats" and precision != "fp16":
                continue
            rows.append({
                "backend": info.get("backend", "?"),
                "model": str(path),
                "reference": name,
                "map": _errors(maps, ref_maps),
                "score": _errors(scores, ref_scores),
            })
    return rows


def format_table(rows):
    """Plain-text table of compare rows."""
    header = "{:<28} {:<18} {:>12} {:>12} {:>12} {:>12}".format(
        "backend", "reference", "map max_abs", "map max_rel", "score max_abs", "score max_rel")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append("{:<28} {:<18} {:>12.3e} {:>12.3e} {:>12.3e} {:>12.3e}".format(
            row["backend"][:28], row["reference"], row["map"]["max_abs"], row["map"]["max_rel"],
            row["score"]["max_abs"], row["score"]["max_rel"]))
    return "\n".join(lines)


def whitening_storage_bytes(dim, num_patches, precision):
    """Bytes of the packed whitening in a file (for size tables)."""
    return packing.packed_length(dim) * num_patches * (2 if precision == "fp16" else 4)
