"""Recordings (the capture format, env_agents/recording/format.py) -> aligned training shards with splits.

Alignment, per episode:
  * frame times: frame_ts.bin ticks -> ms (ticks * 1000 / qpc_freq); a frame whose
    timestamp equals the previous one is a duplicate grab and is dropped.
  * event times: ts -> ms, plus meta's offset_ms (the event clock -> the video clock).
  * frame i owns the interval [ms_i, ms_{i+1}) (the last frame: one frame period). Its
    action row is what the user did while it was on screen: a key counts as pressed if it
    went down inside the interval or is still down at its end (a tap shorter than a frame
    counts; a key released early in the interval, held over from the frames before, does
    not, so a switch from one key to another labels only the new key); a mouse button if
    it was clicked inside it; the mouse position is the cursor's at the end of the
    interval. Keys outside the vocabulary are ignored.

Output: OUT/{train,val,test}/<episode>.npz (frames uint8 [N,H,W,3], actions float32
[N, ACTION_DIM], frame_idx, timestamp_ms, instruction, events_json: the raw events of each
frame for audits) and OUT/manifest.json. Read with numpy, allow_pickle=False.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from env_agents.recording.format import RawEpisode, find_episodes, read_episode
from schemas import actions as A

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"


@dataclass
class AlignedEpisode:
    name: str
    frames: np.ndarray  # uint8 [N, H, W, 3]
    actions: np.ndarray  # float32 [N, ACTION_DIM]
    frame_idx: np.ndarray  # int64 [N]: index in video.mp4
    timestamp_ms: np.ndarray  # float64 [N]
    events: List[List[Dict[str, Any]]]  # raw events inside each frame's interval
    instruction: str
    stats: Dict[str, int]


def unique_frames(frame_ts: np.ndarray) -> np.ndarray:
    """Indices of frames kept: the first of each run of equal timestamps."""
    if len(frame_ts) == 0:
        return np.zeros(0, np.int64)
    keep = np.ones(len(frame_ts), bool)
    keep[1:] = frame_ts[1:] != frame_ts[:-1]
    return np.flatnonzero(keep)


def align_actions(
    raw: RawEpisode, n_frames: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[List[Dict[str, Any]]], Dict[str, int]]:
    """Per kept frame: (action rows, kept video indices, timestamps ms, events, stats)."""
    ts = raw.frame_ts[:n_frames]
    kept = unique_frames(ts)
    if len(kept) and np.any(np.diff(ts[kept]) < 0):
        raise ValueError(f"{raw.path}: frame timestamps go backwards")
    freq = raw.qpc_freq
    frame_ms = ts[kept].astype(np.float64) * 1000.0 / freq
    period = 1000.0 / float(raw.meta.get("fps", 10.0))
    width, height = raw.canvas
    evs = sorted(raw.events, key=lambda e: float(e["ts"]))  # stable: equal times keep file order
    ev_ms = [float(e["ts"]) * 1000.0 / freq + raw.offset_ms for e in evs]
    stats = {"events": len(evs), "unknown_keys": 0, "unknown_kinds": 0, "duplicates": len(ts) - len(kept)}

    mouse = (0.0, 0.0)  # the cursor starts at the centre until an event says otherwise
    down: set = set()
    rows = np.zeros((len(kept), A.ACTION_DIM), np.float32)
    per_frame: List[List[Dict[str, Any]]] = []
    j = 0

    def apply(ev: Dict[str, Any], pressed: Optional[set], clicked: Optional[set]) -> None:
        nonlocal mouse
        kind = ev["kind"]
        if kind in ("mousemove", "mouseclick") and "x" in ev and "y" in ev:
            mouse = A.normalise_mouse(ev["x"], ev["y"], width, height)
        if kind == "mouseclick":
            if clicked is not None:
                clicked.update(A.button_channels(ev.get("buttons")))
        elif kind in ("keydown", "keyup"):
            ch = A.key_channel(ev.get("vk", -1))
            if ch is None:
                stats["unknown_keys"] += 1
            elif kind == "keydown":
                down.add(ch)
                if pressed is not None:
                    pressed.add(ch)
            else:
                down.discard(ch)
        elif kind != "mousemove":
            stats["unknown_kinds"] += 1

    for i, start in enumerate(frame_ms):
        end = frame_ms[i + 1] if i + 1 < len(frame_ms) else start + period
        while j < len(evs) and ev_ms[j] < start:  # before the first frame: state only
            apply(evs[j], None, None)
            j += 1
        pressed, clicked = set(), set()
        mine = []
        while j < len(evs) and ev_ms[j] < end:
            apply(evs[j], pressed, clicked)
            mine.append(evs[j])
            j += 1
        row = A.idle_vector(mouse)
        for ch in pressed | down | clicked:
            row[ch] = A.PRESSED
        rows[i] = row
        per_frame.append(mine)
    return rows, kept.astype(np.int64), frame_ms, per_frame, stats


def _resize(frame: np.ndarray, size: Optional[int]) -> np.ndarray:
    if not size or frame.shape[:2] == (size, size):
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((size, size), Image.BILINEAR))


def convert_episode(path: str, name: str, image_size: Optional[int] = None) -> AlignedEpisode:
    raw = read_episode(path)
    frames = list(raw.frames())
    n = min(len(frames), len(raw.frame_ts))
    if n == 0:
        raise ValueError(f"{path}: no frames")
    rows, kept, ms, per_frame, stats = align_actions(raw, n)
    stats["video_frames"], stats["timestamps"] = len(frames), len(raw.frame_ts)
    imgs = np.stack([_resize(frames[i], image_size) for i in kept]).astype(np.uint8)
    return AlignedEpisode(
        name=name,
        frames=imgs,
        actions=rows,
        frame_idx=kept,
        timestamp_ms=ms,
        events=per_frame,
        instruction=str(raw.meta.get("instruction", "")),
        stats=stats,
    )


def split_names(names: Sequence[str], ratios: Tuple[float, float, float], seed: int) -> Dict[str, List[str]]:
    """A seeded shuffle cut by ratios; with 3+ episodes, val and test get at least one."""
    order = sorted(names)
    np.random.default_rng(seed).shuffle(order)
    n = len(order)
    n_val = round(n * ratios[1])
    n_test = round(n * ratios[2])
    if n >= 3:
        n_val, n_test = max(1, n_val), max(1, n_test)
    n_train = max(0, n - n_val - n_test)
    return {
        "train": sorted(order[:n_train]),
        "val": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


def save_episode(ep: AlignedEpisode, path: str) -> None:
    np.savez_compressed(
        path,
        frames=ep.frames,
        actions=ep.actions,
        frame_idx=ep.frame_idx,
        timestamp_ms=ep.timestamp_ms,
        instruction=np.str_(ep.instruction),
        events_json=np.str_(json.dumps(ep.events)),
    )


def convert(
    src: str,
    out: str,
    image_size: Optional[int] = None,
    ratios: Tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    progress: bool = False,
) -> Dict[str, Any]:
    """Convert every episode folder under src; returns (and writes) the manifest."""
    paths = find_episodes(src)
    if not paths:
        raise FileNotFoundError(
            f"no episode folders (video.mp4 + events.jsonl + frame_ts.bin + meta.json) under {src}"
        )
    names = {
        os.path.relpath(p, src).replace(os.sep, "__") if p != src else os.path.basename(p): p for p in paths
    }
    splits = split_names(list(names), ratios, seed)
    totals: Dict[str, int] = {}
    counts = {s: 0 for s in SPLITS}
    items = [(s, n) for s in SPLITS for n in splits[s]]
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="converting", unit="ep")
    for split, name in items:
        ep = convert_episode(names[name], name, image_size)
        os.makedirs(os.path.join(out, split), exist_ok=True)
        save_episode(ep, os.path.join(out, split, f"{name}.npz"))
        counts[split] += len(ep.actions)
        for k, v in ep.stats.items():
            totals[k] = totals.get(k, 0) + v
    manifest = {
        "format": "vlmq-vla-shards/1",
        "source": os.path.abspath(src),
        "action_dim": A.ACTION_DIM,
        "action_channels": A.channel_names(),
        "image_size": image_size,
        "splits": {s: [f"{s}/{n}.npz" for n in splits[s]] for s in SPLITS},
        "frames": counts,
        "stats": totals,
    }
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest
