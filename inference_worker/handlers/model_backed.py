"""Handlers of the model backends (`hf`, `vllm`): the model is loaded once and shared.

`FACTORIES` maps a kind to what builds its handler from the shared model; a kind is
added by adding its factory (the VLA's `action_chunk` reuses `Shared.vlm`, the loaded
transformers model). The model is loaded before any handler is built, so a wrong folder
fails the worker at start with the loader's message. With `vllm` the chat kinds are
`AsyncHandler`s (vLLM batches); `action_chunk` needs the transformers model, so a vllm
worker asked to serve it (a VLA folder configured) refuses to start rather than load the
VLM a second time beside vLLM's.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

from inference_worker.handlers.base import Handler
from inference_worker.handlers.chat_base import AsyncChatHandler, ChatHandler
from inference_worker.handlers.preference import PreferenceHandler
from inference_worker.handlers.structured_action import StructuredActionHandler
from inference_worker.handlers.text_action import TextActionHandler
from inference_worker.models.errors import ModelLoadError
from inference_worker.settings import WorkerSettings

log = logging.getLogger("vlmq.handlers")
CHAT_KINDS = ("text_action", "structured_action", "preference")


class Shared:
    """What the handlers of one worker share: settings, the loaded model, the chat engine."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.vlm: Optional[Any] = None  # LoadedVLM (hf backend)
        self._engine: Optional[Any] = None
        if settings.backend == "hf":
            self.vlm = self._load()
            if any(k in CHAT_KINDS for k in settings.kinds):
                # the engine is built (and self-checked, before anything patches the model)
                # ahead of the handlers: a fallback reloads the model the VLA then shares
                self._engine = self._build_engine()
        elif settings.backend == "vllm":
            from inference_worker.engines.vllm_engine import VLLMChatEngine

            if "action_chunk" in settings.kinds and _vla_configured(settings):
                raise ModelLoadError(
                    "--backend vllm does not serve action_chunk (the VLA runs on the hf backend's "
                    "model, which would be a second copy of the VLM beside vLLM's): run it in a worker "
                    "of its own with --backend hf --kinds action_chunk, and leave it out of this one's --kinds"
                )
            self._engine = VLLMChatEngine.from_settings(settings)

    @property
    def serves_async(self) -> bool:
        return self.settings.backend == "vllm"

    def _load(self) -> Any:
        from inference_worker.models.loading import load_vlm

        s = self.settings
        return load_vlm(s.model_path or "", device=s.device, dtype=s.dtype, quantize=s.quantize)

    def _build_engine(self) -> Any:
        from inference_worker.engines.chat_engine import ChatEngine
        from inference_worker.engines.options import EngineOptions, SelfCheckOptions
        from inference_worker.engines.self_check import checked_engine

        options = self.settings.option_group(EngineOptions)
        check = self.settings.option_group(SelfCheckOptions)
        # as many sequences decode at once as the largest chat batch the worker allows
        most = max(self.settings.batch_limit(k) for k in CHAT_KINDS)
        if not check.self_check:
            return ChatEngine(self.vlm, options, max_sequences=most)
        engine, self.vlm = checked_engine(
            self.vlm,
            options,
            reload=self._load,
            strict=self.settings.strict,
            tol=check.self_check_tol,
            max_sequences=most,
        )
        return engine

    def chat_engine(self) -> Any:
        if self._engine is None:
            self._engine = self._build_engine()
        return self._engine


def _vla_configured(settings: WorkerSettings) -> bool:
    from inference_worker.handlers.action_chunk import vla_folder

    return bool(vla_folder(settings))


def _chat(handler: Callable[..., ChatHandler]):
    def build(s: Shared) -> Handler:
        h = handler(s.chat_engine(), s.settings.limits)
        return AsyncChatHandler(h) if s.serves_async else h

    return build


def _action_chunk(s: Shared) -> Optional[Handler]:
    """The VLA handler when a VLA folder is configured (--option vla=DIR), else None."""
    from inference_worker.handlers.action_chunk import build_action_chunk_handler, vla_folder

    if not vla_folder(s.settings):
        log.info("action_chunk needs a VLA folder (--option vla=DIR or VLMQ_VLA)")
        return None
    return build_action_chunk_handler(s.settings, vlm=s.vlm)


FACTORIES: Dict[str, Callable[[Shared], Optional[Handler]]] = {
    "text_action": _chat(TextActionHandler),
    "structured_action": _chat(StructuredActionHandler),
    "preference": _chat(PreferenceHandler),
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
