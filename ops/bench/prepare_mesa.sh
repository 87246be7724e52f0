#!/usr/bin/env bash
# Mesa's software renderer (llvmpipe) for the device tool's GPU machine, so MiniWorld can
# render on its CPU cores instead of on the card that serves the model (docs/BENCHMARKS.md,
# "Env agents": sixteen EGL contexts on the serving GPU slow its batches ~5x). Debian
# packages of Mesa's EGL vendor library, its DRI drivers and what they link, split in two
# git-ignored folders that each fit a call's 64 MiB carry beside others:
#   .devcarry-mesa1/  libLLVM, the DRI drivers, z3            (~37 MB)
#   .devcarry-mesa2/  the rest                                 (~14 MB)
# Usage, from the repository root: ../shared/device/prepare-gl.sh, then
#   python3 ops/bench/slim_miniworld.py .devcarry-gl/whl/miniworld-2.1.0-py3-none-any.whl
#   bash ops/bench/prepare_mesa.sh
# (the slim wheel keeps OneRoom's textures only: 1.8 MB instead of 39). On the device tool,
# a call carrying [".devcarry-gl", ".devcarry-mesa1", ".devcarry-mesa2"] (~54 MB) that runs
#   source .devcarry-gl/on-device-gl.sh && bash ops/bench/on_device_mesa.sh
# then, on the same warm machine, a call carrying [".devcarry", ".devcarry-chat"] that runs
#   RENDER=cpu VLMQ_BENCH_COMMIT=<sha> bash ops/bench/gpu_agents.sh
# (/tmp outlives a call while the machine is warm: MiniWorld in /tmp/site-gl, Mesa in
# /tmp/mesaroot).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
for d in .devcarry-mesa1 .devcarry-mesa2; do
  grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
  rm -rf "$d" && mkdir -p "$d"
done
o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64-lists'
mkdir -p /tmp/amd64-lists/partial
apt-get $o update -qq
(cd .devcarry-mesa1 && apt-get $o download -qq libllvm15 libgl1-mesa-dri libz3-4 2>/dev/null)
(cd .devcarry-mesa2 && apt-get $o download -qq libegl-mesa0 libgbm1 libglapi-mesa libdrm2 libdrm-amdgpu1 \
  libdrm-intel1 libdrm-nouveau2 libdrm-radeon1 libelf1 libsensors5 libwayland-client0 libwayland-server0 \
  libx11-xcb1 libxcb-dri2-0 libxcb-dri3-0 libxcb-present0 libxcb-randr0 libxcb-sync1 libxcb-xfixes0 libxcb1 \
  libxshmfence1 libzstd1 libexpat1 libedit2 libffi8 libtinfo6 libxml2 libicu72 libpciaccess0 libbsd0 libmd0 \
  libxau6 libxdmcp6 libx11-6 2>/dev/null)
du -sh .devcarry-mesa1 .devcarry-mesa2
