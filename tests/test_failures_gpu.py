"""Real CUDA errors are classified as inference_worker/failures.py expects (GPU only).

An out-of-memory error must read as out of memory (the batch is split), a device-side assert
as fatal (the worker exits and another takes over). A device assert leaves the CUDA context
unusable, so each case runs in a process of its own.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

_CASES = {
    "oom": """
import torch
from inference_worker.failures import is_fatal_device_error, is_out_of_memory
try:
    torch.empty(1 << 50, dtype=torch.uint8, device="cuda")
except Exception as exc:
    print(is_out_of_memory(exc), is_fatal_device_error(exc))
""",
    "device_assert": """
import torch
from inference_worker.failures import is_fatal_device_error, is_out_of_memory
try:
    x = torch.zeros(4, device="cuda")
    x[torch.tensor([10], device="cuda")] = 1.0
    torch.cuda.synchronize()
except Exception as exc:
    print(is_out_of_memory(exc), is_fatal_device_error(exc))
""",
}


@pytest.mark.parametrize(("case", "expected"), [("oom", "True False"), ("device_assert", "False True")])
def test_real_cuda_errors_are_classified(case: str, expected: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CASES[case]], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.stdout.strip().splitlines()[-1] == expected, out.stdout + out.stderr
