"""Property-based fuzzing (hypothesis) of every way model.json and the ONNX metadata reach edgead.

(1) A valid model.json of a real tiny bundle and a valid metadata dict, mutated (a leaf or subtree replaced by
arbitrary JSON, NaN/Infinity, booleans, huge numbers, deep nesting; keys deleted or added): either the result is
accepted and the invariants the rest of edgead relies on really hold, or it is refused with exactly BundleError /
ModelFileError and one line naming the file. (2) Arbitrary bytes / text as model.json, as the metadata string,
inside a real .onnx file's metadata_props, and as a TensorRT sidecar: the same two outcomes, nothing else.

Reproducible (derandomize=True) and small enough to run in a few seconds on one core.
"""
import copy
import json
import math
import os
import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edgead.bundle import CONFIG_NAME, read_config
from edgead.errors import BundleError, ModelFileError
from edgead.runtime import modelinfo

from fake_models import build_fake_model, fake_metadata

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

#: raw JSON number/literal spellings a Python dict cannot hold, spliced into the text in place of a marker string
RAW_TOKENS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" * 400, "1" * 5000, "1e-400", "-0.0",
              "[" * 5000 + "]" * 5000, "[" * 40 + "1" + "]" * 40, '{"a":' * 50 + "1" + "}" * 50]
_MARK = "\u0001raw{}\u0001"

leaves = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-10 ** 400, max_value=10 ** 400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["padim", "RGB", "area", "dynamic", "normal-oos", "0" * 64, "weights.safetensors"]),
    st.sampled_from([0, 1, -1, 3, 4, 16, 64, 448, 8192, 8193, 0.0, 1e-7, 0.5]),
    st.integers(min_value=0, max_value=len(RAW_TOKENS) - 1).map(lambda i: _MARK.format(i)),
)
json_values = st.recursive(
    leaves, lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children,
                                                                               max_size=4),
    max_leaves=8)


def _paths(value, prefix=()):
    """Every path into a JSON value (the root included)."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _paths(child, prefix + (i,))


def _get(value, path):
    for key in path:
        value = value[key]
    return value


def _mutate(data, doc):
    """Apply 1-3 random mutations to ``doc`` (a fresh copy) and return the JSON text."""
    for _ in range(data.draw(st.integers(1, 3), label="n_mutations")):
        paths = list(_paths(doc))
        path = data.draw(st.sampled_from(paths), label="path")
        op = data.draw(st.sampled_from(["replace", "replace", "delete", "add"]), label="op")
        if op == "replace":
            replacement = data.draw(json_values, label="value")
            if not path:
                doc = replacement
            else:
                _get(doc, path[:-1])[path[-1]] = replacement
        elif op == "delete" and path:
            del _get(doc, path[:-1])[path[-1]]
        elif op == "add":
            target = _get(doc, path)
            if isinstance(target, dict):
                target[data.draw(st.text(max_size=8), label="key")] = data.draw(json_values, label="value")
            elif isinstance(target, list):
                target.append(data.draw(json_values, label="value"))
    text = json.dumps(doc)
    for i, token in enumerate(RAW_TOKENS):
        text = text.replace(json.dumps(_MARK.format(i)), token)
    return text


def _finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _no_non_finite(value):
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            assert math.isfinite(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _check_invariants(info, bundle):
    """What downstream code relies on, checked independently of the schema."""
    _no_non_finite(info)
    assert info["format_version"] == 1
    assert info["method"] in ("padim", "patchcore", "cflow")
    inp = info["input"]
    for key in ("height", "width"):
        assert type(inp[key]) is int and 1 <= inp[key] <= 8192
    for key in ("mean", "std"):
        if bundle or key in inp:
            assert len(inp[key]) == 3 and all(_finite(v) for v in inp[key])
    if "std" in inp:
        assert all(v > 0 for v in inp["std"])
    for key, value in (info.get("calibration") or {}).items():
        assert (isinstance(value, str) or value is None) if key == "source" else (value is None or _finite(value))
    for key in ("image_threshold", "pixel_threshold", "quantile", "rank", "n_normal", "expected_fpr"):
        for section in ("calibration", "calibration_provenance"):
            value = (info.get(section) or {}).get(key)
            assert value is None or _finite(value)
    backbone, embedding = info.get("backbone") or {}, info.get("embedding") or {}
    if bundle:
        assert re.match(r"^[0-9a-f]{64}$", info["weights_sha256"])
        assert len(backbone["channels"]) == len(backbone["strides"]) == len(backbone["out_indices"])
        assert _finite(info["postprocess"]["blur_sigma"]) and info["postprocess"]["blur_sigma"] >= 0
        # what each method's bundle needs besides (the schema's allOf if/then)
        assert isinstance(info[info["method"]], dict)
        needed = {"padim": ("channel_indices",), "patchcore": ("aggregation", "projection"),
                  "cflow": ("layout",)}[info["method"]]
        assert all(key in embedding for key in needed)
    cflow = info.get("cflow") or {}
    if embedding.get("layout") == "scale_rows" and "channels" in backbone and "dim" in embedding:
        assert embedding["dim"] == sum(backbone["channels"])
    for key in ("scale_grids", "reference_log_likelihood"):
        if key in cflow and "channels" in backbone:
            assert len(cflow[key]) == len(backbone["channels"])
    if "scale_grids" in cflow and backbone.get("strides"):
        assert [list(g) for g in cflow["scale_grids"]] == [[inp["height"] // s, inp["width"] // s]
                                                            for s in backbone["strides"]]
    if "weights_file" in info:
        assert re.match(r"^weights(-[0-9a-f]{16})?\.safetensors$", info["weights_file"])
    indices = embedding.get("channel_indices")
    if indices is not None:
        assert all(type(i) is int and i >= 0 for i in indices) and len(set(indices)) == len(indices)
        if "dim" in embedding:
            assert embedding["dim"] == len(indices)
        if "channels" in backbone:
            assert max(indices) < sum(backbone["channels"])
    strides = backbone.get("strides")
    if strides and "grid" in embedding:
        assert list(embedding["grid"]) == [inp["height"] // strides[0], inp["width"] // strides[0]]


def _accepted_consistent_or_refused(load, error_type, name, bundle):
    """``load()`` either returns a config whose invariants hold, or raises ``error_type`` with one clean line
    starting with ``name``; hypothesis ``event``s count which."""
    try:
        config = load()
    except error_type as exc:
        event("refused")
        _assert_clean_error(exc, name)
    else:
        event("accepted")
        _check_invariants(config, bundle=bundle)


def _assert_clean_error(error, name):
    message = str(error)
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith(name), message


# --- (1) mutations of valid documents ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def valid_model_json(tiny_bundle, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fuzz") / "valid.edgead")
    tiny_bundle.save(folder)
    with open(os.path.join(folder, CONFIG_NAME)) as fh:
        return fh.read()


@pytest.fixture(scope="module")
def valid_cflow_json(tmp_path_factory):
    from conftest import TINY_HW, random_frames
    from edgead.cflow.fit import fit_cflow

    folder = str(tmp_path_factory.mktemp("fuzz") / "cflow.edgead")
    fit_cflow([random_frames(6)], backbone="resnet18", weights="random", input_hw=TINY_HW, folds=0, epochs=1,
              fiber_batch=128, coupling_blocks=1).save(folder)
    with open(os.path.join(folder, CONFIG_NAME)) as fh:
        return fh.read()


@pytest.mark.parametrize("seed_document", ["valid_model_json", "valid_cflow_json"])  # PaDiM's, CFLOW's
@FUZZ
@given(data=st.data())
def test_mutated_model_json_is_accepted_consistent_or_refused_in_one_line(request, seed_document, tmp_path, data):
    folder = str(tmp_path / "b.edgead")
    os.makedirs(folder, exist_ok=True)
    text = _mutate(data, json.loads(request.getfixturevalue(seed_document)))
    path = os.path.join(folder, CONFIG_NAME)
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as fh:
        fh.write(text)
    _accepted_consistent_or_refused(lambda: read_config(folder), BundleError, path + ": ", bundle=True)


@FUZZ
@given(data=st.data())
def test_mutated_metadata_is_accepted_consistent_or_refused_in_one_line(data):
    text = _mutate(data, copy.deepcopy(fake_metadata()))  # fake_metadata shares FAKE_CALIBRATION
    _accepted_consistent_or_refused(lambda: modelinfo.parse_metadata(text, "fuzz.onnx"), ModelFileError,
                                    "fuzz.onnx: ", bundle=False)


# --- (2) arbitrary bytes and text ----------------------------------------------------------------------------------

raw_inputs = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    st.text(alphabet='{}[]",:0123456789.eE+-NaIfinitytrulsn \\u', max_size=120),
    st.sampled_from(RAW_TOKENS),
)


@FUZZ
@given(content=raw_inputs)
def test_arbitrary_bytes_as_model_json(tmp_path, content):
    folder = str(tmp_path / "b.edgead")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, CONFIG_NAME)
    with open(path, "wb") as fh:
        fh.write(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    _accepted_consistent_or_refused(lambda: read_config(folder), BundleError, path + ": ", bundle=True)


@FUZZ
@given(content=raw_inputs)
def test_arbitrary_text_or_bytes_as_metadata_string(content):
    _accepted_consistent_or_refused(lambda: modelinfo.parse_metadata(content, "fuzz.onnx"), ModelFileError,
                                    "fuzz.onnx: ", bundle=False)


def _varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _metadata_entry(value):
    """ModelProto field 14 (metadata_props) entry ``{key: "edgead", value: <raw bytes>}``, hand-encoded so the
    value can be any bytes (onnx's helpers insist on valid UTF-8)."""
    entry = b"\x0a" + _varint(6) + b"edgead" + b"\x12" + _varint(len(value)) + value
    return b"\x72" + _varint(len(entry)) + entry


@pytest.fixture(scope="module")
def bare_model_bytes():
    return build_fake_model(metadata=False).SerializeToString()


@FUZZ
@given(content=raw_inputs, tail=st.binary(max_size=12), where=st.sampled_from(["onnx", "sidecar", "file"]))
def test_arbitrary_metadata_inside_a_real_onnx_file_or_sidecar(bare_model_bytes, tmp_path, content, tail, where):
    value = content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass")
    if where == "onnx":
        path = tmp_path / "fuzz.onnx"
        path.write_bytes(bare_model_bytes + _metadata_entry(value))
    elif where == "sidecar":
        (tmp_path / "fuzz.engine").write_bytes(b"engine")
        (tmp_path / "fuzz.engine.json").write_bytes(value)
        path = tmp_path / "fuzz.engine"
    else:  # the whole .onnx file is garbage, or a valid model with garbage appended
        path = tmp_path / "fuzz.onnx"
        path.write_bytes(value + tail if len(value) % 2 else bare_model_bytes + value + tail)
    try:
        info = modelinfo.load_model_info(path)
    except ModelFileError as exc:
        _assert_clean_error(exc, str(path))
    else:
        _check_invariants(info, bundle=False)
