"""What the three chat kinds share: one engine, prompts built per request.

A request whose prompt cannot be built (an image that does not decode, more image
placeholders than images) fails alone with its ProtocolError; the rest of the batch
still runs.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

from inference_worker.engines.prompt import ChatPrompt
from inference_worker.handlers.base import Handler, Outcome
from schemas.errors import ProtocolError
from schemas.limits import DEFAULT_LIMITS, Limits
from schemas.messages import Request


class ChatHandler(Handler):
    def __init__(self, engine: Any, limits: Limits = DEFAULT_LIMITS) -> None:
        self.engine = engine
        self.limits = limits
        # kinds with one prompt per request can have it built and its images encoded ahead
        self.prepares = type(self).prompt is not ChatHandler.prompt and hasattr(engine, "encode")

    def warmup(self) -> None:
        self.engine.warmup()

    def prompt(self, request: Any) -> ChatPrompt:
        """The request's prompt, for kinds that have exactly one."""
        raise NotImplementedError

    def prepare(self, requests: Sequence[Request]) -> List[Any]:
        """Each request's checked prompt with its images encoded, or its ProtocolError."""
        results: List[Optional[Outcome]] = [None] * len(requests)
        prompts = self.build_prompts(requests, self.prompt, results)
        self.engine.encode(list(prompts.values()))
        return [prompts.get(i, results[i]) for i in range(len(requests))]

    def build_prompts(
        self,
        requests: Sequence[Request],
        build: Callable[[Any], ChatPrompt],
        results: List[Optional[Outcome]],
        indices: Optional[Sequence[int]] = None,
        prepared: Optional[Sequence[Any]] = None,
    ) -> Dict[int, ChatPrompt]:
        """index -> prompt for each request (of `indices`) that builds; failures go into
        `results`. A request prepared ahead keeps what prepare() made of it."""
        prompts: Dict[int, ChatPrompt] = {}
        for i in range(len(requests)) if indices is None else indices:
            ready = prepared[i] if prepared is not None else None
            if isinstance(ready, ChatPrompt):
                prompts[i] = ready
                continue
            if isinstance(ready, ProtocolError):
                results[i] = ready
                continue
            try:
                prompts[i] = self.engine.check(build(requests[i]))
            except ProtocolError as exc:
                results[i] = exc
        return prompts
