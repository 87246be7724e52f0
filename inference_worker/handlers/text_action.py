"""`text_action` (Crafter / ALFWorld style): chat messages in, an action as text out.

With `admissible_commands`, every command is scored by its summed log-probability as the
assistant's answer and the best is returned with all scores; without, the model's text
(reasoning stripped), under the request's `constraint` if it has one, with per-token
logprobs and n answers when asked for.
"""

from __future__ import annotations

from typing import Any, List, Optional

from inference_worker.engines.completion import Completion
from inference_worker.engines.prompt import from_chat_messages
from inference_worker.handlers.base import Generate, Program, Score
from inference_worker.handlers.chat_base import ChatHandler
from schemas.messages import TextActionRequest, TextActionResult, TextChoice, TokenLogprob, TopLogprob


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
        got = yield Generate(prompt, self.sampling(req))
        answers: List[Completion] = got if isinstance(got, list) else [got]
        c = answers[0]
        logprobs = [token_logprobs(self.engine, a) for a in answers]
        choices = None
        if len(answers) > 1:
            choices = [
                TextChoice(
                    index=i,
                    text=a.text,
                    finish_reason=a.finish_reason,
                    completion_tokens=a.completion_tokens,
                    logprobs=logprobs[i],
                )
                for i, a in enumerate(answers)
            ]
        return TextActionResult(
            text=c.text,
            prompt_tokens=c.prompt_tokens,
            completion_tokens=sum(a.completion_tokens for a in answers),
            finish_reason=c.finish_reason,
            logprobs=logprobs[0],
            choices=choices,
        )


def top_logprob(engine: Any, token_id: int, logprob: float) -> TopLogprob:
    text, raw = engine.token_piece(token_id)
    return TopLogprob(token=text, token_id=token_id, logprob=logprob, bytes=list(raw))


def token_logprobs(engine: Any, c: Completion) -> Optional[List[TokenLogprob]]:
    return logprob_models(engine, c.logprobs)


def logprob_models(engine: Any, entries: Optional[List[Any]]) -> Optional[List[TokenLogprob]]:
    """The engine's (token id, logprob, top) entries as the wire's TokenLogprob."""
    if entries is None:
        return None
    out = []
    for token_id, logprob, top in entries:
        t = top_logprob(engine, token_id, logprob)
        out.append(TokenLogprob(**t.model_dump(), top_logprobs=[top_logprob(engine, i, v) for i, v in top]))
    return out
