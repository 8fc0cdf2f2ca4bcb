"""Model metadata (runtime/modelinfo.py) and the ONNX Runtime engine (runtime/engines/ort_engine.py)."""
import json

import numpy as np
import pytest

from edgead.errors import BackendError, ModelFileError
from edgead.runtime import modelinfo
from edgead.runtime.engines import open_engine
from edgead.runtime.engines.ort_engine import OrtEngine, parse_providers

from fake_models import FAKE_CALIBRATION, build_fake_model, fake_metadata, reference, write_fake_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {b: write_fake_model(root / "fake_{}.onnx".format(b), batch=b) for b in (1, 4, "dynamic")}


def _frames(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)


# --- model info ---------------------------------------------------------------------------------------

def test_model_info_from_file_matches_session_and_metadata(models):
    import onnxruntime as ort

    path = models[4]
    scanned = modelinfo.load_model_info(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert scanned == modelinfo.model_info_from_session(session, path)
    assert scanned == fake_metadata(batch=4)
    assert modelinfo.input_hw(scanned) == (64, 64)


def test_model_info_engine_sidecar(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not really an engine")
    with pytest.raises(ModelFileError, match="m.engine.json"):
        modelinfo.load_model_info(engine)
    meta = dict(fake_metadata(), tensorrt={"version": "10.3", "fp16": True, "int8": False, "gpu": "Orin"})
    (tmp_path / "m.engine.json").write_text(json.dumps(meta))
    assert modelinfo.load_model_info(engine)["tensorrt"]["gpu"] == "Orin"


def test_model_info_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ModelFileError, match="nope.onnx: model file not found"):
        modelinfo.load_model_info(missing)
    no_meta = tmp_path / "nometa.onnx"
    no_meta.write_bytes(build_fake_model(metadata=False).SerializeToString())
    with pytest.raises(ModelFileError, match="nometa.onnx: ONNX model has no 'edgead' metadata"):
        modelinfo.load_model_info(no_meta)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")
    with pytest.raises(ModelFileError, match="garbage.onnx"):
        modelinfo.load_model_info(garbage)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty.onnx: file is empty"):
        modelinfo.load_model_info(empty)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.pop("input"), "lacks key 'input'"),
    (lambda m: m.update(format_version=99), "format_version 99"),
    (lambda m: m["input"].update(height=0), "input.height"),
    (lambda m: m["input"].update(width="64"), "input.width"),
    (lambda m: m["input"].update(channel_order="BGR"), "channel_order"),
    (lambda m: m["input"].update(resize="cubic"), "input.resize"),
    (lambda m: m.update(calibration={"image_threshold": "high"}), "calibration.image_threshold"),
])
def test_model_info_validation(tmp_path, mutate, message):
    meta = fake_metadata()
    mutate(meta)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=message) as info:
        modelinfo.load_model_info(path)
    assert "bad.json" in str(info.value)


def test_invalid_json_metadata(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(ModelFileError, match="x.json: 'edgead' metadata is not valid JSON"):
        modelinfo.load_model_info(path)


def test_thresholds_fallbacks():
    th = modelinfo.thresholds(fake_metadata())
    assert th == {"image_threshold": 200.0, "pixel_threshold": 200.0, "vmin": 100.0, "vmax": 255.0,
                  "source": "validation"}
    no_pixel = dict(FAKE_CALIBRATION, pixel_threshold=None)
    assert modelinfo.thresholds(fake_metadata(calibration=no_pixel))["pixel_threshold"] == 200.0
    # edgead 0.1's in-sample train_p995 flags normal frames: never a threshold, and the runtime says why
    train = {"train_p995": 12.5, "train_score_max": 20.0, "source": "train"}
    info = fake_metadata(calibration=train)
    th = modelinfo.thresholds(info)
    assert (th["image_threshold"], th["pixel_threshold"], th["vmin"], th["vmax"]) == (None, None, None, None)
    assert any("in-sample train_p995" in w for w in modelinfo.model_warnings(info))
    assert modelinfo.model_warnings(fake_metadata()) == []
    th = modelinfo.thresholds(fake_metadata(calibration=None))
    assert th["image_threshold"] is None and th["pixel_threshold"] is None


def test_legacy_lite0_export_is_flagged_and_provenance_is_described():
    info = fake_metadata()
    info["backbone"] = {"name": "efficientnet_lite0", "out_indices": [1, 2, 3]}  # edgead 0.1: no arch
    assert any("refit and export again" in w for w in modelinfo.model_warnings(info))
    info["backbone"]["arch"] = "tf_efficientnet_lite0"
    assert modelinfo.model_warnings(info) == []
    calibration = {"image_threshold": 7.5, "pixel_threshold": 7.5, "source": "normal-oos"}
    provenance = {"method": "padim-leave-fold-out", "folds": 5, "quantile": 0.995, "n_normal": 300,
                  "rank": 299, "expected_fpr": 0.006645, "fpr_upper95": 0.015692}
    kfold = {"calibration": calibration, "calibration_provenance": provenance}
    assert modelinfo.describe_thresholds(kfold) == (
        "image threshold 7.5, pixel threshold 7.5: 5-fold out-of-sample scores of 300 normal images, quantile 0.995 "
        "(rank 299/300); expected false-positive rate 0.7% (95% upper bound 1.6%)")
    assert "too few images to resolve it" in modelinfo.describe_thresholds(
        dict(kfold, calibration_provenance=dict(provenance, n_normal=50, rank=50)))
    loo = dict(kfold, calibration_provenance=dict(provenance, method="padim-leave-one-out", folds=300))
    assert "leave-one-out out-of-sample scores of 300 normal images" in modelinfo.describe_thresholds(loo)
    # missing fields are left out, never a crash; a zero pixel threshold is shown as zero
    sparse = {"calibration": dict(calibration, pixel_threshold=0.0), "calibration_provenance": {"n_good": 3}}
    assert modelinfo.describe_thresholds(sparse) == (
        "image threshold 7.5, pixel threshold 0: k-fold out-of-sample scores of the training normal images")
    assert modelinfo.describe_thresholds(dict(sparse, calibration=dict(calibration, source="validation"))).endswith(
        "F1-max on labelled validation images")
    assert modelinfo.describe_thresholds({"calibration": None}).startswith("no image threshold")


@pytest.mark.parametrize("field,bad", [("rank", "x"), ("expected_fpr", float("nan")), ("n_good", True),
                                       ("method", 3), (None, [1, 2])])
def test_calibration_provenance_is_validated(tmp_path, field, bad):
    info = fake_metadata()
    info["calibration_provenance"] = bad if field is None else {field: bad}
    path = tmp_path / "m.json"
    path.write_text(json.dumps(info))
    with pytest.raises(ModelFileError, match="calibration_provenance"):
        modelinfo.load_model_info(path)
    info["calibration_provenance"] = {"expected_fpr": None, "future_field": {"x": 1}}  # null and unknown: fine
    path.write_text(json.dumps(info))
    assert modelinfo.load_model_info(path)["calibration_provenance"]["expected_fpr"] is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, "12"])
def test_calibration_numbers_must_be_finite_numbers(tmp_path, bad):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(fake_metadata(calibration=dict(FAKE_CALIBRATION, image_threshold=bad))))
    with pytest.raises(ModelFileError, match="calibration.image_threshold must be a finite number"):
        modelinfo.load_model_info(path)


# --- engine -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 4, "dynamic"])
@pytest.mark.parametrize("n", [1, 3, 4, 9])
def test_infer_any_n_matches_reference(models, batch, n):
    frames = _frames(n, seed=n)
    with OrtEngine(models[batch], providers="cpu", threads=1) as engine:
        assert engine.input_shape == ((None if batch == "dynamic" else batch), 64, 64, 3)
        amap, score = engine.infer(frames)
    ref_map, ref_score = reference(frames)
    assert amap.shape == (n, 1, 64, 64) and amap.dtype == np.float32
    assert score.shape == (n,) and score.dtype == np.float32
    np.testing.assert_allclose(amap, ref_map, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(score, ref_score, rtol=1e-6, atol=1e-4)


def test_fixed_batch_pads_and_drops_padding(models):
    engine = OrtEngine(models[4], providers=("cpu",))
    calls = []
    original = engine._run

    def spy(chunk):
        calls.append(len(chunk))
        return original(chunk)

    engine._run = spy
    frames = _frames(6)
    amap, score = engine.infer(frames)
    assert calls == [4, 4] and amap.shape[0] == 6 and score.shape == (6,)
    np.testing.assert_allclose(score, reference(frames)[1], atol=1e-4)


def test_float32_input_model(tmp_path):
    path = write_fake_model(tmp_path / "f32.onnx", batch="dynamic", input_dtype="float32")
    frames = _frames(2)
    with OrtEngine(path) as engine:
        _, score = engine.infer(frames)
    np.testing.assert_allclose(score, reference(frames)[1], atol=1e-4)


def test_infer_rejects_wrong_frames(models):
    engine = OrtEngine(models[1])
    with pytest.raises(ValueError, match=r"\[N, 64, 64, 3\]"):
        engine.infer(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        engine.infer(np.zeros((1, 64, 64, 3), np.float32))
    amap, score = engine.infer(np.zeros((0, 64, 64, 3), np.uint8))
    assert amap.shape == (0, 1, 64, 64) and score.shape == (0,)


def test_info_and_open_engine(models):
    import onnxruntime as ort

    engine = open_engine(models["dynamic"], threads=2)
    assert isinstance(engine, OrtEngine)
    info = engine.info()
    json.dumps(info)
    assert info["backend"] == "onnxruntime"
    assert info["providers"] == ["CPUExecutionProvider"]
    assert info["onnxruntime"] == ort.__version__
    assert info["threads"] == 2 and info["batch"] == "dynamic"
    assert engine.model_info["calibration"] == FAKE_CALIBRATION


def test_provider_parsing_and_errors(models):
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert parse_providers("tensorrt,cuda", available) == available
    assert parse_providers("auto", available) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert parse_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert parse_providers(("CPU",), available) == ["CPUExecutionProvider"]
    with pytest.raises(BackendError, match="unknown execution provider 'rocm'"):
        parse_providers("rocm", available)
    with pytest.raises(BackendError, match="'cuda' .*not available"):
        parse_providers("cuda", ["CPUExecutionProvider"])
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendError, match="not available in this onnxruntime"):
            OrtEngine(models[1], providers=("cuda",))
    with pytest.raises(BackendError, match="threads"):
        OrtEngine(models[1], threads=0)


def test_unloadable_model_is_model_file_error(tmp_path):
    bad = build_fake_model()
    bad.graph.node[1].op_type = "PadimMahalanobis"
    bad.graph.node[1].domain = "edgead"
    path = tmp_path / "plugin.onnx"
    path.write_bytes(bad.SerializeToString())
    with pytest.raises(ModelFileError, match="plugin.onnx: onnxruntime cannot load the model") as info:
        OrtEngine(path)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelFileError, match="missing.onnx: model file not found"):
        open_engine(tmp_path / "missing.onnx")
