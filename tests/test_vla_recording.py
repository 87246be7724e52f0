"""The action layout, the capture format, the converter and the dataset, on synthesised
recordings (exact expected labels) and on real MiniWorld expert recordings."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from env_agents.recording import actions as MW
from env_agents.recording.format import EpisodeWriter, read_episode
from ops.vla.convert import convert, unique_frames
from schemas import actions as A

FREQ = 10_000_000  # QPC ticks per second
TICK = FREQ // 1000  # ticks per ms


def test_action_layout_round_trips_miniworld_actions():
    assert A.ACTION_DIM == len(A.channel_names()) == 2 + 3 + len(A.KEY_VOCAB)
    for action in range(len(MW.MINIWORLD_KEYS)):
        row = MW.action_to_vector(action)
        assert row.dtype == np.float32 and row.shape == (A.ACTION_DIM,)
        assert MW.vector_to_action(row, 8) == action
        assert ((row[A.KEY_SLICE] > 0).sum(), (row[A.BUTTON_SLICE] > 0).sum()) == (1, 0)
    # An env with 3 actions never gets an action id >= 3, even if "pick up" is strongest.
    row = MW.action_to_vector(4)
    row[A.key_channel(A.VK["RIGHT"])] = 0.3
    assert MW.vector_to_action(row, 3) == 1
    assert MW.chunk_to_actions(np.stack([MW.action_to_vector(2)] * 4), 3) == [2, 2, 2, 2]
    assert A.normalise_mouse(0, 0, 384, 384) == (-1.0, -1.0)
    assert A.normalise_mouse(383, 383, 384, 384) == (1.0, 1.0)
    assert (
        A.button_channels(5) == [2, 4]
        and A.button_channels(None) == [2]
        and A.button_channels("right") == [3]
    )
    assert A.key_channel(0x99) is None


def shard_files(manifest) -> list:
    return [rel for split in manifest["splits"].values() for rel in split]


def _synth_episode(path: str, offset_ms: float) -> None:
    """6 frames at 10 fps (frame 3 grabbed twice), with keys, a tap, clicks, mouse moves,
    a key outside the vocabulary and an event before the first frame."""
    w = EpisodeWriter(path, fps=10.0, qpc_freq=FREQ, offset_ms=offset_ms, extra_meta={"instruction": "go"})
    t0 = 5_000_000_000
    frames = [np.full((32, 48, 3), 40 * i, np.uint8) for i in range(6)]
    for i, f in enumerate(frames):
        w.frame(f, t0 + i * 100 * TICK)
        if i == 3:
            w.frame(f, t0 + i * 100 * TICK)  # a duplicate grab
    ms = lambda x: t0 + int(x * TICK)  # noqa: E731  (video-clock ms -> ticks)
    w.event("mousemove", ms(-50), x=0, y=0)  # before frame 0: state only
    w.event("keydown", ms(10), vk=A.VK["UP"])  # frame 0: UP
    w.event("keyup", ms(150), vk=A.VK["UP"])  # held over into frame 1 and released: not frame 1's
    w.event("keydown", ms(160), vk=A.VK["LEFT"])  # frame 1: LEFT
    w.event("keyup", ms(205), vk=A.VK["LEFT"])  # frame 2: released early -> not pressed
    w.event("keydown", ms(230), vk=A.VK["E"])  # a tap inside frame 2
    w.event("keyup", ms(260), vk=A.VK["E"])
    w.event("keydown", ms(270), vk=0x99)  # not in the vocabulary
    w.event("mouseclick", ms(320), x=47, y=31, buttons=2)  # frame 3: right click at the corner
    w.event("mousemove", ms(450), x=0, y=31)  # frame 4: mouse ends at the left edge
    w.event("mouseclick", ms(520), x=0, y=31)  # frame 5: no buttons field -> left
    w.close()


def test_converter_aligns_synthesised_events_exactly(tmp_path):
    src = tmp_path / "rec"
    for n, offset in enumerate([0.0, 37.5, -12.0]):
        ep = str(src / f"ep{n}")
        _synth_episode(ep, offset)
        raw = read_episode(ep)
        assert raw.frame_ts.dtype == np.int64 and len(raw.frame_ts) == 7
        assert raw.canvas == (48, 32)
        assert list(unique_frames(raw.frame_ts)) == [0, 1, 2, 3, 5, 6]
    manifest = convert(str(src), str(tmp_path / "out"), image_size=16, seed=0)
    assert all(len(v) == 1 for v in manifest["splits"].values())  # 3 episodes: one per split
    assert manifest["stats"]["duplicates"] == 3 and manifest["stats"]["unknown_keys"] == 3
    for rel in shard_files(manifest):
        with np.load(tmp_path / "out" / rel, allow_pickle=False) as d:
            acts, frames = d["actions"], d["frames"]
            assert frames.shape == (6, 16, 16, 3) and acts.shape == (6, A.ACTION_DIM)
            assert list(d["frame_idx"]) == [0, 1, 2, 3, 5, 6]
            assert str(d["instruction"]) == "go"
            assert len(json.loads(str(d["events_json"]))) == 6
        pressed = [sorted(A.channel_names()[c] for c in np.flatnonzero(r > 0) if c >= 2) for r in acts]
        assert pressed == [
            ["key_UP"],
            ["key_LEFT"],
            ["key_E"],
            ["btn_right"],
            [],
            ["btn_left"],
        ]
        assert tuple(acts[0, :2]) == (-1.0, -1.0)  # the pre-episode move
        assert tuple(acts[3, :2]) == (1.0, 1.0)  # the click moved the cursor
        assert tuple(acts[4, :2]) == (-1.0, 1.0)


@pytest.fixture(scope="module")
def miniworld_recording(tmp_path_factory):
    if importlib.util.find_spec("miniworld") is None:  # importing it here would skip headless mode
        pytest.skip("MiniWorld is not installed (the envs extra)")
    from env_agents.recording.recorder import RecordingOptions, record

    out = str(tmp_path_factory.mktemp("mw-rec"))
    opts = RecordingOptions(offset_ms=25.0, duplicate_prob=0.2, max_steps=40)
    return out, record("MiniWorld-OneRoom-v0", out, 3, size=64, seed=3, opts=opts)


def test_recorder_writes_the_seed_format_and_the_converter_recovers_the_actions(
    miniworld_recording, tmp_path
):
    out, summaries = miniworld_recording
    ep_dir = summaries[0]["path"]
    assert sorted(os.listdir(ep_dir)) == ["events.jsonl", "frame_ts.bin", "meta.json", "video.mp4"]
    with open(os.path.join(ep_dir, "meta.json")) as f:
        meta = json.load(f)
    assert (
        meta["fps"] == 10.0
        and meta["canvas"] == [64, 64]
        and meta["qpc_freq"] > 0
        and meta["offset_ms"] == 25.0
    )
    with open(os.path.join(ep_dir, "events.jsonl")) as f:
        kinds = {json.loads(line)["kind"] for line in f}
    assert kinds <= {"mousemove", "mouseclick", "keydown", "keyup"} and "keydown" in kinds
    manifest = convert(out, str(tmp_path / "shards"), seed=0)
    for rel in shard_files(manifest):
        name = os.path.splitext(os.path.basename(rel))[0]
        summary = next(s for s in summaries if os.path.basename(s["path"]) == name)
        with np.load(tmp_path / "shards" / rel, allow_pickle=False) as d:
            acts, frames = d["actions"], d["frames"]
        # One labelled row per executed action, plus the final frame with nothing pressed.
        assert len(acts) == summary["steps"] + 1 and frames.shape[1:] == (64, 64, 3)
        assert MW.chunk_to_actions(acts[:-1], 3) == summary["actions"]
        assert not (acts[-1][A.KEY_SLICE] > 0).any()
        # Decoded video frames are the rendered ones, up to compression.
        assert frames.std() > 5


def test_dataset_pads_episode_starts_and_masks_chunk_ends(miniworld_recording, tmp_path):
    from ops.vla.dataset import MiniworldVLADataset

    out, _ = miniworld_recording
    convert(out, str(tmp_path / "shards"), seed=0, ratios=(1.0, 0.0, 0.0))
    ds = MiniworldVLADataset(str(tmp_path / "shards"), "train", num_frames=3, frame_skip=2, chunk_size=50)
    assert len(ds) == sum(len(e) for e in ds.episodes)
    first = ds[0]
    assert first["images"].shape == (3, 3, 64, 64) and first["frame_idx"].tolist() == [0, 0, 0]
    assert ds[3]["frame_idx"].tolist() == [0, 1, 3] and ds[5]["frame_idx"].tolist() == [1, 3, 5]
    n = len(ds.episodes[0])
    last = ds[n - 1]
    assert last["action_chunk"].shape == (50, A.ACTION_DIM) and int(last["action_mask"].sum()) == 1
    assert (last["action_chunk"] == last["action_chunk"][0]).all()
    assert first["text_instruction"] == "go to the red box"
