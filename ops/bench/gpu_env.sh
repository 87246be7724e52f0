# Sourced by the GPU bench scripts on the device machine: the carried wheels (redis-py,
# pydantic, ... and the pinned transformers), a redis-server on 6379, PYTHONPATH, $OUT,
# VLMQ_BENCH_GPU (the card's name, for the records' `machine`), VLMQ_STRICT, and
# `ensure_2b`, which builds the random-weight 2B-shape Qwen2-VL the benches share in
# $BENCH_2B (/tmp/vlmq-qwen2vl-2b) once per machine.
source .devcarry/on-device.sh || return 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-chat .devcarry-chat/*.whl || return 1
export PYTHONPATH=/tmp/site-chat:$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
export VLMQ_BENCH_GPU="${VLMQ_BENCH_GPU:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)}"
# a benchmark measures the engine's fast path or nothing: a worker whose start-up self-check
# fails refuses to start instead of serving on the slower stock path (engines/self_check.py)
export VLMQ_STRICT=${VLMQ_STRICT:-1}
OUT=${OUT:-/tmp/vlmq-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
BENCH_2B=/tmp/vlmq-qwen2vl-2b
ensure_2b() {
  [ -f "$BENCH_2B/config.json" ] ||
    python3 -m ops.cli make-model --arch qwen2-vl --preset 2b --out "$BENCH_2B" --device cuda 2>&1 | tail -1
}
