"""`structured_action` (the MineRL policy server of seed 000): a frame in, the full MineRL
action dict out, parsed from the model's JSON with the fallbacks of parsing/minerl_action.py.
A malformed answer gives the default action with parse_ok False, never an error reply.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from inference_worker.engines.completion import Completion
from inference_worker.engines.prompt import ChatPrompt, from_chat_messages, image_part, user_prompt
from inference_worker.engines.sampling import Sampling
from inference_worker.handlers.base import HandlerOutput, Outcome, Stopwatch
from inference_worker.handlers.chat_base import AsyncChatHandler, ChatHandler
from inference_worker.parsing.minerl_action import parse_minerl_action
from schemas.errors import ProtocolError
from schemas.images import decode_image
from schemas.messages import Request, StructuredActionRequest, StructuredActionResult

MINERL_PROMPT = (
    "You are playing Minecraft. Task: {task}. Step {step}.\n"
    "Look at the image and choose the next action. Reply with one JSON object and nothing else:\n"
    '{{"action": {{"forward": 0, "back": 0, "left": 0, "right": 0, "jump": 0, "sneak": 0, '
    '"sprint": 0, "attack": 0, "use": 0, "drop": 0, "inventory": 0, "hotbar.1": 0, ..., '
    '"hotbar.9": 0, "ESC": 0, "camera": [pitch, yaw]}}, "reasoning": "one short sentence"}}\n'
    "Buttons are 0 or 1; camera angles are degrees between -180 and 180."
)


def minerl_prompt(req: StructuredActionRequest, limits) -> ChatPrompt:
    if not req.messages:
        text = MINERL_PROMPT.format(task=req.task_name or "play Minecraft", step=req.step)
        return user_prompt(req.image, text, limits=limits)
    prompt = from_chat_messages(req.messages, limits)
    if req.image is not None:
        # the frame goes first in the last user turn, as in the default prompt
        for m in reversed(prompt.messages):
            if m["role"] == "user":
                content = m["content"]
                m["content"] = [image_part()] + (
                    [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
                )
                before = sum(
                    1
                    for earlier in prompt.messages[: prompt.messages.index(m)]
                    for p in (earlier["content"] if isinstance(earlier["content"], list) else [])
                    if p.get("type") == "image"
                )
                prompt.images.insert(before, decode_image(req.image, limits))
                break
    return prompt


def structured_result(c: Completion) -> StructuredActionResult:
    parsed = parse_minerl_action(c.raw_text)
    return StructuredActionResult(
        action=parsed.action,
        reasoning=parsed.reasoning,
        text=c.raw_text,
        parse_ok=parsed.ok,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
    )


class StructuredActionHandler(ChatHandler):
    kind = "structured_action"

    def run(self, requests: Sequence[Request]) -> HandlerOutput:
        sw = Stopwatch()
        results: List[Optional[Outcome]] = [None] * len(requests)
        prompts = self.build_prompts(requests, lambda r: minerl_prompt(r, self.limits), results)
        order = list(prompts)
        if order:
            done = self.engine.generate(
                [prompts[i] for i in order], [Sampling.of(requests[i]) for i in order], sw
            )
            with sw("parse"):
                for i, c in zip(order, done):
                    results[i] = structured_result(c)
        return HandlerOutput(results, sw.timings)  # type: ignore[arg-type]


class AsyncStructuredActionHandler(AsyncChatHandler):
    kind = "structured_action"

    async def serve(self, request: Request) -> Outcome:
        try:
            prompt = self.engine.check(minerl_prompt(request, self.limits))
            return structured_result(await self.engine.generate(prompt, Sampling.of(request)))
        except ProtocolError as exc:
            return exc
