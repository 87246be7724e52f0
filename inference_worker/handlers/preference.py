"""`preference` (RL-VLM-F, seed 001): which of two images makes more progress on a task.

two_step (the seed's `gemini_query_2`): the model describes and compares the images
(analysis prompt, answer concise), then a text-only call with the summary prompt and
max_tokens 16 yields the label, parsed by parsing/preference_label.py. one_pass: one
prompt with the images and the label question; the label is the best-scoring of "0",
"1" and "-1" by summed log-probability (scores returned). Both steps are batched across
the requests of a batch.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from inference_worker.engines.completion import Completion, Scored
from inference_worker.engines.prompt import ChatPrompt, user_prompt
from inference_worker.engines.sampling import Sampling
from inference_worker.handlers.base import HandlerOutput, Outcome, Stopwatch
from inference_worker.handlers.chat_base import AsyncChatHandler, ChatHandler
from inference_worker.parsing.preference_label import parse_preference
from schemas.errors import ProtocolError
from schemas.messages import PreferenceRequest, PreferenceResult, Request

QUESTIONS = (
    "1. What is shown in Image 1?\n"
    "2. What is shown in Image 2?\n"
    "3. The goal is: {task}\n"
    "Is there any difference between Image 1 and Image 2 in terms of achieving the goal?"
)
ANALYSIS_PROMPT = QUESTIONS + "\n(Answer concisely in 2 sentences.)"
LABEL_QUESTION = (
    "Is the goal better achieved in Image 1 or Image 2?\n"
    "Reply a single line of 0 if the goal is better achieved in Image 1, or 1 if it is better achieved "
    "in Image 2.\nReply -1 if the text is unsure or there is no difference."
)
SUMMARY_PROMPT = (
    "Based on the text below to the questions:\n" + QUESTIONS + "\n{analysis}\n\n" + LABEL_QUESTION
)
ONE_PASS_PROMPT = "The goal is: {task}\n" + LABEL_QUESTION.replace("the text is unsure", "you are unsure")
LABELS = ("0", "1", "-1")
SUMMARY_MAX_TOKENS = 16


def fill(template: str, task: str, analysis: str = "") -> str:
    """Named placeholders {task} and {analysis}; a bare {} (RL-VLM-F's own templates) is the analysis."""
    out = template.replace("{task}", task).replace("{analysis}", analysis)
    return out.replace("{}", analysis, 1) if "{}" in out else out


def image_pair_prompt(req: PreferenceRequest, text: str, limits) -> ChatPrompt:
    return user_prompt(
        "Consider the following two images:\nImage 1:\n",
        req.image_a,
        "\nImage 2:\n",
        req.image_b,
        "\n" + text,
        limits=limits,
    )


def two_step_result(analysis: Completion, label: Completion) -> PreferenceResult:
    value, _ = parse_preference(label.raw_text)
    return PreferenceResult(
        label=value,
        texts=[analysis.raw_text, label.raw_text],
        mode="two_step",
        prompt_tokens=analysis.prompt_tokens + label.prompt_tokens,
        completion_tokens=analysis.completion_tokens + label.completion_tokens,
    )


def one_pass_result(scored: Scored) -> PreferenceResult:
    return PreferenceResult(
        label=int(LABELS[scored.best]),
        texts=[],
        scores=dict(zip(LABELS, scored.scores)),
        mode="one_pass",
        prompt_tokens=scored.prompt_tokens,
    )


class PreferenceHandler(ChatHandler):
    kind = "preference"

    def run(self, requests: Sequence[Request]) -> HandlerOutput:
        sw = Stopwatch()
        results: List[Optional[Outcome]] = [None] * len(requests)
        two = [i for i, r in enumerate(requests) if r.mode == "two_step"]
        one = [i for i, r in enumerate(requests) if r.mode == "one_pass"]
        if two:
            self._two_step(requests, two, results, sw)
        if one:
            self._one_pass(requests, one, results, sw)
        return HandlerOutput(results, sw.timings)  # type: ignore[arg-type]

    def _two_step(self, requests, idx: List[int], results, sw: Stopwatch) -> None:
        prompts = self.build_prompts(
            requests,
            lambda r: image_pair_prompt(r, fill(r.prompt or ANALYSIS_PROMPT, r.task), self.limits),
            results,
            idx,
        )
        order = list(prompts)
        if not order:
            return
        done = self.engine.generate(
            [prompts[i] for i in order], [Sampling.of(requests[i]) for i in order], sw
        )
        analyses = dict(zip(order, done))
        summaries = {}
        for i in order:  # a caller's summary_prompt can be as wrong as any prompt: it fails alone
            r = requests[i]
            try:
                summaries[i] = self.engine.check(
                    user_prompt(fill(r.summary_prompt or SUMMARY_PROMPT, r.task, analyses[i].text))
                )
            except ProtocolError as exc:
                results[i] = exc
        order = list(summaries)
        if not order:
            return
        labels = self.engine.generate(
            [summaries[i] for i in order],
            [Sampling.of(requests[i], max_tokens=SUMMARY_MAX_TOKENS) for i in order],
            sw,
        )
        for i, lab in zip(order, labels):
            results[i] = two_step_result(analyses[i], lab)

    def _one_pass(self, requests, idx: List[int], results, sw: Stopwatch) -> None:
        prompts = self.build_prompts(
            requests,
            lambda r: image_pair_prompt(r, fill(r.prompt or ONE_PASS_PROMPT, r.task), self.limits),
            results,
            idx,
        )
        order = list(prompts)
        if not order:
            return
        scored = self.engine.score([prompts[i] for i in order], [LABELS] * len(order), sw)
        for i, s in zip(order, scored):
            results[i] = one_pass_result(s)


class AsyncPreferenceHandler(AsyncChatHandler):
    kind = "preference"

    async def serve(self, request: Request) -> Outcome:
        r = request
        try:
            if r.mode == "one_pass":
                prompt = self.engine.check(
                    image_pair_prompt(r, fill(r.prompt or ONE_PASS_PROMPT, r.task), self.limits)
                )
                return one_pass_result(await self.engine.score(prompt, LABELS))
            prompt = self.engine.check(
                image_pair_prompt(r, fill(r.prompt or ANALYSIS_PROMPT, r.task), self.limits)
            )
            analysis = await self.engine.generate(prompt, Sampling.of(r))
            summary = self.engine.check(
                user_prompt(fill(r.summary_prompt or SUMMARY_PROMPT, r.task, analysis.text))
            )
            label = await self.engine.generate(summary, Sampling.of(r, max_tokens=SUMMARY_MAX_TOKENS))
            return two_step_result(analysis, label)
        except ProtocolError as exc:
            return exc
