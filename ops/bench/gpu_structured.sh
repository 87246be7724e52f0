#!/usr/bin/env bash
# `vlmq bench structured` on the device tool's GPU machine (docs/BENCHMARKS.md, "Constrained
# decoding and streaming"). From the repository root, after `bash ../shared/device/prepare.sh`,
# the transformers wheel in .devcarry-chat/ (as for gpu_chat.sh) and the grammar wheels in
# .devcarry-structured/ (~7.7 MB):
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 -d .devcarry-structured \
#     xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 llguidance==1.9.1
# with carry [".devcarry", ".devcarry-chat", ".devcarry-structured"]:
#   bash ops/bench/gpu_structured.sh [bench structured flags]
# Runs the CUDA test of constrained decoding under decode graphs (SKIP_GPU_TESTS=1 skips
# it), then the benchmark; logs and results go to $OUT. VLMQ_BENCH_COMMIT names the commit.
set -uo pipefail
source ops/bench/gpu_env.sh || exit 1
ensure_2b  # for --model /tmp/vlmq-qwen2vl-2b, as docs/BENCHMARKS.md runs it
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-structured \
  .devcarry-structured/xgrammar-*.whl .devcarry-structured/apache_tvm_ffi-*.whl || exit 1
# llguidance is only the mask-cost baseline: without it that record has no baseline
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-structured \
  .devcarry-structured/llguidance-*.whl || echo "llguidance did not install: no mask baseline"
export PYTHONPATH=/tmp/site-structured:$PYTHONPATH
python3 -c "import xgrammar, triton; print('xgrammar ok, triton', triton.__version__)" || exit 1
if [ -z "${SKIP_GPU_TESTS:-}" ]; then
  python3 -m pytest tests/test_constrained_streaming.py -q -x -p no:cacheprovider -k cuda_graphs 2>&1 |
    tee "$OUT/gpu_tests.log"
fi
python3 -m ops.cli bench structured --out "$OUT/structured.json" "$@" 2>&1 | tee "$OUT/structured.log"
