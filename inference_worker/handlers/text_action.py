"""`text_action` (Crafter / ALFWorld style): chat messages in, an action as text out.

With `admissible_commands`, every command is scored by its summed log-probability as the
assistant's answer (one batched forward pass over all requests' commands) and the best is
returned with all scores; without, the model's free text (reasoning stripped).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from inference_worker.engines.completion import Completion, Scored
from inference_worker.engines.prompt import from_chat_messages
from inference_worker.engines.sampling import Sampling
from inference_worker.handlers.base import HandlerOutput, Outcome, Stopwatch
from inference_worker.handlers.chat_base import AsyncChatHandler, ChatHandler
from schemas.errors import ProtocolError
from schemas.messages import Request, TextActionResult


def choice_result(req: Request, scored: Scored) -> TextActionResult:
    choice = req.admissible_commands[scored.best]
    return TextActionResult(
        text=choice,
        choice=choice,
        choice_index=scored.best,
        scores=scored.scores,
        prompt_tokens=scored.prompt_tokens,
    )


def free_text_result(c: Completion) -> TextActionResult:
    return TextActionResult(
        text=c.text,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        finish_reason=c.finish_reason,
    )


class TextActionHandler(ChatHandler):
    kind = "text_action"

    def run(self, requests: Sequence[Request]) -> HandlerOutput:
        sw = Stopwatch()
        results: List[Optional[Outcome]] = [None] * len(requests)
        prompts = self.build_prompts(requests, lambda r: from_chat_messages(r.messages, self.limits), results)
        choose = [i for i in prompts if requests[i].admissible_commands]
        free = [i for i in prompts if not requests[i].admissible_commands]
        if choose:
            scored = self.engine.score(
                [prompts[i] for i in choose], [requests[i].admissible_commands for i in choose], sw
            )
            for i, s in zip(choose, scored):
                results[i] = choice_result(requests[i], s)
        if free:
            done = self.engine.generate(
                [prompts[i] for i in free], [Sampling.of(requests[i]) for i in free], sw
            )
            for i, c in zip(free, done):
                results[i] = free_text_result(c)
        return HandlerOutput(results, sw.timings)  # type: ignore[arg-type]


class AsyncTextActionHandler(AsyncChatHandler):
    kind = "text_action"

    async def serve(self, request: Request) -> Outcome:
        try:
            prompt = self.engine.check(from_chat_messages(request.messages, self.limits))
            if request.admissible_commands:
                return choice_result(request, await self.engine.score(prompt, request.admissible_commands))
            return free_text_result(await self.engine.generate(prompt, Sampling.of(request)))
        except ProtocolError as exc:
            return exc
