"""The recording file: what `vlmq record` writes and `vlmq replay` / `vlmq tail --file` read.

A recording is a sequence of msgpack maps, one after another, gzip-compressed when the file
name ends in `.gz` (docs/OPS.md, "Recording format"):

1. a header: {"format": "vlmq-recording", "version": 1, "prefix", "partitions",
   "started_at", "host", "command"}
2. one map per tapped stream entry:
   {"type": "request" | "reply", "stream", "id", "seen_at", "kind", "session", "rid",
    "body": <bytes: the message body exactly as it was on the wire>,
    "via": "dead_letter" (only from a stream-reading tap, ops/tap.py: a request it took
    from its dead-letter copy; `vlmq record` reads the commit tap and never writes it)}
3. a footer, when the recorder stopped cleanly: {"type": "end", "ended_at", "requests",
   "replies", "orphan_replies", "missed"} (missed: copies trimmed before the recorder read
   them, ops/commit_tap.py)

Bodies stay in the wire encoding (msgpack with the ndarray extension), so a recording
replays byte for byte and is decoded with the same validating decoder as the worker's;
nothing in it is ever unpickled.
"""

from __future__ import annotations

import gzip
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Dict, Iterator, List, Optional

import msgpack

from ops.tap import TapEvent

FORMAT = "vlmq-recording"
VERSION = 1
# A recorded map holds one message body: the body limit plus room for the envelope.
_MAX_RECORD_BYTES = 512 * 1024 * 1024


class RecordingError(Exception):
    pass


def _open(path: str, mode: str) -> BinaryIO:
    if path.endswith(".gz"):
        return gzip.open(path, mode + "b")  # type: ignore[return-value]
    return open(path, mode + "b")


class RecordingWriter:
    def __init__(self, path: str, prefix: str, partitions: int) -> None:
        self.path = path
        self._f = _open(path, "w")
        self.counts = {"request": 0, "reply": 0}
        self._requests_seen: set = set()
        self.orphan_replies = 0  # replies whose request the tap did not see
        self.missed = 0  # copies the recorder lost (ops/commit_tap.py)
        self._write(
            {
                "format": FORMAT,
                "version": VERSION,
                "prefix": prefix,
                "partitions": partitions,
                "started_at": time.time(),
                "host": socket.gethostname(),
                "command": " ".join(["vlmq", *sys.argv[1:]]),
            }
        )

    def _write(self, obj: Dict[str, Any]) -> None:
        self._f.write(msgpack.packb(obj, use_bin_type=True))

    def write(self, ev: TapEvent) -> None:
        if ev.type == "request":
            self._requests_seen.add(ev.request_id)
        elif ev.request_id not in self._requests_seen:
            self.orphan_replies += 1
        self.counts[ev.type] += 1
        self._write(
            {
                "type": ev.type,
                "stream": ev.stream,
                "id": ev.entry_id,
                "seen_at": ev.seen_at,
                "kind": ev.kind,
                "session": ev.session,
                "rid": ev.request_id,
                "body": ev.body,
                **({"via": ev.via} if ev.via else {}),
            }
        )

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._write(
            {
                "type": "end",
                "ended_at": time.time(),
                "requests": self.counts["request"],
                "replies": self.counts["reply"],
                "orphan_replies": self.orphan_replies,
                "missed": self.missed,
            }
        )
        self._f.close()

    @property
    def size(self) -> int:
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0


@dataclass
class Entry:
    type: str
    stream: str
    id: str
    seen_at: float
    kind: str
    session: str
    rid: str
    body: bytes

    @property
    def id_key(self) -> tuple:
        ms, _, seq = self.id.partition("-")
        return (int(ms), int(seq or 0))


@dataclass
class Recording:
    header: Dict[str, Any]
    entries: List[Entry] = field(default_factory=list)
    footer: Optional[Dict[str, Any]] = None

    def requests(self) -> List[Entry]:
        return [e for e in self.entries if e.type == "request"]

    def replies_by_rid(self) -> Dict[str, Entry]:
        """The first reply of each request id (later ones are at-least-once duplicates)."""
        out: Dict[str, Entry] = {}
        for e in self.entries:
            if e.type == "reply" and e.rid not in out:
                out[e.rid] = e
        return out


def iter_recording(path: str) -> Iterator[Dict[str, Any]]:
    """The raw maps of a recording, header first; raises RecordingError on a foreign file."""
    with _open(path, "r") as f:
        unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=_MAX_RECORD_BYTES, strict_map_key=True)
        try:
            header = next(unpacker)
        except (StopIteration, ValueError, msgpack.UnpackException, OSError) as exc:
            raise RecordingError(f"{path}: not a vlmq recording ({exc or 'empty file'})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise RecordingError(f"{path}: not a vlmq recording (no '{FORMAT}' header)")
        if header.get("version") != VERSION:
            raise RecordingError(
                f"{path}: recording version {header.get('version')!r}; this vlmq reads {VERSION}"
            )
        yield header
        try:
            for obj in unpacker:
                if isinstance(obj, dict):
                    yield obj
        except (ValueError, msgpack.UnpackException, OSError, EOFError):
            return  # a recording cut off mid-record (recorder killed): keep what is whole


def read_recording(path: str) -> Recording:
    it = iter_recording(path)
    rec = Recording(next(it))
    for obj in it:
        if obj.get("type") == "end":
            rec.footer = obj
        elif obj.get("type") in ("request", "reply"):
            rec.entries.append(
                Entry(
                    obj["type"],
                    obj.get("stream", ""),
                    obj.get("id", "0-0"),
                    float(obj.get("seen_at", 0.0)),
                    obj.get("kind", ""),
                    obj.get("session", ""),
                    obj.get("rid", ""),
                    obj.get("body", b""),
                )
            )
    return rec
