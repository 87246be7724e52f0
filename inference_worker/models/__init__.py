"""Model building and loading: `make_model` (random-weight checkpoints of real
architectures) and `load_vlm` (any local Qwen-VL folder -> model, processor, tokenizer).

Exports resolve lazily so that `inference_worker.models.errors` and the CLI stay
importable without torch or transformers.
"""

from typing import Any

__all__ = ["LoadedVLM", "ModelLoadError", "load_vlm", "make_model"]


def __getattr__(name: str) -> Any:
    if name in ("LoadedVLM", "load_vlm"):
        from inference_worker.models import loading

        return getattr(loading, name)
    if name == "make_model":
        from inference_worker.models.make import make_model

        return make_model
    if name == "ModelLoadError":
        from inference_worker.models.errors import ModelLoadError

        return ModelLoadError
    raise AttributeError(name)
