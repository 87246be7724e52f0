"""`preference` (RL-VLM-F's preference labels): which of two images makes more progress on a task.

two_step (RL-VLM-F's `gemini_query_2`): the model describes and compares the images
(analysis prompt, answer concise), then a text-only call with the summary prompt and
max_tokens 16 yields the label, parsed by parsing/preference_label.py. one_pass: one
prompt with the images and the label question; the label is the best-scoring of "0",
"1" and "-1" by summed log-probability (scores returned).
"""

from __future__ import annotations

from inference_worker.engines.prompt import ChatPrompt, user_prompt
from inference_worker.engines.sampling import Sampling
from inference_worker.handlers.base import Generate, Program, Score
from inference_worker.handlers.chat_base import ChatHandler
from inference_worker.parsing.preference_label import parse_preference
from schemas.messages import PreferenceRequest, PreferenceResult

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


class PreferenceHandler(ChatHandler):
    kind = "preference"

    def program(self, req: PreferenceRequest) -> Program:
        if req.mode == "one_pass":
            prompt = self.check(
                image_pair_prompt(req, fill(req.prompt or ONE_PASS_PROMPT, req.task), self.limits)
            )
            scored = yield Score(prompt, LABELS)
            return PreferenceResult(
                label=int(LABELS[scored.best]),
                texts=[],
                scores=dict(zip(LABELS, scored.scores)),
                mode="one_pass",
                prompt_tokens=scored.prompt_tokens,
            )
        prompt = self.check(
            image_pair_prompt(req, fill(req.prompt or ANALYSIS_PROMPT, req.task), self.limits)
        )
        a = yield Generate(prompt, Sampling.of(req))
        # a caller's summary_prompt can be as wrong as any prompt: it fails this request alone
        summary = self.check(user_prompt(fill(req.summary_prompt or SUMMARY_PROMPT, req.task, a.text)))
        lab = yield Generate(summary, Sampling.of(req, max_tokens=SUMMARY_MAX_TOKENS))
        label, _ = parse_preference(lab.raw_text)
        return PreferenceResult(
            label=label,
            texts=[a.raw_text, lab.raw_text],
            mode="two_step",
            prompt_tokens=a.prompt_tokens + lab.prompt_tokens,
            completion_tokens=a.completion_tokens + lab.completion_tokens,
        )
