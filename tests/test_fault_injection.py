"""Crash tests, the way storage engines test themselves: kill -9 each writer at each of its steps
(``edgead.atomic.fault_point``, armed by ``EDGEAD_FAULT_AT``), then the previous result must still load,
whole and unchanged, or the new one must, whole; never a mix, and the next write cleans up.

Writers: ``PadimBundle.save`` (fit, eval --calibrate), ``export_onnx``, and ``edgead.atomic`` files
(reports, metrics, plots, PNG overlays). ``edgead run --save`` under signals: tests/test_run_signals.py.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from edgead import atomic
from edgead.bundle import CONFIG_NAME, load_bundle, weights_file_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_killed_at(point, code):
    """Run ``code`` in a fresh Python with the fault armed at ``point``; it must die by SIGKILL there."""
    env = dict(os.environ, EDGEAD_FAULT_AT=point, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == -signal.SIGKILL, "writer was not killed at {}: rc {} {}".format(
        point, proc.returncode, proc.stderr.decode()[-2000:])


# ---- bundles ------------------------------------------------------------------------------------------

RESAVE = """
import sys
from edgead.bundle import load_bundle
bundle = load_bundle(sys.argv[1] if len(sys.argv) > 1 else {folder!r})
bundle.mean = bundle.mean + 1.0
bundle.config = dict(bundle.config, calibration=dict(bundle.config.get("calibration") or {{}}, image_threshold=123.0))
bundle.save({folder!r})
"""

#: (fault point, which bundle loads afterwards) in the order save() reaches them
BUNDLE_POINTS = [
    ("bundle.weights-written", "old"),
    ("bundle.weights-renamed", "old"),
    ("atomic.before-rename", "old"),  # model.json written to its temp, not renamed: the switch has not happened
    ("atomic.after-rename", "new"),
    ("bundle.switched", "new"),  # before the old weights file is removed
]


@pytest.mark.parametrize("point,expected", BUNDLE_POINTS)
def test_bundle_save_killed_at_each_step_leaves_a_whole_bundle(tiny_bundle, tmp_path, point, expected):
    folder = str(tmp_path / "bundle")
    tiny_bundle.save(folder)
    _run_killed_at(point, RESAVE.format(folder=folder))
    loaded = load_bundle(folder)  # never a mix: the checksum and the shapes hold
    shift = 0.0 if expected == "old" else 1.0
    assert torch.equal(loaded.mean, tiny_bundle.mean + shift)
    threshold = (loaded.config.get("calibration") or {}).get("image_threshold")
    assert (threshold == 123.0) == (expected == "new")
    # the next save removes whatever the crash left (orphan weights, temp files) and the bundle loads
    tiny_bundle.save(folder)
    assert sorted(os.listdir(folder)) == [CONFIG_NAME, os.path.basename(weights_file_path(folder))]
    assert torch.equal(load_bundle(folder).mean, tiny_bundle.mean)


def test_first_save_killed_leaves_no_bundle_that_loads_wrongly(tiny_bundle, tmp_path):
    """Killed before the first model.json exists: the folder is not a bundle (clear error), and a rerun
    of fit into it works (the leftovers are ours)."""
    from edgead.errors import BundleError

    folder = str(tmp_path / "fresh")
    src = str(tmp_path / "src")
    tiny_bundle.save(src)
    code = "from edgead.bundle import load_bundle\nload_bundle({!r}).save({!r})".format(src, folder)
    _run_killed_at("bundle.weights-renamed", code)
    with pytest.raises(BundleError, match="model.json"):
        load_bundle(folder)
    tiny_bundle.save(folder)
    assert torch.equal(load_bundle(folder).mean, tiny_bundle.mean)


# ---- ONNX export ----------------------------------------------------------------------------------

EXPORT = """
from edgead.bundle import load_bundle
from edgead.exporters.onnx_export import export_onnx
bundle = load_bundle({folder!r})
bundle.config = dict(bundle.config, calibration=dict(bundle.config.get("calibration") or {{}}, image_threshold=123.0))
export_onnx(bundle, {out!r})
"""


@pytest.mark.parametrize("point,expected", [("atomic.before-rename", "old"), ("atomic.after-rename", "new")])
def test_export_killed_keeps_a_loadable_model(tiny_bundle, tmp_path, point, expected):
    import onnxruntime as ort

    from edgead.exporters.onnx_export import export_onnx
    from edgead.runtime.modelinfo import load_model_info

    folder, out = str(tmp_path / "bundle"), str(tmp_path / "model.onnx")
    tiny_bundle.save(folder)
    export_onnx(load_bundle(folder), out)
    _run_killed_at(point, EXPORT.format(folder=folder, out=out))
    info = load_model_info(out)
    threshold = (info.get("calibration") or {}).get("image_threshold")
    assert (threshold == 123.0) == (expected == "new")
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    maps, scores = session.run(None, {session.get_inputs()[0].name: np.zeros((1, 64, 64, 3), np.uint8)})
    assert maps.shape == (1, 1, 64, 64) and np.isfinite(scores).all()
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".model.")]
    assert (len(leftovers) == 1) == (expected == "old")  # a killed writer's temp ...
    export_onnx(load_bundle(folder), out)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".model.")]  # ... is gone after the next write


# ---- every atomic file (reports, metrics.json, plots, overlays) ---------------------------------------

WRITE_TEXT = """
from edgead import atomic
atomic.write_text({path!r}, '{{"version": "new"}}')
"""


@pytest.mark.parametrize("point,expected", [("atomic.before-rename", "old"), ("atomic.after-rename", "new")])
def test_atomic_file_killed_is_old_or_new_never_partial(tmp_path, point, expected):
    path = str(tmp_path / "report.json")
    atomic.write_text(path, '{"version": "old"}')
    _run_killed_at(point, WRITE_TEXT.format(path=path))
    assert json.load(open(path)) == {"version": expected}


def test_stale_temps_of_killed_writers_are_removed_but_live_ones_kept(tmp_path):
    path = str(tmp_path / "run.mp4")
    stale = tmp_path / ".run.k1ll3d.tmp.mp4"
    stale.write_bytes(b"half a video")
    with atomic.temp_path(path) as live:  # a writer still at work holds its temp file's lock
        removed = atomic.remove_stale_temps(path)
        assert removed == [str(stale)] and os.path.exists(live)
    assert not os.path.exists(live)
    assert os.listdir(tmp_path) == []


def test_fault_point_counts_hits(tmp_path):
    """``name@K`` kills at the K-th time the point is reached (for writers that loop, e.g. PNG folders)."""
    code = """
    from edgead import atomic
    for i in range(5):
        atomic.write_text({path!r}.format(i), str(i))
    """.format(path=str(tmp_path / "frame{}.txt"))
    _run_killed_at("atomic.after-rename@3", code)
    assert sorted(os.listdir(tmp_path)) == ["frame0.txt", "frame1.txt", "frame2.txt"]


# ---- TensorRT engine + sidecar (one pair, two files) --------------------------------------------------

WRITE_ENGINE = """
from edgead.runtime.engine_files import write_engine_pair
write_engine_pair({path!r}, b"NEW ENGINE BYTES" * 100, {{"format_version": 1, "generation": "new"}})
"""

#: every step of write_engine_pair, in order, and the pair that must load after a kill there
ENGINE_POINTS = [
    ("atomic.before-rename@1", "old"),  # sidecar (new + previous) not yet in place
    ("engine.sidecar-with-previous", "old"),
    ("atomic.before-rename@2", "old"),  # engine not yet in place
    ("atomic.after-rename@2", "new"),
    ("engine.engine-written", "new"),
    ("atomic.before-rename@3", "new"),  # the sidecar still carries `previous`
]


@pytest.mark.parametrize("point,expected", ENGINE_POINTS)
def test_engine_build_killed_at_each_step_leaves_a_matching_pair(tmp_path, point, expected):
    from edgead.runtime.engine_files import select_engine_info, sidecar_path, write_engine_pair

    path = str(tmp_path / "model.engine")
    write_engine_pair(path, b"OLD ENGINE" * 100, {"format_version": 1, "generation": "old"})
    _run_killed_at(point, WRITE_ENGINE.format(path=path))
    info = select_engine_info(path, json.load(open(sidecar_path(path))))
    assert info["generation"] == expected
    assert open(path, "rb").read() == (b"OLD ENGINE" * 100 if expected == "old" else b"NEW ENGINE BYTES" * 100)
    assert "previous" not in info


def test_engine_without_its_sidecar_is_refused(tmp_path):
    from edgead.errors import ModelFileError
    from edgead.runtime.engine_files import select_engine_info, sidecar_path, write_engine_pair

    path = str(tmp_path / "model.engine")
    write_engine_pair(path, b"A" * 64, {"format_version": 1})
    sidecar = json.load(open(sidecar_path(path)))
    open(path, "wb").write(b"B" * 64)  # another build's engine copied over, sidecar left behind
    with pytest.raises(ModelFileError, match="does not match its sidecar"):
        select_engine_info(path, sidecar)
    legacy = {"format_version": 1}  # sidecars from before engine_sha256 still load
    assert select_engine_info(path, legacy) == legacy


def test_runtime_reads_the_sidecar_entry_that_matches_the_engine(tmp_path):
    """load_model_info (what TensorRTEngine calls) validates and returns the matching generation."""
    from edgead.runtime.engine_files import sidecar_path, write_engine_pair
    from edgead.runtime.modelinfo import load_model_info

    from fake_models import FAKE_CALIBRATION, fake_metadata

    path = str(tmp_path / "model.engine")
    old = fake_metadata(calibration=dict(FAKE_CALIBRATION, image_threshold=1.0))
    new = fake_metadata(calibration=dict(FAKE_CALIBRATION, image_threshold=2.0))
    write_engine_pair(path, b"OLD" * 50, old)
    write_engine_pair(path, b"NEW" * 50, new)
    assert load_model_info(path)["calibration"]["image_threshold"] == 2.0
    # as if killed before the engine was renamed: the sidecar holds both, the file is still the old engine
    sidecar = json.load(open(sidecar_path(path)))
    sidecar["previous"] = json.load(open(sidecar_path(path)))
    sidecar["previous"]["engine_sha256"] = hashlib.sha256(b"OLD" * 50).hexdigest()
    sidecar["previous"]["calibration"]["image_threshold"] = 1.0
    json.dump(sidecar, open(sidecar_path(path), "w"))
    open(path, "wb").write(b"OLD" * 50)
    assert load_model_info(path)["calibration"]["image_threshold"] == 1.0


def test_rebuild_over_a_sidecar_without_hash_killed_after_the_engine(tmp_path):
    """A sidecar from before engine_sha256: the rebuild still writes the two-generation sidecar first."""
    from edgead.runtime.engine_files import select_engine_info, sidecar_path

    path = str(tmp_path / "model.engine")
    open(path, "wb").write(b"OLD ENGINE" * 100)
    json.dump({"format_version": 1, "generation": "old"}, open(sidecar_path(path), "w"))
    _run_killed_at("engine.sidecar-with-previous", WRITE_ENGINE.format(path=path))
    assert select_engine_info(path, json.load(open(sidecar_path(path))))["generation"] == "old"
    _run_killed_at("engine.engine-written", WRITE_ENGINE.format(path=path))
    assert select_engine_info(path, json.load(open(sidecar_path(path))))["generation"] == "new"


def test_two_interrupted_rebuilds_in_a_row_keep_the_engine_on_disk_loadable(tmp_path):
    from edgead.runtime.engine_files import select_engine_info, sidecar_path, write_engine_pair

    path = str(tmp_path / "model.engine")
    write_engine_pair(path, b"A" * 64, {"format_version": 1, "generation": "A"})
    for generation in ("B", "C"):
        code = ("from edgead.runtime.engine_files import write_engine_pair\n"
                "write_engine_pair({!r}, {!r} * 64, {{'format_version': 1, 'generation': {!r}}})").format(
                    path, generation.encode(), generation)
        _run_killed_at("engine.sidecar-with-previous", code)
        info = select_engine_info(path, json.load(open(sidecar_path(path))))
        assert info["generation"] == "A" and open(path, "rb").read() == b"A" * 64
