"""TensorRT paths: `edgead build`, the TensorRT engine backend and the plugin loader.

Without TensorRT (CI) these check the error paths: one-line messages, exit code 2, the right error class,
the version/GPU checks of the sidecar (through stand-in ``tensorrt`` modules, tests/fake_tensorrt.py; the
builder's calls are pinned in tests/test_tensorrt_build.py). With TensorRT and a CUDA device (found through the
runtime's own libcudart path, not torch) the ``tensorrt``/``gpu``-marked tests build the default export in both
flavours and both input dtypes, an ``--fp16`` and an ``--int8`` engine of a tiny model, and compare them with ONNX
Runtime (tolerances and their reasons at the end of this file). The plugin header compile-check runs when
TensorRT headers are available ($EDGEAD_TRT_INCLUDE).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgead.errors import BackendError, ExportError, ModelFileError
from edgead.runtime import modelinfo, tensorrt_plugin
from edgead.runtime.engines import base, tensorrt_engine
from fake_models import fake_metadata, write_fake_model
from fake_tensorrt import make_fake_cuda, make_tensorrt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_cli(args, cwd, block_tensorrt=True):
    """Run ``edgead ARGS`` in a fresh interpreter (tensorrt made unimportable); returns CompletedProcess."""
    code = ("import sys\n"
            + ("sys.modules['tensorrt'] = None\n" if block_tensorrt else "")
            + "from edgead.cli import main\nsys.exit(main({!r}))\n".format(list(args)))
    return subprocess.run([sys.executable, "-c", code], cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=120)


_FakeCuda = make_fake_cuda()[0]


def _engine_with_sidecar(tmp_path, tensorrt_info=None, mahalanobis="onnx"):
    path = tmp_path / "m.engine"
    path.write_bytes(b"\x00garbage, not a TensorRT plan\x00" * 4)
    meta = fake_metadata()
    meta["export"]["mahalanobis"] = mahalanobis
    if tensorrt_info is not None:
        meta["tensorrt"] = tensorrt_info
    (tmp_path / "m.engine.json").write_text(json.dumps(meta))
    return str(path)


# --- edgead build -------------------------------------------------------------------------------------

def test_build_without_tensorrt_exits_2_with_one_line(tmp_path):
    model = write_fake_model(tmp_path / "m.onnx")
    proc = _run_cli(["build", model, "-o", str(tmp_path / "m.engine")], tmp_path)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "tensorrt" in err.lower() and "m.onnx" in err
    assert not (tmp_path / "m.engine").exists()


def test_build_missing_onnx_and_int8_without_calib(tmp_path):
    proc = _run_cli(["build", str(tmp_path / "absent.onnx"), "-o", str(tmp_path / "m.engine")], tmp_path)
    assert proc.returncode == 2 and "absent.onnx: model file not found" in proc.stderr.decode()
    model = write_fake_model(tmp_path / "m.onnx")
    proc = _run_cli(["build", model, "-o", str(tmp_path / "m.engine"), "--int8"], tmp_path)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "--calib" in err


def test_build_help_has_example():
    from click.testing import CliRunner

    from edgead.cli import cli

    result = CliRunner().invoke(cli, ["build", "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and "edgead build" in result.output and "--plugin-lib" in result.output


def test_build_plugin_graph_without_plugin_library(tmp_path, monkeypatch):
    from edgead.exporters import tensorrt_build

    meta = fake_metadata()
    meta["export"]["mahalanobis"] = "plugin"
    model = write_fake_model(tmp_path / "p.onnx")
    monkeypatch.setattr(tensorrt_build.modelinfo, "load_model_info", lambda path: meta)
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt())
    with pytest.raises(ExportError, match=r"p\.onnx: the graph uses the PadimMahalanobis plugin: .*not found"):
        tensorrt_build.build_engine(model, str(tmp_path / "p.engine"),
                                    plugin_lib=str(tmp_path / "missing" / "libedgead_plugins.so"))


# --- TensorRTEngine ---------------------------------------------------------------------------------------

def test_engine_missing_empty_and_sidecarless(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        tensorrt_engine.TensorRTEngine(str(tmp_path / "none.engine"))
    empty = tmp_path / "empty.engine"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        tensorrt_engine.TensorRTEngine(str(empty))
    lonely = tmp_path / "lonely.engine"
    lonely.write_bytes(b"garbage")
    with pytest.raises(ModelFileError, match="sidecar"):
        base.open_engine(str(lonely))  # dispatches .engine to TensorRTEngine


def test_engine_without_tensorrt_is_backend_error(tmp_path, monkeypatch):
    path = _engine_with_sidecar(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendError, match=r"m\.engine: the TensorRT Python bindings are not installed"):
        tensorrt_engine.TensorRTEngine(path)


def test_engine_built_with_other_tensorrt_version(tmp_path, monkeypatch):
    path = _engine_with_sidecar(tmp_path, {"version": "8.6.1", "gpu": "Orin"})
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt("10.3.0"))
    with pytest.raises(ModelFileError, match=r"built with TensorRT 8\.6\.1 but this is TensorRT 10\.3\.0"):
        tensorrt_engine.TensorRTEngine(path)


def test_engine_built_for_other_gpu(tmp_path, monkeypatch):
    path = _engine_with_sidecar(tmp_path, {"version": "10.3.0", "gpu": "Orin"})
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt("10.3.0"))
    monkeypatch.setattr(tensorrt_engine, "CudaRuntime", _FakeCuda)
    with pytest.raises(ModelFileError, match="built for GPU 'Orin' but this is 'Fake GPU'"):
        tensorrt_engine.TensorRTEngine(path)


def test_engine_garbage_plan_cannot_deserialize(tmp_path, monkeypatch):
    path = _engine_with_sidecar(tmp_path, {"version": "10.3.0", "gpu": "Fake GPU"})
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt("10.3.0", engine=None))
    monkeypatch.setattr(tensorrt_engine, "CudaRuntime", _FakeCuda)
    with pytest.raises(ModelFileError, match=r"m\.engine: TensorRT 10\.3\.0 cannot deserialize"):
        tensorrt_engine.TensorRTEngine(path)


def test_plugin_engine_needs_plugin_library(tmp_path, monkeypatch):
    path = _engine_with_sidecar(tmp_path, {"version": "10.3.0"}, mahalanobis="plugin")
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt("10.3.0"))
    with pytest.raises(BackendError, match="libedgead_plugins.so not found"):
        tensorrt_engine.TensorRTEngine(path, plugin_lib=str(tmp_path / "no" / "libedgead_plugins.so"))


def test_check_sidecar_accepts_matching_build():
    tensorrt_engine.check_sidecar_matches("m.engine", {"tensorrt": {"version": "10.3.0", "gpu": "Orin"}},
                                          "10.3.0", "Orin")
    tensorrt_engine.check_sidecar_matches("m.engine", {}, "10.3.0", "Orin")  # old sidecar: nothing to check


# --- plugin loader ----------------------------------------------------------------------------------------

def test_plugin_loader_errors(tmp_path):
    with pytest.raises(BackendError, match="not found.*--plugin-lib"):
        tensorrt_plugin.load_plugin_library(str(tmp_path / "absent.so"))
    bogus = tmp_path / "libedgead_plugins.so"
    bogus.write_bytes(b"\x7fELF but not really")
    with pytest.raises(BackendError, match="cannot load the TensorRT plugin library"):
        tensorrt_plugin.load_plugin_library(str(bogus))


def test_plugin_registry_lookup_and_metadata_flag():
    assert tensorrt_plugin.is_registered(make_tensorrt(registered=True))
    assert not tensorrt_plugin.is_registered(make_tensorrt(registered=False))
    assert tensorrt_plugin.needs_plugin({"export": {"mahalanobis": "plugin"}})
    assert not tensorrt_plugin.needs_plugin({"export": {"mahalanobis": "onnx"}})
    assert not tensorrt_plugin.needs_plugin({})


# --- plugin source against real TensorRT headers ------------------------------------------------------------

def _header_dirs():
    env = os.environ.get("EDGEAD_TRT_INCLUDE", "")
    return [d for d in env.split(os.pathsep) if d and os.path.exists(os.path.join(d, "NvInferVersion.h"))]


@pytest.mark.skipif(not _header_dirs(), reason="set EDGEAD_TRT_INCLUDE=dir[:dir...] to TensorRT include folders")
def test_plugin_compiles_against_tensorrt_headers():
    script = os.path.join(ROOT, "cpp_bindings", "check_plugin_headers.sh")
    proc = subprocess.run(["bash", script] + _header_dirs(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout.decode()[-4000:]


# --- real TensorRT on a CUDA device (skips without them) -----------------------------------------------------------
#
# Reference everywhere: ONNX Runtime (CPU) on the *plain* export of the same tiny bundle: standard-op Mahalanobis,
# fp32 statistics, uint8 input, dynamic batch, run one frame at a time. What is built and compared:
#
# - the default export (fp16 statistics) in both flavours (standard ops / PadimMahalanobis plugin), with uint8
#   input (TensorRT >= 8.6) and float32 input (every version), dynamic batch, max_batch 4, plain build (strict
#   fp32, TF32 off). Tolerance: scores rtol 1e-3; map |d| <= 1e-3 |ref| + 1e-3 max|ref|. Storing the statistics
#   in fp16 moves this model's scores by <= 7e-5 and its map by <= 1.2e-4 relative (measured with ONNX Runtime),
#   fp32 kernels differ from ONNX Runtime by summation order only.
# - ``--fp16`` (both flavours): scores rtol 2e-2, map |d| <= 2e-2 max|ref|. Rounding every conv input, weight and
#   output of this model to fp16 (a torch emulation) moves scores by <= 1.5e-3 and the map by <= 2.1e-3 of its
#   max; the 10x margin covers TensorRT's fp16 elementwise / pooling / head layers. TensorRT 11 (strongly typed)
#   must refuse ``--fp16`` with the one-line ExportError instead.
# - ``--int8`` calibrated on 18 PNG frames (standard-op flavour): no relative error bound is honest here. INT8
#   scales come from *normal* frames, so activations in anomalous regions clip and anomaly scores compress (an
#   emulation of per-tensor entropy calibration on this random-weight model maps reference scores of 130..220 to
#   50..72 and moves normal frames by up to 23 %). Asserted: calibration bookkeeping (exact), finite and
#   (up to rounding) non-negative outputs, every strong anomaly (reference score >= 3x the highest normal one) still scores above every normal
#   frame, normal frames within a factor of 2 of the reference, and a rebuild reuses the calibration cache.
# Every batch result (N = 1, 3, max_batch, max_batch + 2 in chunks) must match the engine's own per-frame results
# within the same tolerance. Exports go to their own folders: the ONNX may come with an external data file.

MAX_BATCH = 4


@pytest.fixture(scope="session")
def trt_gpu():
    """The tensorrt module, or skip: needs the TensorRT Python bindings and a CUDA device through the runtime's
    own ctypes path (libcudart), not torch: a stock JetPack has no CUDA build of torch. Session scope and first
    in every signature, so a machine without them skips before the tiny bundle is fitted."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        pytest.skip("needs the TensorRT Python bindings ({})".format(exc))
    ok, detail = tensorrt_engine.cuda_device_status()
    if not ok:
        pytest.skip("needs a CUDA device: {}".format(detail))
    return trt


def _takes_uint8(trt):
    major, minor = (int(v) for v in str(trt.__version__).split(".")[:2])
    return (major, minor) >= (8, 6)


def _default_input_dtype(trt):
    return "uint8" if _takes_uint8(trt) else "float32"


def _export(bundle, folder, **kwargs):
    """Export into its own folder (the .onnx may have an external data file next to it); returns the .onnx path."""
    from edgead.exporters.onnx_export import export_onnx

    os.makedirs(str(folder), exist_ok=True)
    path = os.path.join(str(folder), "m.onnx")
    export_onnx(bundle, path, **kwargs)
    return path


@pytest.fixture(scope="module")
def plain_reference(tiny_bundle, tmp_path_factory):
    """frames -> (map, score) from ONNX Runtime CPU on the plain export, one frame at a time."""
    from edgead.runtime.engines.ort_engine import OrtEngine

    path = _export(tiny_bundle, tmp_path_factory.mktemp("plain"), mahalanobis="onnx", precision="fp32",
                   batch="dynamic", input_dtype="uint8")
    engine = OrtEngine(path, providers=("cpu",))

    def run(frames):
        outs = [engine.infer(frames[i:i + 1]) for i in range(len(frames))]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    yield run
    engine.close()


def _need_plugin(mahalanobis):
    if mahalanobis == "plugin":
        try:
            tensorrt_plugin.load_plugin_library()
        except BackendError as exc:
            pytest.skip("plugin flavour: {}".format(exc))


def _assert_close(actual, expected, rtol, map_atol_fraction, what):
    (amap, score), (ref_map, ref_score) = actual, expected
    np.testing.assert_allclose(score, ref_score, rtol=rtol, atol=0, err_msg=what + ": score")
    np.testing.assert_allclose(amap, ref_map, rtol=rtol, atol=map_atol_fraction * float(np.abs(ref_map).max()),
                               err_msg=what + ": anomaly map")


def _check_engine(engine_path, frames, reference, rtol, map_atol_fraction, input_dtype):
    """Per-frame and batched (1, 3, max, max + 2) results against ``reference`` and against each other."""
    with tensorrt_engine.TensorRTEngine(engine_path) as engine:
        info = engine.info()
        assert (info["batch"], info["max_batch"], info["input_dtype"]) == ("dynamic", MAX_BATCH, input_dtype)
        single = [engine.infer(frames[i:i + 1]) for i in range(len(frames))]
        assert engine.info()["last_timings_ms"]["compute_ms"] > 0
        per_frame = (np.concatenate([s[0] for s in single]), np.concatenate([s[1] for s in single]))
        assert per_frame[0].shape == (len(frames), 1) + frames.shape[1:3] and per_frame[1].shape == (len(frames),)
        _assert_close(per_frame, reference, rtol, map_atol_fraction, "per frame vs reference")
        for n in (1, 3, MAX_BATCH, MAX_BATCH + 2):
            amap, score = engine.infer(frames[:n])
            assert amap.shape == (n, 1) + frames.shape[1:3] and score.shape == (n,)
            _assert_close((amap, score), (per_frame[0][:n], per_frame[1][:n]), rtol, map_atol_fraction,
                          "batch of {} vs per frame".format(n))
            _assert_close((amap, score), (reference[0][:n], reference[1][:n]), rtol, map_atol_fraction,
                          "batch of {} vs reference".format(n))
        return per_frame


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("input_dtype", ["uint8", "float32"])
@pytest.mark.parametrize("mahalanobis", ["onnx", "plugin"])
def test_tensorrt_default_export_matches_onnxruntime(trt_gpu, tiny_bundle, plain_reference, tmp_path, mahalanobis,
                                                     input_dtype):
    from conftest import random_frames
    from edgead.exporters.tensorrt_build import build_engine

    if input_dtype == "uint8" and not _takes_uint8(trt_gpu):
        pytest.skip("TensorRT {} has no uint8 network inputs (8.6+)".format(trt_gpu.__version__))
    _need_plugin(mahalanobis)
    onnx_path = _export(tiny_bundle, tmp_path / "export", mahalanobis=mahalanobis, batch="dynamic",
                        input_dtype=input_dtype)  # default precision: fp16 statistics
    engine_path = str(tmp_path / "m.engine")
    summary = build_engine(onnx_path, engine_path, max_batch=MAX_BATCH)
    built = modelinfo.load_model_info(engine_path)["tensorrt"]
    assert built["version"] == trt_gpu.__version__ and summary["tensorrt"] == built
    assert (built["fp16"], built["int8"], built["tf32"], built["max_batch"], built["opt_batch"]) == (
        False, False, False, MAX_BATCH, MAX_BATCH // 2)
    assert built["strongly_typed"] is (tensorrt_engine.tensorrt_major(trt_gpu) >= 11)
    frames = random_frames(MAX_BATCH + 2, seed=5)
    _check_engine(engine_path, frames, plain_reference(frames), 1e-3, 1e-3, input_dtype)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("mahalanobis", ["onnx", "plugin"])
def test_tensorrt_fp16_build_matches_onnxruntime(trt_gpu, tiny_bundle, plain_reference, tmp_path, mahalanobis):
    from conftest import random_frames
    from edgead.exporters.tensorrt_build import build_engine, strongly_typed_only

    _need_plugin(mahalanobis)
    input_dtype = _default_input_dtype(trt_gpu)
    onnx_path = _export(tiny_bundle, tmp_path / "export", mahalanobis=mahalanobis, batch="dynamic",
                        input_dtype=input_dtype)
    engine_path = str(tmp_path / "m.engine")
    if strongly_typed_only(trt_gpu):
        with pytest.raises(ExportError, match="builds strongly typed networks only.*rebuild without --fp16"):
            build_engine(onnx_path, engine_path, fp16=True, max_batch=MAX_BATCH)
        assert not os.path.exists(engine_path)
        return
    try:
        build_engine(onnx_path, engine_path, fp16=True, max_batch=MAX_BATCH)
    except ExportError as exc:
        if "no fast fp16" in str(exc):
            pytest.skip(str(exc))
        raise
    built = modelinfo.load_model_info(engine_path)["tensorrt"]
    assert (built["fp16"], built["int8"], built["strongly_typed"]) == (True, False, False)
    frames = random_frames(MAX_BATCH + 2, seed=5)
    _check_engine(engine_path, frames, plain_reference(frames), 2e-2, 2e-2, input_dtype)


def _anomalous_frames(n, seed):
    """Frames of the training distribution with a saturated square growing from 4 to 4 + 6 (n - 1) pixels."""
    from conftest import random_frames

    frames = random_frames(n, seed=seed).copy()
    for i in range(n):
        size = 4 + 6 * i
        frames[i, 8:8 + size, 8:8 + size] = (255, (255 - 20 * i) % 256, 0)
    return frames


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_int8_calibration_on_png_folder(trt_gpu, tiny_bundle, plain_reference, tmp_path):
    import cv2
    from conftest import random_frames
    from edgead.exporters.tensorrt_build import build_engine, strongly_typed_only

    input_dtype = _default_input_dtype(trt_gpu)
    onnx_path = _export(tiny_bundle, tmp_path / "export", mahalanobis="onnx", batch="dynamic",
                        input_dtype=input_dtype)
    calib = tmp_path / "calib" / "good"
    calib.mkdir(parents=True)
    for i, frame in enumerate(random_frames(18, seed=11)):  # the training distribution, never seen by the fit
        assert cv2.imwrite(str(calib / "{:03d}.png".format(i)), np.ascontiguousarray(frame[..., ::-1]))
    engine_path = str(tmp_path / "m.engine")
    if strongly_typed_only(trt_gpu):
        with pytest.raises(ExportError, match="builds strongly typed networks only.*rebuild without --int8"):
            build_engine(onnx_path, engine_path, int8=True, calib_dir=str(calib), max_batch=MAX_BATCH)
        return
    try:
        summary = build_engine(onnx_path, engine_path, int8=True, calib_dir=str(calib), max_batch=MAX_BATCH)
    except ExportError as exc:
        if "no fast int8" in str(exc):
            pytest.skip(str(exc))
        raise
    calibration = dict(summary["tensorrt"]["int8_calibration"])
    cache = calibration.pop("cache")
    # dynamic batch: calibrator batch = min(max_batch 4, 8, 18 images) = 4 -> 4 batches, 2 images dropped
    assert calibration == {"images": 18, "used": 16, "dropped": 2, "batch": 4, "batches": 4, "from_cache": False}
    assert os.path.getsize(str(tmp_path / cache)) > 0
    assert modelinfo.load_model_info(engine_path)["tensorrt"]["int8"] is True
    normal, anomalous = random_frames(4, seed=7), _anomalous_frames(8, seed=9)
    frames = np.concatenate([normal, anomalous])
    ref_map, ref_score = plain_reference(frames)
    strong = ref_score >= 3 * ref_score[:4].max()
    assert strong[4:].sum() >= 4, ("test data: the reference must see strong anomalies", ref_score)
    with tensorrt_engine.TensorRTEngine(engine_path) as engine:
        assert engine.info()["int8"] is True
        amap, score = engine.infer(frames)  # chunks of max_batch
    assert amap.shape == ref_map.shape and score.shape == ref_score.shape
    assert np.isfinite(amap).all() and np.isfinite(score).all() and amap.min() >= -1e-3 * amap.max()
    assert score[strong].min() > score[:4].max(), ("int8 no longer separates strong anomalies", score, ref_score)
    ratio = score[:4] / ref_score[:4]
    assert ((ratio > 0.5) & (ratio < 2.0)).all(), ("normal frames", score[:4], ref_score[:4])
    # same ONNX, same images: the keyed calibration cache is reused (TensorRT pulls no batch)
    again = build_engine(onnx_path, engine_path, int8=True, calib_dir=str(calib), max_batch=MAX_BATCH)
    assert again["tensorrt"]["int8_calibration"]["cache"] == cache
    assert again["tensorrt"]["int8_calibration"]["from_cache"] is True
