"""A model-free handler for every kind, with a fixed, configurable latency.

It is the smallest honest handler: it answers each kind with a well-formed result that
depends on the request (first admissible command, default MineRL action, a zero chunk),
so transport benchmarks, broker tests and the async-control tests measure vlmq and a
known model latency, not a model. What needs a model (a constraint, n > 1, logprobs) is
refused with `invalid`, never ignored; a streaming request gets its reply and no pieces.
"""

from __future__ import annotations

import time
from typing import Sequence, Tuple

import numpy as np

from inference_worker.handlers.base import Handler, HandlerOutput
from inference_worker.parsing.minerl_action import default_action
from inference_worker.timing import Stopwatch
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import (
    ActionChunkResult,
    PreferenceResult,
    Request,
    StructuredActionResult,
    TextActionResult,
)


class SyntheticHandler(Handler):
    def __init__(self, kind: str, latency_ms: float = 0.0, chunk: Tuple[int, int] = (50, 7)) -> None:
        self.kind = kind
        self.latency_s = latency_ms / 1000.0
        self.chunk = chunk
        self.blocking = latency_ms > 0

    def _result(self, req: Request):
        needs_model = [
            name
            for name, on in (
                ("constraint", getattr(req, "constraint", None) is not None),
                ("n > 1", getattr(req, "n", 1) > 1),
                ("logprobs", getattr(req, "logprobs", False)),
            )
            if on
        ]
        if needs_model:
            return ProtocolError(
                ErrorCode.INVALID, f"{', '.join(needs_model)}: the synthetic backend has no model"
            )
        if self.kind == "action_chunk":
            return ActionChunkResult(chunk=np.zeros(self.chunk, np.float32), frames_encoded=1)
        if self.kind == "text_action":
            choices = getattr(req, "admissible_commands", None)
            if choices:
                return TextActionResult(
                    text=choices[0], choice=choices[0], choice_index=0, scores=[0.0] * len(choices)
                )
            return TextActionResult(text=req.messages[-1].text())
        if self.kind == "structured_action":
            return StructuredActionResult(action=default_action(), reasoning="synthetic", parse_ok=True)
        return PreferenceResult(label=-1, texts=["synthetic"], mode=req.mode)

    def run(self, requests: Sequence[Request]) -> HandlerOutput:
        sw = Stopwatch()
        with sw("model"):
            if self.latency_s:
                time.sleep(self.latency_s)
            results = [self._result(r) for r in requests]
        return HandlerOutput(results, sw.timings)
