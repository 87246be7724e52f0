"""Reading redis-py's replies: bytes as text, and stream reads as flat entries."""

from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple


def text(x: Any) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else str(x)


def stream_entries(resp: Any) -> Iterator[Tuple[str, str, Dict[bytes, bytes]]]:
    """(stream, entry id, fields) of each entry of an XREAD / XREADGROUP reply, RESP2 or RESP3."""
    items = resp.items() if isinstance(resp, dict) else (resp or [])
    for stream, entries in items:
        if entries and isinstance(entries[0], list) and len(entries) == 1 and isinstance(entries[0][0], list):
            entries = entries[0]  # RESP3 nests one level deeper
        for entry_id, fields in entries:
            yield text(stream), text(entry_id), fields or {}
