#!/usr/bin/env bash
# Unpacks the Mesa packages a device call carries (.devcarry-mesa1/, .devcarry-mesa2/; see
# prepare_mesa.sh) into /tmp/mesaroot, dropping every library the machine already has (its
# own copies stay in use), and writes /tmp/mesaroot/env.sh: the variables that make EGL
# render with Mesa's llvmpipe on the CPU (gpu_agents.sh sources it with RENDER=cpu).
set -euo pipefail
root=/tmp/mesaroot
lib=$root/usr/lib/x86_64-linux-gnu
mkdir -p "$root"
for f in .devcarry-mesa1/*.deb .devcarry-mesa2/*.deb; do
  [ -e "$f" ] && dpkg -x "$f" "$root"
done
[ -d "$lib" ] || { echo "no Mesa packages here: carry .devcarry-mesa1 and .devcarry-mesa2"; exit 1; }
have=$(ldconfig -p | awk 'NR > 1 {print $1}')
for so in "$lib"/*.so.*; do
  [ -L "$so" ] && continue
  name=$(basename "$so")
  case $name in libEGL_mesa*|libgbm*|libglapi*|libLLVM*) continue ;; esac
  soname=$(echo "$name" | sed -E 's/(\.so\.[0-9]+).*/\1/')
  if grep -qxF "$soname" <<<"$have"; then rm -f "$lib/$soname" "$so"; fi
done
cat >"$root/egl_mesa.json" <<JSON
{"file_format_version": "1.0.0", "ICD": {"library_path": "$lib/libEGL_mesa.so.0"}}
JSON
cat >"$root/env.sh" <<ENV
export LD_LIBRARY_PATH=$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export LIBGL_DRIVERS_PATH=$lib/dri
export __EGL_VENDOR_LIBRARY_FILENAMES=$root/egl_mesa.json
export LP_NUM_THREADS=1
ENV
ls "$lib/dri/swrast_dri.so" >/dev/null 2>&1 && ls "$lib"/libLLVM* >/dev/null 2>&1 && echo "Mesa (llvmpipe) ready in $root" ||
  echo "Mesa partly unpacked in $root (carry the other .devcarry-mesa folder)"
