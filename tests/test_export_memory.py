"""Export memory (issue #14): the statistics are streamed, never copied whole.

- Lazy bundles (``load_bundle(..., lazy_statistics=True)``): the packed whitening stays in the weights file,
  read block by block through the descriptor that was checksummed; reference: the eager load of the same
  folder, bit for bit, and its error messages, word for word.
- Streamed initializers (``exporters/streaming.py``, ``external_data.write_model(..., sources=...)``):
  reference: the materialised model ``build_onnx`` returns (the same build, bytes filled in memory); the
  streamed file must parse to exactly that message (inline by protobuf framing, or with external data).
- Memory: structural spies (no block larger than the chunk, nothing materialised) and one subprocess
  measurement of peak RSS against a twin bundle with negligible statistics.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgead import bundle as bundle_module
from edgead.bundle import CONFIG_NAME, PadimBundle, load_bundle, weights_file_path
from edgead.errors import BundleError
from edgead.exporters import external_data as xd
from edgead.exporters import onnx_export, onnx_head, streaming
from edgead.runtime import modelinfo

from conftest import random_frames
from test_file_fuzz import _mutate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHITENING = "padim.whitening_packed"


@pytest.fixture(scope="module")
def saved(tiny_bundle, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("lazy") / "bundle")
    tiny_bundle.save(folder)
    return folder


def _copy(saved, tmp_path, name="bundle"):
    folder = str(tmp_path / name)
    shutil.copytree(saved, folder)
    return folder


def _open_fds():
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


def _normalised(model):
    """``model`` serialized, with ``data_location = DEFAULT`` written out by ``onnx.load`` cleared."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for tensor in model.graph.initializer:
        if tensor.HasField("data_location") and tensor.data_location == TensorProto.DEFAULT:
            tensor.ClearField("data_location")
    return model.SerializeToString()


# ---- lazy bundles ----------------------------------------------------------------------------------------

def test_lazy_bundle_reads_the_same_rows_bit_exact(tiny_bundle, saved):
    eager = load_bundle(saved)
    with load_bundle(saved, lazy_statistics=True) as lazy:
        assert not lazy.statistics_in_memory and lazy.whitening_shape == tuple(eager.whitening_packed.shape)
        assert torch.equal(lazy.mean, eager.mean) and lazy.config == eager.config
        assert lazy.backbone_state.keys() == eager.backbone_state.keys()
        assert all(torch.equal(lazy.backbone_state[k], v) for k, v in eager.backbone_state.items())
        cols = eager.whitening_packed.shape[1]
        for max_bytes in (cols * 4 * 7, 1, 1 << 30):  # 7 rows (uneven last block), one row (the floor), all rows
            blocks = list(lazy.iter_whitening_rows(max_bytes))
            assert [start for start, _ in blocks] == [start for start, _ in eager.iter_whitening_rows(max_bytes)]
            assert all(block.dtype == np.float32 and block.nbytes <= max(max_bytes, cols * 4) for _, block in blocks)
            assert np.array_equal(np.concatenate([b for _, b in blocks]), eager.whitening_packed.numpy())
        assert not lazy.statistics_in_memory  # streaming never reads the whole tensor into the bundle
        assert torch.equal(lazy.whitening_packed, tiny_bundle.whitening_packed)  # first access reads it all
        assert lazy.statistics_in_memory


def test_lazy_bundle_builds_the_same_model_and_resaves(tiny_bundle, saved, tmp_path):
    frames = torch.from_numpy(random_frames(2, seed=5))
    with load_bundle(saved, lazy_statistics=True) as lazy, torch.no_grad():
        maps, scores = lazy.model()(frames)
        ref_maps, ref_scores = tiny_bundle.model()(frames)
        assert torch.equal(maps, ref_maps) and torch.equal(scores, ref_scores)
        lazy.save(str(tmp_path / "again"))
    assert torch.equal(load_bundle(str(tmp_path / "again")).whitening_packed, tiny_bundle.whitening_packed)


def test_closed_lazy_bundle_refuses_to_read(saved):
    lazy = load_bundle(saved, lazy_statistics=True)
    lazy.close()
    with pytest.raises(BundleError, match="closed; load it again"):
        next(lazy.iter_whitening_rows())


def _errors(folder):
    """The BundleError messages of the eager and the lazy load (None when it loads)."""
    messages = []
    for lazy in (False, True):
        try:
            loaded = load_bundle(folder, lazy_statistics=lazy)
        except BundleError as exc:
            messages.append(str(exc))
        else:
            loaded.close()
            messages.append(None)
    return messages


def _rewrite_weights(folder, blob):
    """Replace the weights file's bytes and record their checksum, so the bytes reach the reader."""
    import hashlib

    open(weights_file_path(folder), "wb").write(blob)
    config = json.load(open(os.path.join(folder, CONFIG_NAME)))
    config["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    json.dump(config, open(os.path.join(folder, CONFIG_NAME), "w"))


def _save_with_whitening(tiny_bundle, folder, whitening):
    PadimBundle(tiny_bundle.config, tiny_bundle.backbone_state, tiny_bundle.mean, whitening).save(folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "cut_data", "nan", "inf", "shape", "missing", "dtype"])
def test_lazy_errors_are_the_eager_ones(tiny_bundle, saved, tmp_path, damage):
    folder = _copy(saved, tmp_path)
    path = weights_file_path(folder)
    blob = open(path, "rb").read()
    expected = {"truncated": "checksum does not match", "garbage": "cannot read safetensors",
                "cut_data": "cannot read safetensors", "nan": "statistics contain NaN or Inf",
                "inf": "statistics contain NaN or Inf", "shape": "padim.whitening_packed has shape",
                "missing": "tensor padim.whitening_packed missing", "dtype": "statistics contain NaN or Inf"}[damage]
    if damage == "truncated":
        open(path, "wb").write(blob[: len(blob) - 100])
    elif damage == "garbage":
        _rewrite_weights(folder, b"\x00" * 100)
    elif damage == "cut_data":  # a whole header, data cut short: the checksum matches the cut file
        _rewrite_weights(folder, blob[:-4])
    elif damage in ("nan", "inf"):
        whitening = tiny_bundle.whitening_packed.clone()
        whitening[200, 17] = float("nan") if damage == "nan" else float("inf")  # late in the file: not block 0
        _save_with_whitening(tiny_bundle, folder, whitening)
    elif damage == "shape":
        _save_with_whitening(tiny_bundle, folder, tiny_bundle.whitening_packed[:, :-1].contiguous())
    elif damage == "missing":
        from safetensors.torch import load_file, save_file

        tensors = load_file(path)
        del tensors[WHITENING]
        tmp = str(tmp_path / "w.safetensors")
        save_file(tensors, tmp)
        _rewrite_weights(folder, open(tmp, "rb").read())
    else:  # F64 statistics with one NaN: read and converted block by block, the NaN still found
        whitening = tiny_bundle.whitening_packed.to(torch.float64)
        whitening[255, 299] = float("nan")
        _save_with_whitening(tiny_bundle, folder, whitening)
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights_file_path(folder))
        tensors[WHITENING] = whitening
        tmp = str(tmp_path / "w.safetensors")
        save_file(tensors, tmp)
        _rewrite_weights(folder, open(tmp, "rb").read())
    fds = _open_fds()
    eager, lazy = _errors(folder)
    assert eager is not None and lazy == eager, (eager, lazy)
    assert expected in lazy and "\n" not in lazy and os.path.basename(weights_file_path(folder)) in lazy
    assert _open_fds() == fds  # the refused file is not left open


def test_lazy_f64_statistics_are_read_as_float32(tiny_bundle, tmp_path):
    folder = str(tmp_path / "f64")
    _save_with_whitening(tiny_bundle, folder, tiny_bundle.whitening_packed)
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights_file_path(folder))
    tensors[WHITENING] = tiny_bundle.whitening_packed.to(torch.float64)
    tmp = str(tmp_path / "w.safetensors")
    save_file(tensors, tmp)
    _rewrite_weights(folder, open(tmp, "rb").read())
    with load_bundle(folder, lazy_statistics=True) as lazy:
        blocks = np.concatenate([b for _, b in lazy.iter_whitening_rows(4096)])
    assert blocks.dtype == np.float32 and np.array_equal(blocks, tiny_bundle.whitening_packed.numpy())


FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(data=st.data())
def test_mutated_weights_give_the_eager_answer_lazily(saved, tmp_path, data):
    """Fuzzed weights files (tests/test_file_fuzz.py's mutations, checksum recomputed): the lazy load refuses
    exactly what the eager one refuses, with the same one-line message; what loads reads the same rows."""
    folder = os.path.join(tempfile.mkdtemp(dir=str(tmp_path)), "bundle")
    shutil.copytree(saved, folder)
    _rewrite_weights(folder, _mutate(open(weights_file_path(folder), "rb").read(), data.draw))
    eager, lazy = _errors(folder)
    assert lazy == eager
    if eager is None:
        with load_bundle(folder, lazy_statistics=True) as bundle:
            rows = np.concatenate([b for _, b in bundle.iter_whitening_rows(1 << 16)])
        assert np.array_equal(rows, load_bundle(folder).whitening_packed.numpy())
    else:
        assert "\n" not in lazy and folder in lazy


def test_a_save_replacing_the_bundle_does_not_change_what_a_lazy_bundle_reads(tiny_bundle, saved, tmp_path):
    folder = _copy(saved, tmp_path)
    old_weights = weights_file_path(folder)
    reference = onnx_export.build_onnx(load_bundle(folder), "onnx", "fp32", 1, check=False)
    lazy = load_bundle(folder, lazy_statistics=True)
    changed = PadimBundle(tiny_bundle.config, tiny_bundle.backbone_state, tiny_bundle.mean + 1.0,
                          tiny_bundle.whitening_packed * 2.0)
    changed.save(folder)  # the folder lock is free again: a save switches the bundle and removes the old weights
    assert not os.path.exists(old_weights) and weights_file_path(folder) != old_weights
    with lazy:
        rows = np.concatenate([b for _, b in lazy.iter_whitening_rows(1 << 14)])
        assert np.array_equal(rows, tiny_bundle.whitening_packed.numpy())  # the unlinked file, through its fd
        model = onnx_export.export_onnx(lazy, str(tmp_path / "m.onnx"), "onnx", "fp32", 1)
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    assert loaded.SerializeToString() == reference.SerializeToString()
    assert xd.external_locations(model) == []
    assert torch.equal(load_bundle(folder).mean, tiny_bundle.mean + 1.0)  # the folder holds the new bundle


def test_checksum_and_reads_use_the_descriptor_not_the_path(tiny_bundle, saved, tmp_path, monkeypatch):
    """The file is swapped for another bundle's (valid, other statistics) right after the lazy load opens it:
    hashing or reading through the path would see the new file (checksum error, other rows)."""
    folder = _copy(saved, tmp_path)
    other = str(tmp_path / "other")
    PadimBundle(tiny_bundle.config, tiny_bundle.backbone_state, tiny_bundle.mean + 3.0,
                tiny_bundle.whitening_packed * 3.0).save(other)
    path = weights_file_path(folder)
    real, swapped = bundle_module._sha256_fd, []

    def swap_then_hash(fd):
        shutil.copy(weights_file_path(other), path + ".new")
        os.replace(path + ".new", path)  # what a writer that does not take the lock could do
        swapped.append(True)
        return real(fd)

    monkeypatch.setattr(bundle_module, "_sha256_fd", swap_then_hash)
    with load_bundle(folder, lazy_statistics=True) as lazy:
        assert swapped and torch.equal(lazy.mean, tiny_bundle.mean)
        rows = np.concatenate([b for _, b in lazy.iter_whitening_rows(1 << 14)])
    assert np.array_equal(rows, tiny_bundle.whitening_packed.numpy())


def test_save_of_a_float32_view_into_a_float64_buffer_is_zero_copy(tiny_bundle, tmp_path, monkeypatch):
    """fit may hand the bundle its whitening as a float32 view over the first half of a float64 buffer: saving
    passes that very memory to safetensors (no copy) and writes only the view."""
    import safetensors.torch

    rows, cols = tiny_bundle.whitening_packed.shape
    buffer = torch.empty(rows * cols, dtype=torch.float64)
    view = buffer.view(torch.float32)[: rows * cols].view(rows, cols)
    view.copy_(tiny_bundle.whitening_packed)
    handed = {}
    real = safetensors.torch.save_file

    def spy(tensors, *args, **kwargs):
        handed.update(tensors)
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", spy)
    folder = str(tmp_path / "view")
    PadimBundle(tiny_bundle.config, tiny_bundle.backbone_state, tiny_bundle.mean, view).save(folder)
    assert handed[WHITENING].data_ptr() == view.data_ptr() == buffer.data_ptr()
    with load_bundle(folder, lazy_statistics=True) as lazy:
        assert lazy.whitening_shape == (rows, cols)
        assert torch.equal(lazy.whitening_packed, tiny_bundle.whitening_packed)
    plain = str(tmp_path / "plain")
    tiny_bundle.save(plain)
    assert os.path.getsize(weights_file_path(folder)) == os.path.getsize(weights_file_path(plain))


# ---- streamed initializers: the file parses to the materialised model ------------------------------------

CASES = [  # (mahalanobis, precision, batch, external data)
    ("onnx", "fp16", 1, "never"),
    ("onnx", "fp32", "dynamic", "never"),
    ("plugin", "fp16", 3, "never"),
    ("plugin", "fp32", 1, "always"),
    ("onnx", "fp16", "dynamic", "always"),
    ("onnx", "fp32", 2, "always"),
]


@pytest.mark.parametrize("mahalanobis,precision,batch,mode", CASES)
def test_streamed_file_parses_to_the_materialised_model(saved, tmp_path, mahalanobis, precision, batch, mode):
    out = str(tmp_path / "m.onnx")
    with load_bundle(saved, lazy_statistics=True) as lazy:
        returned = onnx_export.export_onnx(lazy, out, mahalanobis, precision, batch, external_data=mode)
        assert not lazy.statistics_in_memory
    reference = onnx_export.build_onnx(load_bundle(saved), mahalanobis, precision, batch, check=False)
    data_files = [n for n in os.listdir(str(tmp_path)) if n.endswith(".data")]
    assert len(data_files) == (1 if mode == "always" else 0)
    assert xd.external_locations(returned) == data_files
    assert _normalised(onnx.load(out)) == _normalised(reference)  # same message, every byte of every tensor
    onnx.checker.check_model(out, full_check=True)
    names = [t.name for t in onnx.load(out, load_external_data=False).graph.initializer]
    assert names == [t.name for t in reference.graph.initializer]  # initializer order kept
    assert modelinfo.load_model_info(out) == onnx_export.read_metadata(reference)


def test_streamed_inline_file_runs_on_onnx_runtime_like_the_built_model(tiny_bundle, tmp_path):
    frames = random_frames(2, seed=9)
    out = str(tmp_path / "m.onnx")
    onnx_export.export_onnx(tiny_bundle, out, "onnx", "fp16", 2)
    built = onnx_export.build_onnx(tiny_bundle, "onnx", "fp16", 2)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    a = ort.InferenceSession(out, options, providers=["CPUExecutionProvider"]).run(None, {"image": frames})
    b = ort.InferenceSession(built.SerializeToString(), options,
                             providers=["CPUExecutionProvider"]).run(None, {"image": frames})
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def _synthetic_model(sources_at):
    """A small Add-chain graph; initializers ``w0..w4`` (4 x 300 float32), those in ``sources_at`` as
    placeholders with sources (w2 with a [2, 5] fp16 one: under INLINE_LIMIT). Returns (model, sources, arrays)."""
    rng = np.random.default_rng(1)
    arrays = {"w%d" % i: rng.standard_normal((4, 300)).astype(np.float32) for i in range(5)}
    arrays["w2"] = rng.standard_normal((2, 5)).astype(np.float32)
    inits, sources, nodes, previous = [], {}, [], "x"
    for i in range(5):
        name = "w%d" % i
        if i in sources_at:
            dtype = np.float16 if name == "w2" else np.float32
            sources[name] = streaming.TensorSource(arrays[name], dtype)
            inits.append(streaming.placeholder(name, sources[name]))
            arrays[name] = arrays[name].astype(dtype)
        else:
            inits.append(numpy_helper.from_array(arrays[name], name))
        cast = helper.make_node("Cast", [name], [name + "_f"], to=TensorProto.FLOAT)
        reduced = helper.make_node("ReduceSum", [name + "_f"], [name + "_s"], keepdims=0)
        nodes += [cast, reduced, helper.make_node("Add", [previous, name + "_s"], ["y%d" % i])]
        previous = "y%d" % i
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"edgead": "{}"})
    return model, sources, arrays


@pytest.mark.parametrize("mode", ["never", "always"])
@pytest.mark.parametrize("sources_at", [(1,), (1, 2, 3), (4,), (0, 2)])
def test_framing_keeps_order_and_bytes_wherever_the_placeholders_are(tmp_path, mode, sources_at):
    model, sources, arrays = _synthetic_model(sources_at)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    streaming.materialize(reference, {k: streaming.TensorSource(arrays[k], arrays[k].dtype) for k in sources})
    out = str(tmp_path / "m.onnx")
    xd.write_model(model, out, mode, sources=sources)
    loaded = onnx.load(out)
    assert _normalised(loaded) == _normalised(reference)
    for name, array in arrays.items():
        assert np.array_equal(numpy_helper.to_array(next(t for t in loaded.graph.initializer if t.name == name)),
                              array)
    if mode == "always":  # only the 4 x 300 float32 placeholders went to the data file; w2 (20 bytes) stayed
        external = {t.name for t in model.graph.initializer if t.external_data}
        assert external == {"w%d" % i for i in range(5) if i != 2}
        assert "w2" not in sources or model.graph.initializer[2].HasField("raw_data")
    else:  # the caller's model is left as it came: placeholders without data, same order
        assert [t.name for t in model.graph.initializer] == ["w%d" % i for i in range(5)]
        assert not any(streaming.has_data(t) for t in model.graph.initializer if t.name in sources)
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": np.array(0.0, np.float32)})[0]
    assert np.isclose(got, sum(float(a.astype(np.float32).sum()) for a in arrays.values()), rtol=1e-4)


@pytest.mark.parametrize("mode", ["never", "always"])
def test_a_source_giving_the_wrong_bytes_leaves_no_file(tmp_path, mode):
    model, sources, _ = _synthetic_model((1,))

    class Short:
        shape = (4, 300)

        def iter_rows(self, max_bytes):
            yield 0, np.zeros((3, 300), np.float32)  # one row short

    sources["w1"] = streaming.TensorSource(Short(), np.float32)
    with pytest.raises(ValueError, match="ended at row 3 of 4"):
        xd.write_model(model, str(tmp_path / "m.onnx"), mode, sources=sources)
    assert os.listdir(str(tmp_path)) == []


def test_sources_must_name_placeholders():
    model, sources, arrays = _synthetic_model((1,))
    with pytest.raises(ValueError, match="name no initializer"):
        streaming.check_sources(model, dict(sources, nothere=sources["w1"]))
    with pytest.raises(ValueError, match="not a placeholder"):
        streaming.check_sources(model, {"w0": streaming.TensorSource(arrays["w0"], np.float32)})  # holds data


def test_framed_check_sees_the_graph_and_leaves_no_temp(tmp_path, monkeypatch):
    """The inline streamed model is checked through a temp file naming the statistics in the written .onnx
    (the full file would cost onnx.checker twice its size); a failing check leaves nothing."""
    model, sources, _ = _synthetic_model((1, 3))
    seen = []

    def spy(path, full_check=False, **kwargs):
        checked = onnx.load(path, load_external_data=False)
        seen.append({t.name: {e.key: e.value for e in t.external_data} for t in checked.graph.initializer
                     if t.external_data})
        raise onnx.checker.ValidationError("broken graph")

    monkeypatch.setattr(onnx.checker, "check_model", spy)
    with pytest.raises(Exception, match="broken graph"):
        xd.write_model(model, str(tmp_path / "m.onnx"), "never", sources=sources)
    assert sorted(seen[0]) == ["w1", "w3"]
    assert seen[0]["w1"]["location"].startswith(".m.") and seen[0]["w1"]["length"] == str(4 * 300 * 4)
    assert os.listdir(str(tmp_path)) == []


# ---- memory: structure -----------------------------------------------------------------------------------

@pytest.mark.parametrize("precision,mode", [("fp16", "never"), ("fp32", "always"), ("fp16", "always")])
def test_export_streams_in_chunks_and_never_materialises(saved, tmp_path, monkeypatch, precision, mode):
    """With the chunk size lowered to 10 rows of the tiny bundle's whitening (256 rows), no numpy array, read
    or chunk of the statistics' size appears, the bundle never reads them whole and nothing fills a placeholder
    in memory."""
    rows, cols = 256, 300
    chunk = cols * 4 * 10
    monkeypatch.setattr(streaming, "CHUNK_BYTES", chunk)
    sizes = {"from_array": [], "chunks": [], "reads": []}
    real_from_array = onnx_head.numpy_helper.from_array
    real_chunks = streaming.TensorSource.chunks
    real_read = bundle_module.LazyWhitening.read_rows

    def from_array(array, name=None):
        sizes["from_array"].append(np.asarray(array).nbytes)
        return real_from_array(array, name)

    def chunks(self, max_bytes=None):
        for piece in real_chunks(self, max_bytes):
            sizes["chunks"].append(len(piece))
            yield piece

    def read_rows(self, start, stop, out=None):
        sizes["reads"].append((stop - start) * cols * 4)
        return real_read(self, start, stop, out)

    def no_fill(*args):
        raise AssertionError("a placeholder was filled in memory")

    monkeypatch.setattr(onnx_head.numpy_helper, "from_array", from_array)
    monkeypatch.setattr(streaming.TensorSource, "chunks", chunks)
    monkeypatch.setattr(bundle_module.LazyWhitening, "read_rows", read_rows)
    monkeypatch.setattr(streaming, "fill", no_fill)
    with load_bundle(saved, lazy_statistics=True) as lazy:
        assert lazy.whitening_shape == (rows, cols)
        sizes["reads"].clear()  # the load's NaN scan reads blocks too (64 MiB default there)
        onnx_export.export_onnx(lazy, str(tmp_path / "m.onnx"), "onnx", precision, 1, external_data=mode)
        assert not lazy.statistics_in_memory
    dim = len(lazy.config["embedding"]["channel_indices"])
    spans = onnx_head.block_spans(dim, onnx_head.default_blocks(dim))
    stored = rows * sum(end * (end - start) for start, end in spans) * (2 if precision == "fp16" else 4)
    assert max(sizes["from_array"]) < rows * cols * 2  # the mean [P, 1, D] (24 KiB) is the largest constant
    assert sizes["chunks"] and max(sizes["chunks"]) <= chunk and sum(sizes["chunks"]) == stored
    # each row block gathers its dense transposed block from one pass over the packed rows
    assert sizes["reads"] and max(sizes["reads"]) <= chunk and sum(sizes["reads"]) == len(spans) * rows * cols * 4


# ---- memory: measured ------------------------------------------------------------------------------------

def _synthetic_bundle(folder, dim, size=128):
    """resnet18 (random weights) at ``size`` px with a random packed whitening of D = ``dim``, no fit."""
    from edgead import packing
    from edgead.fit import make_config
    from edgead.weights import load_backbone

    extractor, description = load_backbone("resnet18", "random", seed=0, input_hw=(size, size))
    config = make_config("resnet18", description, extractor, (size, size), dim, seed=0)
    grid_h, grid_w = config["embedding"]["grid"]
    patches, packed = grid_h * grid_w, packing.packed_length(dim)
    generator = torch.Generator().manual_seed(0)
    whitening = torch.rand((patches, packed), generator=generator)
    PadimBundle(config, extractor.state_dict(), torch.rand((patches, dim), generator=generator), whitening).save(folder)
    return patches * packed * 4


def _peak_rss_of_export(bundle, out, tmp_path):
    """Peak RSS (bytes) of ``edgead export BUNDLE -o OUT --precision fp32`` in a fresh process (its own
    ``ru_maxrss``, from ``os.wait4``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(str(tmp_path / "stderr.txt"), "w+b") as err:
        proc = subprocess.Popen([sys.executable, "-m", "edgead", "export", bundle, "-o", out, "--precision", "fp32"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        assert proc.returncode == 0, err.read().decode()[-2000:]
    return usage.ru_maxrss * 1024


@pytest.mark.slow
def test_export_peak_rss_holds_at_most_one_copy_of_the_statistics(tmp_path):
    """``edgead export`` (fp32, inline) of a bundle with 328 MB of statistics (resnet18, 128 px: P = 1024,
    D = 400) against its twin with D = 8 (the same backbone, trace and imports; 0.1 MB of statistics): the
    peak RSS may grow by less than one float32 copy of the statistics (0.6). Measured: +0 MB (the streaming
    stays below the peak of the trace); an eager load alone would add ~0.95 copy, the in-memory build ~2.5."""
    big = _synthetic_bundle(str(tmp_path / "big"), 400)
    _synthetic_bundle(str(tmp_path / "small"), 8)
    small_peak = _peak_rss_of_export(str(tmp_path / "small"), str(tmp_path / "small.onnx"), tmp_path)
    big_peak = _peak_rss_of_export(str(tmp_path / "big"), str(tmp_path / "big.onnx"), tmp_path)
    assert os.path.getsize(str(tmp_path / "big.onnx")) > big  # inline: the statistics are in the .onnx
    growth = big_peak - small_peak
    print("peak RSS {:.0f} MB / {:.0f} MB: +{:.0f} MB for {:.0f} MB of statistics".format(
        small_peak / 1e6, big_peak / 1e6, growth / 1e6, big / 1e6))
    assert growth <= 0.6 * big, "peak RSS grew by {:.0f} MB for {:.0f} MB of statistics".format(growth / 1e6, big / 1e6)
