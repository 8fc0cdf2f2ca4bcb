#!/usr/bin/env bash
# Build and run the host-only plugin harness (cpp_bindings/tests/plugin_harness.cpp) against each TensorRT
# header folder given: no TensorRT library, no GPU; g++ (CXX) and the CUDA runtime headers (cuda_runtime_api.h,
# from CUDA_HOME, or next to nvcc) are needed.
#
#   cpp_bindings/tests/run_plugin_harness.sh /tmp/trt-10.16/include /tmp/trt-8.6.1/include ...
#
# Header folders: `git archive <tag> include | tar -x -C /tmp/trt-<tag>` of github.com/NVIDIA/TensorRT
# (tags 8.5.3, v8.6.1, v10.3.0, v10.16, v11.1, ...). Never commit them.
# Prints the harness's summary line per folder (and its failures); exit status = number of failing folders.
set -u
here="$(cd "$(dirname "$0")/.." && pwd)"
cxx="${CXX:-g++}"
if [ $# -eq 0 ]; then
    echo "usage: $0 TRT_INCLUDE_DIR [...]" >&2
    exit 2
fi
cuda_include=""
for candidate in "${CUDA_HOME:-}/include" "$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent)")/../include" \
                 /usr/local/cuda/include /usr/include; do
    if [ -f "$candidate/cuda_runtime_api.h" ]; then cuda_include="$candidate"; break; fi
done
if [ -z "$cuda_include" ]; then
    echo "run_plugin_harness: cuda_runtime_api.h not found (set CUDA_HOME)" >&2
    exit 2
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
failures=0
for inc in "$@"; do
    if [ ! -f "$inc/NvInferVersion.h" ]; then
        echo "FAIL $inc: no NvInferVersion.h there"
        failures=$((failures + 1))
        continue
    fi
    if ! "$cxx" -std=c++17 -O1 -g ${HARNESS_SANITIZE--fsanitize=address,undefined -fno-sanitize-recover=undefined} -Wall -Wextra -Wno-unused-parameter -Wno-deprecated-declarations \
        -isystem "$inc" -isystem "$cuda_include" -I"$here/include" -I"$here/plugin" \
        "$here/tests/plugin_harness.cpp" "$here/plugin/padim_mahalanobis_plugin.cpp" -o "$out/harness" \
        > "$out/build.log" 2>&1; then
        echo "FAIL $inc: the harness does not compile"
        grep -E "error" "$out/build.log" | sed -n '1,20p'
        failures=$((failures + 1))
        continue
    fi
    if "$out/harness" > "$out/run.log" 2> "$out/stderr.log"; then
        tail -n 1 "$out/run.log"
    else
        cat "$out/run.log"
        failures=$((failures + 1))
    fi
done
exit "$failures"
