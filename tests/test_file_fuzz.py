"""Property-based fuzzing (hypothesis) of the binary files edgead reads: the weights file of a bundle and
image files. Whatever the bytes, the answer is a result or one EdgeadError naming the file, never another
exception. model.json and ONNX metadata: tests/test_schema_fuzz.py."""
import hashlib
import json
import os
import shutil
import tempfile

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgead.bundle import CONFIG_NAME, load_bundle, weights_file_path
from edgead.errors import BundleError, DataError

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def saved(tiny_bundle, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fuzz") / "bundle")
    tiny_bundle.save(folder)
    return folder


def _mutate(data, draw):
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "header"]))
    data = bytearray(data)
    if kind == "truncate":
        return bytes(data[:draw(st.integers(0, len(data) - 1))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "splice":
        pos = draw(st.integers(0, len(data)))
        return bytes(data[:pos]) + draw(st.binary(max_size=64)) + bytes(data[pos:])
    # safetensors starts with an 8-byte little-endian header length, then a JSON header: attack both
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8:8 + header_len]))
    key = draw(st.sampled_from(sorted(header)))
    header[key] = draw(st.one_of(st.none(), st.integers(-2 ** 70, 2 ** 70), st.text(max_size=8),
                                 st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "I64", "XX"]),
                                                        "shape": st.lists(st.integers(-3, 10 ** 12), max_size=3),
                                                        "data_offsets": st.lists(st.integers(-5, 10 ** 12),
                                                                                 min_size=2, max_size=2)})))
    blob = json.dumps(header).encode()
    return len(blob).to_bytes(8, "little") + blob + bytes(data[8 + header_len:])


@FUZZ
@given(data=st.data())
def test_mutated_weights_with_a_matching_checksum_fail_cleanly(saved, tmp_path, data):
    """The checksum is recomputed so the bytes reach the safetensors reader and the shape checks."""
    folder = os.path.join(tempfile.mkdtemp(dir=str(tmp_path)), "bundle")
    shutil.copytree(saved, folder)
    path = weights_file_path(folder)
    blob = _mutate(open(path, "rb").read(), data.draw)
    open(path, "wb").write(blob)
    config = json.load(open(os.path.join(folder, CONFIG_NAME)))
    config["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    json.dump(config, open(os.path.join(folder, CONFIG_NAME), "w"))
    try:
        bundle = load_bundle(folder)
    except BundleError as exc:
        assert "\n" not in str(exc) and folder in str(exc)
        return
    assert np.isfinite(bundle.mean.numpy()).all()  # loaded: it must be whole and usable


@FUZZ
@given(blob=st.one_of(st.binary(max_size=256), st.data()))
def test_any_bytes_as_an_image_give_a_picture_or_a_data_error(tmp_path, blob):
    from edgead.data import read_image

    if not isinstance(blob, bytes):  # a real PNG, then mutated
        ok, encoded = cv2.imencode(".png", np.full((16, 16, 3), 90, np.uint8))
        raw = bytearray(encoded.tobytes())
        cut = blob.draw(st.integers(0, len(raw)))
        raw = raw[:cut] + blob.draw(st.binary(max_size=16))
        blob = bytes(raw)
    path = str(tmp_path / "frame.png")
    open(path, "wb").write(blob)
    try:
        image = read_image(path, size=(32, 32))
    except DataError as exc:
        assert "\n" not in str(exc) and "frame.png" in str(exc)
        return
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
