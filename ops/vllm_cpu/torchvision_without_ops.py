"""Let torchvision import when its C++ operators cannot load (a CUDA wheel beside a CPU torch).

torchvision guards every meta registration of its C++ operators by whether they loaded,
except two `torch.library.register_fake` decorators (nms, qnms), which then raise at
import. This rewrites those two into the same guard, in the installed file of the venv
that runs it. Nothing else of torchvision changes; its operators stay unavailable.
"""

from __future__ import annotations

import importlib.util
import os

GUARD = (
    "\n\ndef _fake_if_loaded(name):\n"
    "    if torchvision.extension._has_ops():\n"
    "        return torch.library.register_fake(name)\n"
    "    return lambda fn: fn\n"
)


def main() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    path = os.path.join(os.path.dirname(spec.origin), "_meta_registrations.py")
    with open(path) as f:
        text = f.read()
    if "_fake_if_loaded" in text:
        return
    head, sep, rest = text.partition("\n\n@functools.lru_cache(None)")
    if not sep:
        raise SystemExit(f"{path}: unexpected layout; leave torchvision as it is")
    text = head + GUARD + sep + rest.replace("@torch.library.register_fake(", "@_fake_if_loaded(")
    with open(path, "w") as f:
        f.write(text)
    print(f"guarded the fake registrations of {path}")


if __name__ == "__main__":
    main()
