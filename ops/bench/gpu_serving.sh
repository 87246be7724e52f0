#!/usr/bin/env bash
# The serving benchmarks of one GPU in one device call: the engine's CUDA tests, `vlmq bench
# vla` (batches 1..64, cache on/off, a profile of the largest batch) and `vlmq bench chat`
# (baselines, engine alone, 128 sessions served, mixed lengths continuous vs batch), on
# one random-weight 2B-shape Qwen2-VL built once in /tmp/vlmq-qwen2vl-2b (ops/bench/
# gpu_agents.sh reuses it on the same warm machine). Carry [".devcarry", ".devcarry-chat"]
# (ops/bench/gpu_env.sh):  VLMQ_BENCH_COMMIT=<sha> bash ops/bench/gpu_serving.sh
# Results and logs under $OUT.
set -uo pipefail
source ops/bench/gpu_env.sh || exit 1
M=$BENCH_2B
t0=$SECONDS
ensure_2b
echo "model ready after $((SECONDS - t0)) s"
if [ -z "${SKIP_GPU_TESTS:-}" ]; then
  timeout "${TESTS_S:-150}" python3 -m pytest tests/test_models_gpu.py -q -x -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
  echo "tests done after $((SECONDS - t0)) s"
fi
chat() {  # one part of bench chat into its own file, so a part that runs over loses only itself
  timeout "$1" python3 -m ops.cli bench chat --model "$M" --runs 3 --warmup-s "${WARMUP_S:-8}" \
    --seconds "${WINDOW_S:-6}" --parts "$2" --out "$OUT/$3.json" ${CHAT_FLAGS:-} >"$OUT/$3.log" 2>&1
  grep -E "^(throughput|tokens|latency|baseline|engine_batch|probe|graph|decode_rows|gpu_mem)" "$OUT/$3.log"
  echo "$2 done after $((SECONDS - t0)) s"
}
timeout "${VLA_S:-170}" python3 -m ops.cli bench vla --vlm "$M" --batches "${BATCHES:-1,8,32,64}" --iters "${VLA_ITERS:-15}" \
  --warmup 5 --profile-dir "$OUT" --out "$OUT/vla.json" 2>&1 | grep -v -i warn > "$OUT/vla.log"
grep -E "^batch|wrote" "$OUT/vla.log" | head -30
echo "vla done after $((SECONDS - t0)) s"
chat "${CHAT_S:-240}" "${CHAT_PARTS:-baseline,engine,served}" gpu_chat
[ -n "${SKIP_MIXED:-}" ] || chat "${MIXED_S:-200}" mixed gpu_chat_mixed
echo "all done after $((SECONDS - t0)) s"
