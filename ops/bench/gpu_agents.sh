#!/usr/bin/env bash
# The flagship workload in one device call (docs/BENCHMARKS.md, "Env agents"): 64
# MiniWorld-OneRoom-v0 sessions rendered at 224 px (real rendering: the NVIDIA EGL driver on
# the GPU machine) over 16 agent processes at 30 Hz against one VLA worker (2B-shape
# Qwen2-VL + an untrained expert, `vlmq vla init`) on the same card:
#   1. VLA only: sync (g = 0, the baseline), fixed g = 0.5, adaptive g;
#   2. mixed: fixed and adaptive g while 16 closed-loop chat sessions (text_action, free
#      text, a 224-px frame, ~100-token prompt, 256 new tokens each: the worker runs with
#      --option ignore_eos=1) use the same worker.
# Each mode: the median of RUNS runs of RUN_S seconds (`vlmq bench agents`); both parts go to
# $OUT/agents.json (the mixed metrics end in _mixed), logs beside it.
#
# On the device machine, from the repository root: first, on a fresh machine, a call that
# carries [".devcarry-gl"] and runs `source .devcarry-gl/on-device-gl.sh` (the miniworld
# wheel alone is 39 MB; see ../shared/device/prepare-gl.sh), then in the next call on the
# same warm machine carry [".devcarry", ".devcarry-chat"] (ops/bench/gpu_chat.sh) and run
#   VLMQ_BENCH_COMMIT=<sha> bash ops/bench/gpu_agents.sh
# Where MiniWorld cannot render, the run falls back to Frames-v0 (synthetic frames; the
# metric names then end in _frames) and says so.
# On a CPU (no carry, a private redis-server on a free port):
#   PRESET=tiny DEVICE=cpu SESSIONS=4 PROCS=2 CHAT_SESSIONS=2 CHAT_TOKENS=8 RUN_S=3 RUNS=1 \
#     SIZE=64 OUT=/tmp/agents-out bash ops/bench/gpu_agents.sh
set -uo pipefail
PRESET=${PRESET:-2b}
DEVICE=${DEVICE:-cuda}
SESSIONS=${SESSIONS:-64}
PROCS=${PROCS:-16}
RUN_S=${RUN_S:-8}
RUNS=${RUNS:-3}
WARMUP_S=${WARMUP_S:-5}
ENV_ID=${ENV_ID:-MiniWorld-OneRoom-v0}
SIZE=${SIZE:-224}
CHAT_SESSIONS=${CHAT_SESSIONS:-16}  # 0: no mixed part
CHAT_TOKENS=${CHAT_TOKENS:-256}
CHAT_PROCS=${CHAT_PROCS:-2}
OUT=${OUT:-/tmp/vlmq-out}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
t0=$SECONDS
W=""
RDIR=""
stop_worker() {  # SIGTERM (finish, reply, exit), SIGKILL after 60 s
  [ -n "$W" ] || return 0
  kill -TERM "$W" 2>/dev/null
  for _ in $(seq 120); do kill -0 "$W" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$W" 2>/dev/null
  wait "$W" 2>/dev/null
  W=""
}
cleanup() {
  stop_worker
  [ -n "$RDIR" ] && { kill "$(cat "$RDIR/redis.pid")" 2>/dev/null; rm -rf "$RDIR"; }
}
trap cleanup EXIT

if [ "$DEVICE" != cpu ]; then
  source .devcarry/on-device.sh || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-chat .devcarry-chat/*.whl || exit 1
  export PYTHONPATH=/tmp/site-chat:$PWD:${PYTHONPATH:-}
  export VLMQ_BENCH_GPU="${VLMQ_BENCH_GPU:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)}"
  if [ -f .devcarry-gl/on-device-gl.sh ]; then
    source .devcarry-gl/on-device-gl.sh || echo "GL libraries / miniworld not installed"
  elif [ -d /tmp/site-gl/miniworld ]; then  # installed by an earlier call on this warm machine
    export PYTHONPATH=/tmp/site-gl:$PYTHONPATH
    export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
  fi
  REDIS=${REDIS:-redis://127.0.0.1:6379/0}
else
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
  if [ -z "${REDIS:-}" ]; then  # never the machine's 6379: a private server on a free port
    PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    RDIR=$(mktemp -d)
    redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$RDIR" \
      --daemonize yes --pidfile "$RDIR/redis.pid" --logfile "$RDIR/redis.log" || exit 1
    for _ in $(seq 50); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
    REDIS=redis://127.0.0.1:$PORT/0
  fi
fi
vlmq() { python3 -m ops.cli "$@"; }

# Can the env render here? If not, measure on synthetic frames rather than not at all.
if ! python3 -c "import sys; from ops.bench.agents import renderer; print(renderer(sys.argv[1], int(sys.argv[2])))" \
    "$ENV_ID" "$SIZE" 2>"$OUT/render_probe.log"; then
  echo "WARNING: $ENV_ID does not render here ($(tail -1 "$OUT/render_probe.log")); falling back to Frames-v0"
  ENV_ID=Frames-v0
fi

M=/tmp/vlmq-qwen2vl-$PRESET
V=/tmp/vlmq-vla-$PRESET
[ -f "$M/config.json" ] || vlmq make-model --arch qwen2-vl --preset "$PRESET" --out "$M" --device "$DEVICE" 2>&1 | tail -1
[ -d "$V" ] || vlmq vla init --vlm "$M" --out "$V" --device "$DEVICE" 2>&1 | tail -1
echo "models ready after $((SECONDS - t0)) s"

KINDS=action_chunk
[ "$CHAT_SESSIONS" -gt 0 ] && KINDS=action_chunk,text_action
PREFIX=agents$$
# One worker for both parts: while no chat request comes, serving text_action too changes nothing.
# (python3 itself in the background, not the vlmq function: $! must be the worker's pid)
python3 -m ops.cli --log-level WARNING worker --redis-url "$REDIS" --prefix "$PREFIX" --backend hf \
  --model "$M" --option "vla=$V" --option ignore_eos=1 --device "$DEVICE" --kinds "$KINDS" \
  --max-batch 64 --max-wait-ms 5 --name vla-worker >"$OUT/worker.log" 2>&1 &
W=$!
python3 - "$REDIS" "$PREFIX" "$W" <<'PY' || { tail -20 "$OUT/worker.log"; exit 1; }
import os, sys, time, redis
r = redis.Redis.from_url(sys.argv[1])
for _ in range(2400):
    if r.exists(f"{sys.argv[2]}:worker:vla-worker"):
        sys.exit(0)
    try:
        os.kill(int(sys.argv[3]), 0)
    except OSError:
        sys.exit("the worker exited")
    time.sleep(0.25)
sys.exit("the worker did not start within 10 minutes")
PY
echo "worker ready after $((SECONDS - t0)) s"

LABEL="VLA worker ($PRESET-shape Qwen2-VL + untrained expert, vlmq vla init; serves $KINDS) on ${VLMQ_BENCH_GPU:-$DEVICE}"
common=(bench agents --worker external --redis-url "$REDIS" --prefix "$PREFIX" --env "$ENV_ID" --size "$SIZE"
        --sessions "$SESSIONS" --procs "$PROCS" --seconds "$RUN_S" --runs "$RUNS" --warmup-s "$WARMUP_S"
        --label "$LABEL" --out "$OUT/agents.json")
rc=0
vlmq --log-level WARNING "${common[@]}" --modes sync,fixed,adaptive --fresh 2>&1 | tee "$OUT/bench_vla.log" | grep -v "^ *$" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
echo "VLA only done after $((SECONDS - t0)) s"
if [ "$CHAT_SESSIONS" -gt 0 ]; then
  vlmq --log-level WARNING "${common[@]}" --modes fixed,adaptive --chat-sessions "$CHAT_SESSIONS" \
    --chat-max-tokens "$CHAT_TOKENS" --chat-procs "$CHAT_PROCS" --chat-tokenizer "$M" 2>&1 \
    | tee "$OUT/bench_mixed.log" | grep -v "^ *$" | tail -15
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  echo "mixed done after $((SECONDS - t0)) s"
fi
stop_worker
python3 - "$OUT/agents.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1])):
    if r["metric"].startswith(("starvation_fraction", "chunk_latency_p99", "requests_per_env_step", "chat_rps")):
        print(f"{r['metric']:70s} {r['value']:>10} [{r['min']}, {r['max']}] baseline {r['baseline']}")
PY
echo "all done after $((SECONDS - t0)) s"
exit $rc
