"""`structured_action` (what the MineRL policy server answers): a frame in, the full MineRL
action dict out.

By default the answer is decoded under the action grammar (parsing/minerl_action.py
`action_pattern`): every token the model may take keeps the answer on the way to a valid
action object, so it always parses (`parse_ok` true by construction). The reasoning gets
what `max_tokens` leaves after the longest action (338 bytes); the action itself is
always finished, even when `max_tokens` is smaller. With `constrained: false` the model
writes free text, parsed with the fallbacks of parsing/minerl_action.py: a malformed
answer gives the default action with parse_ok False, never an error reply. A backend
without constrained decoding (vLLM) always takes the free-text path, and the result's
`constrained` says which path an answer took.
"""

from __future__ import annotations

from inference_worker.engines.grammar import Constraint
from inference_worker.engines.prompt import ChatPrompt, from_chat_messages, image_part, user_prompt
from inference_worker.handlers.base import Generate, Program
from inference_worker.handlers.chat_base import ChatHandler
from inference_worker.parsing.minerl_action import action_pattern, parse_minerl_action, pattern_bytes
from schemas.images import decode_image
from schemas.messages import StructuredActionRequest, StructuredActionResult

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


class StructuredActionHandler(ChatHandler):
    kind = "structured_action"

    def program(self, req: StructuredActionRequest) -> Program:
        prompt = self.check(minerl_prompt(req, self.limits))
        # a backend without constrained decoding (vLLM) decodes free text, and says so
        constrained = req.constrained and hasattr(self.engine, "grammar")
        if constrained:
            sampling = self.sampling(
                req, action_constraint(req.max_tokens), max_tokens=action_budget(req.max_tokens)
            )
        else:
            sampling = self.sampling(req)
        c = yield Generate(prompt, sampling)
        parsed = parse_minerl_action(c.raw_text)
        return StructuredActionResult(
            action=parsed.action,
            reasoning=parsed.reasoning,
            text=c.raw_text,
            parse_ok=parsed.ok,
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            constrained=constrained,
        )


MAX_REASONING_CHARS = 1000


def reasoning_chars(max_tokens: int) -> int:
    """Reasoning characters that fit `max_tokens` beside the longest action (a token is at
    least one byte; one more token ends the answer)."""
    return max(0, min(MAX_REASONING_CHARS, max_tokens - pattern_bytes(0) - 1))


def action_constraint(max_tokens: int) -> Constraint:
    return Constraint("regex", action_pattern(reasoning_chars(max_tokens)))


def action_budget(max_tokens: int) -> int:
    """Tokens that always finish a constrained answer: max_tokens, or more if the action
    alone may need more."""
    return max(max_tokens, pattern_bytes(reasoning_chars(max_tokens)) + 1)
