#!/usr/bin/env bash
# `vlmq bench vla` on the device tool's GPU machine, carry [".devcarry", ".devcarry-chat"]
# as for gpu_chat.sh:   bash ops/bench/gpu_vla.sh [bench vla flags]
set -uo pipefail
source ops/bench/gpu_env.sh || exit 1
python3 -m ops.cli bench vla --out "$OUT/vla.json" "$@" 2>&1 | tee "$OUT/vla.log"
