"""``build_engine`` against stand-in ``tensorrt`` modules (tests/fake_tensorrt.py) that record every builder call.

Pinned here, for TensorRT 8.5 / 8.6 / 10.x / 11.x shaped modules:

- network creation flags: ``1 << EXPLICIT_BATCH`` (= 1) on 8.x, 0 on 10.x and 11.x;
- dynamic batch: the main profile is ``1 / max(1, max_batch // 2) / max_batch``; INT8 adds a *separate*
  calibration profile ``min = opt = max = calibrator batch`` (never the main profile, whose min/max TensorRT
  would overwrite with its opt) that is not added as an optimisation profile;
- the calibrator's device buffer holds exactly one batch, every copy is exactly one batch of the calibration
  frames in order, the last ``images % batch`` are dropped, and the buffer is freed after the build, also when
  the build fails, raises, or a copy fails;
- the calibration cache is keyed by the ONNX bytes and the frames: reused for the same inputs, never for a
  changed model;
- TensorRT 11 (strongly typed, no ``BuilderFlag.FP16``): ``--fp16`` / ``--int8`` are one-line ExportErrors
  before any builder work (and ``edgead build`` exits 2 with one line); a plain build records
  ``strongly_typed: true``;
- plain builds are strict fp32 (TF32 cleared); the sidecar records exactly what was built.
"""
import json
import os
import re
import sys

import cv2
import numpy as np
import pytest

from edgead.errors import BackendError, ExportError
from edgead.exporters import tensorrt_build
from edgead.runtime import modelinfo
from edgead.runtime.engines import tensorrt_engine
from fake_models import FAKE_HW, write_fake_model
from fake_tensorrt import FAKE_CACHE, FAKE_ENGINE, builder_calls, make_fake_cuda, make_tensorrt

H, W = FAKE_HW
FRAME_BYTES = H * W * 3


@pytest.fixture()
def fake_trt(monkeypatch):
    """install(version, fail_copy=None, **make_tensorrt kwargs) -> (trt module, CUDA ledger)."""
    def install(version="10.3.0", fail_copy=None, **kwargs):
        trt = make_tensorrt(version, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        cuda_class, ledger = make_fake_cuda(fail_copy)
        monkeypatch.setattr(tensorrt_engine, "CudaRuntime", cuda_class)
        return trt, ledger

    return install


def _frames(n, seed=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, H, W, 3), dtype=np.uint8)


def _calib_dir(tmp_path, n, seed=3, name="calib"):
    """``n`` PNG frames (lossless, RGB written as BGR) in sorted order; returns (folder, frames)."""
    folder = tmp_path / name
    folder.mkdir()
    frames = _frames(n, seed)
    for i, frame in enumerate(frames):
        assert cv2.imwrite(str(folder / "{:03d}.png".format(i)), np.ascontiguousarray(frame[..., ::-1]))
    return str(folder), frames


def _model(tmp_path, batch="dynamic", input_dtype="uint8", name="m.onnx", **kwargs):
    return write_fake_model(tmp_path / name, batch=batch, input_dtype=input_dtype, **kwargs)


def _sidecar(engine_path):
    with open(engine_path + ".json") as fh:
        return json.load(fh)


# --- network flags, profiles, precision flags, sidecar --------------------------------------------------------

@pytest.mark.parametrize("version, flags", [("8.5.3", 1), ("8.6.1", 1), ("10.0.1", 0), ("10.3.0", 0),
                                            ("10.16.0", 0), ("11.1.0", 0)])
def test_network_creation_flags_per_version(tmp_path, fake_trt, version, flags):
    trt, _ = fake_trt(version)
    tensorrt_build.build_engine(_model(tmp_path), str(tmp_path / "m.engine"))
    assert builder_calls(trt, "create_network") == [("create_network", flags)]


def test_fp32_dynamic_build_main_profile_and_sidecar(tmp_path, fake_trt):
    trt, ledger = fake_trt("10.3.0")
    onnx_path, engine_path = _model(tmp_path), str(tmp_path / "m.engine")
    summary = tensorrt_build.build_engine(onnx_path, engine_path, max_batch=8)
    assert builder_calls(trt, "set_memory_pool_limit", "set_flag", "clear_flag", "create_optimization_profile",
                         "set_shape", "add_optimization_profile", "set_calibration_profile", "int8_calibrator",
                         "build_serialized_network") == [
        ("set_memory_pool_limit", "WORKSPACE", 1024 << 20),
        ("clear_flag", "TF32"),
        ("create_optimization_profile", 1),
        ("set_shape", 1, "image", (1, H, W, 3), (4, H, W, 3), (8, H, W, 3)),
        ("add_optimization_profile", 1),
        ("build_serialized_network", []),
    ]
    assert ledger["malloc"] == [] and ledger["free"] == []
    with open(engine_path, "rb") as fh:
        assert fh.read() == FAKE_ENGINE
    built = dict(_sidecar(engine_path)["tensorrt"])
    assert built.pop("build_seconds") >= 0
    assert built == {"version": "10.3.0", "fp16": False, "int8": False, "strongly_typed": False, "tf32": False,
                     "gpu": "Fake GPU", "compute_capability": "8.7", "workspace_mb": 1024, "plugin_lib": None,
                     "max_batch": 8, "opt_batch": 4, "int8_calibration": None, "int8_explicit": False}
    assert summary["tensorrt"]["max_batch"] == 8
    info = modelinfo.load_model_info(engine_path)  # the runtime reads it back (schema + engine hash)
    assert info["tensorrt"]["strongly_typed"] is False


@pytest.mark.parametrize("max_batch, profile", [(1, (1, 1, 1)), (2, (1, 1, 2)), (5, (1, 2, 5))])
def test_main_profile_opt_is_half_max(tmp_path, fake_trt, max_batch, profile):
    trt, _ = fake_trt("8.6.1")
    tensorrt_build.build_engine(_model(tmp_path), str(tmp_path / "m.engine"), max_batch=max_batch)
    low, opt, high = profile
    assert builder_calls(trt, "set_shape") == [("set_shape", 1, "image", (low, H, W, 3), (opt, H, W, 3),
                                                (high, H, W, 3))]


def test_fixed_batch_build_has_no_profile(tmp_path, fake_trt):
    trt, _ = fake_trt("8.5.3", input_shape=(2, H, W, 3), input_dtype="float32")
    tensorrt_build.build_engine(_model(tmp_path, batch=2, input_dtype="float32"), str(tmp_path / "m.engine"))
    assert builder_calls(trt, "create_optimization_profile", "set_shape", "add_optimization_profile") == []
    built = _sidecar(str(tmp_path / "m.engine"))["tensorrt"]
    assert (built["max_batch"], built["opt_batch"]) == (2, 2)


def test_fp16_build_sets_fp16_and_keeps_tf32(tmp_path, fake_trt):
    trt, _ = fake_trt("8.6.1")
    tensorrt_build.build_engine(_model(tmp_path), str(tmp_path / "m.engine"), fp16=True)
    assert builder_calls(trt, "set_flag", "clear_flag") == [("set_flag", "FP16")]
    assert builder_calls(trt, "build_serialized_network") == [("build_serialized_network", ["FP16", "TF32"])]
    built = _sidecar(str(tmp_path / "m.engine"))["tensorrt"]
    assert (built["fp16"], built["int8"], built["tf32"], built["strongly_typed"]) == (True, False, True, False)


def test_fp16_without_fast_fp16_is_refused(tmp_path, fake_trt):
    fake_trt("10.3.0", fast_fp16=False)
    with pytest.raises(ExportError, match=r"m\.onnx: --fp16 requested but this GPU has no fast fp16"):
        tensorrt_build.build_engine(_model(tmp_path), str(tmp_path / "m.engine"), fp16=True)
    assert not (tmp_path / "m.engine").exists()


def test_max_batch_below_one_is_refused(tmp_path, fake_trt):
    trt, _ = fake_trt("10.3.0")
    with pytest.raises(ExportError, match=r"m\.onnx: --max-batch must be >= 1, got 0"):
        tensorrt_build.build_engine(_model(tmp_path), str(tmp_path / "m.engine"), max_batch=0)
    assert trt.calls == []


def test_failed_build_writes_nothing(tmp_path, fake_trt):
    fake_trt("10.3.0", build_result=None)
    with pytest.raises(ExportError, match=r"m\.onnx: TensorRT failed to build the engine"):
        tensorrt_build.build_engine(_model(tmp_path), str(tmp_path / "m.engine"))
    assert sorted(os.listdir(str(tmp_path))) == ["m.onnx"]


# --- TensorRT 11: strongly typed only -----------------------------------------------------------------------------

def test_plain_build_on_tensorrt_11_is_strongly_typed(tmp_path, fake_trt):
    trt, _ = fake_trt("11.1.0")
    assert not hasattr(trt.BuilderFlag, "FP16") and not hasattr(trt, "IInt8EntropyCalibrator2")
    tensorrt_build.build_engine(_model(tmp_path), str(tmp_path / "m.engine"), max_batch=4)
    assert builder_calls(trt, "create_network", "set_flag", "clear_flag", "set_shape") == [
        ("create_network", 0),
        ("clear_flag", "TF32"),
        ("set_shape", 1, "image", (1, H, W, 3), (2, H, W, 3), (4, H, W, 3)),
    ]
    built = _sidecar(str(tmp_path / "m.engine"))["tensorrt"]
    assert (built["version"], built["strongly_typed"], built["fp16"], built["int8"], built["tf32"]) == (
        "11.1.0", True, False, False, False)


@pytest.mark.parametrize("flag", ["fp16", "int8"])
def test_fp16_or_int8_on_tensorrt_11_is_one_line_export_error(tmp_path, fake_trt, flag):
    trt, ledger = fake_trt("11.1.0")
    calib, _ = _calib_dir(tmp_path, 2)
    options = {"fp16": True} if flag == "fp16" else {"int8": True, "calib_dir": calib}
    with pytest.raises(ExportError) as caught:
        tensorrt_build.build_engine(_model(tmp_path), str(tmp_path / "m.engine"), **options)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(str(tmp_path / "m.onnx") + ": TensorRT 11.1.0 builds strongly typed networks only")
    assert "rebuild without --{}".format(flag) in message
    assert trt.calls == [] and ledger["instances"] == 0  # refused before any TensorRT or CUDA work


def test_cli_build_fp16_on_tensorrt_11_exits_2_with_one_line(tmp_path, fake_trt):
    from click.testing import CliRunner

    from edgead.cli import cli

    fake_trt("11.1.0")
    onnx_path = _model(tmp_path)
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart already
        runner = CliRunner()
    result = runner.invoke(cli, ["build", onnx_path, "-o", str(tmp_path / "m.engine"), "--fp16"])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("edgead: error: " + onnx_path + ": TensorRT 11.1.0 builds strongly typed")
    assert not (tmp_path / "m.engine").exists()


def test_cli_build_reports_precision_and_calibration(tmp_path, fake_trt):
    from click.testing import CliRunner

    from edgead.cli import cli

    fake_trt("10.3.0")
    onnx_path, engine_path = _model(tmp_path), str(tmp_path / "m.engine")
    calib, _ = _calib_dir(tmp_path, 10)
    result = CliRunner().invoke(cli, ["build", onnx_path, "-o", engine_path, "--int8", "--calib", calib,
                                      "--max-batch", "4"])
    assert result.exit_code == 0, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert lines[0].startswith(onnx_path + " -> " + engine_path) and ", Fake GPU, int8, " in lines[0]
    assert lines[1].startswith("int8 calibration: 8 of 10 images in 2 batches of 4 (2 dropped: not a full batch); "
                               "cache m.engine.")
    fake_trt("11.1.0")
    result = CliRunner().invoke(cli, ["build", onnx_path, "-o", engine_path, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    built = json.loads(result.output)["tensorrt"]
    assert (built["strongly_typed"], built["tf32"], built["int8_calibration"]) == (True, False, None)


def test_int8_without_implicit_calibration_is_refused(tmp_path, fake_trt):
    trt, _ = fake_trt("10.3.0")
    del trt.IInt8EntropyCalibrator2
    calib, _ = _calib_dir(tmp_path, 2)
    with pytest.raises(ExportError, match=r"m\.onnx: TensorRT 10\.3\.0 has no implicit INT8 calibration"):
        tensorrt_build.build_engine(_model(tmp_path), str(tmp_path / "m.engine"), int8=True, calib_dir=calib)
    assert trt.calls == []


# --- INT8 calibration ---------------------------------------------------------------------------------------------

def test_dynamic_int8_calibration_profile_buffer_and_batches(tmp_path, fake_trt):
    trt, ledger = fake_trt("10.3.0")
    calib, frames = _calib_dir(tmp_path, 10)
    engine_path = str(tmp_path / "m.engine")
    tensorrt_build.build_engine(_model(tmp_path), engine_path, int8=True, calib_dir=calib, max_batch=4)
    # main profile 1/2/4 added; calibration profile 4/4/4 separate, set as calibration profile, never added
    assert builder_calls(trt, "create_optimization_profile", "set_shape", "add_optimization_profile",
                         "set_calibration_profile") == [
        ("create_optimization_profile", 1),
        ("set_shape", 1, "image", (1, H, W, 3), (2, H, W, 3), (4, H, W, 3)),
        ("add_optimization_profile", 1),
        ("create_optimization_profile", 2),
        ("set_shape", 2, "image", (4, H, W, 3), (4, H, W, 3), (4, H, W, 3)),
        ("set_calibration_profile", 2),
    ]
    assert builder_calls(trt, "set_flag", "clear_flag") == [("set_flag", "INT8")]  # TF32 left at the default
    # calibrator batch 4 = calibration profile batch; one buffer of exactly 4 frames; 2 batches, 2 frames dropped
    assert builder_calls(trt, "get_batch_size") == [("get_batch_size", 4)]
    assert ledger["malloc"] == [(0x10000, 4 * FRAME_BYTES)]
    assert builder_calls(trt, "get_batch") == [("get_batch", [0x10000]), ("get_batch", [0x10000]),
                                               ("get_batch", None)]
    assert [(pointer, nbytes) for pointer, nbytes, _ in ledger["copies"]] == [(0x10000, 4 * FRAME_BYTES)] * 2
    np.testing.assert_array_equal(ledger["copies"][0][2], frames[0:4])
    np.testing.assert_array_equal(ledger["copies"][1][2], frames[4:8])
    assert ledger["copies"][0][2].dtype == np.uint8
    assert ledger["free"] == [0x10000]
    calibration = _sidecar(engine_path)["tensorrt"]["int8_calibration"]
    cache = calibration.pop("cache")
    assert calibration == {"images": 10, "used": 8, "dropped": 2, "batch": 4, "batches": 2, "from_cache": False}
    assert cache.startswith("m.engine.") and cache.endswith(".calib") and len(cache) == len("m.engine..calib") + 16
    with open(str(tmp_path / cache), "rb") as fh:
        assert fh.read() == FAKE_CACHE


@pytest.mark.parametrize("max_batch, images, batch", [(16, 20, 8), (4, 20, 4), (16, 3, 3), (1, 5, 1)])
def test_dynamic_calibration_batch_is_min_of_max_batch_8_and_images(max_batch, images, batch):
    assert tensorrt_build.calibration_batch(-1, max_batch, images, "calib") == batch


def test_fixed_batch_calibration_uses_the_engine_batch(tmp_path, fake_trt):
    trt, ledger = fake_trt("8.5.3", input_shape=(2, H, W, 3), input_dtype="float32")
    calib, frames = _calib_dir(tmp_path, 5)
    engine_path = str(tmp_path / "m.engine")
    tensorrt_build.build_engine(_model(tmp_path, batch=2, input_dtype="float32"), engine_path, int8=True,
                                calib_dir=calib, max_batch=8)
    assert builder_calls(trt, "create_optimization_profile", "set_calibration_profile") == []
    assert builder_calls(trt, "get_batch_size") == [("get_batch_size", 2)]
    assert ledger["malloc"] == [(0x10000, 2 * FRAME_BYTES * 4)]  # float32 input: 4 bytes a value
    assert len(ledger["copies"]) == 2 and ledger["free"] == [0x10000]
    copied = ledger["copies"][1][2]
    assert copied.dtype == np.float32
    np.testing.assert_array_equal(copied, frames[2:4].astype(np.float32))  # pixel values 0..255, as exported
    calibration = _sidecar(engine_path)["tensorrt"]["int8_calibration"]
    assert (calibration["batch"], calibration["used"], calibration["dropped"]) == (2, 4, 1)


def test_fixed_batch_larger_than_the_calibration_set(tmp_path, fake_trt):
    fake_trt("10.3.0", input_shape=(4, H, W, 3))
    calib, _ = _calib_dir(tmp_path, 3)
    with pytest.raises(ExportError, match=r"calib: 3 calibration image\(s\) but the ONNX has a fixed batch of 4"):
        tensorrt_build.build_engine(_model(tmp_path, batch=4), str(tmp_path / "m.engine"), int8=True,
                                    calib_dir=calib)


@pytest.mark.parametrize("failure", ["none", "raises"])
def test_calibration_buffer_freed_when_the_build_fails(tmp_path, fake_trt, failure):
    if failure == "none":
        trt, ledger = fake_trt("10.3.0", build_result=None)
        expected = pytest.raises(ExportError, match="TensorRT failed to build the engine")
    else:
        trt, ledger = fake_trt("10.3.0", build_error=RuntimeError("builder crashed"))
        expected = pytest.raises(RuntimeError, match="builder crashed")
    calib, _ = _calib_dir(tmp_path, 4)
    with expected:
        tensorrt_build.build_engine(_model(tmp_path), str(tmp_path / "m.engine"), int8=True, calib_dir=calib)
    assert len(ledger["malloc"]) == 1 and ledger["free"] == [ledger["malloc"][0][0]]
    assert not (tmp_path / "m.engine").exists()


def test_calibration_copy_failure_is_an_export_error_and_frees(tmp_path, fake_trt):
    trt, ledger = fake_trt("8.6.1", fail_copy=BackendError("CUDA error in cudaMemcpy: an illegal memory access (700)"))
    calib, _ = _calib_dir(tmp_path, 4)
    with pytest.raises(ExportError, match=r"m\.onnx: INT8 calibration failed \(.*calib\): CUDA error in cudaMemcpy"):
        tensorrt_build.build_engine(_model(tmp_path), str(tmp_path / "m.engine"), int8=True, calib_dir=calib)
    assert builder_calls(trt, "get_batch") == [("get_batch", None)]  # TensorRT saw the end of the data
    assert ledger["free"] == [ledger["malloc"][0][0]]
    assert not (tmp_path / "m.engine").exists()


def test_calibration_feed_drops_the_incomplete_last_batch():
    cuda_class, ledger = make_fake_cuda()
    frames = _frames(7)
    feed = tensorrt_build.CalibrationFeed(cuda_class(), frames, 3, np.uint8)
    pointers = [feed.next_batch() for _ in range(4)]
    assert pointers == [0x10000, 0x10000, None, None]
    assert [nbytes for _, nbytes, _ in ledger["copies"]] == [3 * FRAME_BYTES] * 2
    feed.close()
    feed.close()
    assert ledger["free"] == [0x10000] and feed.next_batch() is None


def test_calibration_cache_is_keyed_by_model_and_frames(tmp_path, fake_trt):
    calib, _ = _calib_dir(tmp_path, 4)
    engine_path = str(tmp_path / "m.engine")
    (tmp_path / "m.engine.calib").write_bytes(b"a cache an older edgead wrote for another model")
    trt, _ = fake_trt("10.3.0")
    onnx_path = _model(tmp_path)
    tensorrt_build.build_engine(onnx_path, engine_path, int8=True, calib_dir=calib)
    first = _sidecar(engine_path)["tensorrt"]["int8_calibration"]
    assert first["from_cache"] is False and len(builder_calls(trt, "get_batch")) == 2
    # same ONNX, same frames: the cache is reused, no batch is pulled
    trt, _ = fake_trt("10.3.0")
    tensorrt_build.build_engine(onnx_path, engine_path, int8=True, calib_dir=calib)
    second = _sidecar(engine_path)["tensorrt"]["int8_calibration"]
    assert second == dict(first, from_cache=True)
    assert builder_calls(trt, "read_calibration_cache") == [("read_calibration_cache", FAKE_CACHE)]
    assert builder_calls(trt, "get_batch") == []
    # another model at the same path: another cache, calibrated afresh; the old keyed cache is removed
    write_fake_model(onnx_path, batch="dynamic", hw=FAKE_HW, calibration=dict(
        image_threshold=150.0, pixel_threshold=150.0, score_min=0.0, score_max=255.0, source="validation"))
    trt, _ = fake_trt("10.3.0")
    tensorrt_build.build_engine(onnx_path, engine_path, int8=True, calib_dir=calib)
    third = _sidecar(engine_path)["tensorrt"]["int8_calibration"]
    assert third["cache"] != first["cache"] and third["from_cache"] is False
    assert builder_calls(trt, "read_calibration_cache") == [("read_calibration_cache", None)]
    assert not (tmp_path / first["cache"]).exists() and (tmp_path / third["cache"]).exists()
    # the unkeyed cache of an older edgead is never read (nor deleted)
    assert (tmp_path / "m.engine.calib").read_bytes() == b"a cache an older edgead wrote for another model"


def test_calibration_cache_key_changes_with_the_frames(tmp_path):
    frames = _frames(4)
    def path(sha="ab" * 32, version="10.3.0", data=frames, batch=2, dtype=np.uint8):
        return tensorrt_build.calibration_cache_path("m.engine", sha, version, data, batch, dtype)

    key = path()
    assert key == path(data=frames.copy()) and re.match(r"^m\.engine\.[0-9a-f]{16}\.calib$", key)
    changed = frames.copy()
    changed[0, 0, 0, 0] ^= 1
    others = {path(data=changed), path(sha="cd" * 32), path(version="8.6.1"), path(batch=4), path(dtype=np.float32)}
    assert key not in others and len(others) == 5


def test_int8_calibration_profile_refused(tmp_path, fake_trt):
    _, ledger = fake_trt("10.3.0", calibration_profile_ok=False)
    calib, _ = _calib_dir(tmp_path, 4)
    with pytest.raises(ExportError, match=r"m\.onnx: TensorRT refused the calibration profile \(4, 64, 64, 3\)"):
        tensorrt_build.build_engine(_model(tmp_path), str(tmp_path / "m.engine"), int8=True, calib_dir=calib)
    assert ledger["malloc"] == []


def test_int8_calibration_folder_problems(tmp_path, fake_trt):
    fake_trt("10.3.0")
    with pytest.raises(ExportError, match=r"nowhere: --calib folder not found"):
        tensorrt_build.build_engine(_model(tmp_path), str(tmp_path / "m.engine"), int8=True,
                                    calib_dir=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match=r"empty: no calibration images"):
        tensorrt_build.build_engine(_model(tmp_path), str(tmp_path / "m.engine"), int8=True,
                                    calib_dir=str(tmp_path / "empty"))


# --- CUDA runtime helpers -----------------------------------------------------------------------------------------

class _FakeLib(object):
    def __init__(self, status=0):
        self.freed, self.calls, self.status = [], [], status

    def cudaFree(self, pointer):
        self.freed.append(pointer)
        return self.status

    def cudaMemcpy(self, dst, src, nbytes, kind):
        self.calls.append(("cudaMemcpy", dst, nbytes, kind))
        return self.status

    def cudaDeviceSynchronize(self):
        self.calls.append(("cudaDeviceSynchronize",))
        return 0

    def cudaGetErrorString(self, status):
        return b"an illegal memory access was encountered"


def test_cuda_runtime_free():
    cuda = object.__new__(tensorrt_engine.CudaRuntime)
    cuda.lib = _FakeLib()
    cuda.free(0x1234)
    cuda.free(None)
    cuda.free(0)
    assert cuda.lib.freed == [0x1234]
    cuda.lib = _FakeLib(status=700)
    with pytest.raises(BackendError, match=r"CUDA error in cudaFree: an illegal memory access"):
        cuda.free(0x1234)


def test_copy_to_device_is_complete_on_the_device_when_it_returns():
    """cudaMemcpy from pageable memory may return before the DMA lands: the copy is followed by a device sync."""
    cuda = object.__new__(tensorrt_engine.CudaRuntime)
    cuda.lib = _FakeLib()
    chunk = np.zeros((2, 4, 4, 3), np.uint8)
    cuda.copy_to_device(0x1000, chunk)
    assert cuda.lib.calls == [("cudaMemcpy", 0x1000, chunk.nbytes, 1), ("cudaDeviceSynchronize",)]


def test_cuda_device_status_without_libcudart(monkeypatch):
    def missing(device=0):
        raise BackendError("the CUDA runtime library (libcudart) was not found")

    monkeypatch.setattr(tensorrt_engine, "CudaRuntime", missing)
    ok, reason = tensorrt_engine.cuda_device_status()
    assert ok is False and "libcudart" in reason


# --- explicit quantisation: edgead export --precision int8 -----------------------------------------------------

def _int8_model(tmp_path, target):
    """A fake model whose metadata says it is an int8 export for ``target``."""
    import onnx

    from fake_models import build_fake_model, fake_metadata

    model = build_fake_model(batch="dynamic")
    meta = fake_metadata(batch="dynamic")
    meta["export"].update(precision="int8", statistics="fp16", quantization={
        "target": target, "calibration_images": 20, "refit_images": 20})
    for prop in model.metadata_props:
        if prop.key == "edgead":
            prop.value = json.dumps(meta)
    path = str(tmp_path / "int8.onnx")
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("version, flags", [("8.6.1", ["INT8"]), ("10.3.0", ["INT8"]), ("11.1.0", [])])
def test_tensorrt_target_int8_export_builds_with_the_int8_flag(tmp_path, fake_trt, version, flags):
    trt, _ = fake_trt(version)
    tensorrt_build.build_engine(_int8_model(tmp_path, "tensorrt"), str(tmp_path / "m.engine"))
    assert [c[1] for c in builder_calls(trt, "set_flag")] == flags  # 11.x: strongly typed, Q/DQ carry the types
    built = _sidecar(str(tmp_path / "m.engine"))["tensorrt"]
    assert built["int8_explicit"] is True and built["int8"] is False and built["int8_calibration"] is None
    from edgead.cli.build_cmd import describe_precision

    assert describe_precision(built) == ("strongly typed (ONNX types)" if version.startswith("11") else "int8")


def test_onnxruntime_target_int8_export_is_refused_before_tensorrt(tmp_path, fake_trt):
    trt, _ = fake_trt("10.3.0")
    with pytest.raises(ExportError, match="re-export with --precision int8 --int8-target tensorrt"):
        tensorrt_build.build_engine(_int8_model(tmp_path, "onnxruntime"), str(tmp_path / "m.engine"))
    assert builder_calls(trt, "build_serialized_network") == [] and not os.path.exists(str(tmp_path / "m.engine"))


def test_implicit_int8_on_an_int8_export_is_refused(tmp_path, fake_trt):
    fake_trt("8.6.1")
    calib, _ = _calib_dir(tmp_path, 4)
    with pytest.raises(ExportError, match="already quantised"):
        tensorrt_build.build_engine(_int8_model(tmp_path, "tensorrt"), str(tmp_path / "m.engine"), int8=True,
                                    calib_dir=calib)
