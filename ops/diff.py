"""Comparing a replayed reply with the recorded one (`vlmq replay`).

Strings, ints, bools and error codes must be equal: greedy decoding is deterministic, so
a changed word is a real difference. Floats and arrays (action chunks, log-prob scores)
are equal within a tolerance, |a - b| <= atol + rtol * |b| (numpy.isclose), because batch
composition and kernels move the last bits. Fields that depend on timing or on what ran
before, not on the model (timings, batch size, worker, cache hits), are not compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional

import numpy as np

from ops import summary
from schemas.messages import Reply, Request

# Error codes whose outcome depended on timing, not on the model: not comparable.
TIMING_CODES = frozenset({"expired", "superseded", "dead_letter", "backlog_full"})
# Result fields that depend on the worker's state (per-session feature cache), not the model.
IGNORED: Dict[str, FrozenSet[str]] = {"action_chunk": frozenset({"cache_hit", "frames_encoded"})}


@dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-4
    rtol: float = 1e-3


@dataclass
class Difference:
    path: str
    recorded: Any
    replayed: Any
    detail: str = ""

    def render(self) -> str:
        if self.detail:
            return f"{self.path}: {self.detail}"
        return f"{self.path}: {summary.value(self.recorded)} -> {summary.value(self.replayed)}"


def not_comparable(req: Optional[Request], recorded: Optional[Reply]) -> Optional[str]:
    """Why this request's reply can't be compared, or None when it can."""
    if recorded is not None and not recorded.ok and recorded.error is not None:
        code = getattr(recorded.error.code, "value", recorded.error.code)
        if code in TIMING_CODES:
            return f"recorded outcome depended on timing ({code})"
    if req is not None and getattr(req, "temperature", 0.0) > 0 and getattr(req, "seed", None) is None:
        return "sampled (temperature > 0) without a seed"
    return None


def compare_replies(recorded: Reply, replayed: Reply, tol: Tolerance = Tolerance()) -> List[Difference]:
    if recorded.ok != replayed.ok:
        return [Difference("ok", _outcome(recorded), _outcome(replayed))]
    if not recorded.ok:
        a, b = _code(recorded), _code(replayed)
        return [] if a == b else [Difference("error.code", a, b)]
    ignored = IGNORED.get(recorded.kind, frozenset())
    return compare_values("result", _plain(recorded.result), _plain(replayed.result), tol, ignored)


def compare_values(
    path: str, a: Any, b: Any, tol: Tolerance, ignored: FrozenSet[str] = frozenset()
) -> List[Difference]:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        try:
            return _compare_arrays(path, np.asarray(a, np.float64), np.asarray(b, np.float64), tol)
        except (TypeError, ValueError):
            return [Difference(path, a, b, "not comparable as numeric arrays")]
    if isinstance(a, dict) and isinstance(b, dict):
        out: List[Difference] = []
        for key in sorted(set(a) | set(b), key=str):
            if key in ignored:
                continue
            if key not in a or key not in b:
                out.append(Difference(f"{path}.{key}", a.get(key, "(missing)"), b.get(key, "(missing)")))
            else:
                out += compare_values(f"{path}.{key}", a[key], b[key], tol)
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [Difference(path, a, b, f"{len(a)} items -> {len(b)} items")]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += compare_values(f"{path}[{i}]", x, y, tol)
        return out
    if _is_number(a) and _is_number(b) and (isinstance(a, float) or isinstance(b, float)):
        ok = bool(np.isclose(float(b), float(a), atol=tol.atol, rtol=tol.rtol, equal_nan=True))
        return [] if ok else [Difference(path, a, b)]
    same = a == b and (type(a) is type(b) or (_is_number(a) and _is_number(b)))
    return [] if same else [Difference(path, a, b)]


def _compare_arrays(path: str, a: np.ndarray, b: np.ndarray, tol: Tolerance) -> List[Difference]:
    if a.shape != b.shape:
        return [Difference(path, a, b, f"shape {a.shape} -> {b.shape}")]
    if a.size == 0:
        return []
    af, bf = a.astype(np.float64), b.astype(np.float64)
    close = np.isclose(bf, af, atol=tol.atol, rtol=tol.rtol, equal_nan=True)
    if close.all():
        return []
    delta = np.abs(af - bf)
    worst = np.unravel_index(int(np.nanargmax(np.where(close, 0, delta))), a.shape)
    return [
        Difference(
            path,
            a,
            b,
            f"{int((~close).sum())} of {a.size} values differ, max |delta| {float(delta[worst]):.4g} at "
            f"{list(map(int, worst))} ({float(af[worst]):.4g} -> {float(bf[worst]):.4g}; "
            f"atol {tol.atol:g}, rtol {tol.rtol:g})",
        )
    ]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _plain(result: Any) -> Any:
    return result.model_dump() if hasattr(result, "model_dump") else result


def _code(reply: Reply) -> str:
    return str(getattr(reply.error.code, "value", reply.error.code)) if reply.error else ""


def _outcome(reply: Reply) -> str:
    return "ok" if reply.ok else f"error {_code(reply)}"
