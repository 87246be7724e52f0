"""M-RoPE positions of a left-padded batch, computed per row with numpy.

The same numbers as the models' own `get_rope_index` (text runs count up on all three
axes; an image's tokens take (t, row, column) offsets from the position where the image
starts, and the text after it resumes at that position + max(rows, columns)), which
walks every token in Python and costs ~0.3 ms a row. Rows of one shape (runs of text and
image tokens, image grids) share one cached computation. tests/test_models_engine.py
checks the two agree.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence, Tuple

import numpy as np


def mrope_positions(
    mm_token_type_ids: Any, attention_mask: Any, grids: Sequence[Sequence[int]], merge: int
) -> Tuple[Any, Any]:
    """(positions (3, B, S) int64 with pads at 0, next position (B,)) as numpy arrays.

    `grids`: (t, h, w) patch grid of each image, in the order images appear row by row."""
    types = np.asarray(mm_token_type_ids)
    mask = np.asarray(attention_mask).astype(bool)
    b, s = types.shape
    pos = np.zeros((3, b, s), dtype=np.int64)
    nxt = np.zeros(b, dtype=np.int64)
    image = 0
    for r in range(b):
        cols = np.flatnonzero(mask[r])
        row_types = types[r, cols]
        bounds = (np.flatnonzero(np.diff(row_types)) + 1).tolist()
        edges = [0, *bounds, len(row_types)] if len(row_types) else []
        segments = tuple((int(row_types[a]) != 0, e - a) for a, e in zip(edges, edges[1:]))
        count = sum(1 for is_image, _ in segments if is_image)
        row_grids = tuple(tuple(int(x) for x in g) for g in grids[image : image + count])
        image += count
        row, nxt[r] = _row_positions(segments, row_grids, merge)
        pos[:, r, cols] = row
    return pos, nxt


@functools.lru_cache(maxsize=4096)
def _row_positions(
    segments: Tuple[Tuple[bool, int], ...], grids: Tuple[Tuple[int, int, int], ...], merge: int
) -> Tuple[Any, int]:
    """One row's positions (3, tokens) from its runs of (is image, length) and its images'
    grids, and its next position. Cached: a batch's rows mostly repeat a few shapes (the
    VLA's frames with one instruction; numpy work of ~0.1 ms a row on a GPU host's CPU)."""
    row = np.empty((3, sum(n for _, n in segments)), dtype=np.int64)
    cur = a = image = 0
    for is_image, n in segments:
        e = a + n
        if not is_image:
            row[:, a:e] = cur + np.arange(n)
            cur += n
        else:
            t, h, w = grids[image]
            image += 1
            h, w = h // merge, w // merge
            row[0, a:e] = cur + np.repeat(np.arange(t), h * w)
            row[1, a:e] = cur + np.tile(np.repeat(np.arange(h), w), t)
            row[2, a:e] = cur + np.tile(np.arange(w), t * h)
            cur += max(h, w)
        a = e
    row.flags.writeable = False
    return row, int(row.max()) + 1 if row.size else 0
