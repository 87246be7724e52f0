"""What the three chat kinds share: one engine, prompts built per request.

A request whose prompt cannot be built (an image that does not decode, more image
placeholders than images) fails alone with its ProtocolError; the rest of the batch
still runs. `ChatHandler` serves batches on the batching engine (hf); `AsyncChatHandler`
serves single requests on an engine that batches by itself (vLLM).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

from inference_worker.engines.prompt import ChatPrompt
from inference_worker.handlers.base import AsyncHandler, Handler, Outcome
from schemas.errors import ProtocolError
from schemas.limits import DEFAULT_LIMITS, Limits
from schemas.messages import Request


class ChatHandler(Handler):
    def __init__(self, engine: Any, limits: Limits = DEFAULT_LIMITS) -> None:
        self.engine = engine
        self.limits = limits

    def warmup(self) -> None:
        self.engine.warmup()

    def build_prompts(
        self,
        requests: Sequence[Request],
        build: Callable[[Any], ChatPrompt],
        results: List[Optional[Outcome]],
        indices: Optional[Sequence[int]] = None,
    ) -> Dict[int, ChatPrompt]:
        """index -> prompt for each request (of `indices`) that builds; failures go into `results`."""
        prompts: Dict[int, ChatPrompt] = {}
        for i in range(len(requests)) if indices is None else indices:
            try:
                prompts[i] = self.engine.check(build(requests[i]))
            except ProtocolError as exc:
                results[i] = exc
        return prompts


class AsyncChatHandler(AsyncHandler):
    """One request at a time on an engine whose `generate(prompt, sampling)` and
    `score(prompt, candidates)` are awaited per request (engines/vllm_engine.py)."""

    def __init__(self, engine: Any, limits: Limits = DEFAULT_LIMITS) -> None:
        self.engine = engine
        self.limits = limits

    async def warmup_async(self) -> None:
        await self.engine.warmup()

    def close(self) -> None:
        self.engine.close()  # the kinds share the engine: closing twice is a no-op
