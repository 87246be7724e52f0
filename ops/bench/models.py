"""The checkpoint a model benchmark runs on: the one given, or a random-weight one built here."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from typing import Iterator

log = logging.getLogger("vlmq.bench")


@contextlib.contextmanager
def checkpoint(folder: str, arch: str, preset: str, device: str) -> Iterator[str]:
    """`folder`; when it is empty, a random-weight `arch` `preset` checkpoint (seed 0) built on
    `device` in a temporary folder that is removed on exit."""
    if folder:
        yield folder
        return
    from inference_worker.models.make import make_model

    with tempfile.TemporaryDirectory(prefix="vlmq-bench-model-") as tmp:
        t0 = time.perf_counter()
        built = make_model(arch, tmp, preset=preset, seed=0, device=device)
        log.info("built %s %s in %.1f s", arch, preset, time.perf_counter() - t0)
        yield built
