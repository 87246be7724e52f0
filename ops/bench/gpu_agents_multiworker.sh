#!/usr/bin/env bash
# Two GPU runs in one device call (docs/BENCHMARKS.md):
#  1. 64 agent sessions at 30 Hz against the VLA worker (2B-shape Qwen2-VL + an
#     untrained expert) on one GPU, async control vs synchronous (`vlmq bench agents`);
#     the env is Frames-v0 (synthetic frames): the GPU machine has no simulator.
#  2. what one GPU can show of multi-GPU scaling: chat throughput with one worker vs two workers sharing
#     one GPU and one Redis (`vlmq bench multigpu`).
# From the repository root on the device machine, carrying [".devcarry", ".devcarry-chat"]
# (see ops/bench/gpu_chat.sh). PRESET=tiny DEVICE=cpu runs the same steps on a CPU.
set -uo pipefail
PRESET=${PRESET:-2b}
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" != cpu ]; then
  source ops/bench/gpu_env.sh || exit 1
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/vlmq-out}
REDIS=${REDIS:-redis://127.0.0.1:6379/0}
mkdir -p "$OUT"
M=/tmp/vlmq-qwen2vl-$PRESET
V=/tmp/vlmq-vla-$PRESET
vlmq() { python3 -m ops.cli "$@"; }
t0=$SECONDS
vlmq make-model --arch qwen2-vl --preset "$PRESET" --out "$M" --device "$DEVICE" 2>&1 | tail -1
vlmq vla init --vlm "$M" --out "$V" --device "$DEVICE" 2>&1 | tail -1
echo "models ready after $((SECONDS - t0)) s"

# python3 itself in the background (not the vlmq function): $! must be the worker's pid
python3 -m ops.cli --log-level WARNING worker --redis-url "$REDIS" --prefix gpuagents --backend hf --model "$M" \
  --option "vla=$V" --device "$DEVICE" --kinds action_chunk --max-batch 64 --max-wait-ms 5 \
  --name vla-worker >"$OUT/vla_worker.log" 2>&1 &
W=$!
python3 - "$REDIS" <<'PY' || { tail -20 "$OUT/vla_worker.log"; exit 1; }
import sys, time, redis
r = redis.Redis.from_url(sys.argv[1])
for _ in range(1200):
    if r.exists("gpuagents:worker:vla-worker"):
        sys.exit(0)
    time.sleep(0.25)
sys.exit("the VLA worker did not start")
PY
echo "VLA worker ready after $((SECONDS - t0)) s"
vlmq bench agents --worker external --redis-url "$REDIS" --prefix gpuagents --env Frames-v0 \
  --sessions "${SESSIONS:-64}" --procs 8 --size 224 --seconds "${AGENT_SECONDS:-15}" \
  --label "VLA worker ($PRESET-shape Qwen2-VL + untrained 8x512 expert) on ${VLMQ_BENCH_GPU:-$DEVICE}" \
  --out "$OUT/agents_gpu.json" 2>&1 | tail -6
kill -TERM $W; wait $W
echo "agents done after $((SECONDS - t0)) s"

vlmq bench multigpu --model "$M" --device "$DEVICE" --device-sets "$DEVICE|$DEVICE,$DEVICE" \
  --sessions-per-worker "${SESSIONS_PER_WORKER:-128}" --procs 4 --warmup-s "${WARMUP:-12}" \
  --seconds "${MEASURE:-15}" --max-tokens 32 --out "$OUT/multiworker_1gpu.json" 2>&1 | tail -6
echo "all done after $((SECONDS - t0)) s"
