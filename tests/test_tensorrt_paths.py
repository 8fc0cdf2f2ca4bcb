"""TensorRT paths: `edgead build`, the TensorRT engine backend and the plugin loader.

Without TensorRT (CI) these check the error paths: one-line messages, exit code 2, the right error class,
the version/GPU checks of the sidecar (through a stand-in ``tensorrt`` module). With TensorRT and a GPU the
``tensorrt``-marked test builds the plugin and the standard-op flavour of a tiny model and compares them with
ONNX Runtime. The plugin header compile-check runs when TensorRT headers are available ($EDGEAD_TRT_INCLUDE).
"""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from edgead.errors import BackendError, ExportError, ModelFileError
from edgead.runtime import modelinfo, tensorrt_plugin
from edgead.runtime.engines import base, tensorrt_engine
from fake_models import fake_metadata, write_fake_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_cli(args, cwd, block_tensorrt=True):
    """Run ``edgead ARGS`` in a fresh interpreter (tensorrt made unimportable); returns CompletedProcess."""
    code = ("import sys\n"
            + ("sys.modules['tensorrt'] = None\n" if block_tensorrt else "")
            + "from edgead.cli import main\nsys.exit(main({!r}))\n".format(list(args)))
    return subprocess.run([sys.executable, "-c", code], cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=120)


def _fake_trt(version="10.3.0", engine=None, registered=True):
    """A stand-in ``tensorrt`` module with just what the code paths before CUDA work need."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class Logger(object):
        WARNING, VERBOSE = 2, 4

        def __init__(self, level=None):
            self.level = level

    class Runtime(object):
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return engine

    class Registry(object):
        def get_creator(self, name, version, namespace):
            return object() if registered and (name, version, namespace) == ("PadimMahalanobis", "1", "") else None

    trt.Logger, trt.Runtime = Logger, Runtime
    trt.get_plugin_registry = lambda: Registry()
    return trt


class _FakeCuda(object):
    def __init__(self, device=0):
        self.device = device

    def device_name(self):
        return "Fake GPU"


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
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt())
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
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt("10.3.0"))
    with pytest.raises(ModelFileError, match=r"built with TensorRT 8\.6\.1 but this is TensorRT 10\.3\.0"):
        tensorrt_engine.TensorRTEngine(path)


def test_engine_built_for_other_gpu(tmp_path, monkeypatch):
    path = _engine_with_sidecar(tmp_path, {"version": "10.3.0", "gpu": "Orin"})
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt("10.3.0"))
    monkeypatch.setattr(tensorrt_engine, "CudaRuntime", _FakeCuda)
    with pytest.raises(ModelFileError, match="built for GPU 'Orin' but this is 'Fake GPU'"):
        tensorrt_engine.TensorRTEngine(path)


def test_engine_garbage_plan_cannot_deserialize(tmp_path, monkeypatch):
    path = _engine_with_sidecar(tmp_path, {"version": "10.3.0", "gpu": "Fake GPU"})
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt("10.3.0", engine=None))
    monkeypatch.setattr(tensorrt_engine, "CudaRuntime", _FakeCuda)
    with pytest.raises(ModelFileError, match=r"m\.engine: TensorRT 10\.3\.0 cannot deserialize"):
        tensorrt_engine.TensorRTEngine(path)


def test_plugin_engine_needs_plugin_library(tmp_path, monkeypatch):
    path = _engine_with_sidecar(tmp_path, {"version": "10.3.0"}, mahalanobis="plugin")
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt("10.3.0"))
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
    assert tensorrt_plugin.is_registered(_fake_trt(registered=True))
    assert not tensorrt_plugin.is_registered(_fake_trt(registered=False))
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


# --- real TensorRT (skips without it) -----------------------------------------------------------------------

def _have_tensorrt_gpu():
    try:
        import tensorrt  # noqa: F401
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not _have_tensorrt_gpu(), reason="needs TensorRT and a CUDA GPU")
@pytest.mark.parametrize("mahalanobis", ["onnx", "plugin"])
def test_tensorrt_engine_matches_onnxruntime(tiny_bundle, tmp_path, mahalanobis):
    from conftest import random_frames
    from edgead.exporters.onnx_export import export_onnx
    from edgead.exporters.tensorrt_build import build_engine
    from edgead.runtime.engines.ort_engine import OrtEngine

    if mahalanobis == "plugin":
        try:
            tensorrt_plugin.load_plugin_library()
        except BackendError as exc:
            pytest.skip(str(exc))
    onnx_path = str(tmp_path / "m.onnx")
    export_onnx(tiny_bundle, onnx_path, mahalanobis=mahalanobis, precision="fp32", batch=2)
    engine_path = str(tmp_path / "m.engine")
    build_engine(onnx_path, engine_path)
    assert modelinfo.load_model_info(engine_path)["tensorrt"]["version"]
    frames = random_frames(3, seed=5)
    with tensorrt_engine.TensorRTEngine(engine_path) as engine:
        amap, score = engine.infer(frames)
        assert engine.info()["last_timings_ms"]["compute_ms"] > 0
    reference_onnx = str(tmp_path / "ref.onnx")
    export_onnx(tiny_bundle, reference_onnx, mahalanobis="onnx", precision="fp32", batch=2)
    ref_map, ref_score = OrtEngine(reference_onnx).infer(frames)
    np.testing.assert_allclose(score, ref_score, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(amap, ref_map, rtol=1e-3, atol=1e-3)
