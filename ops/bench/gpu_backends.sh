#!/usr/bin/env bash
# Issue 17's GPU figures in one device call: the engine's CUDA tests (nf4 included), `vlmq
# bench backends --parity` (graph == eager at the same shapes, top-5 log-probs against a
# pristine copy, bf16) and `--nf4` (nf4 against bf16 served, 128 sessions), on one
# random-weight 2B-shape Qwen2-VL built in /tmp/vlmq-qwen2vl-2b. From the repository root,
# after `bash ../shared/device/prepare.sh`, the transformers wheel in .devcarry-chat/ (as
# for gpu_chat.sh) and bitsandbytes in .devcarry-nf4/ (43 MB):
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_24_x86_64 -d .devcarry-nf4 bitsandbytes==0.50.2
# carry [".devcarry", ".devcarry-chat", ".devcarry-nf4"]:
#   VLMQ_BENCH_COMMIT=<sha> bash ops/bench/gpu_backends.sh
# Results and logs under $OUT (backends.json, gpu_tests.log, backends.log). SKIP_GPU_TESTS=1,
# SKIP_PARITY=1 and SKIP_NF4=1 leave a part out.
set -uo pipefail
source ops/bench/gpu_env.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-nf4 .devcarry-nf4/*.whl || exit 1
export PYTHONPATH=/tmp/site-nf4:$PYTHONPATH
M=$BENCH_2B
t0=$SECONDS
ensure_2b
echo "model ready after $((SECONDS - t0)) s"
if [ -z "${SKIP_GPU_TESTS:-}" ]; then
  # every test runs (no -x) and a failure's own lines stay in the log (no captured logging)
  timeout "${TESTS_S:-150}" python3 -m pytest tests/test_models_gpu.py -q -p no:cacheprovider -p no:logging \
    -W ignore --tb=short 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
  echo "tests done after $((SECONDS - t0)) s"
fi
if [ -z "${SKIP_PARITY:-}" ]; then
  timeout "${PARITY_S:-120}" python3 -m ops.cli bench backends --parity --model "$M" --runs 3 \
    --out "$OUT/backends.json" 2>&1 | tee "$OUT/backends.log" | grep -v -i warn | tail -6
  echo "parity done after $((SECONDS - t0)) s"
fi
if [ -z "${SKIP_NF4:-}" ]; then
  timeout "${NF4_S:-260}" python3 -m ops.cli bench backends --nf4 --model "$M" --runs 3 \
    --nf4-warmup-s "${WARMUP_S:-8}" --nf4-seconds "${WINDOW_S:-6}" --out "$OUT/backends.json" 2>&1 |
    tee -a "$OUT/backends.log" | grep -v -i warn | tail -6
fi
echo "all done after $((SECONDS - t0)) s"
