"""``edgead export --triton REPO`` / ``edgead build --triton REPO``: Triton model repository entries
(``edgead.exporters.triton``).

Pinned here:
- config.pbtxt parses with Triton's own ``ModelConfig`` protobuf (tritonclient's ``model_config_pb2``): platform /
  backend, max_batch_size, names, data types, per-item dims, ``score`` as ``dims [1]`` + ``reshape { shape: [] }``,
  dynamic batching, instance group, warm-up, op libraries, ``edgead.*`` parameters; and its dims match the graph in
  the written model file (read with ``onnx``, and with the writer's own protobuf scan);
- the entry's model.onnx has a dynamic batch and gives, for batch 1 and batch 3, the maps and scores of a normal
  ``edgead export -o`` (batch 1) of the same bundle: max abs difference <= 1e-5 x the reference's max (the graphs
  differ only in the batch dimension); plugin flavour with the shipped libedgead_ort.so vs the standard-op export:
  <= 1e-5 relative (tests/test_ort_ops.py's bar);
- edgead.json = the model's ONNX metadata + a ``triton`` record; its thresholds equal the metadata and the config's
  parameters;
- refusals are one line and write nothing: an explicit fixed --batch, a folder edgead did not write (unless
  --force), the plugin flavour without libedgead_ort.so, a bad name, --triton-* without --triton, a fixed-batch ONNX
  for build;
- the entry switches as a whole: a writer killed (SIGKILL) after staging leaves the old entry byte for byte, killed
  after the swap leaves the new one whole; the rename fallback (no RENAME_EXCHANGE) killed between its renames leaves
  the old entry aside, which the next write restores before replacing it; leftovers are removed by the next write;
- ``edgead build --triton`` against the stand-in tensorrt module (tests/fake_tensorrt.py): a tensorrt_plan entry,
  the plugin library copied and named in the comments / README.
"""
import hashlib
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from conftest import assert_refused_in_one_line, cli_runner, random_frames
from edgead.cli import cli
from edgead.errors import ExportError
from edgead.exporters import triton
from edgead.runtime import modelinfo, ort_ops, tensorrt_plugin
from edgead.runtime.engines import tensorrt_engine
from fake_models import build_fake_model, write_fake_model
from fake_tensorrt import FAKE_ENGINE, make_fake_cuda, make_tensorrt
from test_fault_injection import _run_killed_at

H = W = 64


def _config(path):
    config = model_config_pb2.ModelConfig()
    with open(os.path.join(str(path), triton.CONFIG_NAME)) as fh:
        text_format.Parse(fh.read(), config)
    return config


def _session(path, library=None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if library:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _snapshot(folder):
    """{relative path: sha256} of every file under ``folder``."""
    out = {}
    for root, _dirs, files in os.walk(str(folder)):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, str(folder))] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _leftovers(tmp_path):
    """Staging / set-aside folders of any entry, in the repository's parent or inside the repository."""
    found = []
    for place in (tmp_path, tmp_path / "repo"):
        if place.is_dir():
            found += [n for n in os.listdir(str(place)) if n.endswith((".tmp", ".old"))]
    return found


def _export(args):
    result = cli_runner().invoke(cli, ["export"] + [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.stderr)
    return result


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("bundle") / "widget.edgead")
    tiny_bundle.save(folder)
    return folder


@pytest.fixture(scope="module")
def frames():
    f = random_frames(3, seed=31)
    f[1, 10:25, 30:50] = (250, 20, 20)
    return f


@pytest.fixture(scope="module")
def normal(bundle_dir, frames, tmp_path_factory):
    """A normal ``edgead export -o`` (standard ops, batch 1) and its outputs for ``frames``, one at a time."""
    out = tmp_path_factory.mktemp("normal") / "widget.onnx"
    _export([bundle_dir, "-o", out])
    session = _session(out)
    outs = [session.run(None, {"image": frames[i:i + 1]}) for i in range(len(frames))]
    return str(out), np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


@pytest.fixture(scope="module")
def entry(bundle_dir, tmp_path_factory):
    """``edgead export widget.edgead --triton REPO --json``: (entry folder, summary)."""
    repo = tmp_path_factory.mktemp("triton") / "repo"
    summary = json.loads(_export([bundle_dir, "--triton", repo, "--json"]).output)
    return repo / "widget", summary


# ---- the entry ------------------------------------------------------------------------------------------------

def test_layout_and_config_fields(entry):
    path, summary = entry
    assert sorted(os.listdir(str(path))) == ["1", "README.md", "config.pbtxt", "edgead.json"]
    assert os.listdir(str(path / "1")) == ["model.onnx"]
    assert summary["triton"]["path"] == str(path) and summary["onnx"] == str(path / "1" / "model.onnx")
    assert summary["batch"] == "dynamic" and summary["triton"]["validated"]
    config = _config(path)
    assert config.name == "widget"
    assert (config.platform, config.backend) == ("onnxruntime_onnx", "onnxruntime")
    assert config.max_batch_size == 8 and config.default_model_filename == "model.onnx"
    (image,) = config.input
    assert (image.name, image.data_type, list(image.dims)) == ("image", model_config_pb2.TYPE_UINT8, [H, W, 3])
    assert not image.HasField("reshape")
    amap, score = config.output
    assert (amap.name, amap.data_type, list(amap.dims)) == ("anomaly_map", model_config_pb2.TYPE_FP32, [1, H, W])
    assert not amap.HasField("reshape")
    # the graph's score is [N]: nothing per item, so Triton's dims [1] reshaped to [] for the backend
    assert (score.name, score.data_type, list(score.dims)) == ("score", model_config_pb2.TYPE_FP32, [1])
    assert score.HasField("reshape") and list(score.reshape.shape) == []
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert list(config.dynamic_batching.preferred_batch_size) == []
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_GPU)]
    assert [w.batch_size for w in config.model_warmup] == [1, 8]
    for warm in config.model_warmup:
        assert list(warm.inputs) == ["image"] and list(warm.inputs["image"].dims) == [H, W, 3]
        assert warm.inputs["image"].zero_data and warm.inputs["image"].data_type == model_config_pb2.TYPE_UINT8
    assert not config.HasField("model_operations")


def test_config_dims_match_the_graph(entry):
    path, _ = entry
    model = onnx.load(str(path / "1" / "model.onnx"), load_external_data=False)
    config = _config(path)

    def graph_dims(value):
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]

    for section, graph in ((config.input, model.graph.input), (config.output, model.graph.output)):
        assert [t.name for t in section] == [v.name for v in graph]
        for tensor, value in zip(section, graph):
            dims = graph_dims(value)
            assert isinstance(dims[0], str)  # dynamic batch
            expected = dims[1:] or [1]
            assert list(tensor.dims) == expected
            assert tensor.HasField("reshape") == (dims[1:] == [])
    # the writer's own scan (no onnx, initializers skipped; this file has two graph fields) agrees with onnx
    scanned = triton.graph_io(str(path / "1" / "model.onnx"))
    assert [(t["name"], t["elem_type"], t["dims"]) for t in scanned["inputs"]] == [
        (v.name, v.type.tensor_type.elem_type, [None if isinstance(d, str) else d for d in graph_dims(v)])
        for v in model.graph.input]
    assert [(t["name"], t["dims"]) for t in scanned["outputs"]] == [
        ("anomaly_map", [None, 1, H, W]), ("score", [None])]


def test_entry_model_batches_and_matches_a_normal_export(entry, normal, frames):
    path, _ = entry
    _, ref_maps, ref_scores = normal
    session = _session(path / "1" / "model.onnx")
    assert session.get_inputs()[0].shape[0] == "N"
    one = [session.run(None, {"image": frames[i:i + 1]}) for i in range(len(frames))]
    three = session.run(None, {"image": frames})
    for maps, scores in ((np.concatenate([o[0] for o in one]), np.concatenate([o[1] for o in one])), three):
        assert maps.shape == (3, 1, H, W) and scores.shape == (3,)
        assert np.abs(maps - ref_maps).max() <= 1e-5 * np.abs(ref_maps).max()
        assert np.abs(scores - ref_scores).max() <= 1e-5 * np.abs(ref_scores).max()


def test_edgead_json_and_parameters_carry_the_model_thresholds(entry):
    path, _ = entry
    model_file = str(path / "1" / "model.onnx")
    meta = modelinfo.load_model_info(model_file)
    with open(str(path / "edgead.json")) as fh:
        marker = json.load(fh)
    record = marker.pop("triton")
    assert marker == json.loads(json.dumps(meta))  # the ONNX metadata, unchanged
    assert modelinfo.thresholds(modelinfo.load_model_info(str(path / "edgead.json"))) == modelinfo.thresholds(meta)
    assert record["written_by"].startswith("edgead ") and record["model_file"] == "1/model.onnx"
    with open(model_file, "rb") as fh:
        assert record["model_sha256"] == hashlib.sha256(fh.read()).hexdigest()
    params = {k: v.string_value for k, v in _config(path).parameters.items()}
    calibration = meta["calibration"]
    assert calibration["image_threshold"] is not None
    for key in ("image_threshold", "pixel_threshold", "score_min", "score_max"):
        assert float(params["edgead." + key]) == calibration[key]
    assert params["edgead.model_sha256"] == record["model_sha256"]
    assert params["edgead.weights_sha256"] == meta["weights_sha256"]
    assert (params["edgead.input_height"], params["edgead.input_width"]) == (str(H), str(W))
    assert params["edgead.method"] == "padim" and params["edgead.precision"] == "fp16"
    with open(str(path / "README.md")) as fh:
        readme = fh.read()
    assert "tritonserver --model-repository=" in readme and repr(calibration["image_threshold"]) in readme


def test_plugin_flavour_ships_the_ort_library(bundle_dir, normal, frames, tmp_path):
    library = ort_ops.find_ort_ops_library()
    if library is None or os.sep not in library or not os.path.isfile(library):
        pytest.skip("no libedgead_ort.so (make ort-ops)")
    _export([bundle_dir, "--triton", tmp_path / "repo", "--mahalanobis", "plugin", "--triton-server-repo", "/models"])
    path = tmp_path / "repo" / "widget"
    copied = path / ort_ops.LIBRARY_NAME
    with open(library, "rb") as a, open(str(copied), "rb") as b:
        assert a.read() == b.read()
    config = _config(path)
    assert list(config.model_operations.op_library_filename) == ["/models/widget/libedgead_ort.so"]
    with open(str(path / "edgead.json")) as fh:
        assert json.load(fh)["triton"]["libraries"] == [ort_ops.LIBRARY_NAME]
    maps, scores = _session(path / "1" / "model.onnx", library=str(copied)).run(None, {"image": frames})
    _, ref_maps, ref_scores = normal
    assert np.abs(maps - ref_maps).max() <= 1e-5 * np.abs(ref_maps).max()
    assert np.abs(scores - ref_scores).max() <= 1e-5 * np.abs(ref_scores).max()


def test_without_tritonclient_the_entry_is_written_and_said_unvalidated(bundle_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tritonclient.grpc.model_config_pb2", None)  # import fails as if absent
    out = tmp_path / "widget_f32.onnx"
    result = _export([bundle_dir, "-o", out, "--triton", tmp_path / "repo", "--input-dtype", "float32",
                      "--triton-name", "widget_f32", "--triton-version", "3", "--triton-max-batch", "4",
                      "--triton-queue-delay-us", "500", "--triton-instance", "cpu", "--triton-instance-count", "2"])
    notes = [line for line in result.stderr.splitlines() if "not validated" in line]
    assert len(notes) == 1 and "pip install edgead[triton]" in notes[0]
    path = tmp_path / "repo" / "widget_f32"
    with open(str(out), "rb") as a, open(str(path / "3" / "model.onnx"), "rb") as b:
        assert a.read() == b.read()  # -o and the entry hold the same model
    config = _config(path)  # parsed here with the module imported before the patch
    assert config.input[0].data_type == model_config_pb2.TYPE_FP32
    assert config.max_batch_size == 4 and config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    assert [w.batch_size for w in config.model_warmup] == [1, 4]
    with open(str(path / "edgead.json")) as fh:
        assert json.load(fh)["triton"]["config_validated_with"] is None


# ---- refusals -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--batch", "4"], "needs a dynamic batch dimension"),
    (["--batch", "1"], "drop --batch or pass --batch dynamic"),
    (["--triton-name", "../up"], "Triton model name"),
    (["--triton-name", ".hidden"], "Triton model name"),
    (["--triton-server-repo", "models"], "absolute path"),
    (["--triton-max-batch", "0"], "--triton-max-batch"),
])
def test_bad_triton_options_refused_in_one_line(bundle_dir, tmp_path, args, message):
    result = cli_runner().invoke(cli, ["export", bundle_dir, "--triton", str(tmp_path / "repo")] + args)
    assert_refused_in_one_line(result, message)
    assert not (tmp_path / "repo").exists() or os.listdir(str(tmp_path / "repo")) == []
    assert _leftovers(tmp_path) == []


def test_triton_options_need_triton_and_export_needs_a_target(bundle_dir, tmp_path):
    result = cli_runner().invoke(cli, ["export", bundle_dir, "-o", str(tmp_path / "m.onnx"), "--triton-name", "x"])
    assert_refused_in_one_line(result, "--triton-name goes with --triton REPO")
    assert_refused_in_one_line(cli_runner().invoke(cli, ["export", bundle_dir]), "-o OUT.onnx or --triton REPO")
    assert os.listdir(str(tmp_path)) == []


def test_plugin_flavour_without_the_ort_library_refused(bundle_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ort_ops, "find_ort_ops_library", lambda path=None: None)
    result = cli_runner().invoke(cli, ["export", bundle_dir, "--triton", str(tmp_path / "repo"), "--mahalanobis",
                                       "plugin"])
    assert_refused_in_one_line(result, "libedgead_ort.so")
    assert "make ort-ops" in result.stderr
    assert not (tmp_path / "repo").exists()


def test_foreign_folder_or_file_needs_force(bundle_dir, tmp_path):
    repo = tmp_path / "repo"
    (repo / "widget" / "1").mkdir(parents=True)
    (repo / "widget" / "config.pbtxt").write_text('name: "widget"\n')
    (repo / "widget" / "1" / "model.onnx").write_bytes(b"someone else's")
    (repo / "plain").write_text("x")
    (tmp_path / "afile").write_text("x")
    before = _snapshot(repo)
    result = cli_runner().invoke(cli, ["export", bundle_dir, "--triton", str(repo)])
    assert_refused_in_one_line(result, "--force")
    result = cli_runner().invoke(cli, ["export", bundle_dir, "--triton", str(repo), "--triton-name", "plain"])
    assert_refused_in_one_line(result, "a file or link that edgead did not write")
    result = cli_runner().invoke(cli, ["export", bundle_dir, "--triton", str(tmp_path / "afile")])
    assert_refused_in_one_line(result, "must name a folder")
    assert _snapshot(repo) == before
    _export([bundle_dir, "--triton", repo, "--force"])
    assert triton.is_edgead_entry(str(repo / "widget"))
    assert sorted(os.listdir(str(repo / "widget"))) == ["1", "README.md", "config.pbtxt", "edgead.json"]
    assert _leftovers(tmp_path) == []


# ---- switching as a whole -------------------------------------------------------------------------------------

WRITE = """
import sys
from edgead.exporters import triton
from edgead.runtime import modelinfo
repo, model, max_batch, fallback = {repo!r}, {model!r}, {max_batch}, {fallback}
if fallback:
    triton._rename_exchange = lambda a, b: False  # a file system without RENAME_EXCHANGE (NFS)
with triton.RepositoryEntry(triton.TritonOptions(repo, name="widget", max_batch=max_batch), "onnx") as entry:
    entry.add_model_file(model)
    entry.commit(modelinfo.load_model_info(model))
"""


def _write_entry(repo, model, max_batch):
    with triton.RepositoryEntry(triton.TritonOptions(str(repo), name="widget", max_batch=max_batch), "onnx") as entry:
        entry.add_model_file(model)
        return entry.commit(modelinfo.load_model_info(model))


def _assert_whole(path, max_batch):
    """The entry at ``path`` is one complete write: the config parses, names max_batch, and edgead.json names the
    model file's hash."""
    assert _config(path).max_batch_size == max_batch
    with open(str(path / "edgead.json")) as fh:
        record = json.load(fh)["triton"]
    with open(str(path / "1" / "model.onnx"), "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == record["model_sha256"]
    assert record["max_batch_size"] == max_batch


@pytest.mark.parametrize("point, fallback, left", [
    ("triton.staged", False, "old"),  # staged, not switched: the old entry, byte for byte
    ("triton.swapped", False, "new"),  # exchanged, the old one not yet removed: the new entry, whole
    ("triton.moved-aside", True, "aside"),  # fallback killed between its renames: the old entry waits aside
    ("triton.swapped", True, "new"),
])
def test_writer_killed_at_each_step_leaves_a_whole_entry(entry, tmp_path, point, fallback, left):
    model = str(entry[0] / "1" / "model.onnx")  # a dynamic-batch edgead model
    repo = tmp_path / "repo"
    _write_entry(repo, model, 8)
    old = _snapshot(repo / "widget")
    _run_killed_at(point, WRITE.format(repo=str(repo), model=model, max_batch=4, fallback=fallback))
    assert _leftovers(tmp_path)  # the killed writer's staging (or set-aside) folder
    if left == "old":
        assert _snapshot(repo / "widget") == old
    elif left == "new":
        _assert_whole(repo / "widget", 4)
    else:
        assert not (repo / "widget").exists()
        (aside,) = [n for n in os.listdir(str(tmp_path)) if n.endswith(".old")]
        assert _snapshot(tmp_path / aside) == old
    summary = _write_entry(repo, model, 2)  # the next write cleans up (and first puts an entry set aside back)
    assert any("restored" in w for w in summary["warnings"]) == (left == "aside")
    assert summary["replaced"]
    _assert_whole(repo / "widget", 2)
    assert _leftovers(tmp_path) == [] and os.listdir(str(repo)) == ["widget"]


def test_failed_write_keeps_the_old_entry_and_leaves_nothing(entry, tmp_path, monkeypatch):
    model = str(entry[0] / "1" / "model.onnx")
    repo = tmp_path / "repo"
    _write_entry(repo, model, 8)
    old = _snapshot(repo / "widget")

    def broken(*args):
        raise ExportError("config.pbtxt: simulated failure")

    monkeypatch.setattr(triton, "validate_config", broken)
    with pytest.raises(ExportError, match="simulated"):
        _write_entry(repo, model, 4)
    assert _snapshot(repo / "widget") == old and _leftovers(tmp_path) == []


def test_rename_fallback_replaces_the_entry(entry, tmp_path, monkeypatch):
    model = str(entry[0] / "1" / "model.onnx")
    monkeypatch.setattr(triton, "_rename_exchange", lambda a, b: False)
    _write_entry(tmp_path / "repo", model, 8)
    summary = _write_entry(tmp_path / "repo", model, 3)
    assert summary["replaced"] and summary["warnings"] == []
    _assert_whole(tmp_path / "repo" / "widget", 3)
    assert _leftovers(tmp_path) == []


def test_names_and_unreadable_models():
    assert triton.default_name("data/bottle.edgead/") == "bottle"
    assert triton.default_name("m v2.onnx") == "m_v2"
    assert triton.default_name("..onnx") == "edgead_model"
    assert triton.check_name("line3-cam_2.v1") == "line3-cam_2.v1"


def test_graph_scan_of_a_broken_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x3a\xff\xff\xff\xff\x0f")  # graph field claiming 4 GiB
    with pytest.raises(ExportError, match="not a readable ONNX file"):
        triton.graph_io(str(bad))


# ---- edgead build --triton (stand-in tensorrt) ----------------------------------------------------------------

@pytest.fixture()
def fake_trt(monkeypatch):
    trt = make_tensorrt("10.3.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cuda_class, _ledger = make_fake_cuda()
    monkeypatch.setattr(tensorrt_engine, "CudaRuntime", cuda_class)
    return trt


def _plugin_model(path):
    model = build_fake_model(batch="dynamic")
    meta = json.loads(model.metadata_props[0].value)
    meta["export"]["mahalanobis"] = "plugin"
    model.metadata_props[0].value = json.dumps(meta)
    onnx.save(model, str(path))
    return str(path)


def test_build_writes_a_tensorrt_plan_entry(fake_trt, tmp_path):
    onnx_path = write_fake_model(tmp_path / "line3.onnx", batch="dynamic")
    result = cli_runner().invoke(cli, ["build", onnx_path, "--triton", str(tmp_path / "repo"), "--max-batch", "4",
                                       "--json"])
    assert result.exit_code == 0, (result.output, result.stderr)
    summary = json.loads(result.output)
    path = tmp_path / "repo" / "line3"
    assert summary["engine"] == str(path / "1" / "model.plan")
    with open(str(path / "1" / "model.plan"), "rb") as fh:
        assert fh.read() == FAKE_ENGINE
    assert sorted(os.listdir(str(path / "1"))) == ["model.plan", "model.plan.json"]
    assert modelinfo.load_model_info(str(path / "1" / "model.plan"))["tensorrt"]["version"] == "10.3.0"
    config = _config(path)
    assert (config.platform, config.backend, config.default_model_filename) == ("tensorrt_plan", "tensorrt",
                                                                                "model.plan")
    assert config.max_batch_size == 4 and [w.batch_size for w in config.model_warmup] == [1, 4]
    assert list(config.input[0].dims) == [H, W, 3] and config.input[0].data_type == model_config_pb2.TYPE_UINT8
    assert list(config.output[1].dims) == [1] and list(config.output[1].reshape.shape) == []
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_GPU)]
    assert config.parameters["edgead.tensorrt_version"].string_value == "10.3.0"
    assert float(config.parameters["edgead.image_threshold"].string_value) == 200.0
    assert not config.HasField("model_operations")
    with open(str(path / "edgead.json")) as fh:
        assert json.load(fh)["tensorrt"]["max_batch"] == 4


def test_build_with_plugin_and_output_copies_both(fake_trt, tmp_path, monkeypatch):
    plugin = tmp_path / "lib" / tensorrt_plugin.LIBRARY_NAME
    plugin.parent.mkdir()
    plugin.write_bytes(b"\x7fELF stand-in plugin")
    monkeypatch.setattr(tensorrt_plugin, "load_plugin_library", lambda path=None: str(plugin))
    onnx_path = _plugin_model(tmp_path / "bottle_plugin.onnx")
    engine = tmp_path / "bottle.engine"
    result = cli_runner().invoke(cli, ["build", onnx_path, "-o", str(engine), "--triton", str(tmp_path / "repo"),
                                       "--triton-server-repo", "/models"])
    assert result.exit_code == 0, (result.output, result.stderr)
    path = tmp_path / "repo" / "bottle_plugin"
    with open(str(engine), "rb") as a, open(str(path / "1" / "model.plan"), "rb") as b:
        assert a.read() == b.read() == FAKE_ENGINE
    assert (path / tensorrt_plugin.LIBRARY_NAME).read_bytes() == plugin.read_bytes()
    text = (path / "config.pbtxt").read_text()
    load = '--backend-config=tensorrt,plugins="/models/bottle_plugin/libedgead_plugins.so"'
    assert load in text and load in (path / "README.md").read_text()
    assert "LD_PRELOAD=/models/bottle_plugin/libedgead_plugins.so" in text
    assert not _config(path).HasField("model_operations")  # the tensorrt backend loads plugins at server start


def test_build_refuses_a_fixed_batch_onnx(fake_trt, tmp_path):
    onnx_path = write_fake_model(tmp_path / "fixed.onnx", batch=1)
    result = cli_runner().invoke(cli, ["build", onnx_path, "--triton", str(tmp_path / "repo")])
    assert_refused_in_one_line(result, "export with --batch dynamic")
    assert fake_trt.calls == [] and not (tmp_path / "repo").exists()
