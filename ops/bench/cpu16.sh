#!/usr/bin/env bash
# `vlmq bench scale` (one Redis, then a 3-node Redis Cluster) and `vlmq bench transport` on
# a machine with many cores, e.g. the 16 cores of the device tool's GPU host (no GPU work):
# where 4 agent processes, 4 workers and Redis each get a core, unlike on 2 cores. About 4
# minutes. Writes scale_cpu16.json/.png, scale_cluster_cpu16.json/.png and
# transport_cpu16.json into the folder given (default benchmarks/results), and cpu16.log.
# SKIP_CLUSTER=1 leaves out the cluster part (~1 minute), SKIP_SCALE=1 the one-Redis part;
# DURATION (3) is each measured window in s.
#
# On the device tool, from the repository root: first, here,
#   bash ../shared/device/prepare.sh fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 httptools==0.9.0 \
#     opentelemetry-api==1.45.3 annotated-doc==0.0.7
# (redis-py, pydantic and a redis-server with redis-cli, plus the HTTP baselines' servers and
# what fastapi imports that the GPU image lacks; prepare.sh downloads without dependencies),
# then a run with carry [".devcarry"] and the command
#   source .devcarry/on-device.sh && VLMQ_BENCH_COMMIT=<git SHA of this tree> bash ops/bench/cpu16.sh "$OUT"
# and copy what comes back into benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-benchmarks/results}
mkdir -p "$out"
exec > >(tee "$out/cpu16.log") 2>&1

if [ -z "${VLMQ_BENCH_COMMIT:-}" ] && ! git rev-parse HEAD >/dev/null 2>&1; then
  echo "no git checkout here: set VLMQ_BENCH_COMMIT to the SHA of this tree" >&2
  exit 2
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export VLMQ_BENCH_MACHINE=${VLMQ_BENCH_MACHINE:-"device tool GPU host, CPU only"}
vlmq() { python3 -m ops.cli --log-level WARNING "$@"; }

echo "cores: $(nproc), load: $(cut -d' ' -f1-3 /proc/loadavg), redis: $(redis-server --version | cut -d' ' -f3)"
t0=$SECONDS
if [ -z "${SKIP_SCALE:-}" ]; then
  vlmq bench scale --workers 1,4 --procs 1,2,4 --repeats 3 --duration "${DURATION:-3}" --out "$out/scale_cpu16.json"
  echo "scale: $((SECONDS - t0)) s"
fi
t1=$SECONDS
if [ -z "${SKIP_CLUSTER:-}" ]; then
  vlmq bench scale --workers 4 --procs 1,2,4 --repeats 3 --duration 3 --cluster-nodes 3 \
    --out "$out/scale_cluster_cpu16.json"
  echo "scale on a cluster: $((SECONDS - t1)) s"
fi
t2=$SECONDS
vlmq bench transport --rounds 3 --duration "${DURATION:-3}" --out "$out/transport_cpu16.json"
echo "transport: $((SECONDS - t2)) s; all: $((SECONDS - t0)) s"
