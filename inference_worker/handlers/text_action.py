"""`text_action` (Crafter / ALFWorld style): chat messages in, an action as text out.

With `admissible_commands`, every command is scored by its summed log-probability as the
assistant's answer and the best is returned with all scores; without, the model's free
text (reasoning stripped).
"""

from __future__ import annotations

from inference_worker.engines.prompt import from_chat_messages
from inference_worker.engines.sampling import Sampling
from inference_worker.handlers.base import Generate, Program, Score
from inference_worker.handlers.chat_base import ChatHandler
from schemas.messages import TextActionRequest, TextActionResult


class TextActionHandler(ChatHandler):
    kind = "text_action"

    def program(self, req: TextActionRequest) -> Program:
        prompt = self.check(from_chat_messages(req.messages, self.limits))
        if req.admissible_commands:
            scored = yield Score(prompt, req.admissible_commands)
            best = scored.best
            choice = req.admissible_commands[best]
            return TextActionResult(
                text=choice,
                choice=choice,
                choice_index=best,
                scores=scored.scores,
                prompt_tokens=scored.prompt_tokens,
            )
        c = yield Generate(prompt, Sampling.of(req))
        return TextActionResult(
            text=c.text,
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            finish_reason=c.finish_reason,
        )
