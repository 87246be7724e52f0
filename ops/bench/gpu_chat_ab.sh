#!/usr/bin/env bash
# An A/B of served chat on the device tool's GPU machine, every side in one call on one card
# (docs/BENCHMARKS.md, "Chat throughput"): `vlmq bench chat --parts served` with the worker
# as it is (A), then once per argument with that argument's worker options (B, C, ...; a
# side's options comma-separated; one that starts with -- is a bench chat flag, as
# --prefill-min=16, and VLMQ_<NAME>=... a variable of that side's processes, as
# VLMQ_GIL_SWITCH_MS=0.5), each into its own file; with PROFILE=1 each side's
# worker also writes a torch profiler trace of 100 steps (`vlmq worker --profile-dir`) and
# its summary into $OUT/profile_<side> (TRACES=0 keeps the summaries only). With the carry
# of gpu_chat.sh ([".devcarry", ".devcarry-chat"]):
#   VLMQ_BENCH_COMMIT=<sha> PROFILE=1 bash ops/bench/gpu_chat_ab.sh decode_ahead=off vision_graphs=on,prefill_graphs=on
# REPEAT=2 runs every side twice, interleaved (a1 b1 a2 b2). Each side takes ~80 s on an
# H100: worker start, an 8-s warm-up (14 s with PROFILE=1, so that the trace is taken and
# written before the windows; a larger PROFILE_SKIP needs a longer WARMUP_S), 3 windows of
# 6 s. GPU_TESTS=1 runs tests/test_models_gpu.py first. Comes back: chat_<side>.json,
# ab.log and, with PROFILE=1, a trace and a summary per side (the device tool returns 8
# files at most).
# On a CPU: DEVICE=cpu builds a tiny checkpoint, and BENCH_ARGS adds bench chat flags, e.g.
#   DEVICE=cpu BENCH_ARGS="--sessions 4 --procs 1 --image-size 64 --max-tokens 4 --seconds 1" \
#     OUT=/tmp/ab bash ops/bench/gpu_chat_ab.sh vision_graphs=padded
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: bash ops/bench/gpu_chat_ab.sh KEY=VALUE[,KEY=VALUE...] [...]"; exit 2; }
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  OUT=${OUT:-/tmp/vlmq-out}
  mkdir -p "$OUT"
  BENCH_2B=$OUT/tiny-qwen2-vl  # the name is the GPU's; on a CPU the checkpoint is tiny
  [ -f "$BENCH_2B/config.json" ] || python3 -m ops.cli make-model --out "$BENCH_2B" 2>&1 | tail -1
  DTYPE=float32
else
  source ops/bench/gpu_env.sh || exit 1
  ensure_2b
  DTYPE=auto
fi
if [ -n "${GPU_TESTS:-}" ]; then
  timeout "${TESTS_S:-150}" python3 -m pytest tests/test_models_gpu.py -q -p no:cacheprovider -p no:logging \
    -W ignore --tb=short 2>&1 | tail -15 | tee -a "$OUT/ab.log"
fi
side() {  # side NAME [--option KEY=VALUE ...]
  local name=$1
  shift
  local warmup=${WARMUP_S:-8}
  if [ -n "${PROFILE:-}" ]; then
    export VLMQ_PROFILE_DIR=$OUT/profile_$name VLMQ_PROFILE_SKIP=${PROFILE_SKIP:-300}
    warmup=${WARMUP_S:-14}
  else
    unset VLMQ_PROFILE_DIR VLMQ_PROFILE_SKIP
  fi
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
  timeout "${SIDE_S:-240}" python3 -m ops.cli bench chat --model "$BENCH_2B" --device "$DEVICE" --dtype "$DTYPE" \
    --parts served --runs 3 --warmup-s "$warmup" --seconds "${SECONDS_PER_RUN:-6}" ${BENCH_ARGS:-} \
    --out "$OUT/chat_$name.json" "$@" 2>&1 |
    grep -v "WARNING: Target" | tee -a "$OUT/ab.log" | grep -E "^(throughput|gpu_util|decode_rows|outside)"
}
names=(b c d e f g)
sides=("$@")
# REPEAT=n: the whole list of sides n times over (a b c a b c ...; files chat_a1, chat_b1,
# chat_a2, ...): one worker start can settle into a different closed-loop rhythm than the
# next, which moves its windows together (docs/BENCHMARKS.md), so an A/B compares starts
for round in $(seq 1 "${REPEAT:-1}"); do
  tag=$([ "${REPEAT:-1}" = 1 ] || echo "$round")
  echo "a$tag: the worker as it is"
  side "a$tag"
  for i in "${!sides[@]}"; do
    opts=() envs=()
    IFS=, read -ra kvs <<<"${sides[$i]}"
    for kv in "${kvs[@]}"; do
      if [[ $kv == --* ]]; then
        opts+=("${kv%%=*}" "${kv#*=}")
      elif [[ $kv == VLMQ_* ]]; then
        envs+=("$kv")
      else
        opts+=(--option "$kv")
      fi
    done
    echo "${names[$i]}$tag: ${envs[*]} ${opts[*]}"
    (
      [ ${#envs[@]} -eq 0 ] || export "${envs[@]}"
      side "${names[$i]}$tag" "${opts[@]}"
    )
  done
done
if [ "${TRACES:-1}" = 0 ]; then rm -f "$OUT"/profile_*/*.trace.json.gz; fi
