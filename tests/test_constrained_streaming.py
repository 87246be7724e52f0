"""Constrained decoding, logprobs, n answers and token streaming, on a tiny random-weight
Qwen2-VL (a real architecture) on CPU: the engine alone, then through a real worker, Redis
and the client library. Random weights choose nonsense, so every structured answer that
parses here parses because of the grammar."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("xgrammar")

from broker.settings import BrokerSettings
from env_agents.client import AsyncAgentClient
from inference_worker.engines.chat_engine import ChatEngine
from inference_worker.engines.grammar import Constraint
from inference_worker.engines.options import EngineOptions
from inference_worker.engines.prompt import user_prompt
from inference_worker.engines.sampling import Sampling
from inference_worker.handlers.structured_action import StructuredActionHandler, action_budget
from inference_worker.handlers.text_action import TextActionHandler
from inference_worker.models import load_vlm
from inference_worker.parsing.minerl_action import (
    ACTION_SCHEMA,
    BUTTONS,
    action_pattern,
    parse_minerl_action,
    pattern_bytes,
)
from inference_worker.streaming import TextStream, visible
from schemas.messages import Partial, StructuredActionRequest, TextActionRequest
from tests.helpers import WorkerThread, synthetic_settings

FRAME = np.random.RandomState(5).randint(0, 256, (56, 56, 3), dtype=np.uint8)
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
    "required": ["city", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_qwen2_vl) -> ChatEngine:
    e = ChatEngine(load_vlm(tiny_qwen2_vl), EngineOptions(), max_sequences=16)
    e.warmup()
    return e


def test_constraints_hold_in_one_mixed_batch(engine):
    """Constrained, free, sampled and logprob rows decode side by side; each gets what it asked."""
    p = engine.check(user_prompt(FRAME, "Answer."))
    rows = [
        Sampling(max_tokens=80, grammar=engine.grammar(Constraint("json_schema", json.dumps(SCHEMA)))),
        Sampling(max_tokens=20, grammar=engine.grammar(Constraint("regex", "(yes|no)-[0-9]{2}"))),
        Sampling(
            max_tokens=20, grammar=engine.grammar(Constraint("choice", json.dumps(["go north", "open door"])))
        ),
        Sampling(max_tokens=8),
        Sampling(max_tokens=6, logprobs=True, top_logprobs=3),
        Sampling(max_tokens=40, temperature=1.0, seed=7, grammar=engine.grammar(Constraint("json_object"))),
    ]
    schema_out, regex_out, choice_out, free, scored, obj = engine.generate([p] * len(rows), rows)
    if schema_out.finish_reason == "stop":  # random weights may run a string to max_tokens
        assert set(json.loads(schema_out.text)) == {"city", "n"}
    assert re.fullmatch("(yes|no)-[0-9]{2}", regex_out.text) and regex_out.finish_reason == "stop"
    assert choice_out.text in ("go north", "open door") and choice_out.finish_reason == "stop"
    assert free.completion_tokens == 8 and free.logprobs is None
    assert len(scored.logprobs) == scored.completion_tokens
    for tok, lp, top in scored.logprobs:
        assert lp <= 0.0 and len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
        assert top[0][0] == tok  # greedy: the chosen token is the most likely
    assert obj.text.startswith("{")


@pytest.fixture
def engine_ignoring_eos(engine):
    """The engine with --option ignore_eos=1: the end of sequence doesn't end a row, so a
    constrained row ends where its grammar does (the grammar takes the end token)."""
    engine.decoder.ignore_eos = True
    yield engine
    engine.decoder.ignore_eos = False


def test_a_grammar_that_ends_finishes_its_row_with_exactly_its_tokens(engine_ignoring_eos):
    """The row whose grammar ended leaves with the tokens up to the end, not the extra one a
    step launched before its end was read gave it; a row at its length whose grammar ends
    with that token ends with "stop"."""
    engine = engine_ignoring_eos
    p = engine.check(user_prompt(FRAME, "Answer."))
    choice = engine.grammar(Constraint("choice", json.dumps(["go north", "open the door now"])))
    regex = engine.grammar(Constraint("regex", "(yes|no)-[0-9]{2}"))
    free = Sampling(max_tokens=24)  # keeps the decode running after the constrained rows end
    rows = [
        Sampling(max_tokens=30, grammar=choice, logprobs=True),
        Sampling(max_tokens=30, grammar=regex),
        free,
    ]
    c, r, f = engine.generate([p] * 3, rows)
    for out in (c, r):
        assert out.finish_reason == "stop" and out.completion_tokens == len(out.token_ids)
        assert engine.tokenizer.decode(out.token_ids, skip_special_tokens=True) == out.raw_text
    assert c.text in ("go north", "open the door now") and len(c.logprobs) == c.completion_tokens
    assert re.fullmatch("(yes|no)-[0-9]{2}", r.text)
    assert f.completion_tokens == 24
    k = c.completion_tokens
    at_end, short = engine.generate(
        [p] * 3,
        [
            Sampling(max_tokens=k, grammar=choice, logprobs=True),
            Sampling(max_tokens=k - 1, grammar=choice),
            free,
        ],
    )[:2]
    # its length and its grammar's end at once: "stop"
    assert at_end.token_ids == c.token_ids and at_end.finish_reason == "stop"
    assert short.token_ids == c.token_ids[: k - 1] and short.finish_reason == "length"


def test_the_models_padding_ids_are_never_a_constrained_rows_token(engine):
    """The model's logits are wider than the tokenizer (embedding padding); the grammar only
    knows the tokenizer's ids, so the padding columns are masked for constrained rows, and
    left alone for the others."""
    import torch

    from inference_worker.engines.grammar import Grammars

    tok = engine.tokenizer
    own = len(tok)
    g = Grammars(tok, own + 200, engine.eos_ids)
    assert g.tokens == own
    matcher = g.matcher(g.compile(Constraint("choice", json.dumps(["yes", "no"]))))
    logits = torch.zeros(2, own + 200)
    logits[:, own:] = 100.0  # a padding id would win any argmax
    g.new_bitmask(2, "cpu").apply(logits, [0], [matcher])
    assert torch.isinf(logits[0, own:]).all() and (logits[1, own:] == 100.0).all()
    first = tok.decode([int(logits[0].argmax())])
    assert "yes".startswith(first) or "no".startswith(first)


def test_n_answers_share_one_prefill_and_differ_when_sampled(engine):
    p = engine.check(user_prompt("Say something."))
    greedy, sampled = engine.generate(
        [p, p], [Sampling(max_tokens=6, n=3), Sampling(max_tokens=6, n=3, temperature=1.0, seed=1)]
    )
    assert len(greedy) == 3 and len({c.raw_text for c in greedy}) == 1
    assert len(sampled) == 3 and len({c.raw_text for c in sampled}) > 1
    again = engine.generate([p], [Sampling(max_tokens=6, n=3, temperature=1.0, seed=1)])[0]
    assert [c.raw_text for c in again] == [c.raw_text for c in sampled]  # seed + answer index


def test_minerl_grammar_matches_the_parser_and_schema(engine):
    """Every answer the action grammar allows parses; the parser's output fits the schema;
    the longest answer is what the budget assumes."""
    xgr = pytest.importorskip("xgrammar")
    action = {**{b: i % 2 for i, b in enumerate(BUTTONS)}, "camera": [-179.99, 180]}
    text = json.dumps({"action": action, "reasoning": "look left"})
    assert re.fullmatch(action_pattern(20), text)
    parsed = parse_minerl_action(text)
    assert parsed.ok and parsed.action == {**action, "camera": [-179.99, 180.0]}
    schema = engine.grammar(Constraint("json_schema", json.dumps(ACTION_SCHEMA)))
    for a in (parsed.action, parse_minerl_action('{"camera": [1e9, "x"], "jump": true}').action):
        m = xgr.GrammarMatcher(schema)
        assert m.accept_string(json.dumps({"action": a, "reasoning": "r"}))  # ", " and ": " as the prompt
    longest = json.dumps({"action": {**action, "camera": ["-179.99", "-179.99"]}, "reasoning": "x" * 5})
    assert len(longest.replace('"-179.99"', "-179.99")) == pattern_bytes(5)
    assert action_budget(16) == pattern_bytes(0) + 1 and action_budget(600) == 600


def test_stream_text_is_a_prefix_of_the_answer():
    assert visible("Hello wor", ["world"]) == "Hello"  # " wor" may be the start of the stop
    assert visible("<think>hm</think> Yes ", []) == "Yes"
    assert visible("  Yes, <think>hm", []) == "Yes,"

    class Toks:  # a tokenizer of single characters
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    s = TextStream(Toks(), ["STOP"])
    out = "".join(s.push([ord(c)]) for c in " Hi there STOP and more")
    assert out == "Hi there"


def test_version_1_bodies_are_still_served_and_v2_fields_validate():
    from schemas.codec import packb
    from schemas.errors import ProtocolError
    from schemas.messages import decode_request

    old = {
        **TextActionRequest(session_id="s", messages=[{"role": "user", "content": "hi"}]).to_wire(),
        "v": 1,
    }
    assert decode_request(packb(old)).n == 1
    new = TextActionRequest(
        session_id="s",
        messages=[{"role": "user", "content": "hi"}],
        constraint={"type": "choice", "choices": ["a"]},
        n=2,
    )
    assert new.v == 2 and decode_request(packb(new.to_wire())).constraint.choices == ["a"]
    for bad in (
        {"constraint": {"type": "regex"}},  # no pattern
        {"top_logprobs": 2},  # without logprobs
        {"admissible_commands": ["a"], "n": 2},
        {"n": 17},
    ):
        with pytest.raises(ProtocolError):
            decode_request(packb({**new.to_wire(), "constraint": None, "n": 1, **bad}))


def test_client_keeps_one_deliverys_pieces_in_order():
    from env_agents.client import _PieceQueue

    def piece(seq, worker="w1", delivery=1, index=0):
        return Partial(
            request_id="r", session_id="s", kind="text_action", seq=seq, index=index, worker=worker,
            delivery=delivery, text=str(seq),
        )  # fmt: skip

    q = _PieceQueue()
    offered = [piece(0), piece(1), piece(1), piece(0, "w2", 2), piece(3), piece(0, index=1), piece(2)]
    assert [q.accept(p) for p in offered] == [True, True, False, False, False, True, True]
    got = [q.queue.get_nowait() for _ in range(q.queue.qsize())]
    assert [(p.index, p.seq) for p in got] == [(0, 0), (0, 1), (1, 0), (0, 2)]


# ----------------------------------------------------------------------------- through a worker


@pytest.fixture(scope="module")
def served(redis_server, engine):
    broker = BrokerSettings(url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:10]}", claim_min_idle_ms=2000)
    settings = synthetic_settings(broker, kinds=("text_action", "structured_action"), max_wait_ms=1.0)
    handlers = {
        "text_action": TextActionHandler(engine, settings.limits),
        "structured_action": StructuredActionHandler(engine, settings.limits),
    }
    with WorkerThread(settings, handlers=handlers):
        yield broker


def test_structured_action_is_valid_by_construction(served):
    async def go():
        async with AsyncAgentClient("minerl-1", settings=served) as c:
            reqs = [
                StructuredActionRequest(image=FRAME, step=i, max_tokens=16 + 200 * (i % 2)) for i in range(4)
            ]
            free = StructuredActionRequest(image=FRAME, max_tokens=12, constrained=False)
            return await asyncio.gather(*(c.request(r, timeout=120) for r in [*reqs, free]))

    *constrained, free = asyncio.run(go())
    for r in constrained:
        res = r.result
        assert res.parse_ok and res.constrained and set(res.action) == {*BUTTONS, "camera"}
        assert all(-180 <= x <= 180 for x in res.action["camera"])
        assert re.fullmatch(action_pattern(400), res.text.strip())
    assert not free.result.constrained and not free.result.parse_ok  # random weights, no grammar


def test_stream_yields_pieces_then_the_reply(served):
    async def go():
        async with AsyncAgentClient("streamer-1", settings=served) as c:
            req = TextActionRequest(
                messages=[{"role": "user", "content": "Tell a story."}], max_tokens=12, logprobs=True
            )
            events = [e async for e in c.stream(req, timeout=120)]
            plain = await c.request(
                TextActionRequest(messages=[{"role": "user", "content": "Tell a story."}], max_tokens=12),
                timeout=120,
            )
            return events, plain

    events, plain = asyncio.run(go())
    pieces, reply = events[:-1], events[-1]
    assert all(isinstance(p, Partial) for p in pieces) and len(pieces) >= 5
    assert [p.seq for p in pieces] == list(range(len(pieces)))
    streamed = "".join(p.text for p in pieces)
    assert reply.ok and reply.result.text.startswith(streamed)
    assert reply.result.text == plain.result.text  # greedy: streaming changes nothing
    assert sum(len(p.token_ids) for p in pieces) < reply.result.completion_tokens
    assert all(p.logprobs and len(p.logprobs) == len(p.token_ids) for p in pieces)


@pytest.mark.gpu
def test_constrained_rows_under_cuda_graphs(tiny_qwen2_vl):
    """On CUDA the mask is applied to the logits the decode graph's replay left, on the device."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    e = ChatEngine(load_vlm(tiny_qwen2_vl, device="cuda"), EngineOptions(decode="graphs"), max_sequences=16)
    e.warmup()
    p = e.check(user_prompt(FRAME, "Answer."))
    regex = e.grammar(Constraint("regex", "(yes|no)-[0-9]{2}"))
    action = e.grammar(Constraint("regex", action_pattern(30)))
    rows = [Sampling(max_tokens=20, grammar=regex), Sampling(max_tokens=12)] * 4 + [
        Sampling(max_tokens=pattern_bytes(30) + 1, grammar=action, temperature=1.0, seed=i) for i in range(4)
    ]
    out = e.generate([p] * len(rows), rows)
    assert e.decoder.stats()["graphs"] > 0
    for s, c in zip(rows, out):
        if s.grammar is regex:
            assert re.fullmatch("(yes|no)-[0-9]{2}", c.text)
        elif s.grammar is action:
            assert parse_minerl_action(c.raw_text).ok and c.finish_reason == "stop"
        else:
            assert c.completion_tokens <= 12
