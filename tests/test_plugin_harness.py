"""The TensorRT plugin driven the way TensorRT drives it, without TensorRT or a GPU.

``cpp_bindings/tests/plugin_harness.cpp`` is compiled with g++ (AddressSanitizer + UBSan) against each TensorRT
header folder in ``EDGEAD_TRT_INCLUDE`` (``dir[:dir...]``), with the plugin registry and the kernel stubbed: fields
built like the ONNX parser builds them, 8.x serialize -> deserialize -> clone, 10.x/11.x getFieldsToSerialize ->
createPlugin(kRUNTIME) -> attachToContext, format combinations (the statistics only in the dtype the file stored),
shape rejection, and the exact arguments enqueue passes to the kernel. Get header folders with
``git --git-dir=<TensorRT mirror> archive <tag> include | tar -x -C /tmp/trt-<tag>`` (docs/tensorrt.md).
"""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "cpp_bindings", "tests", "run_plugin_harness.sh")


def _header_dirs():
    env = os.environ.get("EDGEAD_TRT_INCLUDE", "")
    return [d for d in env.split(os.pathsep) if d and os.path.exists(os.path.join(d, "NvInferVersion.h"))]


def _cuda_headers():
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "include"), "/usr/local/cuda/include"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include"))
    return any(os.path.exists(os.path.join(c, "cuda_runtime_api.h")) for c in candidates)


needs_headers = pytest.mark.skipif(
    not _header_dirs() or not shutil.which(os.environ.get("CXX", "g++")) or not _cuda_headers(),
    reason="set EDGEAD_TRT_INCLUDE=dir[:dir...] to TensorRT include folders (plus g++ and CUDA headers)")


@needs_headers
@pytest.mark.parametrize("include_dir", _header_dirs() or ["none"])
def test_plugin_harness_passes(include_dir):
    proc = subprocess.run(["bash", SCRIPT, include_dir], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=600)
    text = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    summary = re.search(r"plugin harness: TensorRT (\d+)\.\d+\.\d+ \((\w+)\): (\d+) checks, 0 failures", text)
    assert summary, text
    major, interface, checks = int(summary.group(1)), summary.group(2), int(summary.group(3))
    assert interface == ("IPluginV3" if major >= 10 else "IPluginV2DynamicExt")
    assert checks >= 170  # the harness really ran its checks (not an empty main)


def test_harness_script_refuses_missing_folder(tmp_path):
    if not shutil.which("bash"):
        pytest.skip("no bash")
    proc = subprocess.run(["bash", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert proc.returncode == 2 and b"usage" in proc.stdout
    if _cuda_headers():
        proc = subprocess.run(["bash", SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=60)
        assert proc.returncode == 1 and b"no NvInferVersion.h" in proc.stdout
