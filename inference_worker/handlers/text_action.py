"""`text_action` (Crafter / ALFWorld style): chat messages in, an action as text out.

With `admissible_commands`, every command is scored by its summed log-probability as the
assistant's answer (one batched forward pass over all requests' commands) and the best is
returned with all scores; without, the model's free text (reasoning stripped).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from inference_worker.engines.prompt import from_chat_messages
from inference_worker.engines.sampling import Sampling
from inference_worker.handlers.base import HandlerOutput, Outcome, Stopwatch
from inference_worker.handlers.chat_base import ChatHandler
from schemas.messages import Request, TextActionResult


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
                best = s.best
                choice = requests[i].admissible_commands[best]
                results[i] = TextActionResult(
                    text=choice,
                    choice=choice,
                    choice_index=best,
                    scores=s.scores,
                    prompt_tokens=s.prompt_tokens,
                )
        if free:
            done = self.engine.generate(
                [prompts[i] for i in free], [Sampling.of(requests[i]) for i in free], sw
            )
            for i, c in zip(free, done):
                results[i] = TextActionResult(
                    text=c.text,
                    prompt_tokens=c.prompt_tokens,
                    completion_tokens=c.completion_tokens,
                    finish_reason=c.finish_reason,
                )
        return HandlerOutput(results, sw.timings)  # type: ignore[arg-type]
