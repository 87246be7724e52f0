"""Host tensors onto the model's device without stalling the host.

A plain `.to("cuda")` from pageable memory ends with a stream synchronize: the host waits
for every kernel queued before the copy (the vision tower, a decode step) and the GPU then
idles until the host queues more. From pinned memory the copy is queued like a kernel and
the host goes on; PyTorch's pinned-memory cache keeps the staging buffer alive until the
copy has run."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, List, Sequence, Tuple


def upload(tensor: Any, device: Any) -> Any:
    if getattr(device, "type", device) != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


ALIGN = 64  # bytes: where each array of `upload_many` starts (a cache line; vector loads want 16)


def upload_many(arrays: Sequence[Any], device: Any) -> List[Any]:
    """`upload` of several numpy arrays as one buffer and one copy: their bytes side by side
    (each at an ALIGN-byte boundary), viewed back as the arrays on the device (on a CPU, views of
    the host buffer: the same packing runs everywhere). A prompt group's index tensors are
    six small arrays; uploaded one by one, each asked the pinned-memory cache for a block and
    queued a copy of its own (a served 2B worker's profile: 414 pin_memory calls, 48.6 ms of
    the model thread's time, in 100 steps)."""
    import numpy as np
    import torch

    cuda = getattr(device, "type", device) == "cuda"
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.nbytes // ALIGN) * ALIGN
    host = torch.empty(max(total, ALIGN), dtype=torch.uint8, pin_memory=cuda)
    raw = host.numpy()
    for a, at in zip(arrays, offsets):
        raw[at : at + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    buf = host.to(device, non_blocking=True) if cuda else host
    return [
        buf[at : at + a.nbytes].view(_torch_dtype(a.dtype)).view(a.shape) for a, at in zip(arrays, offsets)
    ]


def _torch_dtype(dtype: Any) -> Any:
    """The torch dtype `torch.from_numpy` gives an array of this numpy dtype."""
    import numpy as np
    import torch

    return torch.from_numpy(np.empty(0, dtype)).dtype


def constant(values: Any, device: Any, dtype: Any = None) -> Any:
    """A small tensor of Python values on `device`, queued like `upload`."""
    import torch

    return upload(torch.tensor(values, dtype=dtype), device)


class FrameStaging:
    """Same-shape frames stacked straight into a pinned buffer kept per batch shape, then
    queued to the device: one host copy per frame, where stacking and then pinning the
    stack makes two and asks the pinned-memory cache for a block on every batch. A buffer
    is refilled only after the copy out of it has run (its event; by the next batch of that
    shape it long has)."""

    def __init__(self, max_buffers: int = 8) -> None:
        self.max_buffers = max_buffers
        self._buffers: OrderedDict[Tuple[Any, ...], Tuple[Any, Any]] = OrderedDict()

    def upload(self, frames: Sequence[Any], device: Any) -> Any:
        import numpy as np
        import torch

        if getattr(device, "type", device) != "cuda":
            return torch.from_numpy(np.stack(frames)).to(device)
        key = (len(frames), *frames[0].shape, frames[0].dtype.str)
        entry = self._buffers.pop(key, None)
        if entry is None:
            host = torch.from_numpy(np.empty((len(frames), *frames[0].shape), frames[0].dtype)).pin_memory()
        else:
            host, done = entry
            done.synchronize()
        np.stack(frames, out=host.numpy())
        out = host.to(device, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._buffers[key] = (host, done)
        while len(self._buffers) > self.max_buffers:
            self._buffers.popitem(last=False)
        return out
