"""``make gpu-check`` (scripts/gpu_check.sh + benchmarks/gpu_check.py + cpp_bindings/tests/kernel_sanitize.cu),
tested without a GPU.

- the no-GPU path: exit 2, one line, nothing pip-installed;
- goal evaluation and the verdict on pinned benchmark rows / summaries;
- compute-sanitizer output parsing on captured-style samples (memcheck, racecheck, synccheck, initcheck,
  unsupported device, crashed target);
- the correctness grid and the whole run_check with a stand-in "GPU": real torch on the CPU and the library's C++
  CPU reference as the kernel (plus defective kernels that the grid must catch);
- the sanitizer driver built by g++ against a stub CUDA runtime whose "launcher" is the CPU reference, with
  planted defects (unwritten output, wrong value, D > MAX_DIM accepted, launch error);
- nvcc builds of the kernel library and the driver for sm_90 (skips without nvcc).
"""
import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import pytest

import cuda_reference as ref
from edgead.errors import BackendError
from edgead.runtime import cuda_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = os.path.join(ROOT, "cpp_bindings")
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.py")
CXX = shutil.which("g++") or shutil.which("c++")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gc = _load("gpu_check", CHECK)
kb = gc.load_module("kernel_bench", os.path.join(ROOT, "benchmarks", "kernel_bench.py"))
NVCC = gc.find_nvcc()


def _cuda_headers():
    folders = [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    if NVCC:
        folders.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "include"))
    folders.append("/usr/local/cuda/include")
    return next((f for f in folders if os.path.exists(os.path.join(f, "cuda_runtime_api.h"))), None)


def _gpu_visible():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# --- the no-GPU path -------------------------------------------------------------------------------------

def _no_gpu_env(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONDONTWRITEBYTECODE="1")
    env.pop("EDGEAD_GPU_CHECK_T0", None)
    return env


def test_script_without_gpu_exits_2_with_one_line_and_installs_nothing(tmp_path):
    """A wrapper interpreter records every call: the script must stop after the preflight (no pip install)."""
    calls = tmp_path / "calls.txt"
    wrapper = tmp_path / "python"
    wrapper.write_text('#!/bin/sh\necho "$@" >> {}\nexec {} "$@"\n'.format(calls, sys.executable))
    wrapper.chmod(0o755)
    env = dict(_no_gpu_env(tmp_path), PYTHON=str(wrapper))
    proc = subprocess.run(["bash", SCRIPT, "--quick"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=300)
    lines = [line for line in proc.stdout.decode().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout.decode()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: "), lines
    assert "GPU" in lines[0] or "torch" in lines[0]
    recorded = calls.read_text()
    assert "--preflight" in recorded and "pip" not in recorded, recorded


def test_script_without_python_exits_2_with_one_line(tmp_path):
    env = dict(_no_gpu_env(tmp_path), PYTHON=str(tmp_path / "no-such-python"))
    proc = subprocess.run(["bash", SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    lines = proc.stdout.decode().strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "no Python interpreter" in lines[0], lines


def test_orchestrator_without_gpu_exits_2_with_one_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, CHECK, "--quick", "--out", str(out)], env=_no_gpu_env(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode == 2
    assert proc.stdout.decode() == ""
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: "), lines
    assert not out.exists()  # nothing built, nothing written


def test_makefile_target_uses_the_script_without_a_venv():
    with open(os.path.join(ROOT, "Makefile")) as fh:
        text = fh.read()
    match = re.search(r"^gpu-check:(.*)\n((?:\t.*\n)+)", text, re.M)
    assert match, "no gpu-check target"
    assert match.group(1).strip() == "", "gpu-check must not depend on the venv stamp"
    recipe = match.group(2)
    assert "scripts/gpu_check.sh" in recipe and "$(PYTHON)" in recipe
    assert "venv" not in recipe and "pip" not in recipe
    assert re.search(r"^\.PHONY:.*\bgpu-check\b", text, re.M)
    assert re.search(r"^PYTHON \?= python3$", text, re.M)


# --- importing edgead from the tree --------------------------------------------------------------------------

def test_package_dirs_match_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml")) as fh:
        text = fh.read()
    line = re.search(r"^package-dir\s*=\s*\{(.*)\}\s*$", text, re.M).group(1)
    mapping = dict(re.findall(r'"([\w.]+)"\s*=\s*"([\w/]+)"', line))
    assert mapping, line
    for package, folder in mapping.items():
        if package in gc.PACKAGE_DIRS:
            assert gc.PACKAGE_DIRS[package] == folder, package
        else:  # a sub-package must sit in its parent's folder, where the parent's __path__ finds it
            parent, _, child = package.rpartition(".")
            assert folder == mapping[parent] + "/" + child, package
    assert set(gc.PACKAGE_DIRS) <= set(mapping)


def test_tree_import_without_any_install(tmp_path):
    """``python -S`` (no site-packages, so no editable install) from another folder: the finder must map the tree."""
    bench = os.path.join(ROOT, "benchmarks")
    control = subprocess.run([sys.executable, "-S", "-c", "import edgead.runtime.cuda_kernel"], cwd=str(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert control.returncode != 0  # without the finder there is no edgead.runtime
    code = ("import sys; sys.path.insert(0, {!r}); import gpu_check; how = gpu_check.ensure_importable(); "
            "import edgead.runtime.cuda_kernel as ck, edgead.runtime.engines.base as base, edgead.exporters as ex, "
            "edgead.errors as er; print(how); print(ck.__file__); print(base.__file__); print(ex.__file__); "
            "print(er.__file__)").format(bench)
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=str(tmp_path), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=60)
    assert proc.returncode == 0, proc.stdout.decode()
    how, kernel, base, exporters, errors = proc.stdout.decode().splitlines()
    assert how == "from the tree"
    assert kernel == os.path.join(ROOT, "runtime", "cuda_kernel.py")
    assert base == os.path.join(ROOT, "runtime", "engines", "base.py")
    assert exporters == os.path.join(ROOT, "exporters", "__init__.py")
    assert errors == os.path.join(ROOT, "edgead", "errors.py")


def test_max_dim_header_is_read():
    assert gc.header_max_dim() == getattr(cuda_kernel, "MAX_DIM", gc.FALLBACK_MAX_DIM)


# --- plans, tolerances, comparisons ---------------------------------------------------------------------------

def test_correctness_plan_covers_the_brief():
    for quick in (False, True):
        plan = gc.correctness_plan(quick, 12280)
        dims = {dim for dim, _, _ in plan}
        assert dims == {1, 7, 33, 100, 550, 12280}
        assert (550, 4096) in {(dim, p) for dim, p, _ in plan}
        for dim, num_patches, batches in plan:
            assert {1, 9, 12} <= set(batches) and max(batches) <= 12
            assert num_patches == {550: num_patches, 12280: 2}.get(dim, 37)
    assert gc.correctness_plan(False, 12280)[0][2] == list(range(1, 13))


def test_tolerance_is_pinned():
    assert gc.tolerance(1) == pytest.approx(2e-5)
    assert gc.tolerance(550) == pytest.approx(2e-5)
    assert gc.tolerance(2200) == pytest.approx(4e-5)
    assert gc.tolerance(12280) == pytest.approx(2e-5 * (12280 / 550) ** 0.5)


def test_compare_flags_unwritten_and_wrong_outputs():
    expected = np.array([[1.0, 2.0, 4.0]])
    assert gc.compare(expected * (1 + 1e-6), expected, 2e-5)[2]
    max_rel, nonfinite, ok = gc.compare(np.array([[1.0, np.nan, 4.0]]), expected, 2e-5)
    assert (nonfinite, ok) == (1, False) and max_rel == 0.0
    max_rel, nonfinite, ok = gc.compare(np.array([[1.0, 2.0, 4.001]]), expected, 2e-5)
    assert nonfinite == 0 and not ok and max_rel == pytest.approx(2.5e-4)


# --- goals, verdict, report -----------------------------------------------------------------------------------

def _row(n, dim, p, dtype, kernel_ms, floor_ms, torch_ms):
    row = {"N": n, "D": dim, "P": p, "whitening": dtype, "kernel_ms": kernel_ms, "floor_ms": floor_ms,
           "pct_of_floor": round(100.0 * floor_ms / kernel_ms, 1), "kernel_gbps": 1000.0,
           "torch_ms": torch_ms, "speedup_vs_torch": None if torch_ms is None else round(torch_ms / kernel_ms, 2)}
    return row


ROWS = [_row(1, 550, 4096, "fp16", 0.50, 0.42, 2.10),   # 84 % of floor, 4.2x
        _row(1, 550, 4096, "fp32", 0.95, 0.83, 3.00),   # 87.4 %, 3.16x
        _row(8, 550, 4096, "fp16", 0.90, 0.43, 2.40),   # 47.8 %, 2.67x
        _row(1, 100, 4096, "fp16", 0.05, 0.02, 0.30)]   # other shape: not in the goals


def test_goals_on_pinned_rows():
    goals = {g["name"]: g for g in gc.evaluate_goals(ROWS)}
    assert goals["bandwidth_batch1"]["status"] == "pass"
    assert goals["bandwidth_batch1"]["worst"] == pytest.approx(84.0)
    assert len(goals["bandwidth_batch1"]["rows"]) == 2
    assert goals["speedup_vs_torch_batch1"]["status"] == "pass"
    assert goals["speedup_vs_torch_batch1"]["worst"] == pytest.approx(3.16)
    assert goals["speedup_vs_torch_all_batches"]["status"] == "fail"
    assert goals["speedup_vs_torch_all_batches"]["worst"] == pytest.approx(2.67)
    failing = [r for r in goals["speedup_vs_torch_all_batches"]["rows"] if not r["ok"]]
    assert [(r["N"], r["whitening"]) for r in failing] == [(8, "fp16")]


def test_goal_thresholds_are_inclusive_and_missing_metrics_not_evaluated():
    exact = [_row(1, 550, 4096, "fp16", 1.0, 0.8, 3.0)]  # exactly 80 % and exactly 3x
    assert [g["status"] for g in gc.evaluate_goals(exact)] == ["pass", "pass", "pass"]
    below = [_row(1, 550, 4096, "fp16", 1.0, 0.799, 2.99)]
    assert [g["status"] for g in gc.evaluate_goals(below)] == ["fail", "fail", "fail"]
    no_baseline = [_row(1, 550, 4096, "fp16", 1.0, 0.9, None)]
    statuses = {g["name"]: g["status"] for g in gc.evaluate_goals(no_baseline)}
    assert statuses == {"bandwidth_batch1": "pass", "speedup_vs_torch_batch1": "not evaluated",
                        "speedup_vs_torch_all_batches": "not evaluated"}
    assert all(g["status"] == "not evaluated" for g in gc.evaluate_goals([]))


def _summary(**overrides):
    summary = {
        "device": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "driver_version": "580.159.04",
                   "cuda_driver_api": "13.0", "nvcc": "13.0.88", "torch": "2.11.0+cu130", "torch_cuda": "13.0",
                   "copy_bandwidth_gbps": 3012.4},
        "package": {"import": "installed"},
        "build": {"arch": "sm_90 + compute_90 PTX", "library": {"status": "pass"}, "driver": {"status": "pass"}},
        "correctness": {"status": "pass", "failed": 0, "errors": [], "skipped": [], "aborted": None,
                        "refusal": {"ok": True}, "worst_rel_err": 3e-6,
                        "cases": [{"N": 1, "D": 550, "P": 4096, "whitening": "fp16", "tol": 2e-5,
                                   "max_rel_err": 3e-6, "nonfinite": 0, "ok": True}]},
        "pytest": {"status": "pass", "tests": 12, "skipped": 0},
        "sanitizer": {"native": {"status": "pass", "cases": 11},
                      "tools": {t: {"status": "pass", "summary": ["ERROR SUMMARY: 0 errors"]}
                                for t in gc.SANITIZER_TOOLS}},
        "benchmark": {"status": "done", "rows": ROWS, "skipped": []},
    }
    summary["goals"] = gc.evaluate_goals(ROWS)
    summary.update(overrides)
    return summary


def test_verdict_passes_with_a_missed_performance_goal():
    summary = _summary()
    failures, incomplete = gc.verdict(summary)
    assert failures == [] and incomplete == []
    report = gc.format_report(summary)
    assert "gpu-check: PASS" in report and "speedup_vs_torch_all_batches fail" in report
    assert "NVIDIA H100" in report and "3012 GB/s" in report


@pytest.mark.parametrize("override,expected", [
    ({"correctness": {"status": "fail", "failed": 1, "cases": [{"N": 9, "D": 33, "P": 37, "whitening": "fp32",
                                                                "tol": 2e-5, "max_rel_err": 1e-3, "nonfinite": 0,
                                                                "ok": False}]}}, "correctness: 1 of 1"),
    ({"pytest": {"status": "fail", "reason": "pytest exit status 1"}}, "pytest -m gpu"),
    ({"sanitizer": {"native": {"status": "pass"}, "tools": {"racecheck": {"status": "fail",
                                                                          "reason": "racecheck reported 3 hazards"}}}},
     "compute-sanitizer racecheck"),
    ({"sanitizer": {"native": {"status": "fail", "reason": "kernel_sanitize: FAILED"}, "tools": {}}},
     "kernel_sanitize"),
    ({"build": {"library": {"status": "fail", "log": "x.log"}, "driver": {"status": "pass"}}}, "build: library"),
])
def test_verdict_fails_on_correctness_test_sanitizer_or_build(override, expected):
    summary = _summary(**override)
    failures, _ = gc.verdict(summary)
    assert any(expected in f for f in failures), failures
    assert "gpu-check: FAIL" in gc.format_report(summary)


def test_missing_sanitizer_is_not_run_never_a_pass():
    not_run = gc.run_sanitizers(None, "/nowhere/kernel_sanitize", "/tmp", False, time.time() + 100, 10)
    assert not_run["status"] == "not run"
    assert {r["status"] for r in not_run["tools"].values()} == {"not run"}
    summary = _summary(sanitizer=dict(not_run, native={"status": "pass", "cases": 11}))
    failures, incomplete = gc.verdict(summary)
    assert failures == []
    assert len([i for i in incomplete if i.startswith("compute-sanitizer")]) == len(gc.SANITIZER_TOOLS)
    report = gc.format_report(summary)
    assert "NOT RUN / INCOMPLETE: compute-sanitizer memcheck: not run" in report
    assert not re.search(r"memcheck\s+pass", report)
    # never a PASS or exit 0 when a sanitizer did not run
    assert gc.exit_status(failures, incomplete) == 3
    assert "gpu-check: INCOMPLETE (correctness/sanitizer exit status 3)" in report and "PASS" not in report


def test_exit_status_ignores_benchmark_gaps_only():
    assert gc.exit_status([], []) == 0
    assert gc.exit_status([], ["benchmark: skipped 3 rows (time budget)"]) == 0
    assert gc.exit_status([], ["pytest -m gpu: not run (pytest is not installed)"]) == 3
    assert gc.exit_status(["correctness: 1 of 4 cases failed"], ["compute-sanitizer racecheck: not run"]) == 1


def test_summary_json_is_strict(tmp_path):
    path = str(tmp_path / "gpu_check.json")
    gc.write_summary(path, {"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": None}})
    with open(path) as fh:
        text = fh.read()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


# --- compute-sanitizer output ---------------------------------------------------------------------------------

DRIVER_OUT = ("kernel_sanitize: N=1 D=1 P=3 fp32 max_rel=0.000e+00 rtol=2.0e-05 ok\n"
              "kernel_sanitize: N=9 D=33 P=4 fp32 max_rel=1.192e-07 rtol=2.0e-05 ok\n"
              "kernel_sanitize: OK (9 cases, 4 refusals)\n")
MEMCHECK_CLEAN = ("========= COMPUTE-SANITIZER\n" + DRIVER_OUT +
                  "========= LEAK SUMMARY: 0 bytes leaked in 0 allocations\n"
                  "========= ERROR SUMMARY: 0 errors\n")
MEMCHECK_OOB = """========= COMPUTE-SANITIZER
========= Invalid __shared__ read of size 4 bytes
=========     at void padim_mahalanobis_kernel<float, (int)8, (int)4>(const float *, const float *, const T1 *, float *, int, int, int)+0x5d0 in padim_mahalanobis.cu:89
=========     by thread (37,0,0) in block (2,0,0)
=========     Address 0xc080 is out of bounds
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame: cudaLaunchKernel [0x4f2a1] in kernel_sanitize
=========
kernel_sanitize: CUDA error cudaErrorLaunchFailure (unspecified launch failure) at cudaStreamSynchronize(stream)
kernel_sanitize: FAILED (1 of 11 cases, CUDA error)
========= Target application returned an error
========= ERROR SUMMARY: 1 error
"""
MEMCHECK_LEAK = ("========= COMPUTE-SANITIZER\n" + DRIVER_OUT +
                 "========= Leaked 1024 bytes at 0x7f3a5c000000\n"
                 "=========     Saved host backtrace up to driver entry point at cudaMalloc time\n"
                 "=========\n"
                 "========= LEAK SUMMARY: 1024 bytes leaked in 1 allocations\n"
                 "========= ERROR SUMMARY: 1 error\n")
RACECHECK_CLEAN = ("========= COMPUTE-SANITIZER\n" + DRIVER_OUT +
                   "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
RACECHECK_HAZARD = """========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at void padim_mahalanobis_kernel<__half, (int)8, (int)8>(const float *, const float *, const T1 *, float *, int, int, int)+0x2a0 in padim_mahalanobis.cu:67
=========     and Read access at void padim_mahalanobis_kernel<__half, (int)8, (int)8>(const float *, const float *, const T1 *, float *, int, int, int)+0x910 in padim_mahalanobis.cu:88 [2048 hazards]
=========
""" + DRIVER_OUT + "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n"
RACECHECK_WARNING = ("========= COMPUTE-SANITIZER\n" + DRIVER_OUT +
                     "========= RACECHECK SUMMARY: 1 hazard displayed (0 errors, 1 warning)\n")
SYNCCHECK_CLEAN = "========= COMPUTE-SANITIZER\n" + DRIVER_OUT + "========= ERROR SUMMARY: 0 errors\n"
SYNCCHECK_BARRIER = """========= COMPUTE-SANITIZER
========= Barrier error detected. Divergent thread(s) in block
=========     at void padim_mahalanobis_kernel<float, (int)1, (int)4>(const float *, const float *, const T1 *, float *, int, int, int)+0x1e0 in padim_mahalanobis.cu:72
=========     by thread (0,0,0) in block (0,0,0)
=========
""" + DRIVER_OUT + "========= ERROR SUMMARY: 1 error\n"
INITCHECK_UNINIT = """========= COMPUTE-SANITIZER
========= Uninitialized __global__ memory read of size 4 bytes
=========     at void padim_mahalanobis_kernel<float, (int)2, (int)4>(const float *, const float *, const T1 *, float *, int, int, int)+0x3f0 in padim_mahalanobis.cu:66
=========     by thread (5,0,0) in block (1,0,0)
=========     Address 0x7f3a5c000200
=========
""" + DRIVER_OUT + "========= ERROR SUMMARY: 1 error\n"
DEVICE_NOT_SUPPORTED = """========= COMPUTE-SANITIZER
========= Error: Device not supported. Please refer to the "Supported Devices" section of the sanitizer documentation
kernel_sanitize: no CUDA device (unknown error)
========= Target application returned an error
========= ERROR SUMMARY: 0 errors
"""
MISMATCH_ZERO_ERRORS = ("========= COMPUTE-SANITIZER\n"
                        "kernel_sanitize: N=9 D=33 P=4 fp32 max_rel=3.100e-03 rtol=2.0e-05 MISMATCH (2 outside rtol, "
                        "0 non-finite of 36)\n"
                        "kernel_sanitize: FAILED (1 of 11 cases)\n"
                        "========= Target application returned an error\n"
                        "========= ERROR SUMMARY: 0 errors\n")
CRASHED_ZERO_HAZARDS = ("========= COMPUTE-SANITIZER\n"
                        "kernel_sanitize: N=1 D=1 P=3 fp32 max_rel=0.000e+00 rtol=2.0e-05 ok\n"
                        "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
NO_SUMMARY = "========= COMPUTE-SANITIZER\n" + DRIVER_OUT


@pytest.mark.parametrize("tool,text,rc,status,fields", [
    ("memcheck", MEMCHECK_CLEAN, 0, "pass", {"errors": 0, "leaked_bytes": 0}),
    ("memcheck", MEMCHECK_OOB, 86, "fail", {"errors": 1}),
    ("memcheck", MEMCHECK_OOB, 1, "fail", {"errors": 1}),        # summary counted even without --error-exitcode
    ("memcheck", MEMCHECK_LEAK, 86, "fail", {"errors": 1, "leaked_bytes": 1024}),
    ("racecheck", RACECHECK_CLEAN, 0, "pass", {"hazards": 0, "warnings": 0}),
    ("racecheck", RACECHECK_HAZARD, 86, "fail", {"hazards": 1}),
    ("racecheck", RACECHECK_WARNING, 0, "fail", {"hazards": 1, "warnings": 1}),
    ("synccheck", SYNCCHECK_CLEAN, 0, "pass", {"errors": 0}),
    ("synccheck", SYNCCHECK_BARRIER, 86, "fail", {"errors": 1}),
    ("initcheck", INITCHECK_UNINIT, 86, "fail", {"errors": 1}),
    ("memcheck", DEVICE_NOT_SUPPORTED, 2, "tool error", {"errors": 0}),
    ("memcheck", MISMATCH_ZERO_ERRORS, 1, "fail", {"errors": 0}),  # the driver's verdict counts too
    ("racecheck", CRASHED_ZERO_HAZARDS, -11, "fail", {"hazards": 0}),  # a zero summary of a crashed target
    ("memcheck", NO_SUMMARY, 0, "tool error", {"errors": None}),
    ("synccheck", SYNCCHECK_CLEAN, 86, "fail", {"errors": 0}),
    ("initcheck", "========= COMPUTE-SANITIZER\n========= Error: Unrecognized option '--tool initcheck'\n", 1,
     "tool error", {}),
])
def test_parse_sanitizer_output(tool, text, rc, status, fields):
    result = gc.parse_sanitizer_output(tool, text, rc)
    assert result["status"] == status, result
    for key, value in fields.items():
        assert result[key] == value, (key, result)
    if status == "pass":
        assert result["reason"] is None
    else:
        assert result["reason"]


def test_parse_requires_the_tools_own_summary():
    # racecheck's verdict is its RACECHECK SUMMARY; an ERROR SUMMARY from memcheck's sample is not enough for
    # memcheck to be missing its line, and a racecheck run with neither line is not a pass
    assert gc.parse_sanitizer_output("racecheck", NO_SUMMARY, 0)["status"] == "tool error"
    assert gc.parse_sanitizer_output("memcheck", RACECHECK_CLEAN, 0)["status"] == "tool error"


# --- kernel_bench helpers -------------------------------------------------------------------------------------

def test_derived_columns_are_pinned():
    assert kb.derived(1e9, 1.0, 2000.0) == {"floor_ms": 0.5, "kernel_gbps": 1000.0, "kernel_vs_floor": 2.0,
                                            "pct_of_floor": 50.0}
    assert kb.grid_configs([1, 8], [100, 550], [4096]) == ["1x100x4096", "8x100x4096", "1x550x4096", "8x550x4096"]
    assert kb.parse_config("12x550x4096") == (12, 550, 4096)


def test_kernel_bench_outputs(tmp_path):
    rows = [dict(r, max_rel_diff_vs_torch=float("nan"), stats_mb=1.0, kernel_vs_floor=1.2) for r in ROWS]
    rows[3]["torch_ms"] = rows[3]["speedup_vs_torch"] = None
    result = {"device": "fake", "copy_bandwidth_gbps": 3000.0, "torch": "x", "rows": rows, "skipped": []}
    plot_path, reason = kb.write_outputs(str(tmp_path), result)
    with open(str(tmp_path / "kernel_bench.csv")) as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["N"]) for r in table] == [1, 1, 8, 1] and table[0]["pct_of_floor"] == "84.0"
    payload = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert payload["rows"][0]["max_rel_diff_vs_torch"] is None  # strict JSON
    if importlib.util.find_spec("matplotlib") is not None:
        assert reason is None and plot_path == str(tmp_path / "kernel_bench.png")
        assert (tmp_path / "kernel_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pct_of_floor" in kb.format_table(rows)


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path, reason = kb.plot(ROWS, str(tmp_path / "p.png"))
    assert path is None and "matplotlib" in reason
    assert not (tmp_path / "p.png").exists()


def test_run_stops_starting_rows_after_the_deadline(monkeypatch):
    started = []
    monkeypatch.setattr(kb, "bench_one", lambda *a: started.append(a[3:7]) or {"N": a[3]})
    fake = types.SimpleNamespace(__version__="x", cuda=types.SimpleNamespace(get_device_name=lambda: "fake"))
    result = kb.run(fake, None, None, ["1x4x8", "2x4x8"], ["fp16", "fp32"], bandwidth=100.0,
                    deadline=time.time() + 60, log=lambda m: None)
    assert len(result["rows"]) == 4 and result["skipped"] == []
    result = kb.run(fake, None, None, ["1x4x8", "2x4x8"], ["fp16"], bandwidth=100.0, deadline=time.time() - 1,
                    log=lambda m: None)
    assert result["rows"] == [] and result["skipped"] == ["1x4x8 fp16", "2x4x8 fp16"]


# --- a stand-in GPU: CPU torch + the C++ CPU reference as the kernel -------------------------------------------

@pytest.fixture(scope="module")
def cpu_lib(cpu_reference_lib):
    """The C++ CPU reference without CUDA (conftest.cpu_reference_lib)."""
    return cpu_reference_lib


class _Event(object):
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return max((other.t - self.t) * 1e3, 1e-4)


class FakeTorch(object):
    """torch on the CPU behind the handful of CUDA calls the check makes (``device="cuda"`` dropped)."""

    def __init__(self):
        import torch

        self._torch = torch
        self.__version__ = torch.__version__
        self.version = types.SimpleNamespace(cuda="13.0")
        props = types.SimpleNamespace(name="Fake GPU (CPU torch)", major=9, minor=0, multi_processor_count=132,
                                      total_memory=80 * 2 ** 30, L2_cache_size=50 * 2 ** 20)
        self.cuda = types.SimpleNamespace(
            Event=_Event, is_available=lambda: True, device_count=lambda: 1, synchronize=lambda: None,
            empty_cache=lambda: None, current_stream=lambda: types.SimpleNamespace(cuda_stream=0),
            get_device_name=lambda index=0: props.name, get_device_capability=lambda index=0: (9, 0),
            get_device_properties=lambda index=0: props, mem_get_info=lambda: (64 * 2 ** 30, 80 * 2 ** 30))

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def Generator(self, device=None):
        return self._torch.Generator()

    def _cpu(name):
        def call(self, *args, **kwargs):
            kwargs.pop("device", None)
            return getattr(self._torch, name)(*args, **kwargs)
        return call

    randn = _cpu("randn")
    full = _cpu("full")
    empty = _cpu("empty")
    zeros = _cpu("zeros")
    as_tensor = _cpu("as_tensor")


def _fake_kernel(cpu_lib, defect=None):
    """A stand-in ``cuda_kernel`` module: the C++ CPU reference writes ``out``; ``defect`` plants a bug."""
    def padim_mahalanobis(x, mean, w, out, stream=0, lib=None):
        import torch

        got = cuda_kernel.padim_mahalanobis_cpu(x.numpy(), mean.numpy(), w.numpy(), lib=cpu_lib)
        if defect == "unwritten":
            got[-1, -1] = np.nan  # as if the last image of the last patch were never stored
        elif defect == "wrong" and x.shape[1] == 33:
            got[0, 0] *= 1 + 1e-3
        out.copy_(torch.from_numpy(got))
        return out

    def padim_mahalanobis_raw(x, mean, w, w_is_half, out, n, dim, num_patches, stream=0, lib=None):
        if defect == "accepts_large_d":
            return
        # the C++ reference applies the same argument checks (EDGEAD_MAX_DIM from the header)
        buf = np.zeros(64, np.float32)
        status = cpu_lib.edgead_padim_mahalanobis_cpu(buf.ctypes.data, buf.ctypes.data, buf.ctypes.data, 0,
                                                      buf.ctypes.data, n, dim, num_patches)
        if status != 0:
            raise BackendError("edgead_padim_mahalanobis(N={}, D={}, P={}) failed: {}".format(
                n, dim, num_patches, cpu_lib.edgead_status_string(status).decode()))

    return types.SimpleNamespace(padim_mahalanobis=padim_mahalanobis, padim_mahalanobis_raw=padim_mahalanobis_raw,
                                 load_library=lambda path=None: cpu_lib, MAX_DIM=gc.FALLBACK_MAX_DIM)


SMALL_PLAN = [(7, 5, [1, 3, 9]), (33, 4, [2, 12]), (1, 3, [1])]


def test_correctness_grid_passes_a_correct_kernel(cpu_lib):
    result = gc.run_correctness(FakeTorch(), _fake_kernel(cpu_lib), cpu_lib, ref, SMALL_PLAN, gc.FALLBACK_MAX_DIM,
                                time.time() + 300)
    assert result["status"] == "pass", result
    assert len(result["cases"]) == 2 * (3 + 2 + 1) and result["failed"] == 0
    assert {c["whitening"] for c in result["cases"]} == {"fp16", "fp32"}
    assert result["refusal"]["ok"] and "invalid argument" in result["refusal"]["detail"]
    assert 0 < result["worst_rel_err"] < 2e-5  # fp32 arithmetic really was compared against float64


@pytest.mark.parametrize("defect,check", [
    ("unwritten", lambda r: all(c["nonfinite"] == 1 for c in r["cases"] if not c["ok"]) and r["failed"] == 12),
    ("wrong", lambda r: r["failed"] == 4 and all(c["D"] == 33 for c in r["cases"] if not c["ok"])),
    ("accepts_large_d", lambda r: r["failed"] == 0 and not r["refusal"]["ok"]),
])
def test_correctness_grid_catches_a_defective_kernel(cpu_lib, defect, check):
    result = gc.run_correctness(FakeTorch(), _fake_kernel(cpu_lib, defect), cpu_lib, ref, SMALL_PLAN,
                                gc.FALLBACK_MAX_DIM, time.time() + 300)
    assert result["status"] == "fail"
    assert check(result), result
    failures, _ = gc.verdict({"correctness": result})
    assert failures and failures[0].startswith("correctness:")


def test_correctness_grid_skips_after_the_deadline(cpu_lib):
    result = gc.run_correctness(FakeTorch(), _fake_kernel(cpu_lib), cpu_lib, ref, SMALL_PLAN, gc.FALLBACK_MAX_DIM,
                                time.time() - 1)
    assert result["cases"] == [] and len(result["skipped"]) == 3
    assert any("skipped" in i for i in gc.verdict({"correctness": result})[1])


# --- the sanitizer driver against a stub CUDA runtime (g++, no GPU) -------------------------------------------

STUB_RUNTIME = r"""
// Host-memory stand-in for the CUDA runtime calls kernel_sanitize makes; the "launcher" is the CPU reference.
#include <cuda_runtime_api.h>
#include <cstdlib>
#include <cstring>
#include <string>
#include "edgead/padim_mahalanobis.h"

static std::string defect() { const char* d = std::getenv("STUB_DEFECT"); return d ? d : ""; }

extern "C" {
const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorStub"; }
const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "stub error"; }
cudaError_t cudaGetDeviceCount(int* count) { *count = defect() == "nodevice" ? 0 : 1; return cudaSuccess; }
cudaError_t cudaMalloc(void** p, size_t n) { *p = std::malloc(n ? n : 1); return *p ? cudaSuccess : cudaErrorMemoryAllocation; }
cudaError_t cudaFree(void* p) { std::free(p); return cudaSuccess; }
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, enum cudaMemcpyKind, cudaStream_t) {
    std::memcpy(dst, src, n); return cudaSuccess; }
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) {
    return defect() == "sync_error" ? cudaErrorIllegalAddress : cudaSuccess; }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned int) { *s = nullptr; return cudaSuccess; }
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaDeviceReset(void) { return cudaSuccess; }

int edgead_padim_mahalanobis(const float* x, const float* mean, const void* w, int half, float* out, int N, int D,
                             int P, cudaStream_t) {
    if (defect() == "accept_large_d" && D > EDGEAD_MAX_DIM) return EDGEAD_OK;
    if (!x || !mean || !w || !out || N < 1 || D < 1 || P < 1 || D > EDGEAD_MAX_DIM) return EDGEAD_ERR_INVALID_ARGUMENT;
    if (defect() == "launch_error") return EDGEAD_ERR_CUDA;
    const float first = out[0];
    const int status = edgead_padim_mahalanobis_cpu(x, mean, w, half, out, N, D, P);
    if (defect() == "unwritten" && N * P > 1) out[(size_t)N * P - 1] = first;   // the NaN poison stays
    if (defect() == "wrong" && D == 33) out[0] *= 1.001f;
    return status;
}
}
"""


@pytest.fixture(scope="module")
def stub_driver(tmp_path_factory):
    include = _cuda_headers()
    if CXX is None or include is None:
        pytest.skip("needs g++ and the CUDA headers")
    folder = tmp_path_factory.mktemp("stub")
    stub = folder / "stub_runtime.cpp"
    stub.write_text(STUB_RUNTIME)
    exe = str(folder / "kernel_sanitize_stub")
    cmd = [CXX, "-std=c++17", "-O1", "-x", "c++", "-I" + include, "-I" + os.path.join(NATIVE, "include"),
           "-I" + os.path.join(NATIVE, "src"), gc.DRIVER_SOURCE, str(stub),
           os.path.join(NATIVE, "src", "padim_mahalanobis_ref.cpp"), "-o", exe]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout.decode()[-3000:]
    return exe


def _run_stub(exe, args, defect=None):
    env = dict(os.environ)
    if defect:
        env["STUB_DEFECT"] = defect
    proc = subprocess.run([exe] + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    return proc.returncode, proc.stdout.decode()


def test_driver_passes_a_correct_launcher(stub_driver):
    rc, text = _run_stub(stub_driver, [])  # every built-in case, incl. D = 6000 and D = EDGEAD_MAX_DIM
    assert rc == 0, text
    assert "kernel_sanitize: OK (11 cases, 4 refusals)" in text
    assert "D={} ".format(gc.header_max_dim()) in text and "D=6000 " in text
    cases = re.findall(r"N=(\d+) D=(\d+) P=(\d+) (fp16|fp32) max_rel=(\S+)", text)
    assert len(cases) == 11
    assert any(int(n) > 8 and int(n) % 8 for n, _, _, _, _ in cases)  # N not a multiple of the batch tile
    assert any(int(d) % 32 for _, d, _, _, _ in cases)                 # D not a multiple of a warp
    assert {dtype for _, _, _, dtype, _ in cases} == {"fp16", "fp32"}
    wrapped = "========= COMPUTE-SANITIZER\n" + text + "========= ERROR SUMMARY: 0 errors\n"
    assert gc.parse_sanitizer_output("memcheck", wrapped, rc)["status"] == "pass"


def test_driver_small_and_explicit_cases(stub_driver):
    rc, text = _run_stub(stub_driver, ["--small"])
    assert rc == 0 and "OK (9 cases" in text and "D=6000" not in text, text
    rc, text = _run_stub(stub_driver, ["3,40,2,fp16", "1,5,1,fp32"])
    assert rc == 0 and "OK (2 cases" in text and "N=3 D=40 P=2 fp16" in text, text
    for bad in ("3,40,2,bf16", "3,40", "0,4,1,fp32", "1,{},1,fp32".format(gc.header_max_dim() + 1)):
        rc, text = _run_stub(stub_driver, [bad])
        assert rc == 2 and "bad argument" in text, (bad, text)


@pytest.mark.parametrize("defect,message", [
    ("unwritten", "non-finite"),
    ("wrong", "MISMATCH"),
    ("accept_large_d", "D = EDGEAD_MAX_DIM + 1: launcher returned 0"),
    ("launch_error", "launcher returned 2"),
    ("sync_error", "CUDA error"),
])
def test_driver_catches_planted_defects(stub_driver, defect, message):
    rc, text = _run_stub(stub_driver, ["--small"], defect)
    assert rc == 1, text
    assert message in text and "kernel_sanitize: FAILED" in text, text
    wrapped = "========= COMPUTE-SANITIZER\n" + text + "========= ERROR SUMMARY: 0 errors\n"
    assert gc.parse_sanitizer_output("memcheck", wrapped, rc)["status"] == "fail"


def test_driver_without_device_exits_2(stub_driver):
    rc, text = _run_stub(stub_driver, [], "nodevice")
    assert rc == 2 and "no CUDA device" in text


# --- nvcc builds (compile only here) ------------------------------------------------------------------------

@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_gencode_for_known_and_unknown_archs():
    flags, text = gc.gencode_for(NVCC, (9, 0))
    assert flags == ["-gencode", "arch=compute_90,code=[sm_90,compute_90]"] and "sm_90" in text
    flags, text = gc.gencode_for(NVCC, (9, 9))  # no such arch: the newest older one, as PTX
    assert re.match(r"arch=compute_(\d+),code=compute_\1$", flags[1]) and "JIT" in text
    with pytest.raises(RuntimeError):
        gc.gencode_for(NVCC, (1, 0))


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_nvcc_builds_library_and_sanitizer_driver_for_sm90(tmp_path):
    gencode, _ = gc.gencode_for(NVCC, (9, 0))
    library = gc.build_library(NVCC, gencode, str(tmp_path))
    driver = gc.build_driver(NVCC, gencode, str(tmp_path))
    assert library["status"] == "pass", library["tail"]
    assert driver["status"] == "pass", driver["tail"]
    symbols = subprocess.run(["nm", "-D", "--defined-only", library["output"]], stdout=subprocess.PIPE).stdout.decode()
    for name in ("edgead_padim_mahalanobis", "edgead_padim_mahalanobis_cpu", "edgead_kernels_abi_version"):
        assert " T " + name in symbols
    sass = subprocess.run(["cuobjdump", "--list-elf", driver["output"]], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) if shutil.which("cuobjdump") else None
    if sass is not None and sass.returncode == 0:
        assert "sm_90" in sass.stdout.decode()
    proc = subprocess.run([driver["output"], "--small"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=300)
    text = proc.stdout.decode()
    if _gpu_visible():
        assert proc.returncode == 0 and gc.DRIVER_OK in text, text
    else:
        assert proc.returncode == 2 and "no CUDA device" in text, text
        assert gc.parse_sanitizer_output("memcheck", text + "========= ERROR SUMMARY: 0 errors\n", 2)["status"] == \
            "tool error"
    # a second build over the first (the check is run twice) replaces the outputs in place
    again = gc.build_library(NVCC, gencode, str(tmp_path))
    assert again["status"] == "pass" and not os.path.exists(library["output"] + ".tmp")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_broken_source_is_a_build_failure(tmp_path, monkeypatch):
    bad = tmp_path / "bad.cu"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(gc, "KERNEL_SOURCES", [str(bad)])
    result = gc.build_library(NVCC, ["-gencode", "arch=compute_90,code=sm_90"], str(tmp_path))
    assert result["status"] == "fail" and result["output"] is None and result["tail"]
    assert not os.path.exists(str(tmp_path / gc.LIBRARY_NAME))
    failures, _ = gc.verdict({"build": {"library": result, "driver": {"status": "pass"}}})
    assert failures and failures[0].startswith("build: library failed")


# --- pytest plumbing and the whole run with the stand-in GPU ---------------------------------------------------

@pytest.mark.skipif(_gpu_visible(), reason="on a GPU machine the gpu tests run instead of skipping")
def test_run_pytest_treats_all_skipped_gpu_tests_as_failure(tmp_path):
    result = gc.run_pytest(str(tmp_path), str(tmp_path / "nowhere.so"), False, timeout=300)
    assert result["status"] == "fail" and "skipped" in result["reason"], result
    assert result["tests"] >= 12 and result["skipped"] == result["tests"] and result["failures"] == 0


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_run_check_end_to_end_with_a_stand_in_gpu(tmp_path, monkeypatch, cpu_lib):
    """run_check's glue: real nvcc builds (sm_90), the correctness grid and the benchmark on CPU torch with the
    C++ reference as the kernel, the real driver (no device here) and no compute-sanitizer."""
    fake_torch = FakeTorch()
    fake = _fake_kernel(cpu_lib)
    monkeypatch.setattr(gc, "preflight", lambda: (fake_torch, NVCC))
    monkeypatch.setattr(gc, "correctness_plan", lambda quick, max_dim: [(7, 5, [1, 9]), (33, 3, [2])])
    monkeypatch.setattr(gc, "QUICK_BENCH", {"batches": [1, 2], "dims": [12], "patches": [6], "extra": [],
                                            "warmup": 1, "iters": 2})
    monkeypatch.setattr(gc, "run_pytest", lambda *a, **k: {"status": "pass", "tests": 12, "skipped": 0})
    monkeypatch.setattr(gc, "find_compute_sanitizer", lambda nvcc=None: None)
    monkeypatch.setattr(cuda_kernel, "padim_mahalanobis", fake.padim_mahalanobis)
    monkeypatch.setattr(cuda_kernel, "padim_mahalanobis_raw", fake.padim_mahalanobis_raw)
    real_load = gc.load_module

    def load_module(name, path):
        module = real_load(name, path)
        if name == "kernel_bench":
            module.copy_bandwidth_gbps = lambda torch: 1000.0
        return module

    monkeypatch.setattr(gc, "load_module", load_module)
    out = tmp_path / "out"
    status = gc.main(["--quick", "--out", str(out)])
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["last_stage"] == "done"
    assert summary["build"]["library"]["status"] == "pass" and summary["build"]["driver"]["status"] == "pass"
    assert summary["device"]["compute_capability"] == "9.0" and summary["device"]["copy_bandwidth_gbps"] == 1000.0
    assert summary["correctness"]["status"] == "pass" and len(summary["correctness"]["cases"]) == 6
    assert summary["package"]["max_dim_used"] == summary["package"]["max_dim_header"]
    assert {r["status"] for r in summary["sanitizer"]["tools"].values()} == {"not run"}
    rows = summary["benchmark"]["rows"]
    assert [(r["N"], r["D"], r["P"], r["whitening"]) for r in rows] == [
        (1, 12, 6, "fp16"), (1, 12, 6, "fp32"), (2, 12, 6, "fp16"), (2, 12, 6, "fp32")]
    assert all(r["max_rel_diff_vs_torch"] < 1e-2 for r in rows)  # the torch baseline computes the same distances
    assert {g["status"] for g in summary["goals"]} == {"not evaluated"}  # no D=550, P=4096 row in this grid
    assert (out / "kernel_bench.csv").exists() and (out / gc.LIBRARY_NAME).exists()
    # no GPU here: the real driver finds no device, which is a failure of the run (exit 1), not a pass
    assert summary["sanitizer"]["native"]["status"] == "fail"
    assert status == 1 and summary["exit_status"] == 1 and not summary["ok"]
    assert any(f.startswith("kernel_sanitize") for f in summary["failures"])
