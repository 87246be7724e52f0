"""A model-free handler for every kind, with a fixed, configurable latency.

It is the smallest honest handler: it answers each kind with a well-formed result that
depends on the request (first admissible command, default MineRL action, a zero chunk),
so transport benchmarks, broker tests and the async-control tests measure vlmq and a
known model latency, not a model. What needs a model (a constraint, n > 1, logprobs) is
refused with `invalid`, never ignored; a streaming request gets its reply and no pieces.

Faults on demand, for fault tests and `vlmq bench reliability` (`--option KEY=VALUE`, or
VLMQ_<KEY>; FaultOptions in inference_worker/settings.py):
  fault_kill_on=TEXT           SIGKILL the worker when a request whose text is TEXT runs
  fault_device_assert_on=TEXT  raise CUDA's "device-side assert triggered" error instead
  fault_oom_over=N             raise CUDA's out-of-memory error for a batch of more than N
The text of a request is its last chat message, its instruction (action_chunk) or its task
(preference).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from inference_worker.handlers.base import Handler, HandlerOutput
from inference_worker.models.errors import ModelLoadError
from inference_worker.parsing.minerl_action import default_action
from inference_worker.settings import FaultOptions, options_of
from inference_worker.timing import Stopwatch
from schemas import settings as tree
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import (
    ActionChunkResult,
    PreferenceResult,
    Request,
    StructuredActionResult,
    TextActionResult,
)


@dataclass(frozen=True)
class Faults:
    kill_on: Optional[str] = None
    device_assert_on: Optional[str] = None
    oom_over: int = 0

    @classmethod
    def from_options(cls, options: Dict[str, str]) -> Faults:
        known = set(tree.keys(FaultOptions))
        unknown = sorted(set(options) - known)
        if unknown:
            raise ModelLoadError(
                f"the synthetic backend has no option(s) {unknown}; it knows {sorted(known)}"
            )
        opts = options_of(FaultOptions, options)
        return cls(
            kill_on=opts.fault_kill_on,
            device_assert_on=opts.fault_device_assert_on,
            oom_over=opts.fault_oom_over,
        )

    @property
    def any(self) -> bool:
        return bool(self.kill_on or self.device_assert_on or self.oom_over)


def request_text(req: Request) -> str:
    messages = getattr(req, "messages", None)
    if messages:
        return messages[-1].text()
    return str(getattr(req, "instruction", "") or getattr(req, "task", ""))


class SyntheticHandler(Handler):
    def __init__(
        self,
        kind: str,
        latency_ms: float = 0.0,
        chunk: Tuple[int, int] = (50, 7),
        faults: Optional[Faults] = None,
    ) -> None:
        self.kind = kind
        self.latency_s = latency_ms / 1000.0
        self.chunk = chunk
        self.faults = faults or Faults()
        # a fault kills or fails the model thread's work, as a real model would
        self.blocking = latency_ms > 0 or self.faults.any

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
        if req.mode == "one_pass":  # docs/PROTOCOL.md 6: one_pass results carry the scores
            return PreferenceResult(label=-1, scores={"0": 0.0, "1": 0.0, "-1": 0.0}, mode=req.mode)
        return PreferenceResult(label=-1, texts=["synthetic"], mode=req.mode)

    def _inject(self, requests: Sequence[Request]) -> None:
        f = self.faults
        if f.oom_over and len(requests) > f.oom_over:
            raise RuntimeError(f"CUDA out of memory. Tried to allocate {len(requests)} GiB (synthetic fault)")
        for r in requests:
            text = request_text(r)
            if f.kill_on is not None and text == f.kill_on:
                os.kill(os.getpid(), signal.SIGKILL)
            if f.device_assert_on is not None and text == f.device_assert_on:
                raise RuntimeError("CUDA error: device-side assert triggered (synthetic fault)")

    def run(self, requests: Sequence[Request]) -> HandlerOutput:
        sw = Stopwatch()
        if self.faults.any:
            self._inject(requests)
        with sw("model"):
            if self.latency_s:
                time.sleep(self.latency_s)
            results = [self._result(r) for r in requests]
        return HandlerOutput(results, sw.timings)
