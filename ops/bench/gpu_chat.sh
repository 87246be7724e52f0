#!/usr/bin/env bash
# `vlmq bench chat` on the device tool's GPU machine (docs/BENCHMARKS.md, "Chat throughput").
# From the repository root, after `bash ../shared/device/prepare.sh` and downloading the
# transformers wheel pyproject.toml pins into .devcarry-chat/, with carry
# [".devcarry", ".devcarry-chat"]:   bash ops/bench/gpu_chat.sh [bench chat flags]
# Runs the CUDA tests of the engine (SKIP_GPU_TESTS=1 skips them), then the benchmark;
# logs and results go to $OUT. VLMQ_BENCH_COMMIT names the commit (the copy has no .git).
set -uo pipefail
source ops/bench/gpu_env.sh || exit 1
ensure_2b  # for --model /tmp/vlmq-qwen2vl-2b, as docs/BENCHMARKS.md runs it
if [ -z "${SKIP_GPU_TESTS:-}" ]; then
  python3 -m pytest tests/test_models_gpu.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
fi
python3 -m ops.cli bench chat --out "$OUT/gpu_chat.json" "$@" 2>&1 | tee "$OUT/chat.log"
