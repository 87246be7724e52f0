"""The capture format (a screen-capture tool's, QPC clock): one folder per episode.

    video.mp4      the screen, ~10 fps (H.264 through imageio-ffmpeg)
    events.jsonl   one input event per line: {"ts": QPC ticks, "kind": ..., ...}
                   mousemove {x, y}; mouseclick {x, y, buttons?}; keydown/keyup {vk}
    frame_ts.bin   int64 little-endian QPC timestamp per video frame (repeats = duplicate frames)
    meta.json      {"fps", "canvas": [width, height], "qpc_freq", "offset_ms", ...}

Clocks: milliseconds = ticks * 1000 / qpc_freq. `offset_ms` is added to *event* times to
put them on the video's clock (event_ms = ts_ms + offset_ms); frames are taken as they are.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

VIDEO, EVENTS, FRAME_TS, META = "video.mp4", "events.jsonl", "frame_ts.bin", "meta.json"
EVENT_KINDS = ("mousemove", "mouseclick", "keydown", "keyup")


@dataclass
class RawEpisode:
    path: str
    meta: Dict[str, Any]
    frame_ts: np.ndarray  # int64 ticks, one per video frame
    events: List[Dict[str, Any]]

    @property
    def qpc_freq(self) -> float:
        return float(self.meta["qpc_freq"])

    @property
    def offset_ms(self) -> float:
        return float(self.meta.get("offset_ms", 0.0))

    @property
    def canvas(self) -> Tuple[int, int]:
        return canvas_size(self.meta)

    def frames(self) -> Iterator[np.ndarray]:
        return read_video(os.path.join(self.path, VIDEO))


def canvas_size(meta: Dict[str, Any]) -> Tuple[int, int]:
    """(width, height) from meta.json: "canvas": [w, h] or {"width", "height"}, or canvas_w/_h."""
    c = meta.get("canvas")
    if isinstance(c, dict):
        return int(c.get("width", c.get("w"))), int(c.get("height", c.get("h")))
    if isinstance(c, (list, tuple)) and len(c) == 2:
        return int(c[0]), int(c[1])
    if "canvas_w" in meta and "canvas_h" in meta:
        return int(meta["canvas_w"]), int(meta["canvas_h"])
    raise ValueError(f"meta.json has no usable canvas size: {c!r}")


def is_episode(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, f)) for f in (VIDEO, EVENTS, FRAME_TS, META))


def find_episodes(root: str) -> List[str]:
    """Episode folders under root (root itself if it is one), sorted."""
    if is_episode(root):
        return [root]
    found = []
    for dirpath, _dirs, _files in os.walk(root):
        if is_episode(dirpath):
            found.append(dirpath)
    return sorted(found)


def read_episode(path: str) -> RawEpisode:
    with open(os.path.join(path, META)) as f:
        meta = json.load(f)
    if "qpc_freq" not in meta or float(meta["qpc_freq"]) <= 0:
        raise ValueError(f"{path}: meta.json needs a positive qpc_freq")
    frame_ts = np.fromfile(os.path.join(path, FRAME_TS), dtype="<i8").astype(np.int64)
    events = []
    with open(os.path.join(path, EVENTS)) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}/{EVENTS}:{n}: not JSON ({exc})") from None
            if not isinstance(ev, dict) or "ts" not in ev or "kind" not in ev:
                raise ValueError(f"{path}/{EVENTS}:{n}: an event needs ts and kind")
            events.append(ev)
    return RawEpisode(path, meta, frame_ts, events)


def read_video(path: str) -> Iterator[np.ndarray]:
    import imageio.v3 as iio

    for frame in iio.imiter(path, plugin="FFMPEG"):
        yield np.ascontiguousarray(frame[..., :3])


@dataclass
class EpisodeWriter:
    """Writes one episode folder; frames go to the encoder as they come."""

    path: str
    fps: float = 10.0
    qpc_freq: int = 10_000_000
    offset_ms: float = 0.0
    extra_meta: Dict[str, Any] = field(default_factory=dict)
    _writer: Any = None
    _ts: List[int] = field(default_factory=list)
    _events: Any = None
    _canvas: Optional[Tuple[int, int]] = None

    def __post_init__(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        self._events = open(os.path.join(self.path, EVENTS), "w")  # noqa: SIM115  (closed by close())

    def frame(self, image: np.ndarray, ts: int) -> None:
        import imageio.v2 as iio

        if self._writer is None:
            h, w = image.shape[:2]
            self._canvas = (w, h)
            # Every frame is a key frame at near-lossless quality: training decodes frames
            # exactly where they are, and MiniWorld's flat colours compress well anyway.
            self._writer = iio.get_writer(
                os.path.join(self.path, VIDEO),
                fps=self.fps,
                codec="libx264",
                quality=None,
                macro_block_size=1,
                ffmpeg_log_level="error",
                output_params=["-crf", "12", "-g", "1", "-pix_fmt", "yuv444p"],
            )
        self._writer.append_data(np.ascontiguousarray(image[..., :3]))
        self._ts.append(int(ts))

    def event(self, kind: str, ts: int, **fields: Any) -> None:
        """An input event; `ts` is on the video clock and is written on the event clock."""
        shifted = round(ts - self.offset_ms * self.qpc_freq / 1000.0)
        self._events.write(json.dumps({"ts": shifted, "kind": kind, **fields}) + "\n")

    def close(self, **meta: Any) -> None:
        if self._writer is not None:
            self._writer.close()
        self._events.close()
        np.asarray(self._ts, dtype="<i8").tofile(os.path.join(self.path, FRAME_TS))
        w, h = self._canvas or (0, 0)
        body = {
            "fps": self.fps,
            "canvas": [w, h],
            "qpc_freq": self.qpc_freq,
            "offset_ms": self.offset_ms,
            **self.extra_meta,
            **meta,
        }
        with open(os.path.join(self.path, META), "w") as f:
            json.dump(body, f, indent=1)
