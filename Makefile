# edgead: two commands on a fresh machine.
#   make demo   fit + evaluate PaDiM (EfficientNet-Lite0, offline ImageNet weights) on the embedded demo dataset
#   make test   install everything, build build/ort/libedgead_ort.so (`make ort-ops`: fetches the ONNX Runtime
#               headers from Debian once, scripts/fetch_ort_headers.sh) and run the test suite (CPU only;
#               GPU/TensorRT tests skip). A failed header fetch fails the target with one line; EDGEAD_ORT_OPS=skip
#               (environment or make variable) does not build it (tests/test_ort_ops.py then skips unless the
#               library is already there).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgead-installed
NVCC   ?= nvcc

.PHONY: demo test install bench bench-quick bench-anomalib bench-tradeoff clean gpu-check

include cpp_bindings/Makefile.inc

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgead demo --out demo_out

TEST_ORT_OPS := $(if $(filter skip,$(EDGEAD_ORT_OPS)),,ort-ops)

test: $(STAMP) $(TEST_ORT_OPS)
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -ra tests

bench: $(STAMP)
	$(PY) benchmarks/fit_scaling.py --out bench_out
	$(PY) benchmarks/export_memory.py --out bench_out
	$(PY) benchmarks/backbone_auroc.py --out bench_out
	$(PY) benchmarks/latency_table.py --out bench_out
	$(PY) benchmarks/default_thresholds.py --out bench_out
	$(PY) benchmarks/padim_reference.py --out bench_out
	$(PY) benchmarks/long_run_rss.py --out bench_out
	$(PY) benchmarks/patchcore_coreset.py --out bench_out
	$(PY) benchmarks/int8_quality.py --tensorrt --out bench_out
	$(PY) benchmarks/multicam.py --out bench_out
	$(PY) benchmarks/mqtt_outage.py --out bench_out

bench-quick: $(STAMP)
	$(PY) benchmarks/fit_scaling.py --quick --out bench_out/quick
	$(PY) benchmarks/export_memory.py --quick --out bench_out/quick
	$(PY) benchmarks/backbone_auroc.py --quick --out bench_out/quick
	$(PY) benchmarks/latency_table.py --quick --out bench_out/quick
	$(PY) benchmarks/default_thresholds.py --quick --out bench_out/quick
	$(PY) benchmarks/padim_reference.py --quick --out bench_out/quick
	$(PY) benchmarks/long_run_rss.py --quick --out bench_out/quick
	$(PY) benchmarks/patchcore_coreset.py --quick --out bench_out/quick
	$(PY) benchmarks/int8_quality.py --quick --out bench_out/quick
	$(PY) benchmarks/tradeoff.py --quick --out bench_out/quick
	$(PY) benchmarks/multicam.py --quick --out bench_out/quick
	$(PY) benchmarks/mqtt_outage.py --quick --out bench_out/quick

# alpha/rho trade-off: backbones x sizes x fp32/fp16/int8 (fresh-process latency, size, peak RSS, Lite0 quality;
# 19-26 min, resumable from bench_out/tradeoff_cache)
bench-tradeoff: $(STAMP)
	$(PY) benchmarks/tradeoff.py --out bench_out

# anomalib 2.7 lives in its own venv (shares torch/timm with .venv through a .pth file).
# ORT_INCLUDE=<onnxruntime include dir> also builds libedgead_ort.so first, so the plugin flavour is timed too
bench-anomalib: $(STAMP)
	bash benchmarks/setup_anomalib_venv.sh
	if [ -n "$(ORT_INCLUDE)" ]; then $(MAKE) ort-ops ORT_INCLUDE="$(ORT_INCLUDE)"; fi
	$(PY) benchmarks/vs_anomalib.py --out bench_out
	$(PY) benchmarks/vs_anomalib.py --method patchcore --out bench_out
	$(PY) benchmarks/vs_anomalib.py --method cflow --out bench_out

# GPU machine (no venv, no dependency installs, no network): builds the kernel for this GPU into build/gpu_check/,
# checks it against float64, runs pytest -m gpu, compute-sanitizer and the kernel benchmark -> gpu_check.json.
# Exit 2 without a GPU / nvcc / torch. GPU_CHECK_ARGS=--quick for a short run; PYTHON=... picks the interpreter.
gpu-check:
	PYTHON="$(PYTHON)" bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .venv-anomalib build cpp_bindings/build demo_out bench_out
