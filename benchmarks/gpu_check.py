"""One command for a GPU machine (issue #10): build the PaDiM kernel for this GPU, check it, sanitize it, time it.

    bash scripts/gpu_check.sh [--quick] [--out DIR]        # = make gpu-check [GPU_CHECK_ARGS=--quick]
    python benchmarks/gpu_check.py [--quick] [--out DIR]   # the same without the editable install

Needs an NVIDIA GPU, nvcc and a Python with numpy and a CUDA build of torch; nothing is downloaded or pip-installed.
Optional: pytest (the ``gpu``-marked tests), compute-sanitizer (next to nvcc or on PATH), matplotlib (the plot).
Steps, everything under --out (default build/gpu_check/):
  1. preflight: no GPU, no nvcc or no torch -> one line on stderr, exit 2
  2. nvcc: libedgead_kernels.so for this GPU's compute capability (sm_XY + PTX) and the sanitizer driver
     kernel_sanitize (cpp_bindings/tests/kernel_sanitize.cu linked with the kernel sources)
  3. correctness grid against the float64 reference of tests/cuda_reference.py: N = 1..12, D in {1, 7, 33, 100,
     550} at P = 37, D = 550 at P = 4096, D = MAX_DIM at P = 2, fp16 and fp32 whitening (fp16 against the float64
     distance of the fp16-rounded weights); every output must be written (NaN-poisoned) and within
     rtol(D) = 2e-5 * max(1, sqrt(D / 550)) (fp32 accumulation); D = MAX_DIM + 1 must be refused
  4. pytest -m gpu tests/test_cuda_kernel.py with that library (when pytest is importable)
  5. kernel_sanitize natively, then under compute-sanitizer memcheck (+ leak check), racecheck, synccheck,
     initcheck ("not run" when compute-sanitizer is missing: never counted as a pass)
  6. benchmarks/kernel_bench.py: kernel vs bandwidth floor vs torch bmm per (N, D, P, dtype), plot if matplotlib
  7. gpu_check.json (+ the table printed): device, versions, copy bandwidth, every result above, goals
     (>= 80 % of the bandwidth floor at batch 1, >= 3x torch bmm; reported, never fatal)
Exit status: 0 every build, correctness, test and sanitizer check ran and passed (performance goals may have
missed), 1 one of them failed, 2 no GPU / nvcc / torch, 3 none failed but one did not run or not to the end
(no compute-sanitizer, no pytest, time budget): the table lists them as NOT RUN / INCOMPLETE. --quick: smaller N lists, small sanitizer cases, short benchmark.
The whole run is sized for well under 8 minutes on an H100; --deadline-s stops starting new work after that many
seconds (counted from $EDGEAD_GPU_CHECK_T0, which scripts/gpu_check.sh sets) and records what was skipped.
"""
import argparse
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = os.path.join(ROOT, "cpp_bindings")
KERNEL_SOURCES = [os.path.join(NATIVE, "src", "padim_mahalanobis.cu"),
                  os.path.join(NATIVE, "src", "padim_mahalanobis_ref.cpp")]
DRIVER_SOURCE = os.path.join(NATIVE, "tests", "kernel_sanitize.cu")
HEADER = os.path.join(NATIVE, "include", "edgead", "padim_mahalanobis.h")
DEFAULT_OUT = os.path.join(ROOT, "build", "gpu_check")
LIBRARY_NAME = "libedgead_kernels.so"
DRIVER_NAME = "kernel_sanitize"
FALLBACK_MAX_DIM = 12280
# pyproject.toml [tool.setuptools] package-dir (the sub-packages below these follow their folders);
# tests/test_gpu_check.py keeps the two equal.
PACKAGE_DIRS = {"edgead": "edgead", "edgead.exporters": "exporters", "edgead.runtime": "runtime"}
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
SANITIZER_FLAGS = {"memcheck": ["--leak-check", "full"], "racecheck": [], "synccheck": [], "initcheck": []}
SANITIZER_EXITCODE = 86  # --error-exitcode: the sanitizer found errors
DRIVER_OK = "kernel_sanitize: OK"
GPU_TEST_FILES = ["tests/test_cuda_kernel.py"]
BENCH_GRACE_S = 60  # benchmark rows may start until deadline + this (the other stages stop at the deadline)
REFERENCE_CHUNK_BYTES = 2e8  # float64 dense triangles per chunk of the numpy reference
GOALS = (
    {"name": "bandwidth_batch1", "metric": "pct_of_floor", "min": 80.0, "where": {"N": 1, "D": 550, "P": 4096},
     "text": "kernel >= 80 % of the bandwidth floor at batch 1 (D=550, P=4096)"},
    {"name": "speedup_vs_torch_batch1", "metric": "speedup_vs_torch", "min": 3.0,
     "where": {"N": 1, "D": 550, "P": 4096}, "text": "kernel >= 3x torch bmm at batch 1 (D=550, P=4096)"},
    {"name": "speedup_vs_torch_all_batches", "metric": "speedup_vs_torch", "min": 3.0, "where": {"D": 550, "P": 4096},
     "text": "kernel >= 3x torch bmm at every benchmarked batch (D=550, P=4096)"},
)
FULL_BENCH = {"batches": [1, 2, 4, 8, 12], "dims": [100, 550], "patches": [4096],
              "extra": ["1x1100x4096", "8x1100x4096"], "warmup": 5, "iters": 30}
QUICK_BENCH = {"batches": [1, 8], "dims": [550], "patches": [4096], "extra": ["1x100x4096"], "warmup": 3, "iters": 10}

_ERROR_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+errors?")
_RACE_SUMMARY = re.compile(r"RACECHECK SUMMARY:\s*(\d+)\s+hazards?\s+displayed\s*\((\d+)\s+errors?,\s*(\d+)\s+warnings?\)")
_LEAK_SUMMARY = re.compile(r"LEAK SUMMARY:\s*(\d+)\s+bytes? leaked in\s+(\d+)\s+allocations?")
_TOOL_PROBLEM = re.compile(r"Device not supported|Internal Sanitizer Error|Unable to find injection library|"
                           r"Target application terminated before first instrumented API call|"
                           r"Unrecognized option|Invalid option|"
                           r"kernel_sanitize: no CUDA device|Error: .*(not supported|Failed to).*", re.I)
_DRIVER_FAILED = re.compile(r"kernel_sanitize: (FAILED|CUDA error|bad argument|CPU reference returned|"
                            r".*MISMATCH|.*launcher returned).*")


class Unavailable(Exception):
    """No GPU / nvcc / torch: the one-line reason, exit 2."""


def _t0():
    try:
        return float(os.environ["EDGEAD_GPU_CHECK_T0"])
    except (KeyError, ValueError):
        return time.time()


T0 = _t0()


def log(message):
    print("[gpu-check {:6.1f}s] {}".format(time.time() - T0, message), flush=True)


# --- finding the tools -------------------------------------------------------------------------------------

def _executable(path):
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def find_nvcc():
    """$NVCC, PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin: the first nvcc found, or None."""
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for candidate in candidates:
        if candidate and os.sep not in candidate:
            candidate = shutil.which(candidate)
        if _executable(candidate):
            return candidate
    return None


def find_compute_sanitizer(nvcc=None):
    """$COMPUTE_SANITIZER, PATH, beside nvcc (the toolkit's bin/), /usr/local/cuda: the first found, or None."""
    candidates = [os.environ.get("COMPUTE_SANITIZER"), shutil.which("compute-sanitizer")]
    if nvcc:
        for folder in {os.path.dirname(nvcc), os.path.dirname(os.path.realpath(nvcc))}:
            candidates += [os.path.join(folder, "compute-sanitizer"),
                           os.path.join(os.path.dirname(folder), "compute-sanitizer", "compute-sanitizer")]
    candidates += ["/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda/compute-sanitizer/compute-sanitizer"]
    for candidate in candidates:
        if _executable(candidate):
            return candidate
    return None


def _run_text(cmd, timeout=30):
    """stdout+stderr of ``cmd`` (text) or None when it cannot run or fails."""
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.decode(errors="replace") if proc.returncode == 0 else None


def nvidia_smi(fields):
    """``nvidia-smi --query-gpu=<fields>`` as a list of dicts (one per GPU), or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    text = _run_text(["nvidia-smi", "--query-gpu=" + ",".join(fields), "--format=csv,noheader,nounits"])
    if text is None:
        return None
    rows = []
    for line in text.strip().splitlines():
        values = [v.strip() for v in line.split(",")]
        if len(values) == len(fields):
            rows.append(dict(zip(fields, values)))
    return rows


def nvcc_version(nvcc):
    text = _run_text([nvcc, "--version"]) or ""
    match = re.search(r"release [\d.]+, V([\d.]+)", text) or re.search(r"release ([\d.]+)", text)
    return match.group(1) if match else None


def cuda_driver_api_version():
    """cuDriverGetVersion() as "13.0", or None."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return "{}.{}".format(version.value // 1000, (version.value % 1000) // 10)


# --- preflight ---------------------------------------------------------------------------------------------

def detect_gpu():
    """The torch module when it sees a CUDA GPU; raises Unavailable (one line) otherwise."""
    try:
        import torch
    except ImportError as exc:
        torch, torch_text = None, "torch not importable ({})".format(exc)
    else:
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return torch
        torch_text = "torch {} sees none{}".format(torch.__version__, "" if torch.version.cuda else " (CPU-only build)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible_text = "" if visible is None else ", CUDA_VISIBLE_DEVICES={!r}".format(visible)
    smi = nvidia_smi(["name"])
    if smi:
        raise Unavailable("gpu-check: nvidia-smi lists {} but {}{}; needs a CUDA build of torch that sees the GPU"
                          .format(smi[0]["name"], torch_text, visible_text))
    smi_text = "nvidia-smi not found" if shutil.which("nvidia-smi") is None else "nvidia-smi lists no GPU"
    raise Unavailable("gpu-check: no CUDA GPU ({}, {}{}); run it on a machine with an NVIDIA GPU, its driver, "
                      "nvcc and torch".format(smi_text, torch_text, visible_text))


def preflight():
    """(torch, nvcc) or Unavailable: GPU first, then nvcc, then numpy."""
    torch = detect_gpu()
    nvcc = find_nvcc()
    if nvcc is None:
        raise Unavailable("gpu-check: nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin); install the CUDA "
                          "toolkit or set NVCC=/path/to/nvcc")
    try:
        import numpy  # noqa: F401
    except ImportError as exc:
        raise Unavailable("gpu-check: numpy not importable ({})".format(exc))
    return torch, nvcc


# --- importing edgead without an install -------------------------------------------------------------------

class TreeFinder(object):
    """Imports ``edgead``, ``edgead.runtime`` and ``edgead.exporters`` from their repo folders (pyproject's
    package-dir mapping), for when ``pip install -e .`` failed or another copy of edgead is installed."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        folder = PACKAGE_DIRS.get(fullname)
        if folder is None:
            return None
        folder = os.path.join(ROOT, folder)
        return importlib.util.spec_from_file_location(fullname, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


def ensure_importable(force_tree=False):
    """Make ``import edgead.runtime.cuda_kernel`` load this tree's file; returns how ("installed" / "from the tree")."""
    expected = os.path.realpath(os.path.join(ROOT, "runtime", "cuda_kernel.py"))
    if not force_tree:
        try:
            from edgead.runtime import cuda_kernel

            if os.path.realpath(cuda_kernel.__file__) == expected:
                return "installed"
        except ImportError:
            pass
    for name in list(sys.modules):
        if name == "edgead" or name.startswith("edgead."):
            del sys.modules[name]
    if not any(isinstance(finder, TreeFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, TreeFinder())
    importlib.invalidate_caches()
    from edgead.runtime import cuda_kernel

    if os.path.realpath(cuda_kernel.__file__) != expected:
        raise ImportError("edgead.runtime.cuda_kernel resolves to {}, not {}".format(cuda_kernel.__file__, expected))
    return "from the tree"


def load_module(name, path):
    """A module from a file path (tests/cuda_reference.py, benchmarks/kernel_bench.py) without touching sys.path."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def header_max_dim(path=HEADER):
    with open(path) as fh:
        match = re.search(r"#define\s+EDGEAD_MAX_DIM\s+(\d+)", fh.read())
    return int(match.group(1)) if match else None


# --- build -------------------------------------------------------------------------------------------------

def gencode_for(nvcc, capability):
    """nvcc flags for compute capability (major, minor): SASS + PTX when nvcc knows the arch, else the newest
    older PTX (JIT-compiled by the driver). Returns (flags, text)."""
    arch = "{}{}".format(*capability)
    codes = (_run_text([nvcc, "--list-gpu-code"]) or "").split()
    if not codes or "sm_" + arch in codes:
        return (["-gencode", "arch=compute_{0},code=[sm_{0},compute_{0}]".format(arch)],
                "sm_{0} + compute_{0} PTX".format(arch))
    older = sorted(int(c[3:]) for c in codes if re.match(r"sm_\d+$", c) and int(c[3:]) <= int(arch))
    if not older:
        raise RuntimeError("nvcc {} supports none of sm_{} or older ({})".format(nvcc, arch, " ".join(codes)))
    ptx = older[-1]
    return (["-gencode", "arch=compute_{0},code=compute_{0}".format(ptx)],
            "compute_{} PTX (nvcc does not know sm_{}; the driver JIT-compiles)".format(ptx, arch))


def _compile(cmd, output, log_path, timeout=600):
    """Run an nvcc command writing ``output + '.tmp'``, then move it in place. Returns a result dict."""
    start = time.time()
    tmp = output + ".tmp"
    cmd = cmd + ["-o", tmp]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        text, rc = proc.stdout.decode(errors="replace"), proc.returncode
    except subprocess.TimeoutExpired:
        text, rc = "timed out after {} s".format(timeout), None
    with open(log_path, "w") as fh:
        fh.write(" ".join(cmd) + "\n" + text)
    ok = rc == 0 and os.path.exists(tmp)
    if ok:
        os.replace(tmp, output)
    elif os.path.exists(tmp):
        os.remove(tmp)
    return {"status": "pass" if ok else "fail", "output": output if ok else None, "seconds": round(time.time() - start, 1),
            "log": log_path, "command": " ".join(cmd), "tail": None if ok else text[-2000:]}


def build_library(nvcc, gencode, out_dir):
    """libedgead_kernels.so (kernel + CPU reference, static cudart, line info) into ``out_dir``."""
    cmd = [nvcc, "-std=c++17", "-O3", "-lineinfo", "-I" + os.path.join(NATIVE, "include"),
           "-I" + os.path.join(NATIVE, "src"), "-Xcompiler", "-fPIC", "-shared"] + gencode + KERNEL_SOURCES
    return _compile(cmd, os.path.join(out_dir, LIBRARY_NAME), os.path.join(out_dir, "build_library.log"))


def build_driver(nvcc, gencode, out_dir):
    """The sanitizer driver: kernel_sanitize.cu linked with the kernel sources (one static cudart)."""
    cmd = [nvcc, "-std=c++17", "-O2", "-lineinfo", "-I" + os.path.join(NATIVE, "include"),
           "-I" + os.path.join(NATIVE, "src")] + gencode + [DRIVER_SOURCE] + KERNEL_SOURCES
    return _compile(cmd, os.path.join(out_dir, DRIVER_NAME), os.path.join(out_dir, "build_driver.log"))


# --- correctness grid --------------------------------------------------------------------------------------

def tolerance(dim):
    """Relative tolerance against float64: fp32 accumulation over D terms, error growing like sqrt(D)."""
    return 2e-5 * max(1.0, math.sqrt(dim / 550.0))


def correctness_plan(quick, max_dim):
    """[(D, P, [N...])]: every image is independent, so one reference of 12 images serves every N."""
    batches = [1, 2, 8, 9, 12] if quick else list(range(1, 13))
    plan = [(dim, 37, batches) for dim in (1, 7, 33, 100, 550)]
    plan.append((550, 4096, batches))
    plan.append((max_dim, 2, [1, 2, 9, 12] if quick else batches))
    return plan


def compare(got, expected, tol):
    """(max relative error over the finite outputs, number of non-finite outputs, ok) - numpy arrays."""
    import numpy as np

    got = np.asarray(got, np.float64)
    expected = np.asarray(expected, np.float64)
    finite = np.isfinite(got)
    nonfinite = int(got.size - finite.sum())
    rel = np.abs(got - expected) / np.maximum(np.abs(expected), 1e-12)
    max_rel = float(rel[finite].max()) if finite.any() else float("nan")
    return max_rel, nonfinite, bool(nonfinite == 0 and max_rel <= tol)


def _correctness_problem(torch, cuda_kernel, lib, reference, dim, num_patches, batches, nmax, stream, cases,
                         backend_error):
    """One (D, P): data for ``nmax`` images, one float64 reference per dtype, the kernel for every N in ``batches``
    (cases appended to ``cases``). Returns the first line of a CUDA error that poisoned the context, else None."""
    tri = dim * (dim + 1) // 2
    gen = torch.Generator(device="cuda").manual_seed(dim * 131 + num_patches)
    mean = torch.randn((num_patches, dim), device="cuda", generator=gen)
    x = (mean.T[None] + torch.randn((nmax, dim, num_patches), device="cuda", generator=gen)).contiguous()
    w32 = torch.randn((num_patches, tri), device="cuda", generator=gen) / dim ** 0.5
    x_np, mean_np = x.cpu().numpy(), mean.cpu().numpy()
    chunk = max(1, min(num_patches, int(REFERENCE_CHUNK_BYTES // (dim * dim * 8))))
    for dtype_name in ("fp16", "fp32"):
        w = w32.half() if dtype_name == "fp16" else w32
        # fp16 -> fp32 is exact (and numpy converts fp32 to float64 much faster than fp16): the reference still
        # sees exactly the stored weights
        expected = reference.distance_f64(x_np, mean_np, w.float().cpu().numpy(), patch_chunk=chunk)  # [nmax, P]
        for n in batches:
            case = {"N": n, "D": dim, "P": num_patches, "whitening": dtype_name, "tol": tolerance(dim),
                    "max_rel_err": None, "nonfinite": None, "ok": False}
            cases.append(case)
            try:
                out = torch.full((n, num_patches), float("nan"), device="cuda")  # every entry must be written
                cuda_kernel.padim_mahalanobis(x[:n], mean, w, out, stream=stream, lib=lib)
                torch.cuda.synchronize()
                max_rel, nonfinite, ok = compare(out.cpu().numpy(), expected[:n], case["tol"])
                case.update(max_rel_err=max_rel, nonfinite=nonfinite, ok=ok)
            except (backend_error, RuntimeError) as exc:
                case.update(max_rel_err=None, nonfinite=None, ok=False, error=str(exc).splitlines()[0][:300])
                if isinstance(exc, RuntimeError):  # a CUDA error in torch: the context is likely gone
                    return case["error"]
    return None


def run_correctness(torch, cuda_kernel, lib, reference, plan, max_dim, deadline):
    """The grid; returns {"status", "cases": [...], "refusal": {...}, ...}."""
    from edgead.errors import BackendError

    cases, skipped, errors, aborted = [], [], [], None
    stream = torch.cuda.current_stream().cuda_stream
    nmax = max(max(batches) for _, _, batches in plan)
    for dim, num_patches, batches in plan:
        if aborted or time.time() > deadline:
            skipped.append("D={} P={}".format(dim, num_patches))
            continue
        start = time.time()
        try:
            aborted = _correctness_problem(torch, cuda_kernel, lib, reference, dim, num_patches, batches, nmax,
                                           stream, cases, BackendError)
        except Exception as exc:  # the reference or the data (host/GPU memory): not verified, so not a pass
            errors.append("D={} P={}: {}: {}".format(dim, num_patches, type(exc).__name__,
                                                     str(exc).splitlines()[0][:300] if str(exc) else ""))
            aborted = aborted or ("CUDA" in str(exc) and errors[-1])
        mine = [c for c in cases if c["D"] == dim and c["P"] == num_patches]
        log("correctness D={} P={}: {} cases, {} failed ({:.1f} s)".format(
            dim, num_patches, len(mine), sum(1 for c in mine if not c["ok"]), time.time() - start))
        torch.cuda.empty_cache()
    refusal = None
    if not aborted:
        # D = MAX_DIM + 1 must be refused (invalid argument) before anything is launched.
        buf = torch.zeros(64, device="cuda")
        try:
            cuda_kernel.padim_mahalanobis_raw(buf, buf, buf, False, buf, 1, max_dim + 1, 1, lib=lib)
            torch.cuda.synchronize()
            refusal = {"D": max_dim + 1, "ok": False, "detail": "the launcher accepted D = MAX_DIM + 1"}
        except BackendError as exc:
            ok = "invalid argument" in str(exc)
            refusal = {"D": max_dim + 1, "ok": ok, "detail": str(exc)[:300]}
        except RuntimeError as exc:
            refusal = {"D": max_dim + 1, "ok": False, "detail": str(exc).splitlines()[0][:300]}
    failed = [c for c in cases if not c["ok"]]
    status = "fail" if failed or errors or aborted or (refusal is not None and not refusal["ok"]) else "pass"
    finite = [c["max_rel_err"] for c in cases if c.get("max_rel_err") is not None and math.isfinite(c["max_rel_err"])]
    return {"status": status, "cases": cases, "failed": len(failed), "errors": errors, "refusal": refusal,
            "aborted": aborted, "skipped": skipped, "worst_rel_err": max(finite) if finite else None,
            "tolerance": "rtol(D) = 2e-5 * max(1, sqrt(D/550)) against float64 (tests/cuda_reference.py); fp16 "
                         "against the float64 distance of the fp16-rounded weights; NaN-poisoned outputs"}


# --- pytest ------------------------------------------------------------------------------------------------

def junit_counts(path):
    """{"tests", "failures", "errors", "skipped"} summed over a JUnit XML file's test suites."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0) or 0)
    return counts


def pytest_files():
    files = list(GPU_TEST_FILES)
    # everything the real-TensorRT tests import (tiny_bundle fit, export, ORT reference, sidecar schema)
    needed = ("tensorrt", "onnx", "onnxruntime", "cv2", "timm", "tqdm", "jsonschema", "safetensors", "click")
    if all(importlib.util.find_spec(m) is not None for m in needed):
        files.append("tests/test_tensorrt_paths.py")  # its gpu test builds a TensorRT engine
    return files


def run_pytest(out_dir, library, from_tree, timeout):
    if importlib.util.find_spec("pytest") is None:
        return {"status": "not run", "reason": "pytest is not installed"}
    junit = os.path.join(out_dir, "pytest_gpu.xml")
    if os.path.exists(junit):
        os.remove(junit)
    files = pytest_files()
    cmd = [sys.executable, os.path.abspath(__file__), "--run-pytest", "-q", "-rs", "-m", "gpu", "-p",
           "no:cacheprovider", "--junitxml", junit] + files
    env = dict(os.environ, EDGEAD_KERNEL_LIB=library, PYTHONUNBUFFERED="1")
    if from_tree:
        env["EDGEAD_GPU_CHECK_FROM_TREE"] = "1"
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout)
        text, rc = proc.stdout.decode(errors="replace"), proc.returncode
    except subprocess.TimeoutExpired as exc:
        text, rc = (exc.output or b"").decode(errors="replace"), None
    log_path = os.path.join(out_dir, "pytest_gpu.log")
    with open(log_path, "w") as fh:
        fh.write(" ".join(cmd) + "\n" + text)
    result = {"files": files, "returncode": rc, "seconds": round(time.time() - start, 1), "log": log_path}
    counts = junit_counts(junit) if os.path.exists(junit) else None
    if counts:
        result.update(counts)
    if rc is None:
        result.update(status="timeout", reason="pytest ran past {} s".format(timeout))
    elif rc != 0 or counts is None:
        result.update(status="fail", reason="pytest exit status {}".format(rc), tail=text[-3000:])
    elif counts["tests"] == counts["skipped"]:
        result.update(status="fail", reason="every gpu test skipped on a machine with a GPU", tail=text[-3000:])
    else:
        result["status"] = "pass"
    return result


# --- compute-sanitizer -------------------------------------------------------------------------------------

def parse_sanitizer_output(tool, text, returncode, error_exitcode=SANITIZER_EXITCODE):
    """Verdict on one compute-sanitizer run of kernel_sanitize.

    Returns {"tool", "status" (pass / fail / tool error), "reason", "errors", "hazards", "warnings",
    "leaked_bytes", "summary" (the summary lines)}. A pass needs the tool's summary line with zero counts, exit
    status 0 and the driver's own OK line; a crash of the driver is a failure even under a zero summary.
    """
    errors = [int(m) for m in _ERROR_SUMMARY.findall(text)]
    races = [tuple(int(v) for v in m) for m in _RACE_SUMMARY.findall(text)]
    leaks = [tuple(int(v) for v in m) for m in _LEAK_SUMMARY.findall(text)]
    summary = [line.strip("= \t") for line in text.splitlines() if "SUMMARY:" in line]
    result = {"tool": tool, "returncode": returncode, "summary": summary,
              "errors": sum(errors) if errors else None,
              "hazards": sum(r[0] for r in races) if races else None,
              "warnings": sum(r[2] for r in races) if races else None,
              "leaked_bytes": sum(leak[0] for leak in leaks) if leaks else None}
    has_summary = bool(races or errors) if tool == "racecheck" else bool(errors)
    counted = sum(errors) + sum(r[0] + r[1] + r[2] for r in races) + sum(leak[0] + leak[1] for leak in leaks)
    driver_failed = _DRIVER_FAILED.search(text)
    problem = _TOOL_PROBLEM.search(text)
    if counted > 0:
        found = []
        if errors and sum(errors):
            found.append("{} errors".format(sum(errors)))
        if races and result["hazards"]:
            found.append("{} hazards ({} errors, {} warnings)".format(
                result["hazards"], sum(r[1] for r in races), result["warnings"]))
        if leaks and result["leaked_bytes"]:
            found.append("{} bytes leaked".format(result["leaked_bytes"]))
        return dict(result, status="fail", reason="{} reported {}".format(tool, ", ".join(found) or "errors"))
    if returncode == error_exitcode:
        return dict(result, status="fail", reason="{} exited with its error exit code {}".format(tool, returncode))
    if driver_failed:
        return dict(result, status="fail", reason="driver: " + driver_failed.group(0))
    if returncode == 0 and DRIVER_OK in text and has_summary and not problem:
        return dict(result, status="pass", reason=None)
    if problem:
        return dict(result, status="tool error", reason=problem.group(0))
    if returncode == 0 and DRIVER_OK in text:
        return dict(result, status="tool error", reason="no {} summary line in the output".format(
            "RACECHECK SUMMARY" if tool == "racecheck" else "ERROR SUMMARY"))
    if not re.search(r"^kernel_sanitize: ", text, re.M):
        return dict(result, status="tool error", reason="the driver did not run under {} (exit status {})".format(
            tool, returncode))
    return dict(result, status="fail", reason="exit status {} without the driver's OK line (crash?)".format(
        returncode))


def _run_logged(cmd, log_path, timeout):
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        text, rc = proc.stdout.decode(errors="replace"), proc.returncode
    except subprocess.TimeoutExpired as exc:
        text, rc = (exc.output or b"").decode(errors="replace"), None
    with open(log_path, "w") as fh:
        fh.write(" ".join(cmd) + "\n" + text)
    return text, rc, round(time.time() - start, 1)


def run_driver_native(driver, out_dir, small, timeout):
    """kernel_sanitize without a sanitizer: every case against the CPU reference."""
    cmd = [driver] + (["--small"] if small else [])
    text, rc, seconds = _run_logged(cmd, os.path.join(out_dir, "kernel_sanitize_native.log"), timeout)
    ok = rc == 0 and DRIVER_OK in text
    lines = [line for line in text.splitlines() if line.startswith("kernel_sanitize:")]
    return {"status": "pass" if ok else ("timeout" if rc is None else "fail"), "returncode": rc,
            "seconds": seconds, "log": os.path.join(out_dir, "kernel_sanitize_native.log"),
            "reason": None if ok else (lines[-1] if lines else "exit status {}".format(rc)),
            "cases": sum(1 for line in lines if " max_rel=" in line)}


def run_sanitizers(sanitizer, driver, out_dir, quick, deadline, timeout):
    """Each tool on kernel_sanitize; memcheck on every case (--small under --quick), the others on small cases."""
    tools = {}
    if sanitizer is None:
        for tool in SANITIZER_TOOLS:
            tools[tool] = {"status": "not run", "reason": "compute-sanitizer not found"}
        return {"status": "not run", "reason": "compute-sanitizer not found (PATH, beside nvcc, /usr/local/cuda)",
                "tools": tools}
    version = _run_text([sanitizer, "--version"]) or ""
    match = re.search(r"Version\s+([\w.]+)", version)
    for tool in SANITIZER_TOOLS:
        remaining = deadline - time.time()
        if remaining < 20:
            tools[tool] = {"status": "not run", "reason": "time budget spent"}
            continue
        small = quick or tool != "memcheck"
        cmd = ([sanitizer, "--tool", tool, "--error-exitcode", str(SANITIZER_EXITCODE)] + SANITIZER_FLAGS[tool] + [driver] + (["--small"] if small else []))
        log_path = os.path.join(out_dir, "sanitizer_{}.log".format(tool))
        text, rc, seconds = _run_logged(cmd, log_path, min(timeout, remaining))
        if rc is None:
            result = {"tool": tool, "status": "timeout", "reason": "ran past {:.0f} s".format(min(timeout, remaining))}
        else:
            result = parse_sanitizer_output(tool, text, rc)
        result.update(seconds=seconds, log=log_path, cases="small" if small else "all")
        tools[tool] = result
        log("compute-sanitizer {}: {}{} ({:.1f} s)".format(tool, result["status"],
                                                            ": " + result["reason"] if result.get("reason") else "",
                                                            seconds))
    statuses = {r["status"] for r in tools.values()}
    status = "fail" if "fail" in statuses else ("pass" if statuses == {"pass"} else "incomplete")
    return {"status": status, "path": sanitizer, "version": match.group(1) if match else None, "tools": tools}


# --- goals and the summary ---------------------------------------------------------------------------------

def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def evaluate_goals(rows, goals=GOALS):
    """Each goal over the benchmark rows matching its ``where``: pass when every matching row reaches ``min``,
    fail when one does not, "not evaluated" when no matching row has the metric (e.g. no torch baseline)."""
    results = []
    for goal in goals:
        matched = [r for r in rows if all(r.get(k) == v for k, v in goal["where"].items())]
        entries = [{"N": r["N"], "D": r["D"], "P": r["P"], "whitening": r["whitening"], "value": r[goal["metric"]],
                    "ok": r[goal["metric"]] >= goal["min"]} for r in matched if _number(r.get(goal["metric"]))]
        result = {"name": goal["name"], "text": goal["text"], "metric": goal["metric"], "min": goal["min"],
                  "rows": entries}
        if not entries:
            result.update(status="not evaluated", worst=None,
                          reason="no benchmark row with {} and {}".format(
                              ", ".join("{}={}".format(k, v) for k, v in goal["where"].items()), goal["metric"]))
        else:
            result.update(status="pass" if all(e["ok"] for e in entries) else "fail",
                          worst=min(e["value"] for e in entries))
        results.append(result)
    return results


def exit_status(failures, incomplete):
    """1 when a check failed; 3 when a correctness, test or sanitizer check did not run (or not to the end);
    0 only when every one of them ran and passed. Benchmark gaps and performance goals never count."""
    if failures:
        return 1
    if any(not text.startswith("benchmark") for text in incomplete):
        return 3
    return 0


def verdict_word(status):
    return {0: "PASS", 1: "FAIL", 3: "INCOMPLETE"}[status]


def verdict(summary):
    """(failures, incomplete): lists of one-line texts (``exit_status`` turns them into the exit status)."""
    failures, incomplete = [], []
    build = summary.get("build") or {}
    for part in ("library", "driver"):
        if (build.get(part) or {}).get("status") == "fail":
            failures.append("build: {} failed (see {})".format(part, build[part].get("log")))
    if build.get("error"):
        failures.append("build: " + build["error"])
    correctness = summary.get("correctness")
    if correctness:
        if correctness.get("status") == "fail":
            failures.append("correctness: {} of {} cases failed{}{}{}".format(
                correctness.get("failed"), len(correctness.get("cases") or []),
                "; aborted: " + correctness["aborted"] if correctness.get("aborted") else "",
                "; " + "; ".join(correctness["errors"]) if correctness.get("errors") else "",
                "" if (correctness.get("refusal") or {}).get("ok", True) else "; D = MAX_DIM + 1 not refused"))
        elif correctness.get("status") == "error":
            failures.append("correctness: " + str(correctness.get("reason")))
        if correctness.get("skipped"):
            incomplete.append("correctness: skipped {} (time budget)".format(", ".join(correctness["skipped"])))
    elif build and not failures:
        incomplete.append("correctness: not run")
    pytest_result = summary.get("pytest") or {}
    if pytest_result.get("status") == "fail":
        failures.append("pytest -m gpu: {}".format(pytest_result.get("reason")))
    elif pytest_result.get("status") in ("not run", "timeout"):
        incomplete.append("pytest -m gpu: {} ({})".format(pytest_result["status"], pytest_result.get("reason")))
    sanitizer = summary.get("sanitizer") or {}
    native = sanitizer.get("native") or {}
    if native.get("status") in ("fail", "timeout"):
        failures.append("kernel_sanitize (no sanitizer): {}".format(native.get("reason") or native["status"]))
    for tool, result in sorted((sanitizer.get("tools") or {}).items()):
        if result.get("status") == "fail":
            failures.append("compute-sanitizer {}: {}".format(tool, result.get("reason")))
        elif result.get("status") != "pass":
            incomplete.append("compute-sanitizer {}: {} ({})".format(tool, result.get("status"), result.get("reason")))
    bench = summary.get("benchmark") or {}
    if bench.get("status") == "error":
        incomplete.append("benchmark: {}".format(bench.get("reason")))
    if bench.get("skipped"):
        incomplete.append("benchmark: skipped {} rows (time budget)".format(len(bench["skipped"])))
    return failures, incomplete


def strict_json(value):
    """``value`` with non-finite floats as None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_summary(path, summary):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(strict_json(summary), fh, indent=2, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, path)


def _fmt(value, spec="{:.2e}"):
    return "-" if not _number(value) else spec.format(value)


def format_report(summary):
    """The printed table: device line, one line per stage, benchmark rows, goals, verdict."""
    device = summary.get("device") or {}
    lines = ["gpu-check: {} (compute capability {}), driver {}, CUDA driver API {}, nvcc {}, torch {} (CUDA {})".format(
        device.get("name"), device.get("compute_capability"), device.get("driver_version"),
        device.get("cuda_driver_api"), device.get("nvcc"), device.get("torch"), device.get("torch_cuda"))]
    if _number(device.get("copy_bandwidth_gbps")):
        lines.append("  copy bandwidth      {:.0f} GB/s (device-to-device, read + write)".format(
            device["copy_bandwidth_gbps"]))
    lines.append("  package             {}".format(summary.get("package", {}).get("import")))
    build = summary.get("build") or {}
    lines.append("  build               {} / driver {}  {}".format(
        (build.get("library") or {}).get("status", "-"), (build.get("driver") or {}).get("status", "-"),
        build.get("arch", build.get("error", ""))))
    corr = summary.get("correctness") or {}
    if corr:
        lines.append("  correctness         {}  {} cases, {} failed, worst rel err {} (tol 2e-5 .. {}), "
                     "D=MAX_DIM+1 refused: {}".format(
                         corr.get("status"), len(corr.get("cases") or []), corr.get("failed"),
                         _fmt(corr.get("worst_rel_err")),
                         _fmt(max([c["tol"] for c in corr.get("cases") or []] or [float("nan")]), "{:.1e}"),
                         (corr.get("refusal") or {}).get("ok")))
        for case in [c for c in corr.get("cases") or [] if not c["ok"]][:10]:
            lines.append("    FAILED N={N} D={D} P={P} {whitening}: max rel {err} (tol {tol:.1e}), non-finite {nf}{e}"
                         .format(err=_fmt(case.get("max_rel_err")), nf=case.get("nonfinite"),
                                 e=" " + case["error"] if case.get("error") else "", **case))
    py = summary.get("pytest") or {}
    if py:
        lines.append("  pytest -m gpu       {}  {}".format(py.get("status"), py.get("reason") or "{} tests, {} skipped"
                                                           .format(py.get("tests"), py.get("skipped"))))
    san = summary.get("sanitizer") or {}
    if san:
        native = san.get("native") or {}
        lines.append("  kernel_sanitize     {}  {}".format(native.get("status", "-"), native.get("reason") or
                                                           "{} cases vs the CPU reference".format(native.get("cases"))))
        for tool in SANITIZER_TOOLS:
            result = (san.get("tools") or {}).get(tool, {})
            detail = result.get("reason") or "; ".join(result.get("summary") or [])
            lines.append("  {:<19} {}  {}".format(tool, result.get("status", "-"), detail))
    bench = summary.get("benchmark") or {}
    if bench.get("rows"):
        lines.append("  benchmark (median ms; % of floor = floor / kernel; speed-up = torch / kernel):")
        lines.append("    {:>3} {:>5} {:>5} {:>5} {:>9} {:>9} {:>8} {:>7} {:>9} {:>8}".format(
            "N", "D", "P", "W", "kernel", "floor", "GB/s", "%floor", "torch", "speedup"))
        for r in bench["rows"]:
            lines.append("    {:>3} {:>5} {:>5} {:>5} {:>9} {:>9} {:>8} {:>7} {:>9} {:>8}".format(
                r["N"], r["D"], r["P"], r["whitening"], _fmt(r.get("kernel_ms"), "{:.4f}"),
                _fmt(r.get("floor_ms"), "{:.4f}"), _fmt(r.get("kernel_gbps"), "{:.0f}"),
                _fmt(r.get("pct_of_floor"), "{:.1f}"), _fmt(r.get("torch_ms"), "{:.4f}"),
                _fmt(r.get("speedup_vs_torch"), "{:.2f}")))
    elif bench:
        lines.append("  benchmark           {}  {}".format(bench.get("status"), bench.get("reason")))
    for goal in summary.get("goals") or []:
        lines.append("  goal {:<28} {:<13} worst {} (min {})  {}".format(
            goal["name"], goal["status"], _fmt(goal.get("worst"), "{:.2f}"), goal["min"], goal["text"]))
    failures, incomplete = verdict(summary)
    for text in incomplete:
        lines.append("  NOT RUN / INCOMPLETE: " + text)
    for text in failures:
        lines.append("  FAILED: " + text)
    status = exit_status(failures, incomplete)
    lines.append("gpu-check: {} (correctness/sanitizer exit status {}); performance goals: {}".format(
        verdict_word(status), status,
        ", ".join("{} {}".format(g["name"], g["status"]) for g in summary.get("goals") or []) or "not evaluated"))
    return "\n".join(lines)


# --- the run -----------------------------------------------------------------------------------------------

def device_info(torch, nvcc):
    props = torch.cuda.get_device_properties(0)
    smi = (nvidia_smi(["driver_version", "compute_cap"]) or [{}])[0]
    import numpy

    return {"name": props.name, "compute_capability": "{}.{}".format(props.major, props.minor),
            "multiprocessors": props.multi_processor_count, "memory_gib": round(props.total_memory / 2 ** 30, 1),
            "l2_cache_mb": round(getattr(props, "L2_cache_size", 0) / 1e6, 1) or None,
            "driver_version": smi.get("driver_version"), "cuda_driver_api": cuda_driver_api_version(),
            "nvcc": nvcc_version(nvcc), "nvcc_path": nvcc, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "python": platform.python_version(), "numpy": numpy.__version__, "host": platform.node(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def run_check(args):
    try:
        torch, nvcc = preflight()
    except Unavailable as exc:
        print(str(exc), file=sys.stderr)
        return 2
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    summary_path = os.path.join(out_dir, "gpu_check.json")
    deadline = T0 + args.deadline_s
    summary = {"tool": "edgead gpu-check", "format": 1, "quick": args.quick,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(T0)), "out": out_dir}

    def save(stage):
        summary["elapsed_s"] = round(time.time() - T0, 1)
        summary["last_stage"] = stage
        write_summary(summary_path, summary)

    capability = torch.cuda.get_device_capability(0)
    summary["device"] = device_info(torch, nvcc)
    log("{} (sm_{}{}), nvcc {}, torch {}".format(summary["device"]["name"], capability[0], capability[1],
                                                 summary["device"]["nvcc"], torch.__version__))

    # build
    build = {}
    summary["build"] = build
    try:
        gencode, build["arch"] = gencode_for(nvcc, capability)
    except RuntimeError as exc:
        build["error"] = str(exc)
        save("build")
        print(format_report(summary))
        return 1
    build["library"] = build_library(nvcc, gencode, out_dir)
    log("built {}: {} ({} s)".format(LIBRARY_NAME, build["library"]["status"], build["library"]["seconds"]))
    build["driver"] = build_driver(nvcc, gencode, out_dir)
    log("built {}: {} ({} s)".format(DRIVER_NAME, build["driver"]["status"], build["driver"]["seconds"]))
    save("build")
    library = build["library"]["output"]
    driver = build["driver"]["output"]

    # import edgead (installed by scripts/gpu_check.sh, else from the tree)
    force_tree = os.environ.get("EDGEAD_GPU_CHECK_FROM_TREE") == "1"
    how = ensure_importable(force_tree)
    from edgead.errors import BackendError
    from edgead.runtime import cuda_kernel

    max_dim = int(getattr(cuda_kernel, "MAX_DIM", FALLBACK_MAX_DIM))
    summary["package"] = {"import": how, "install": os.environ.get("EDGEAD_GPU_CHECK_INSTALL", "not attempted"),
                          "max_dim_python": getattr(cuda_kernel, "MAX_DIM", None), "max_dim_header": header_max_dim(),
                          "max_dim_used": max_dim}
    kernel_bench = load_module("kernel_bench", os.path.join(ROOT, "benchmarks", "kernel_bench.py"))
    bandwidth = kernel_bench.copy_bandwidth_gbps(torch)
    summary["device"]["copy_bandwidth_gbps"] = round(bandwidth, 1)
    log("device-to-device copy bandwidth {:.0f} GB/s".format(bandwidth))
    save("device")

    gpu_ok = True
    if library is not None:
        try:
            lib = cuda_kernel.load_library(library)
        except BackendError as exc:
            lib = None
            summary["correctness"] = {"status": "error", "reason": str(exc)}
        if lib is not None:
            reference = load_module("cuda_reference", os.path.join(ROOT, "tests", "cuda_reference.py"))
            plan = correctness_plan(args.quick, max_dim)
            summary["correctness"] = run_correctness(torch, cuda_kernel, lib, reference, plan, max_dim, deadline)
            gpu_ok = not summary["correctness"]["aborted"]
            if summary["package"]["max_dim_header"] not in (None, max_dim):
                summary["correctness"]["status"] = "fail"
                summary["correctness"]["aborted"] = "EDGEAD_MAX_DIM {} in the header but MAX_DIM {} in Python".format(
                    summary["package"]["max_dim_header"], max_dim)
        save("correctness")

    # the sanitizers before pytest: a slow TensorRT test must not use up their time
    if driver is not None:
        sanitizer = {"native": run_driver_native(driver, out_dir, args.quick,
                                                 timeout=max(30, min(300, deadline - time.time())))}
        log("kernel_sanitize (no sanitizer): {} {}".format(sanitizer["native"]["status"],
                                                           sanitizer["native"]["reason"] or ""))
        sanitizer.update(run_sanitizers(find_compute_sanitizer(nvcc), driver, out_dir, args.quick,
                                        deadline, timeout=240))
        summary["sanitizer"] = sanitizer
        save("sanitizer")

    if library is not None:
        summary["pytest"] = run_pytest(out_dir, library, how != "installed", timeout=max(60, min(
            300, deadline - time.time())))
        log("pytest -m gpu: {} {}".format(summary["pytest"]["status"], summary["pytest"].get("reason") or ""))
        save("pytest")

    if library is not None and gpu_ok and summary.get("correctness", {}).get("status") != "error":
        grid = QUICK_BENCH if args.quick else FULL_BENCH
        configs = kernel_bench.grid_configs(grid["batches"], grid["dims"], grid["patches"]) + grid["extra"]
        try:
            result = kernel_bench.run(torch, cuda_kernel, lib, configs, ["fp16", "fp32"], grid["warmup"],
                                      grid["iters"], True, bandwidth=bandwidth, deadline=deadline + BENCH_GRACE_S,
                                      log=log)
            plot_path, plot_reason = kernel_bench.write_outputs(out_dir, result)
            summary["benchmark"] = {"status": "done", "rows": result["rows"], "skipped": result["skipped"],
                                    "plot": plot_path, "plot_skipped": plot_reason,
                                    "csv": os.path.join(out_dir, "kernel_bench.csv")}
        except (BackendError, RuntimeError) as exc:
            summary["benchmark"] = {"status": "error", "reason": str(exc).splitlines()[0][:300], "rows": []}
    else:
        summary["benchmark"] = {"status": "error", "reason": "no usable kernel library or CUDA context", "rows": []}
    summary["goals"] = evaluate_goals(summary["benchmark"].get("rows") or [])
    failures, incomplete = verdict(summary)
    summary["failures"], summary["incomplete"] = failures, incomplete
    summary["exit_status"] = exit_status(failures, incomplete)
    summary["ok"] = summary["exit_status"] == 0
    save("done")
    print(format_report(summary))
    print("gpu-check: wrote {}".format(summary_path))
    return summary["exit_status"]


def run_pytest_child(pytest_args):
    """``--run-pytest ARGS``: pytest in a child process with edgead importable (installed or from the tree)."""
    ensure_importable(os.environ.get("EDGEAD_GPU_CHECK_FROM_TREE") == "1")
    import pytest

    return pytest.main(pytest_args)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--run-pytest"]:
        return run_pytest_child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for the builds, logs, kernel_bench.* and "
                        "gpu_check.json (default: build/gpu_check)")
    parser.add_argument("--quick", action="store_true", help="smaller grids: a CI-like run of about 2 minutes")
    parser.add_argument("--deadline-s", type=float, default=420.0,
                        help="start no new correctness problem or sanitizer tool after this many seconds, no "
                             "benchmark row after {} s more (from $EDGEAD_GPU_CHECK_T0 or start; default 420)".format(
                                 BENCH_GRACE_S))
    parser.add_argument("--preflight", action="store_true",
                        help="only check for a GPU, nvcc and torch (exit 2 with one line when one is missing)")
    args = parser.parse_args(argv)
    if args.preflight:
        try:
            torch, nvcc = preflight()
        except Unavailable as exc:
            print(str(exc), file=sys.stderr)
            return 2
        print("gpu-check: {} with nvcc {} and torch {}".format(torch.cuda.get_device_name(0), nvcc_version(nvcc),
                                                                torch.__version__))
        return 0
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
