"""Handlers of the model backends (`hf`, `vllm`): the model is loaded once and shared.

`FACTORIES` maps a kind to what builds its handler from the shared model; a kind is
added by adding its factory (the VLA's `action_chunk` reuses `Shared.vlm`, the loaded
transformers model). The model is loaded before any handler is built, so a wrong folder
fails the worker at start with the loader's message.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

from inference_worker.handlers.base import Handler
from inference_worker.handlers.preference import PreferenceHandler
from inference_worker.handlers.structured_action import StructuredActionHandler
from inference_worker.handlers.text_action import TextActionHandler
from inference_worker.settings import WorkerSettings

log = logging.getLogger("vlmq.handlers")


class Shared:
    """What the handlers of one worker share: settings, the loaded model, the chat engine."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.vlm: Optional[Any] = None  # LoadedVLM (hf backend)
        self._engine: Optional[Any] = None
        if settings.backend == "hf":
            from inference_worker.models.loading import load_vlm

            self.vlm = load_vlm(
                settings.model_path or "",
                device=settings.device,
                dtype=settings.dtype,
                quantize=settings.quantize,
            )
        elif settings.backend == "vllm":
            from inference_worker.engines.vllm_engine import VLLMChatEngine

            self._engine = VLLMChatEngine.from_settings(settings)

    def chat_engine(self) -> Any:
        if self._engine is None:
            from inference_worker.engines.chat_engine import ChatEngine
            from inference_worker.engines.options import EngineOptions

            # as many sequences decode at once as the largest chat batch the worker allows
            chat = [k for k in self.settings.kinds if k != "action_chunk"] or ["text_action"]
            most = max(self.settings.batch_limit(k) for k in chat)
            self._engine = ChatEngine(
                self.vlm, EngineOptions.parse(self.settings.options), max_sequences=most
            )
        return self._engine


def _action_chunk(s: Shared) -> Optional[Handler]:
    """The VLA handler when a VLA folder is configured (--option vla=DIR), else None."""
    from inference_worker.handlers.action_chunk import build_action_chunk_handler, vla_folder

    if not vla_folder(s.settings):
        log.info("action_chunk needs a VLA folder (--option vla=DIR or VLMQ_VLA)")
        return None
    return build_action_chunk_handler(s.settings, vlm=s.vlm)


FACTORIES: Dict[str, Callable[[Shared], Optional[Handler]]] = {
    "text_action": lambda s: TextActionHandler(s.chat_engine(), s.settings.limits),
    "structured_action": lambda s: StructuredActionHandler(s.chat_engine(), s.settings.limits),
    "preference": lambda s: PreferenceHandler(s.chat_engine(), s.settings.limits),
    "action_chunk": _action_chunk,
}


def build_model_handlers(settings: WorkerSettings) -> Dict[str, Handler]:
    shared = Shared(settings)
    built = {k: FACTORIES[k](shared) for k in settings.kinds if k in FACTORIES}
    handlers = {k: h for k, h in built.items() if h is not None}
    missing = [k for k in settings.kinds if k not in handlers]
    if missing:
        log.warning(
            "backend %s has no handler for %s: those streams are not read",
            settings.backend,
            ", ".join(missing),
        )
    if not handlers:
        raise ValueError(f"backend {settings.backend!r} serves none of the kinds {', '.join(settings.kinds)}")
    return handlers
