"""Traces -> SFT JSONL: OpenAI-style messages (images as data URLs) + the model's answer.

One sample per answered chat request (text_action, structured_action). The split is by
episode, never inside one (frames of an episode are near-duplicates), seeded, so the same
database always gives the same train/val files. Traces with nothing to export (action_chunk
requests only, or filters that leave no sample) are an error, not empty files: an
action_chunk request has no text answer to learn from, and its chunks are the model's own
guesses (VLA training data comes from `vlmq vla record`).
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

CHAT_KINDS = ("text_action", "structured_action")


class NothingToExport(ValueError):
    """The traces hold no sample the export could write."""


@dataclass
class ExportCounts:
    episodes: int = 0
    train_episodes: int = 0
    val_episodes: int = 0
    train_samples: int = 0
    val_samples: int = 0


def answer_text(kind: str, result: Dict[str, Any]) -> str:
    if kind == "text_action":
        return str(result.get("choice") or result.get("text") or "")
    return str(result.get("text") or json.dumps(result.get("action", {}), sort_keys=True))


def _episodes(db: sqlite3.Connection, min_steps: int, success_only: bool) -> List[Dict[str, Any]]:
    out = []
    for row in db.execute(
        "SELECT id, run, session, episode, seed, env_id, kind, stats FROM episodes "
        "WHERE stats IS NOT NULL ORDER BY id"
    ):
        stats = json.loads(row[7])
        if stats.get("steps", 0) < min_steps or (success_only and not stats.get("success")):
            continue
        out.append(
            {
                "id": row[0],
                "run": row[1],
                "session": row[2],
                "episode": row[3],
                "seed": row[4],
                "env_id": row[5],
                "kind": row[6],
                "success": bool(stats.get("success")),
                "reward": stats.get("reward", 0.0),
                "steps": stats.get("steps", 0),
            }
        )
    return out


def samples(
    db: sqlite3.Connection, episode: Dict[str, Any], kinds: Sequence[str] = CHAT_KINDS
) -> Iterator[dict]:
    rows = db.execute(
        "SELECT t, request_id, kind, request, reply, rtt_ms FROM requests "
        "WHERE episode_id = ? AND ok = 1 ORDER BY t, rowid",
        (episode["id"],),
    )
    for t, rid, kind, req, reply, rtt in rows:
        if kind not in kinds:
            continue
        messages = json.loads(req).get("messages")
        if not messages:
            continue
        answer = answer_text(kind, json.loads(reply))
        meta = {k: episode[k] for k in ("run", "session", "episode", "seed", "env_id", "success", "reward")}
        meta.update(t=t, request_id=rid, kind=kind, rtt_ms=round(rtt, 3))
        yield {"messages": [*messages, {"role": "assistant", "content": answer}], "metadata": meta}


def split_episodes(episodes: List[dict], val_fraction: float, seed: int) -> Dict[int, str]:
    ids = [e["id"] for e in episodes]
    random.Random(seed).shuffle(ids)
    n_val = round(len(ids) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(ids) > 1:
        n_val = 1  # a requested validation split is never silently empty
    return {eid: ("val" if i < n_val else "train") for i, eid in enumerate(ids)}


def export_sft(
    db_path: str,
    out_dir: str,
    val_fraction: float = 0.1,
    min_steps: int = 1,
    success_only: bool = False,
    seed: int = 0,
    kinds: Sequence[str] = CHAT_KINDS,
) -> ExportCounts:
    """Write out_dir/train.jsonl and out_dir/val.jsonl; returns what went where."""
    if not os.path.exists(db_path):
        raise FileNotFoundError(f"no trace database at {db_path}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    db = sqlite3.connect(db_path)
    try:
        _check_kinds(db, db_path, kinds)
        episodes = _episodes(db, min_steps, success_only)
        os.makedirs(out_dir, exist_ok=True)
        where = split_episodes(episodes, val_fraction, seed)
        counts = ExportCounts(episodes=len(episodes))
        with (
            open(os.path.join(out_dir, "train.jsonl"), "w") as train,
            open(os.path.join(out_dir, "val.jsonl"), "w") as val,
        ):
            files = {"train": train, "val": val}
            for ep in episodes:
                split = where[ep["id"]]
                n = 0
                for sample in samples(db, ep, kinds):
                    files[split].write(json.dumps(sample) + "\n")
                    n += 1
                if split == "val":
                    counts.val_episodes += 1
                    counts.val_samples += n
                else:
                    counts.train_episodes += 1
                    counts.train_samples += n
        if counts.train_samples + counts.val_samples == 0:
            for name in ("train.jsonl", "val.jsonl"):
                os.remove(os.path.join(out_dir, name))
            raise NothingToExport(
                f"{db_path}: no sample left: {counts.episodes} finished episode(s) pass --min-steps "
                f"{min_steps}{' and --success-only' if success_only else ''}, none with an answered "
                f"{' or '.join(kinds)} request"
            )
        return counts
    finally:
        db.close()


def _check_kinds(db: sqlite3.Connection, db_path: str, kinds: Sequence[str]) -> None:
    """Fail before writing anything when no answered request is of an exportable kind."""
    answered = dict(db.execute("SELECT kind, COUNT(*) FROM requests WHERE ok = 1 GROUP BY kind").fetchall())
    if any(answered.get(k) for k in kinds):
        return
    held = ", ".join(f"{n} {k}" for k, n in sorted(answered.items())) or "no answered requests"
    hint = (
        "; action_chunk traces have no text answer to train on (VLA training data: `vlmq vla record`)"
        if "action_chunk" in answered
        else ""
    )
    raise NothingToExport(
        f"{db_path} holds {held}; SFT export takes answered {' and '.join(kinds)} requests{hint}"
    )


def read_jsonl(path: str, limit: Optional[int] = None) -> List[dict]:
    out = []
    with open(path) as f:
        for line in f:
            out.append(json.loads(line))
            if limit and len(out) >= limit:
                break
    return out
