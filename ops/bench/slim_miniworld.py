"""Rewrite a miniworld wheel without the textures and meshes MiniWorld-OneRoom-v0 never loads.

The wheel is 39 MB, nearly all of it textures; a device call carries at most 64 MiB, and
the OneRoom benchmark (gpu_agents.sh) loads three textures (the floor, wall and ceiling
ones below, seen with an audit hook on `open`). The slim wheel (~1 MB) lets the GL
packages, Mesa and MiniWorld travel in one call. For the device machine only: any other
MiniWorld env needs the full wheel.

    python3 ops/bench/slim_miniworld.py .devcarry-gl/whl/miniworld-2.1.0-py3-none-any.whl
"""

from __future__ import annotations

import os
import re
import sys
import zipfile

KEEP = ("concrete_", "concrete_tiles_", "floor_tiles_bw_")  # OneRoom's textures, every variant


def wanted(name: str) -> bool:
    parts = name.split("/")
    if len(parts) > 2 and parts[0] == "miniworld" and parts[1] in ("textures", "meshes"):
        return parts[1] == "textures" and len(parts) == 3 and re.sub(r"\d+\.png$", "", parts[2]) in KEEP
    return True


def main(path: str) -> None:
    tmp = path + ".slim"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        kept = {i.filename for i in src.infolist() if wanted(i.filename)}
        for info in src.infolist():
            if info.filename not in kept:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):  # list only what is left
                rows = data.decode().splitlines()
                data = ("\n".join(r for r in rows if r.split(",")[0] in kept) + "\n").encode()
            dst.writestr(info, data)
    before, after = os.path.getsize(path), os.path.getsize(tmp)
    os.replace(tmp, path)
    print(f"{path}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")


if __name__ == "__main__":
    main(sys.argv[1])
