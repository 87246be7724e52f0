"""Partial replies: the text of streaming requests as it is decoded.

The engine core hands out each step's new tokens of the requests that asked to stream
(core.PartialOutput). Here, on the event loop and never on the model thread, they become
text and go to the session's partial stream, `<prefix>:part:{p<n>}:<session>`, one
pipeline per step. The partial stream is a sibling of the reply stream, not the reply
stream itself: reply streams are trimmed to exactly `reply_maxlen` entries so that an
unread reply is never trimmed while fewer requests are in flight, and a stream of
partials beside them would break that. Partials are plain XADDs: not fenced, never acked,
never counted as the reply. The reply still comes, once, through the fenced commit, with
the whole answer; pieces that are lost (a trimmed stream, a failed write) cost a client
their timing, never their text.

Each piece's `text` is what the reply's `text` grows by: the decoded text with the stop
sequence cut off (held back while a stop could still be starting), Qwen3 reasoning left
out, and leading and trailing whitespace held back, as `Completion.text` is stripped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from broker.keys import Keys
from inference_worker.engines.text import find_stop
from inference_worker.handlers.text_action import logprob_models
from schemas.codec import packb
from schemas.messages import PROTOCOL_VERSION

log = logging.getLogger("vlmq.streaming")

PARTIAL_MAXLEN = 4096  # pieces kept per session (approximate trimming)


def visible(raw: str, stops: Sequence[str]) -> str:
    """The part of an unfinished answer's text that its final `text` will start with."""
    cut = find_stop(raw, stops)
    if cut is not None:
        text = raw[:cut]
    else:
        hold = max((len(s) for s in stops if s), default=1) - 1  # a stop may be starting
        text = raw[: len(raw) - hold] if hold else raw
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text.strip()


class TextStream:
    """One answer's text, token by token (incremental detokenization: each push decodes a
    few tokens, not the whole answer)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.tokens: List[int] = []
        self.prefix = 0  # tokens[prefix:read] decode to the end of `raw`; they give context
        self.read = 0
        self.raw = ""
        self.sent = ""
        self.seq = 0

    def _decode(self, tokens: List[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def push(self, token_ids: Sequence[int]) -> str:
        """The visible text these tokens add ("" while it is held back)."""
        self.tokens += token_ids
        before = self._decode(self.tokens[self.prefix : self.read])
        now = self._decode(self.tokens[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):  # not in the middle of a character
            self.raw += now[len(before) :]
            self.prefix, self.read = self.read, len(self.tokens)
        shown = visible(self.raw, self.stops)
        if not shown.startswith(self.sent):  # a later </think> hid text already sent: the reply settles it
            return ""
        delta, self.sent = shown[len(self.sent) :], shown
        return delta


class PartialWriter:
    """Writes the partials of each step, in order, without holding up the loop's other work."""

    def __init__(self, redis, keys: Keys, worker: str, ttl_s: int, engine: Any) -> None:
        self.redis = redis
        self.keys = keys
        self.worker = worker
        self.ttl_s = ttl_s
        self.engine = engine  # the chat engine: its tokenizer and token pieces
        self._queue: asyncio.Queue = asyncio.Queue()
        self._streams: Dict[Tuple[int, int], TextStream] = {}
        self._task: Optional[asyncio.Task] = None
        self.written = 0
        self.failed = 0

    def push(self, partials: List[Any]) -> None:
        """A step's partials (core.PartialOutput); called on the loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="partials")
        self._queue.put_nowait(("parts", partials))

    def finished(self, items: Sequence[Any]) -> None:
        """These requests are answered: forget their text."""
        if self._task is not None:
            self._queue.put_nowait(("done", items))

    async def close(self) -> None:
        if self._task is not None:
            await self._queue.join()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            except Exception as exc:  # best effort: the reply carries the whole text anyway
                self.failed += 1
                log.warning("writing partial replies failed: %s", exc)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: List[Tuple[str, Any]]) -> None:
        # A request's pieces of several steps waiting here go out as one: when writing falls
        # behind the decode, entries grow instead of piling up.
        merged: Dict[Tuple[int, int], Tuple[Any, List[int], Optional[List[Any]]]] = {}
        done: List[Any] = []
        for what, payload in batch:
            if what == "done":
                done += payload
                continue
            for p in payload:
                key = (id(p.item), p.index)
                if key in merged:
                    item, tokens, logprobs = merged[key]
                    tokens += p.token_ids
                    if logprobs is not None:
                        logprobs += p.logprobs or []
                else:
                    merged[key] = (p.item, list(p.token_ids), list(p.logprobs) if p.logprobs else None)
        entries = [self._entry(key, *value) for key, value in merged.items()]
        for item in done:
            for key in [k for k in self._streams if k[0] == id(item)]:
                del self._streams[key]
        if not entries:
            return
        pipe = self.redis.pipeline(transaction=False)
        for stream, rid, body in entries:
            pipe.xadd(stream, {"rid": rid, "body": body}, maxlen=PARTIAL_MAXLEN, approximate=True)
        for stream in {e[0] for e in entries}:
            pipe.expire(stream, self.ttl_s)
        await pipe.execute()
        self.written += len(entries)

    def _entry(
        self, key: Tuple[int, int], item: Any, token_ids: List[int], logprobs: Optional[List[Any]]
    ) -> Tuple[str, bytes, bytes]:
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = TextStream(self.engine.tokenizer, getattr(item.request, "stop", ()))
        text = stream.push(token_ids)
        req, d = item.request, item.delivery
        # the fields of schemas.messages.Partial, as a plain map: this runs for every
        # streaming request every step, and a model instance per piece costs more than the rest
        piece: Dict[str, Any] = {
            "partial": True,
            "v": PROTOCOL_VERSION,
            "request_id": req.request_id,
            "session_id": req.session_id,
            "kind": req.kind,
            "index": key[1],
            "seq": stream.seq,
            "text": text,
            "token_ids": token_ids,
            "worker": self.worker,
            "delivery": d.deliveries,
        }
        if logprobs is not None:
            piece["logprobs"] = [m.model_dump() for m in logprob_models(self.engine, logprobs) or []]
        stream.seq += 1
        return self.keys.partial_stream(req.session_id, d.partition), req.request_id.encode(), packb(piece)
