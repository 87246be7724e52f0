#!/usr/bin/env bash
# `vlmq bench chat` on the device tool's GPU machine (docs/MODELS.md, "GPU benchmark").
# From the repository root, after `bash ../shared/device/prepare.sh` and downloading the
# transformers wheel into .devcarry-chat/ (same version as here), with carry
# [".devcarry", ".devcarry-chat"]:   bash ops/bench/gpu_chat.sh [bench chat flags]
# Runs the CUDA tests of the chat engine, then the benchmark; logs and results go to $OUT.
set -uo pipefail
source .devcarry/on-device.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-chat .devcarry-chat/*.whl || exit 1
export PYTHONPATH=/tmp/site-chat:$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/vlmq-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
if [ -z "${SKIP_GPU_TESTS:-}" ]; then
  python3 -m pytest tests/test_models_gpu.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
fi
python3 -m ops.cli bench chat --out "$OUT/gpu_chat.json" "$@" 2>&1 | tee "$OUT/bench.log"
