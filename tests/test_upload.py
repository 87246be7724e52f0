"""engines/upload.py's pinned ring, with a plain buffer and events the test controls: every
tensor arrives intact, and no stretch is written while a queued copy may still read it."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from inference_worker.engines.upload import ALIGN, Ring, through  # noqa: E402


class Event:
    """A copy's completion, passed when the test says so (or when waited on)."""

    def __init__(self) -> None:
        self.done = False
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = True
        self.done = True


def test_tensors_of_any_dtype_and_shape_arrive_intact():
    ring = Ring(torch.zeros(4096, dtype=torch.uint8))
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(3, 5, generator=g),
        torch.randint(0, 1 << 40, (7,), generator=g),
        torch.rand(4, 4, generator=g) > 0.5,
        torch.tensor(3.5, dtype=torch.float64),
        torch.randn(6, 4, generator=g).t(),  # not contiguous
        torch.randn(9, generator=g).to(torch.bfloat16),
    ]
    for _ in range(20):  # several laps of the ring
        for t in tensors:
            got = through(ring, t, "cpu", Event)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)


def test_a_stretch_is_written_again_only_after_its_copy_passed():
    ring = Ring(torch.zeros(4 * ALIGN, dtype=torch.uint8))
    events, spans = [], []
    for k in range(4):  # fill the ring: four stretches, none passed
        stretch = ring.stage(torch.full((ALIGN,), k, dtype=torch.uint8))
        events.append(Event())
        ring.commit(events[-1])
        spans.append((ring.head - ALIGN, ring.head))
        assert int(stretch[0]) == k
    events[2].done = True  # a later copy passes before the oldest
    ring.stage(torch.full((ALIGN,), 9, dtype=torch.uint8))  # wraps to the start
    ring.commit(Event())
    assert events[0].waited and not any(e.waited for e in events[1:])
    assert int(ring.buffer[ALIGN]) == 1  # the stretches still queued are untouched
    # a stretch wider than what is free waits for every copy it covers, oldest first
    ring.stage(torch.full((2 * ALIGN,), 7, dtype=torch.uint8))
    assert events[1].waited and not events[3].waited
    assert ring.fits(ALIGN) and not ring.fits(2 * ALIGN)
