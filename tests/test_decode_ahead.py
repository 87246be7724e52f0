"""Decoding ahead (decoder.py `step`): a step is launched before the host reads the previous
step's tokens. The answers must be exactly those of reading every step before launching
the next (`decode_ahead=off`): the same tokens, texts, finish reasons and logprobs, for
greedy, seeded sampling, stop strings, n answers, streaming, aborts and rows that reach
the end of their slot."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from inference_worker.engines.chat_engine import ChatEngine  # noqa: E402
from inference_worker.engines.options import EngineOptions  # noqa: E402
from inference_worker.engines.prompt import user_prompt  # noqa: E402
from inference_worker.engines.sampling import Sampling  # noqa: E402
from inference_worker.models import load_vlm  # noqa: E402


@pytest.fixture(scope="module")
def engines(tiny_qwen2_vl):
    """(ahead, reading first): two engines on two loads of one checkpoint."""
    vlm = load_vlm(tiny_qwen2_vl)
    return ChatEngine(vlm), ChatEngine(load_vlm(tiny_qwen2_vl), EngineOptions(decode_ahead=False))


def prompts():
    rng = np.random.default_rng(3)
    frame = lambda s: rng.integers(0, 255, (s, s, 3), dtype=np.uint8)  # noqa: E731
    return [
        user_prompt(frame(64), "what now?"),
        user_prompt("go north, then west"),
        user_prompt(frame(48), "left or right", frame(32), "?"),
        user_prompt("count to ten"),
        user_prompt(frame(56), "describe"),
    ]


def samplings():
    return [
        Sampling(max_tokens=12),
        Sampling(max_tokens=9, temperature=0.9, top_p=0.8, seed=5, logprobs=True, top_logprobs=3),
        Sampling(max_tokens=7, n=3, temperature=1.0, seed=2),
        Sampling(max_tokens=1),
        Sampling(max_tokens=15, logprobs=True),
    ]


def answers(completions):
    """Each answer's tokens, text, finish reason and logprobs (values to 4 decimals: a step's
    batch may hold a row more or less either way, which moves fp32 sums in the last bits)."""
    out = []
    for c in completions:
        for a in c if isinstance(c, list) else [c]:
            lp = a.logprobs and [
                (t, round(v, 4), [(u, round(w, 4)) for u, w in top]) for t, v, top in a.logprobs
            ]
            out.append((a.token_ids, a.text, a.finish_reason, lp))
    return out


def test_ahead_gives_the_answers_of_reading_every_step_first(engines):
    ahead, first = engines
    assert ahead.decoder.ahead and not first.decoder.ahead
    got = ahead.generate(prompts(), samplings())
    want = first.generate(prompts(), samplings())
    assert answers(got) == answers(want)
    # a stop string found in a token the host reads one step late still ends the answer there
    stop = [c.text[3:6] for c in want if not isinstance(c, list) and len(c.text) > 8][:1]
    if stop:
        cut = [Sampling(max_tokens=12, stop=tuple(stop))] * 2
        assert answers(ahead.generate(prompts()[:2], cut)) == answers(first.generate(prompts()[:2], cut))
    assert ahead.running == 0 and ahead.free_slots == ahead.decoder.slots


def test_a_step_is_launched_before_the_previous_steps_tokens_are_read(engines, monkeypatch):
    ahead, _ = engines
    events = []
    forward, read = ahead.decoder._forward, ahead.decoder._read
    monkeypatch.setattr(
        ahead.decoder, "_forward", lambda n, span: events.append("launch") or forward(n, span)
    )
    monkeypatch.setattr(ahead.decoder, "_read", lambda flight: events.append("read") or read(flight))
    ahead.generate([prompts()[1]], [Sampling(max_tokens=5)])
    # the first token comes from the prompt pass and is read after step 1 is launched (the
    # host never waits for the prompt pass); steps 1..4 make the other four; each step's
    # tokens are read after the next is launched, and nothing is launched past the last one
    assert events == ["launch", "read", "launch", "read", "launch", "read", "launch", "read", "read"]


def test_streaming_deltas_and_an_abort_in_flight(engines):
    """A streaming row's deltas add up to its answer; a row aborted while its step is in
    flight leaves at once, its in-flight token dropped, and the others are unaffected."""
    ahead, first = engines
    for engine in engines:
        assert engine.generate([prompts()[0]], [Sampling(max_tokens=3)])  # both pools idle
    keys = [object(), object()]
    got = {}
    streamed = []
    done = ahead.admit(keys, prompts()[:2], [Sampling(max_tokens=10, stream=True), Sampling(max_tokens=10)])
    assert not done
    for k in range(12):
        if k == 3:
            assert ahead.abort([keys[1]]) == [keys[1]]
        for key, c in ahead.step():
            got[id(key)] = c
        streamed += [t for key, _, toks, _ in ahead.take_deltas() if key is keys[0] for t in toks]
    assert list(got) == [id(keys[0])] and ahead.running == 0
    want = first.generate(prompts()[:1], [Sampling(max_tokens=10)])[0]
    assert got[id(keys[0])].token_ids == want.token_ids
    assert streamed == want.token_ids[: len(streamed)] and len(streamed) >= 8


def test_rows_that_reach_the_end_of_their_slot(tiny_qwen2_vl):
    """With room for a few answer tokens only, rows leave at the end of their slot ("length")
    with the same tokens either way: the step after a row's last column is never launched."""
    p = prompts()[1]
    small = {}
    for on in (True, False):
        engine = ChatEngine(load_vlm(tiny_qwen2_vl), EngineOptions(max_context=64, decode_ahead=on))
        width = engine.check(p).tokens
        assert width < 60
        small[on] = engine.generate([p, p], [Sampling(max_tokens=100), Sampling(max_tokens=64 - width - 2)])
    assert answers(small[True]) == answers(small[False])
    assert [c.finish_reason for c in small[True]] == ["length", "length"]
    # the prompt fills columns [0, tokens), each step's token one more; the last one is never fed
    assert len(small[True][0].token_ids) == 64 - p.tokens + 1


def test_a_group_aborted_before_its_first_tokens_are_read(engines):
    """With ahead, admit queues a group's first tokens without reading them. A row aborted
    before any step leaves at once (no answer, its slot freed); its group-mate decodes the
    tokens it gets alone; a group aborted whole leaves the pool empty and the next step
    drops what was queued."""
    ahead, first = engines
    keys = [object(), object()]
    assert ahead.admit(keys, prompts()[:2], [Sampling(max_tokens=6)] * 2) == []
    assert ahead.abort([keys[0]]) == [keys[0]] and ahead.running == 1
    got = {}
    while ahead.running:
        got.update({id(k): c for k, c in ahead.step()})
    assert list(got) == [id(keys[1])]
    want = first.generate(prompts()[1:2], [Sampling(max_tokens=6)])[0]
    assert got[id(keys[1])].token_ids == want.token_ids
    ahead.admit(keys, prompts()[:2], [Sampling(max_tokens=6)] * 2)
    assert sorted(map(id, ahead.abort(keys))) == sorted(map(id, keys)) and ahead.running == 0
    assert ahead.step() == [] and ahead.decoder._joined == [] and ahead.free_slots == ahead.decoder.slots
