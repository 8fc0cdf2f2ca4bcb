#!/usr/bin/env bash
# Compile-check the TensorRT plugin (and the kernel ABI it calls) against a TensorRT header folder.
#
#   cpp_bindings/check_plugin_headers.sh /tmp/trt-10.16/include [/tmp/trt-8.6.1/include ...]
#   TRT_INCLUDE=/usr/include/aarch64-linux-gnu cpp_bindings/check_plugin_headers.sh
#
# Each folder must hold NvInfer.h / NvInferVersion.h (e.g. `git archive <tag> include` of NVIDIA/TensorRT,
# or a TensorRT install). Needs nvcc (CUDA headers); NVCC and CUDA_STD (default c++17) override.
# Compiles the plugin source to an object file (no linking, no GPU) and prints one line per folder.
# Exit status: number of failing folders (0 = all good).
set -u
here="$(cd "$(dirname "$0")" && pwd)"
nvcc="${NVCC:-nvcc}"
std="${CUDA_STD:-c++17}"
dirs=("$@")
if [ ${#dirs[@]} -eq 0 ]; then
    if [ -z "${TRT_INCLUDE:-}" ]; then
        echo "usage: $0 TRT_INCLUDE_DIR [...]   (or set TRT_INCLUDE)" >&2
        exit 2
    fi
    read -r -a dirs <<< "${TRT_INCLUDE}"
fi
if ! command -v "$nvcc" > /dev/null 2>&1; then
    echo "check_plugin_headers: nvcc not found (set NVCC=/usr/local/cuda/bin/nvcc)" >&2
    exit 2
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
failures=0
for inc in "${dirs[@]}"; do
    if [ ! -f "$inc/NvInferVersion.h" ]; then
        echo "FAIL $inc: no NvInferVersion.h there"
        failures=$((failures + 1))
        continue
    fi
    version="$(printf '#include <NvInferVersion.h>\nTRTVER NV_TENSORRT_MAJOR NV_TENSORRT_MINOR NV_TENSORRT_PATCH\n' |
        "$nvcc" -E -x c++ -I"$inc" - 2>/dev/null | awk '/^TRTVER /{gsub(/[()]/, ""); print $2 "." $3 "." $4}')"
    log="$out/log.txt"
    if "$nvcc" -std="$std" -Xcompiler -Wall,-Wextra,-Wno-unused-parameter,-Werror=overloaded-virtual,-Werror=suggest-override \
        -isystem "$inc" -I"$here/include" -I"$here/plugin" -c "$here/plugin/padim_mahalanobis_plugin.cpp" \
        -o "$out/plugin.o" > "$log" 2>&1; then
        api="IPluginV2DynamicExt"
        case "$version" in 1[0-9].*|[2-9][0-9].*) api="IPluginV3";; esac
        echo "OK   TensorRT $version ($api): $inc"
    else
        echo "FAIL TensorRT $version: $inc"
        grep -E "error|Error" "$log" | sed -n '1,30p'
        [ -s "$log" ] && ! grep -qE "error|Error" "$log" && sed -n '1,30p' "$log"
        failures=$((failures + 1))
    fi
done
exit "$failures"
