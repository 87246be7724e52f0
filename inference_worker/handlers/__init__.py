"""Handler registry: which handler serves each kind for a given backend."""

from __future__ import annotations

from typing import Dict

from inference_worker.handlers.base import Handler, HandlerOutput
from inference_worker.settings import WorkerSettings

__all__ = ["Handler", "HandlerOutput", "build_handlers"]


def build_handlers(settings: WorkerSettings) -> Dict[str, Handler]:
    if settings.backend == "synthetic":
        from inference_worker.handlers.synthetic import Faults, SyntheticHandler

        faults = Faults.from_options(settings.options)
        return {
            k: SyntheticHandler(k, settings.synthetic_latency_ms, settings.synthetic_chunk, faults)
            for k in settings.kinds
        }
    if settings.backend in ("hf", "vllm"):
        # the model is loaded once for all kinds; kinds register in model_backed.FACTORIES
        from inference_worker.handlers.model_backed import build_model_handlers

        return build_model_handlers(settings)
    raise ValueError(f"unknown backend {settings.backend!r}; choose hf, vllm or synthetic")
