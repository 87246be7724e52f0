"""The reply comparison behind `vlmq replay`: exact for text, tolerance for numbers."""

from __future__ import annotations

import numpy as np

from ops.diff import Tolerance, compare_replies, compare_values, not_comparable
from schemas.messages import ActionChunkResult, ErrorInfo, Reply, TextActionRequest, TextActionResult

TOL = Tolerance(atol=1e-4, rtol=1e-3)


def _reply(kind: str, result=None, error=None) -> Reply:
    return Reply(request_id="r", session_id="s", kind=kind, ok=error is None, result=result, error=error)


def test_chunks_within_tolerance_match_and_outside_are_located():
    chunk = np.linspace(-1, 1, 50 * 7, dtype=np.float32).reshape(50, 7)
    near = chunk + np.float32(5e-5)
    far = chunk.copy()
    far[4, 2] += 0.3
    a = _reply("action_chunk", ActionChunkResult(chunk=chunk, cache_hit=False))
    assert (
        compare_replies(a, _reply("action_chunk", ActionChunkResult(chunk=near, cache_hit=True)), TOL) == []
    )
    (d,) = compare_replies(a, _reply("action_chunk", ActionChunkResult(chunk=far)), TOL)
    assert d.path == "result.chunk" and "1 of 350 values differ" in d.detail and "[4, 2]" in d.detail


def test_text_is_exact_scores_are_close_and_errors_compare_codes():
    a = _reply("text_action", TextActionResult(text="go north", scores=[-1.0, -2.0], completion_tokens=2))
    same = _reply(
        "text_action", TextActionResult(text="go north", scores=[-1.00001, -2.0], completion_tokens=2)
    )
    assert compare_replies(a, same, TOL) == []
    other = _reply(
        "text_action", TextActionResult(text="go north.", scores=[-1.5, -2.0], completion_tokens=2)
    )
    assert [d.path for d in compare_replies(a, other, TOL)] == ["result.scores[0]", "result.text"]
    err = _reply("text_action", error=ErrorInfo(code="internal", message="boom"))
    assert [d.render() for d in compare_replies(a, err, TOL)] == ["ok: 'ok' -> 'error internal'"]
    assert (
        compare_replies(err, _reply("text_action", error=ErrorInfo(code="internal", message="other")), TOL)
        == []
    )


def test_values_types_and_missing_keys():
    assert compare_values("x", 1, 1.00000001, TOL) == []
    assert compare_values("x", True, 1, TOL) != []  # a bool is not a number here
    (d,) = compare_values("r", {"a": 1}, {"a": 1, "b": 2}, TOL)
    assert d.path == "r.b" and d.recorded == "(missing)"


def test_sampled_and_timing_dependent_outcomes_are_not_compared():
    sampled = TextActionRequest(messages=[{"role": "user", "content": "hi"}], temperature=0.7)
    seeded = TextActionRequest(messages=[{"role": "user", "content": "hi"}], temperature=0.7, seed=3)
    assert "sampled" in not_comparable(sampled, None)
    assert not_comparable(seeded, None) is None
    expired = _reply("text_action", error=ErrorInfo(code="expired", message="late"))
    assert "timing" in not_comparable(seeded, expired)
