"""Model building and loading: `make_model` (random-weight checkpoints of real
architectures) and `load_vlm` (any local Qwen-VL folder -> model, processor, tokenizer)."""

from inference_worker.models.loading import LoadedVLM, ModelLoadError, load_vlm
from inference_worker.models.make import make_model

__all__ = ["LoadedVLM", "ModelLoadError", "load_vlm", "make_model"]
