"""Host tensors onto the model's device without stalling the host.

A plain `.to("cuda")` from pageable memory ends with a stream synchronize: the host waits
for every kernel queued before the copy (the vision tower, a decode step) and the GPU then
idles until the host queues more. From pinned memory the copy is queued like a kernel and
the host goes on; PyTorch's pinned-memory cache keeps the staging buffer alive until the
copy has run."""

from __future__ import annotations

from typing import Any


def upload(tensor: Any, device: Any) -> Any:
    if getattr(device, "type", device) != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def constant(values: Any, device: Any, dtype: Any = None) -> Any:
    """A small tensor of Python values on `device`, queued like `upload`."""
    import torch

    return upload(torch.tensor(values, dtype=dtype), device)
