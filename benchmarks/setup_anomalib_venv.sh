#!/usr/bin/env bash
# Creates .venv-anomalib with anomalib 2.7.0 for benchmarks/vs_anomalib.py, sharing torch/timm/onnx with .venv
# through a .pth file (so nothing is downloaded twice and our .venv is never modified).
set -euo pipefail
cd "$(dirname "$0")/.."
# Idempotent: nothing to do when the venv already has anomalib 2.7.0.
[ -x .venv-anomalib/bin/python ] && .venv-anomalib/bin/python -c "import anomalib, onnxscript, sys; sys.exit(anomalib.__version__ != '2.7.0')" 2>/dev/null && exit 0
[ -x .venv/bin/python ] || { echo "no .venv: run 'make install' first" >&2; exit 2; }
python3 -m venv .venv-anomalib
base=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
site=$(.venv-anomalib/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$base" > "$site/edgead_base_venv.pth"
.venv-anomalib/bin/pip install --quiet --disable-pip-version-check "anomalib==2.7.0" onnxscript  # to_onnx (torch.onnx dynamo) needs onnxscript
.venv-anomalib/bin/python -c "import anomalib; print('anomalib', anomalib.__version__, 'ready in .venv-anomalib')"
