"""What a failure means for the worker: retry, split the batch, fail one request, or stop.

- Out of memory on the device: the batch was too big for what it asked of the model; run
  it again in halves (a request that is out of memory alone fails alone).
- A fatal device error (a device-side assert, an illegal memory access, a launch failure):
  the CUDA context is unusable for every later batch of this process. The worker stops
  reading, answers nothing more, and exits non-zero; another worker reclaims what it held,
  and runs those requests one at a time, so the one that causes it ends in dead letters.
- A transient Redis error (connection lost, timeout, loading, failover): retry with
  backoff, within a time budget, and count it.
- Anything else a handler raises: that batch (or, split, that request) fails with
  `internal`; the worker goes on.

Errors are classified by type where torch and redis-py give one, else by the message CUDA
puts in its RuntimeError; torch is never imported here (the env side shares no code with
this module, but the worker may run without torch: the synthetic backend).
"""

from __future__ import annotations

import sys

from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ConnectionError,
    MasterDownError,
    ReadOnlyError,
    ResponseError,
    TimeoutError,
    TryAgainError,
)

# Substrings of the messages of CUDA errors after which the context is corrupt
# (cudaErrorAssert, cudaErrorIllegalAddress, cudaErrorLaunchFailure, ...).
_FATAL_DEVICE = (
    "device-side assert",
    "illegal memory access",
    "an illegal instruction was encountered",
    "misaligned address",
    "unspecified launch failure",
    "uncorrectable ecc error",
    "cuda error: launch failure",
    "cublas_status_execution_failed",
    "cudnn_status_execution_failed",
    "nccl error",
)
_OOM = ("out of memory", "cuda_error_out_of_memory", "cublas_status_alloc_failed")
# Redis replies that go away by themselves: a replica promoted, a node loading its data,
# a write refused while over maxmemory.
_TRANSIENT_REPLIES = ("LOADING", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "READONLY", "OOM ", "BUSY ")


class FatalDeviceError(RuntimeError):
    """The device cannot run anything more in this process."""


def is_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc).lower() for s in _OOM)


def is_fatal_device_error(exc: BaseException) -> bool:
    if isinstance(exc, FatalDeviceError):
        return True
    if not isinstance(exc, RuntimeError) or is_out_of_memory(exc):
        return False
    text = str(exc).lower()
    return any(s in text for s in _FATAL_DEVICE)


def is_transient_redis_error(exc: BaseException) -> bool:
    if isinstance(
        exc,
        (ConnectionError, TimeoutError, BusyLoadingError, TryAgainError, ClusterDownError, MasterDownError),
    ):
        return True
    if isinstance(exc, (ReadOnlyError, OSError)):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_TRANSIENT_REPLIES)


def release_device_memory() -> None:
    """Give cached blocks back after an out-of-memory error, so the halves can fit."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
