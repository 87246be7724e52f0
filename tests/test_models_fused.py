"""The compiled per-token ops keep their compiled form across the variants a worker meets."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")

from inference_worker.engines.fused import Kernels, add_rms_norm  # noqa: E402


@pytest.mark.slow
def test_more_variants_than_torchs_default_limit_stay_compiled(caplog):
    """The chat engine (inference_mode) and the VLA feature pass (no_grad) share a model and
    call the same compiled functions at several dtypes and ranks: past torch's default of 8
    variants a fullgraph compile fails, and the function then ran op by op for good (seen on
    an H100 worker serving action_chunk and text_action)."""
    k = Kernels(True)
    calls = 0
    with caplog.at_level(logging.WARNING, logger="vlmq.engine"):
        for mode in (torch.no_grad, torch.inference_mode):
            for dtype in (torch.float32, torch.bfloat16):
                for shape in ((3, 5, 32), (3, 1, 32), (7, 32)):
                    with mode():
                        h, d = torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)
                        w = torch.randn(shape[-1], dtype=dtype)
                        got = k.add_rms_norm(h, d, w, 1e-6)
                        want = add_rms_norm(h, d, w, 1e-6)
                        tol = 1e-5 if dtype == torch.float32 else 1e-2
                        assert all(torch.allclose(a, b, atol=tol, rtol=tol) for a, b in zip(got, want))
                        calls += 1
    assert calls == 12
    assert not [r for r in caplog.records if "op by op" in r.getMessage()], "a compiled op fell back to eager"
