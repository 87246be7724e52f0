"""One-line, human-readable summaries of requests and replies, frames summarised.

`vlmq tail` prints them; `vlmq replay` uses them in its report. A frame becomes
`uint8[224x224x3]` or `jpeg 14.2KB`, never its bytes.
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from schemas.messages import Reply, Request

_TEXT = 60


def clip(text: str, limit: int = _TEXT) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def value(v: Any) -> str:
    """A short description of any payload value."""
    if isinstance(v, np.ndarray):
        return f"{v.dtype.name}[{'x'.join(str(d) for d in v.shape)}]"
    if isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v[:8])
        fmt = "jpeg" if b.startswith(b"\xff\xd8") else "png" if b.startswith(b"\x89PNG") else "bytes"
        return f"{fmt} {len(v) / 1024:.1f}KB"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, str):
        return repr(clip(v))
    if isinstance(v, (list, tuple)):
        if len(v) > 4:
            return f"[{len(v)} items]"
        return "[" + ", ".join(value(x) for x in v) + "]"
    if isinstance(v, dict):
        return (
            "{"
            + ", ".join(f"{k}={value(x)}" for k, x in list(v.items())[:6])
            + (", …}" if len(v) > 6 else "}")
        )
    return str(v)


def _messages(messages: List[Any]) -> str:
    images = sum(len(m.images()) for m in messages)
    last = messages[-1].text() if messages else ""
    return (
        f"{len(messages)} msg{'s' if len(messages) != 1 else ''}"
        + (f", {images} image{'s' if images != 1 else ''}" if images else "")
        + f": {clip(last)!r}"
    )


def request(req: Request) -> str:
    parts: List[str] = []
    kind = req.kind
    if kind == "action_chunk":
        parts.append(f"frame {value(req.image)}")
        if req.instruction:
            parts.append(repr(clip(req.instruction, 40)))
        if req.state is not None:
            parts.append(f"state {value(req.state)}")
        if req.prev_chunk is not None:
            parts.append(f"prev {value(req.prev_chunk)} delay={req.inference_delay}")
        if req.reset:
            parts.append("reset")
        if req.noise_seed is not None:
            parts.append(f"noise_seed={req.noise_seed}")
    elif kind == "preference":
        parts.append(f"a={value(req.image_a)} b={value(req.image_b)} task={clip(req.task, 40)!r} {req.mode}")
    elif kind == "text_action":
        parts.append(_messages(req.messages))
        if req.admissible_commands:
            parts.append(f"{len(req.admissible_commands)} choices")
    elif kind == "structured_action":
        if req.image is not None:
            parts.append(f"frame {value(req.image)}")
        if req.messages:
            parts.append(_messages(req.messages))
        if req.task_name:
            parts.append(f"task={req.task_name!r}")
    if hasattr(req, "temperature"):
        parts.append("greedy" if req.temperature == 0 else f"T={req.temperature:g}")
    if req.latest_only:
        parts.append("latest_only")
    return "  ".join(parts)


def result(kind: str, res: Any) -> str:
    r: Dict[str, Any] = res.model_dump() if hasattr(res, "model_dump") else dict(res or {})
    if kind == "action_chunk":
        chunk = np.asarray(r.get("chunk"))
        stats = f" mean={chunk.mean():.3g} min={chunk.min():.3g} max={chunk.max():.3g}" if chunk.size else ""
        return f"chunk {value(chunk)}{stats}" + (" cache_hit" if r.get("cache_hit") else "")
    if kind == "text_action":
        out = repr(clip(r.get("text", "")))
        if r.get("choice") is not None:
            out += f" choice={r['choice']!r}"
        return out + f" tokens={r.get('prompt_tokens', 0)}+{r.get('completion_tokens', 0)}"
    if kind == "structured_action":
        action = r.get("action") or {}
        active = {k: v for k, v in action.items() if v not in (0, [0.0, 0.0], [0, 0])}
        return f"action {value(active) if active else '(noop)'}" + (
            "" if r.get("parse_ok", True) else " parse_failed"
        )
    if kind == "preference":
        texts = r.get("texts") or []
        return f"label={r.get('label')}" + (f" {clip(texts[-1], 40)!r}" if texts else "")
    return value(r)


def reply(rep: Reply) -> str:
    head = "ok" if rep.ok else f"ERROR {getattr(rep.error.code, 'value', rep.error.code)}"
    timing = ""
    if rep.created_at and rep.replied_at:
        timing = f" {(rep.replied_at - rep.created_at) * 1000:.1f}ms"
    stages = " ".join(f"{k.removesuffix('_ms')}={v:.1f}" for k, v in rep.timings.items())
    batch = f" batch={rep.batch_size}" if rep.batch_size else ""
    body = result(rep.kind, rep.result) if rep.ok else clip(rep.error.message if rep.error else "", 80)
    return f"{head}{timing}{batch}  {body}" + (f"  ({stages})" if stages else "")
