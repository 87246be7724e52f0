"""Chat prompts the adapters send; one place, so every env asks the same way."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from env_agents.envs.base import Observation

CHOICE_SYSTEM = (
    "You are an agent acting in an environment. Read the observation and the task, then "
    "answer with exactly one of the admissible commands."
)
STRUCTURED_SYSTEM = (
    "You control a first-person agent with Minecraft-style controls. Answer with a JSON "
    "action dict (forward, back, left, right, jump, attack, use, camera [pitch, yaw])."
)


def _user_content(obs: Observation, text: str) -> Any:
    if obs.frame is None:
        return text
    return [{"type": "image", "image": obs.frame}, {"type": "text", "text": text}]


def choice_messages(
    obs: Observation, commands: Sequence[str], history: Optional[List[str]] = None
) -> List[Dict[str, Any]]:
    lines = []
    if history:
        lines.append("Recent steps:\n" + "\n".join(history))
    lines.append(f"Observation: {obs.text.strip()}")
    lines.append("Admissible commands: " + ", ".join(commands))
    lines.append("Command:")
    return [
        {"role": "system", "content": CHOICE_SYSTEM},
        {"role": "user", "content": _user_content(obs, "\n".join(lines))},
    ]


def structured_messages(obs: Observation) -> List[Dict[str, Any]]:
    return [
        {"role": "system", "content": STRUCTURED_SYSTEM},
        {"role": "user", "content": _user_content(obs, f"Task: {obs.text.strip()}\nAction:")},
    ]
