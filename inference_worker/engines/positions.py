"""M-RoPE positions of a left-padded batch, computed per row with numpy.

The same numbers as the models' own `get_rope_index` (text runs count up on all three
axes; an image's tokens take (t, row, column) offsets from the position where the image
starts, and the text after it resumes at that position + max(rows, columns)), which
walks every token in Python and costs ~0.3 ms a row. tests/test_models_engine.py checks
the two agree.
"""

from __future__ import annotations

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
        bounds = np.flatnonzero(np.diff(row_types)) + 1
        starts = np.concatenate(([0], bounds))
        ends = np.concatenate((bounds, [len(row_types)]))
        row = np.empty((3, len(row_types)), dtype=np.int64)
        cur = 0
        for a, e in zip(starts.tolist(), ends.tolist()):
            if row_types[a] == 0:
                row[:, a:e] = cur + np.arange(e - a)
                cur += e - a
            else:
                t, h, w = (int(x) for x in grids[image])
                image += 1
                h, w = h // merge, w // merge
                row[0, a:e] = cur + np.repeat(np.arange(t), h * w)
                row[1, a:e] = cur + np.tile(np.repeat(np.arange(h), w), t)
                row[2, a:e] = cur + np.tile(np.arange(w), t * h)
                cur += max(h, w)
        pos[:, r, cols] = row
        nxt[r] = row.max() + 1 if row.size else 0
    return pos, nxt
