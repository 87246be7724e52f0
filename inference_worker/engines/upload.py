"""Host tensors onto the model's device without stalling the host.

A plain `.to("cuda")` from pageable memory ends with a stream synchronize: the host waits
for every kernel queued before the copy (the vision tower, a decode step) and the GPU then
idles until the host queues more. From pinned memory the copy is queued like a kernel and
the host goes on. Pinning each tensor (`tensor.pin_memory()`) costs ~0.5-1 ms of host time
a call on the H100 machines (a batch-8 VLA encode made ten such calls: 5.5 of its 9.3 ms of
host time), so tensors go through one pinned buffer per device used as a ring: a tensor's
bytes are copied into the next free stretch and its copy to the device is queued from
there; a stretch is written again only after the event recorded behind its copy has
passed. Tensors larger than a quarter of the ring, and uploads during a CUDA-graph
capture, are pinned on their own.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict

RING_BYTES = 16 << 20
ALIGN = 256


@dataclass
class _Region:
    start: int
    end: int
    event: Any  # query() -> bool, synchronize()


class Ring:
    """A byte buffer handed out in stretches, oldest first; `stage` returns a stretch holding
    a copy of the tensor's bytes once no queued copy still reads it."""

    def __init__(self, buffer: Any) -> None:
        self.buffer = buffer  # (size,) uint8; pinned in use, plain in the tests
        self.size = int(buffer.numel())
        self.head = 0
        self.pending: Deque[_Region] = deque()
        self.lock = threading.Lock()

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.size // 4

    def stage(self, data: Any) -> Any:
        """`data`: a flat uint8 view of the tensor. Call `commit` once its copy is queued."""
        n = int(data.numel())
        start = -(-self.head // ALIGN) * ALIGN
        if start + n > self.size:
            start = 0
        end = start + n
        while True:
            while self.pending and self.pending[0].event.query():
                self.pending.popleft()
            if not any(r.start < end and start < r.end for r in self.pending):
                break
            self.pending.popleft().event.synchronize()  # the oldest first: the earliest done
        stretch = self.buffer[start:end]
        stretch.copy_(data)
        self.head = end
        self._staged = (start, end)
        return stretch

    def commit(self, event: Any) -> None:
        start, end = self._staged
        self.pending.append(_Region(start, end, event))


_rings: Dict[Any, Ring] = {}
_rings_lock = threading.Lock()


def _ring(device: Any) -> Ring:
    import torch

    key = torch.device(device).index or 0
    ring = _rings.get(key)
    if ring is None:
        with _rings_lock:
            ring = _rings.get(key)
            if ring is None:
                ring = Ring(torch.empty(RING_BYTES, dtype=torch.uint8, pin_memory=True))
                _rings[key] = ring
    return ring


def upload(tensor: Any, device: Any) -> Any:
    if getattr(device, "type", device) != "cuda" and not str(device).startswith("cuda"):
        return tensor.to(device)
    import torch

    nbytes = tensor.numel() * tensor.element_size()
    if torch.cuda.is_current_stream_capturing() or nbytes == 0:
        return tensor.pin_memory().to(device, non_blocking=True)
    ring = _ring(device)
    if not ring.fits(nbytes):
        return tensor.pin_memory().to(device, non_blocking=True)
    return through(ring, tensor, device, recorder(device))


def recorder(device: Any) -> Callable[[], Any]:
    """A function that records a CUDA event on `device`'s current stream and returns it."""
    import torch

    def recorded() -> Any:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event

    return recorded


def through(ring: Ring, tensor: Any, device: Any, recorded: Callable[[], Any]) -> Any:
    """`tensor` on `device` by way of a stretch of `ring`; `recorded()` returns an event
    recorded behind the queued copy."""
    import torch

    src = tensor.contiguous().reshape(-1).view(torch.uint8)
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    with ring.lock:
        stretch = ring.stage(src)
        out.reshape(-1).view(torch.uint8).copy_(stretch, non_blocking=True)
        ring.commit(recorded())
    return out


def constant(values: Any, device: Any, dtype: Any = None) -> Any:
    """A small tensor of Python values on `device`, queued like `upload`."""
    import torch

    return upload(torch.tensor(values, dtype=dtype), device)
