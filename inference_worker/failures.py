"""What an exception from the model means for the worker: one request's problem, memory, or
a device that can no longer be trusted."""

from __future__ import annotations

ERROR = "error"  # this work failed; the worker goes on
OOM = "oom"  # out of device memory: smaller pieces may fit
FATAL = "fatal"  # the device is in an undefined state: stop taking work, exit non-zero

_FATAL_MESSAGES = (
    "device-side assert",
    "illegal memory access",
    "an illegal instruction",
    "unspecified launch failure",
    "misaligned address",
    "uncorrectable ecc error",
)


def classify(exc: BaseException) -> str:
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return OOM
    text = str(exc).lower()
    if any(m in text for m in _FATAL_MESSAGES):
        return FATAL
    return ERROR
