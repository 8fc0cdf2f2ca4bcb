"""ONNX exports with external data (models over protobuf's 2 GiB; exporters/external_data.py).

The tiny model is forced to ``--external-data always``; the size decision is pinned with the numbers of the
real case (fp32 wide_resnet50_2, D = 550, 4096 patches: 2.48 GB). Reference for the outputs: the inline
export of the same bundle, which must be matched bit for bit (same graph, same bytes, only stored apart).
Loaders checked: ONNX Runtime (``OrtEngine``), ``modelinfo`` (protobuf scan), ``onnx.checker``/``onnx.load``
and ``edgead compare``. Crash tests kill the export at each step (``EDGEAD_FAULT_AT``).
"""
import hashlib
import json
import os
import re
import shutil
import threading
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, external_data_helper, helper

from edgead import atomic
from edgead.bundle import load_bundle
from edgead.cli import cli
from edgead.errors import ExportError
from edgead.exporters import external_data as xd
from edgead.exporters import onnx_export
from edgead.runtime import modelinfo
from edgead.runtime.engines.ort_engine import OrtEngine

from conftest import cli_runner, random_frames
from test_fault_injection import _run_killed_at

GiB = 1 << 30


_runner = cli_runner


def _outputs(path, frames):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(["anomaly_map", "score"], {"image": frames})


def _data_files(folder):
    return sorted(n for n in os.listdir(str(folder)) if n.endswith(".data"))


@pytest.fixture(scope="module")
def frames():
    f = random_frames(2, seed=7)
    f[1, 10:25, 30:50] = (250, 20, 20)
    return f


@pytest.fixture(scope="module")
def exported(tiny_bundle, tmp_path_factory):
    """The tiny bundle exported fp32, batch 2, inline and with external data."""
    folder = tmp_path_factory.mktemp("exported")
    inline, external = str(folder / "inline.onnx"), str(folder / "ext.onnx")
    onnx_export.export_onnx(tiny_bundle, inline, "onnx", "fp32", 2)
    model = onnx_export.export_onnx(tiny_bundle, external, "onnx", "fp32", 2, external_data="always")
    return {"folder": folder, "inline": inline, "external": external, "model": model}


# ---- what the files are ----------------------------------------------------------------------------------

def test_external_export_gives_bit_identical_outputs(exported, frames):
    assert os.path.getsize(exported["inline"]) > 8 * os.path.getsize(exported["external"])  # really stored apart
    maps_i, scores_i = _outputs(exported["inline"], frames)
    maps_e, scores_e = _outputs(exported["external"], frames)
    assert np.array_equal(maps_i, maps_e) and np.array_equal(scores_i, scores_e)
    assert np.isfinite(maps_e).all() and maps_e.shape == (2, 1, 64, 64)


def test_file_layout_small_onnx_one_aligned_content_addressed_data_file(exported):
    folder, path = str(exported["folder"]), exported["external"]
    data_files = [n for n in _data_files(folder) if n.startswith("ext.onnx.")]
    assert len(data_files) == 1 and re.match(r"^ext\.onnx\.[0-9a-f]{16}\.data$", data_files[0])
    data_path = os.path.join(folder, data_files[0])
    blob = open(data_path, "rb").read()
    assert hashlib.sha256(blob).hexdigest()[:16] == data_files[0].split(".")[2]
    assert blob.startswith(xd.MAGIC) and not any(blob[len(xd.MAGIC):xd.ALIGN])
    on_disk = onnx.load(path, load_external_data=False)
    inline = onnx.load(exported["inline"])
    by_name = {t.name: t for t in inline.graph.initializer}
    external = [t for t in on_disk.graph.initializer if external_data_helper.uses_external_data(t)]
    assert external and len(on_disk.graph.initializer) == len(inline.graph.initializer)
    spans = []
    for tensor in on_disk.graph.initializer:
        if not external_data_helper.uses_external_data(tensor):
            assert xd.tensor_nbytes(tensor) < xd.INLINE_LIMIT, tensor.name  # only small tensors stay inline
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        assert entries["location"] == data_files[0]
        offset, length = int(entries["offset"]), int(entries["length"])
        assert offset % xd.ALIGN == 0 and offset >= xd.ALIGN
        assert length == xd.tensor_nbytes(tensor) >= xd.INLINE_LIMIT
        assert blob[offset:offset + length] == by_name[tensor.name].raw_data  # the very bytes of the inline model
        spans.append((offset, offset + length))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no overlap
    assert spans[-1][1] == len(blob)
    # the returned ModelProto is the one on disk: it names the data file, its big tensors hold no bytes
    assert xd.external_locations(exported["model"]) == data_files
    onnx.checker.check_model(path, full_check=True)  # the checker follows the location and finds the file


def test_loaders_read_it_modelinfo_ort_engine_onnx_load(exported, frames, tmp_path, monkeypatch):
    inline_meta = modelinfo.load_model_info(exported["inline"])
    assert modelinfo.load_model_info(exported["external"]) == inline_meta  # protobuf scan of the small .onnx
    assert modelinfo.read_onnx_metadata_raw(exported["external"]) == modelinfo.read_onnx_metadata_raw(
        exported["inline"])
    monkeypatch.chdir(str(tmp_path))  # the data file is found next to the .onnx, not in the working directory
    engine = OrtEngine(exported["external"], threads=1)
    assert engine.model_info == inline_meta and engine.batch == 2
    maps, scores = engine.infer(frames)
    maps_i, scores_i = _outputs(exported["inline"], frames)
    assert np.array_equal(maps, maps_i) and np.array_equal(scores, scores_i)
    loaded = onnx.load(exported["external"])  # onnx.load pulls the data in (what benchmarks do)
    inline = onnx.load(exported["inline"])
    assert {t.name: t.raw_data for t in loaded.graph.initializer} == {t.name: t.raw_data for t in inline.graph.initializer}


def test_engine_waits_while_an_export_holds_the_folder(exported):
    """OrtEngine reads under a shared folder lock, so an export (exclusive) never removes the data mid-read."""
    done = []
    with atomic.locked(str(exported["folder"])):
        thread = threading.Thread(target=lambda: done.append(OrtEngine(exported["external"], threads=1)))
        thread.start()
        time.sleep(1.0)
        assert not done  # still waiting for the writer
    thread.join(60)
    assert done and done[0].batch == 2


# ---- the CLI: export --json, compare -----------------------------------------------------------------------

def test_cli_export_json_and_compare_pass(tiny_bundle, tmp_path, monkeypatch):
    bundle_dir = str(tmp_path / "b.edgead")
    tiny_bundle.save(bundle_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = str(out_dir / "m.onnx")
    result = _runner().invoke(cli, ["export", bundle_dir, "-o", out, "--precision", "fp32", "--external-data",
                                    "always", "--json"])
    assert result.exit_code == 0, (result.output, result.stderr)
    summary = json.loads(result.output)
    assert summary["data_file"] == _data_files(out_dir)[0]
    assert summary["bytes"] == os.path.getsize(out)
    assert summary["total_bytes"] == os.path.getsize(out) + os.path.getsize(str(out_dir / summary["data_file"]))
    assert summary["tensorrt_problems"] == []
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(str(elsewhere))
    result = _runner().invoke(cli, ["compare", bundle_dir, os.path.join("..", "out", "m.onnx"), "--frames", "2",
                                    "--json"])
    assert result.exit_code == 0, (result.output, result.stderr)
    rows = json.loads(result.output)
    assert rows[0]["map"]["max_rel"] <= 1e-4 and rows[0]["score"]["max_rel"] <= 1e-4
    # inline by default: no data file, and the previous version's data file is removed
    result = _runner().invoke(cli, ["export", bundle_dir, "-o", out, "--json"])
    assert result.exit_code == 0, (result.output, result.stderr)
    summary = json.loads(result.output)
    assert summary["data_file"] is None and summary["total_bytes"] == summary["bytes"] == os.path.getsize(out)
    assert os.listdir(str(out_dir)) == ["m.onnx"]


def test_never_on_a_too_large_model_is_one_line_and_writes_nothing(tiny_bundle, tmp_path, monkeypatch):
    bundle_dir = str(tmp_path / "b.edgead")
    tiny_bundle.save(bundle_dir)
    out = str(tmp_path / "out" / "m.onnx")
    os.mkdir(str(tmp_path / "out"))
    monkeypatch.setattr(xd, "THRESHOLD_BYTES", 100_000)  # the tiny fp32 model is ~9 MB
    result = _runner().invoke(cli, ["export", bundle_dir, "-o", out, "--precision", "fp32", "--external-data", "never"])
    assert result.exit_code == 2, (result.output, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("edgead: error: " + out + ": the model is 0.01 GB, over the 0.00 GB"), lines[0]
    assert os.listdir(str(tmp_path / "out")) == []
    # auto with the same threshold goes external by itself
    result = _runner().invoke(cli, ["export", bundle_dir, "-o", out, "--precision", "fp32", "--json"])
    assert result.exit_code == 0, (result.output, result.stderr)
    assert json.loads(result.output)["data_file"] == _data_files(tmp_path / "out")[0]


def test_bad_mode_is_refused_before_the_build(tiny_bundle, tmp_path):
    with pytest.raises(ExportError, match="external data must be one of auto, always, never, not 'sometimes'"):
        onnx_export.export_onnx(tiny_bundle, str(tmp_path / "m.onnx"), external_data="sometimes")
    assert os.listdir(str(tmp_path)) == []


# ---- the decision, with numbers ----------------------------------------------------------------------------

def _declared_model(dims, data_type=TensorProto.FLOAT):
    """A model whose one initializer declares ``dims`` but holds no bytes (the estimate reads dims only)."""
    tensor = TensorProto(name="whitening_packed", data_type=data_type, dims=dims)
    node = helper.make_node("Identity", ["whitening_packed"], ["y"])
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", data_type, dims)], [tensor])
    return helper.make_model(graph)


def test_auto_decision_pinned_with_numbers():
    assert xd.THRESHOLD_BYTES == 1_932_735_283  # 1.8 GiB, below protobuf's 2 GiB = 2_147_483_648
    # wide_resnet50_2, D = 550 -> packed length 550 * 551 / 2 = 151525, 4096 patches
    fp32 = xd.estimate_model_bytes(_declared_model([4096, 151525]))
    fp16 = xd.estimate_model_bytes(_declared_model([4096, 151525], TensorProto.FLOAT16))
    assert 2_482_585_600 <= fp32 < 2_482_585_600 + 16384
    assert 1_241_292_800 <= fp16 < 1_241_292_800 + 16384
    assert xd.wants_external("auto", fp32) is True
    assert xd.wants_external("auto", fp16) is False
    assert xd.wants_external("auto", xd.THRESHOLD_BYTES) is False
    assert xd.wants_external("auto", xd.THRESHOLD_BYTES + 1) is True
    assert xd.wants_external("always", 10) is True
    assert xd.wants_external("never", fp16) is False
    with pytest.raises(ExportError) as info:
        xd.wants_external("never", fp32, "wrn.onnx")
    assert str(info.value) == ("wrn.onnx: the model is 2.48 GB, over the 1.93 GB an .onnx file without external "
                               "data can hold safely (protobuf's limit is 2 GiB); export with --external-data auto")
    assert xd.wants_external("auto", 50, threshold=40) is True


def test_estimate_is_close_to_the_real_size(exported):
    inline = onnx.load(exported["inline"])
    real = os.path.getsize(exported["inline"])
    assert real <= xd.estimate_model_bytes(inline) <= real * 1.01 + 8192


# ---- replacing a model: stale data goes, foreign files stay -----------------------------------------------

def _shifted(bundle, shift):
    from edgead.bundle import PadimBundle

    return PadimBundle(bundle.config, bundle.backbone_state, bundle.mean + shift, bundle.whitening_packed)


def test_reexport_replaces_data_removes_stale_never_foreign(tiny_bundle, tmp_path, frames):
    path = str(tmp_path / "m.onnx")
    onnx_export.export_onnx(tiny_bundle, path, "onnx", "fp32", 2, external_data="always")
    (first,) = _data_files(tmp_path)
    old = _outputs(path, frames)
    foreign = {
        "m.onnx.0123456789abcdef.data": b"someone else's bytes",  # our name pattern, not our file
        "other.onnx." + first.split(".")[2] + ".data": open(str(tmp_path / first), "rb").read(),  # another model's
        "m.onnx.data": b"anomalib-style data file",
        "m.onnx.0123456789ABCDEF.data": xd.MAGIC + b"upper-case digest: not our pattern",
    }
    for name, content in foreign.items():
        (tmp_path / name).write_bytes(content)
    shutil.copy(path, str(tmp_path / "m_v1.onnx"))  # a kept copy of version 1 names the first data file

    onnx_export.export_onnx(_shifted(tiny_bundle, 1.0), path, "onnx", "fp32", 2, external_data="always")
    second = [n for n in _data_files(tmp_path) if n not in foreign and n != first]
    assert len(second) == 1 and os.path.exists(str(tmp_path / first))  # m_v1.onnx still needs the first
    for name, content in foreign.items():
        assert (tmp_path / name).read_bytes() == content
    assert np.array_equal(_outputs(str(tmp_path / "m_v1.onnx"), frames)[0], old[0])
    new = _outputs(path, frames)
    assert not np.array_equal(new[0], old[0])

    os.remove(str(tmp_path / "m_v1.onnx"))
    onnx_export.export_onnx(_shifted(tiny_bundle, 1.0), path, "onnx", "fp32", 2, external_data="always")
    assert not os.path.exists(str(tmp_path / first))  # nothing names it now: removed
    assert sorted(_data_files(tmp_path)) == sorted(list(foreign) + second)  # same content: same file, reused
    assert np.array_equal(_outputs(path, frames)[0], new[0])
    assert sorted(os.listdir(str(tmp_path))) == sorted(["m.onnx"] + list(foreign) + second)  # no temp files


def test_a_different_file_with_the_data_name_is_never_replaced(tiny_bundle, exported, tmp_path, frames):
    (name,) = [n for n in _data_files(exported["folder"]) if n.startswith("ext.onnx.")]
    path = str(tmp_path / "ext.onnx")
    onnx_export.export_onnx(_shifted(tiny_bundle, 1.0), path, "onnx", "fp32", 2, external_data="always")
    (previous_data,) = _data_files(tmp_path)
    before = _outputs(path, frames)
    (tmp_path / name).write_bytes(xd.MAGIC + b"\0" * 100)  # the name this export wants, other content
    with pytest.raises(ExportError, match=re.escape(str(tmp_path / name)) + ": exists and is not the data"):
        onnx_export.export_onnx(tiny_bundle, path, "onnx", "fp32", 2, external_data="always")
    assert (tmp_path / name).read_bytes() == xd.MAGIC + b"\0" * 100
    assert sorted(os.listdir(str(tmp_path))) == sorted(["ext.onnx", previous_data, name])
    assert np.array_equal(_outputs(path, frames)[0], before[0])


def test_a_model_failing_the_checker_leaves_no_new_file(tiny_bundle, tmp_path, frames, monkeypatch):
    path = str(tmp_path / "m.onnx")
    onnx_export.export_onnx(tiny_bundle, path, "onnx", "fp32", 2, external_data="always")
    before_files = sorted(os.listdir(str(tmp_path)))
    before = _outputs(path, frames)
    checked = []

    def failing(model, full_check=False, **kwargs):
        checked.append(model)
        raise onnx.checker.ValidationError("Nodes in a graph must be topologically sorted\nmore detail")

    monkeypatch.setattr(onnx.checker, "check_model", failing)
    with pytest.raises(ExportError, match="fails onnx.checker: Nodes in a graph must be topologically sorted$"):
        onnx_export.export_onnx(_shifted(tiny_bundle, 1.0), path, "onnx", "fp32", 2, external_data="always")
    assert isinstance(checked[0], str)  # checked through the written temp file (works above 2 GiB)
    assert sorted(os.listdir(str(tmp_path))) == before_files  # the new data file is gone again
    with pytest.raises(ExportError, match="fails onnx.checker"):  # inline: checked before the rename, nothing left
        onnx_export.export_onnx(_shifted(tiny_bundle, 1.0), path, "onnx", "fp32", 2, external_data="never")
    assert isinstance(checked[1], str)  # the streamed .onnx is checked through a temp file (its statistics by reference)
    assert sorted(os.listdir(str(tmp_path))) == before_files
    monkeypatch.undo()
    assert np.array_equal(_outputs(path, frames)[0], before[0])


# ---- crash tests ---------------------------------------------------------------------------------------------

EXPORT_SHIFTED = """
from edgead.bundle import load_bundle
from edgead.exporters.onnx_export import export_onnx
bundle = load_bundle({folder!r})
bundle.mean = bundle.mean + 1.0
bundle.config = dict(bundle.config, calibration=dict(bundle.config.get("calibration") or {{}}, image_threshold=123.0))
export_onnx(bundle, {out!r}, "onnx", "fp32", 2, external_data="always")
"""

#: (fault point, which model loads afterwards) in the order an external-data export reaches them
EXTERNAL_POINTS = [
    ("onnx_export.data-written", "old"),  # data in its temp file
    ("onnx_export.data-renamed", "old"),  # data under its new name, nothing names it yet
    ("atomic.before-rename", "old"),  # the new .onnx written and checked, not renamed
    ("atomic.after-rename", "new"),  # the switch happened; the old data file is still there
    ("onnx_export.switched", "new"),
]


@pytest.fixture(scope="module")
def shifted_reference(tiny_bundle, tmp_path_factory, frames):
    """Outputs of the bundle the killed exports write (mean + 1), from an inline export."""
    path = str(tmp_path_factory.mktemp("shifted") / "ref.onnx")
    onnx_export.export_onnx(_shifted(tiny_bundle, 1.0), path, "onnx", "fp32", 2)
    return _outputs(path, frames)


@pytest.mark.parametrize("point,expected", EXTERNAL_POINTS)
def test_export_killed_at_each_step_keeps_a_whole_model(tiny_bundle, tmp_path, frames, shifted_reference, point,
                                                        expected):
    folder, out_dir = str(tmp_path / "bundle"), tmp_path / "out"
    tiny_bundle.save(folder)
    out_dir.mkdir()
    out = str(out_dir / "m.onnx")
    bundle = load_bundle(folder)
    onnx_export.export_onnx(bundle, out, "onnx", "fp32", 2, external_data="always")
    (old_data,) = _data_files(out_dir)
    old = _outputs(out, frames)

    _run_killed_at(point, EXPORT_SHIFTED.format(folder=folder, out=out))
    threshold = (modelinfo.load_model_info(out).get("calibration") or {}).get("image_threshold")
    assert (threshold == 123.0) == (expected == "new")
    maps, scores = OrtEngine(out, threads=1).infer(frames)  # loads whole: the data file it names is there
    reference = old if expected == "old" else shifted_reference
    assert np.array_equal(maps, reference[0]) and np.array_equal(scores, reference[1])
    assert os.path.exists(str(out_dir / old_data))
    assert len(os.listdir(str(out_dir))) > 2  # the crash left something: a temp, an orphan or the stale data

    onnx_export.export_onnx(bundle, out, "onnx", "fp32", 2, external_data="always")  # the next export cleans up
    assert sorted(os.listdir(str(out_dir))) == sorted(["m.onnx", old_data])
    assert np.array_equal(_outputs(out, frames)[0], old[0])
