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
# $OUT/agents.json (the mixed metrics end in _mixed), logs beside it, and the worker's
# /metrics (batch sizes, batch/stage seconds, waits) after each part in metrics_*.txt.
# Split over two calls on one warm machine (each call is at most 10 minutes): the first with
# PARTS=vla KEEP_WORKER=1 OUT=/tmp/o (the worker outlives the call in its own session), the
# second with PARTS=mixed OUT=/tmp/o reuses it (and its Redis, the daemon on 6379 there);
# copy /tmp/o to the call's $OUT.
# RENDER=cpu renders MiniWorld with Mesa's llvmpipe on the CPU cores (ops/bench/prepare_mesa.sh,
# on_device_mesa.sh) instead of through the NVIDIA EGL driver on the serving card; TAG is
# appended to the metric names (vlmq bench agents --tag). MIXED_MODES (fixed,adaptive) are the
# modes of the mixed part.
# DIAG_FRAMES=1 adds one unrecorded fixed-g run on synthetic frames after the VLA part: with
# no rendering beside the worker, it tells the simulators' share of the box from the worker's.
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
RENDER=${RENDER:-auto}  # where MiniWorld renders (bench agents --render): auto (EGL's driver) or cpu
TAG=${TAG:-}
PARTS=${PARTS:-vla,mixed}  # vla: the VLA-only modes (writes agents.json afresh); mixed: with chat beside
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
  source ops/bench/gpu_env.sh || exit 1
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
if [ "$RENDER" = cpu ]; then
  source /tmp/mesaroot/env.sh || { echo "RENDER=cpu: run ops/bench/on_device_mesa.sh first"; exit 1; }
fi
vlmq() { python3 -m ops.cli "$@"; }

# Can the env render here? If not, measure on synthetic frames rather than not at all.
if ! python3 -c "import sys; from ops.bench.agents import renderer; print(renderer(sys.argv[1], int(sys.argv[2]), sys.argv[3]))" \
    "$ENV_ID" "$SIZE" "$RENDER" 2>"$OUT/render_probe.log"; then
  echo "WARNING: $ENV_ID does not render here ($(tail -1 "$OUT/render_probe.log")); falling back to Frames-v0"
  ENV_ID=Frames-v0
fi

M=/tmp/vlmq-qwen2vl-$PRESET
V=/tmp/vlmq-vla-$PRESET
[ -f "$M/config.json" ] || vlmq make-model --arch qwen2-vl --preset "$PRESET" --out "$M" --device "$DEVICE" 2>&1 | tail -1
[ -d "$V" ] || vlmq vla init --vlm "$M" --out "$V" --device "$DEVICE" 2>&1 | tail -1
echo "models ready after $((SECONDS - t0)) s"

METRICS_PORT=${METRICS_PORT:-9464}
# The worker's own view of each part (batch sizes, batch and stage seconds, waits), for
# telling the worker's time from the agents' and Redis's: its /metrics after each part.
scrape() {
  python3 - "$METRICS_PORT" <<'PY' >"$OUT/$1" 2>&1 || echo "no /metrics: $(tail -1 "$OUT/$1")"
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
for line in text.splitlines():
    if line.startswith(("vlmq_batch_size", "vlmq_batch_seconds", "vlmq_stage_seconds", "vlmq_schedule_wait",
                        "vlmq_stream_wait", "vlmq_request_latency", "vlmq_worker_latency", "vlmq_batches_total",
                        "vlmq_requests_total")) and ("_sum" in line or "_count" in line or "_total" in line):
        print(line)
PY
}
KINDS=action_chunk
[ "$CHAT_SESSIONS" -gt 0 ] && KINDS=action_chunk,text_action
PREFIX=agents$$
WPID=/tmp/vlmq-agents-worker.pid  # KEEP_WORKER: the worker outlives this call, for the next one
if [ -f "$WPID" ] && read -r W PREFIX <"$WPID" && kill -0 "$W" 2>/dev/null; then
  echo "reusing worker $W (prefix $PREFIX) of an earlier call"
else
  # One worker for both parts: while no chat request comes, serving text_action too changes nothing.
  wargs=(-m ops.cli --log-level WARNING worker --redis-url "$REDIS" --prefix "$PREFIX" --backend hf --model "$M"
         --option "vla=$V" --option ignore_eos=1 --device "$DEVICE" --kinds "$KINDS" --max-batch 64
         --max-wait-ms 5 --name vla-worker --metrics-port "$METRICS_PORT")
  if [ -n "${KEEP_WORKER:-}" ]; then
    # a session of its own (the device machine ends a call's processes, not other sessions');
    # setsid(1) may fork, so the worker writes its own pid
    rm -f "$WPID"
    python3 -c 'import os, sys
if os.getpid() == os.getpgid(0) and os.fork():
    os._exit(0)
os.setsid()
open(sys.argv[1], "w").write(f"{os.getpid()} {sys.argv[2]}\n")
os.execvp(sys.executable, [sys.executable] + sys.argv[3:])' "$WPID" "$PREFIX" "${wargs[@]}" >>"$OUT/worker.log" 2>&1 &
    for _ in $(seq 100); do [ -s "$WPID" ] && break; sleep 0.1; done
    read -r W PREFIX <"$WPID" || { echo "the worker did not start"; exit 1; }
  else
    # (python3 itself in the background, not the vlmq function: $! must be the worker's pid)
    python3 "${wargs[@]}" >"$OUT/worker.log" 2>&1 &
    W=$!
  fi
fi
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
        --label "$LABEL" --tag "$TAG" --render "$RENDER" --out "$OUT/agents.json")
rc=0
if [[ ,$PARTS, == *,vla,* ]]; then
vlmq --log-level WARNING "${common[@]}" --modes sync,fixed,adaptive --fresh 2>&1 | tee "$OUT/bench_vla.log" | grep -v "^ *$" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
echo "VLA only done after $((SECONDS - t0)) s"
scrape metrics_vla.txt
fi
if [ -n "${DIAG_FRAMES:-}" ] && [ "$ENV_ID" != Frames-v0 ]; then
  # Diagnostic, not a record (one run, a scratch file): the same load on synthetic frames,
  # which need no rendering, tells the simulator's share of the box from the worker's.
  vlmq --log-level WARNING bench agents --worker external --redis-url "$REDIS" --prefix "$PREFIX" --env Frames-v0 \
    --size "$SIZE" --sessions "$SESSIONS" --procs "$PROCS" --seconds "$RUN_S" --runs 1 --warmup-s "$WARMUP_S" \
    --modes fixed --fresh --label diagnostic --out /tmp/agents_frames_diag.json 2>&1 | grep -v "^ *$" | tail -6
  echo "Frames-v0 diagnostic done after $((SECONDS - t0)) s"
fi
if [ "$CHAT_SESSIONS" -gt 0 ] && [[ ,$PARTS, == *,mixed,* ]]; then
  vlmq --log-level WARNING "${common[@]}" --modes "${MIXED_MODES:-fixed,adaptive}" --chat-sessions "$CHAT_SESSIONS" \
    --chat-max-tokens "$CHAT_TOKENS" --chat-procs "$CHAT_PROCS" --chat-tokenizer "$M" 2>&1 \
    | tee "$OUT/bench_mixed.log" | grep -v "^ *$" | tail -15
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  echo "mixed done after $((SECONDS - t0)) s"
  scrape metrics_mixed.txt
fi
[ -n "${KEEP_WORKER:-}" ] && W=""  # left running for the next call
stop_worker
python3 - "$OUT/agents.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1])):
    if r["metric"].startswith(("starvation_fraction", "chunk_latency_p99", "requests_per_env_step", "chat_rps")):
        print(f"{r['metric']:70s} {r['value']:>10} [{r['min']}, {r['max']}] baseline {r['baseline']}")
PY
echo "all done after $((SECONDS - t0)) s"
exit $rc
