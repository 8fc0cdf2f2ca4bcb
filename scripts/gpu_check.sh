#!/usr/bin/env bash
# make gpu-check: one command for a machine with an NVIDIA GPU, nvcc and a Python with numpy + torch (issue #10).
# No network, no dependency installs, no virtual environment; safe to run twice.
#
#   bash scripts/gpu_check.sh [--quick] [--out DIR] [--deadline-s S]    # PYTHON=/path/to/python picks the interpreter
#
# 1. preflight: no GPU, no nvcc or no torch -> one line on stderr, exit 2 (nothing installed, nothing built)
# 2. $PYTHON -m pip install --no-deps --no-build-isolation --no-index -e .  (log: build/gpu_check/pip_install.log);
#    when that fails (no pip, no setuptools >= 68, externally managed Python) edgead is imported from the tree
# 3. benchmarks/gpu_check.py: nvcc build for this GPU into build/gpu_check/, correctness grid vs float64,
#    pytest -m gpu, compute-sanitizer (memcheck, racecheck, synccheck, initcheck), kernel benchmark,
#    build/gpu_check/gpu_check.json + a printed table
# Exit status: 0 every correctness / test / sanitizer check ran and passed (performance goals are only reported),
#              1 one failed, 2 no GPU / nvcc / torch, 3 none failed but one did not run (e.g. no compute-sanitizer).
set -u
cd "$(dirname "$0")/.." || exit 2
export EDGEAD_GPU_CHECK_T0="${EDGEAD_GPU_CHECK_T0:-$(date +%s)}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu-check: no Python interpreter '$PY' (set PYTHON=/path/to/python, one with numpy and torch)" >&2
    exit 2
fi
"$PY" benchmarks/gpu_check.py --preflight || exit $?

mkdir -p build/gpu_check
LOG=build/gpu_check/pip_install.log
if "$PY" -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -e . >"$LOG" 2>&1; then
    export EDGEAD_GPU_CHECK_INSTALL="pip install -e . (no deps): ok"
else
    export EDGEAD_GPU_CHECK_INSTALL="pip install -e . failed (see $LOG): edgead imported from the tree"
    echo "gpu-check: $EDGEAD_GPU_CHECK_INSTALL" >&2
fi
exec "$PY" benchmarks/gpu_check.py "$@"
