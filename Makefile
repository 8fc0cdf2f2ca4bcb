# edgead: two commands on a fresh machine.
#   make demo   fit + evaluate PaDiM (EfficientNet-Lite0, offline ImageNet weights) on the embedded demo dataset
#   make test   install everything and run the test suite (CPU only; GPU/TensorRT tests skip)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgead-installed
NVCC   ?= nvcc

.PHONY: demo test install bench clean cuda-check plugin-check

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgead demo --out demo_out

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -ra tests

bench: $(STAMP)
	$(PY) benchmarks/fit_scaling.py --out bench_out
	$(PY) benchmarks/backbone_auroc.py --out bench_out

clean:
	rm -rf $(VENV) build demo_out bench_out
