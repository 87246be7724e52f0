"""The worker's start-up self-check (engines/self_check.py) on tiny checkpoints, CPU: it
passes on the real engine, catches a fast path that computes something else, falls back to
the stock path (or refuses with --strict), and its half-precision criterion holds in bf16."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")

from inference_worker.engines import chat_engine as chat_engine_module  # noqa: E402
from inference_worker.engines import self_check  # noqa: E402
from inference_worker.engines.chat_engine import ChatEngine  # noqa: E402
from inference_worker.engines.options import EngineOptions  # noqa: E402
from inference_worker.engines.parity import compare_topk, engine_trace, reference_trace  # noqa: E402
from inference_worker.handlers import build_handlers  # noqa: E402
from inference_worker.models import ModelLoadError, load_vlm  # noqa: E402
from inference_worker.settings import WorkerSettings  # noqa: E402
from tests.helpers import WorkerThread  # noqa: E402


def wrong_patch_embedding(model) -> bool:
    """A fast path gone wrong the way an internal's change would make it: the patch
    embedding as a GEMM, but over the pixel columns in another order."""
    import torch.nn.functional as F

    embed = model.model.visual.patch_embed
    conv = embed.proj

    def forward(hidden_states):
        w = conv.weight.transpose(-1, -2).reshape(conv.weight.shape[0], -1)
        return F.linear(hidden_states.reshape(-1, w.shape[1]).to(w.dtype), w, conv.bias)

    embed.forward = forward
    return True


@pytest.mark.parametrize("fixture", ["tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_qwen3_vl"])
def test_the_engine_passes(request, fixture):
    vlm = load_vlm(request.getfixturevalue(fixture))
    engine, served = self_check.checked_engine(vlm, EngineOptions(), reload=lambda: pytest.fail("reloaded"))
    assert served is vlm and engine.options.vision == "fast"


def test_a_wrong_fast_path_falls_back_to_the_stock_path(tiny_qwen2_vl, monkeypatch, caplog):
    monkeypatch.setattr(chat_engine_module, "use_linear_patch_embedding", wrong_patch_embedding)
    first = load_vlm(tiny_qwen2_vl)
    reloads = []

    def reload():
        reloads.append(load_vlm(tiny_qwen2_vl))
        return reloads[-1]

    with caplog.at_level(logging.WARNING, logger="vlmq.self_check"):
        engine, served = self_check.checked_engine(first, EngineOptions(), reload=reload)
    assert "self-check failed" in caplog.text and "stock path" in caplog.text
    assert served is reloads[0] and served is not first  # the patched model is dropped
    assert engine.options == EngineOptions().stock()
    assert "forward" not in vars(served.model.model.visual.patch_embed)


def test_strict_refuses_to_start(tiny_qwen2_vl, monkeypatch):
    monkeypatch.setattr(chat_engine_module, "use_linear_patch_embedding", wrong_patch_embedding)
    settings = WorkerSettings(backend="hf", model_path=tiny_qwen2_vl, kinds=("text_action",), strict=True)
    with pytest.raises(ModelLoadError, match=r"self-check failed \(--strict\)") as err:
        build_handlers(settings)
    assert "\n" not in str(err.value)


def test_the_worker_serves_on_the_stock_path_after_a_failed_check(tiny_qwen2_vl, monkeypatch):
    monkeypatch.setattr(chat_engine_module, "use_linear_patch_embedding", wrong_patch_embedding)
    settings = WorkerSettings(backend="hf", model_path=tiny_qwen2_vl, kinds=("text_action", "preference"))
    handlers = build_handlers(settings)
    engines = {id(h.engine) for h in handlers.values()}
    assert len(engines) == 1 and handlers["text_action"].engine.options.vision == "stock"
    assert handlers["text_action"].engine.path == "stock (self-check failed)"


@pytest.mark.parametrize("broken", [False, True])
def test_the_heartbeat_and_inspect_say_which_path_serves(settings, tiny_qwen2_vl, monkeypatch, broken):
    """A fallback is visible without reading the worker's log: `vlmq inspect` shows the
    engine's path from the heartbeat ("fast", or "stock (self-check failed)")."""
    from broker.connection import connect_sync
    from ops.inspect import render, snapshot

    if broken:
        monkeypatch.setattr(chat_engine_module, "use_linear_patch_embedding", wrong_patch_embedding)
    worker = WorkerSettings(broker=settings, backend="hf", model_path=tiny_qwen2_vl, kinds=("text_action",))
    with WorkerThread(worker) as thread:
        thread.wait_live()
        r = connect_sync(settings)
        try:
            shown = render(snapshot(r, settings))
        finally:
            r.close()
    path = "stock (self-check failed)" if broken else "fast"
    assert f"engine={path!r}" in shown, shown


def test_the_check_can_be_turned_off(tiny_qwen2_vl, monkeypatch):
    monkeypatch.setattr(chat_engine_module, "use_linear_patch_embedding", wrong_patch_embedding)
    settings = WorkerSettings(
        backend="hf", model_path=tiny_qwen2_vl, kinds=("text_action",), options={"self_check": "0"}
    )
    assert build_handlers(settings)["text_action"].engine.options.vision == "fast"


def test_half_precision_is_judged_by_top_k(tiny_qwen2_vl):
    """bf16 on CPU: the engine's argmax may differ from the stock forward's at near-ties;
    every difference is one (each pick in the other's top 5) and the top-5 log-probs stay
    within the self-check's tolerance."""
    engine = ChatEngine(load_vlm(tiny_qwen2_vl, dtype="bfloat16"))
    pristine = load_vlm(tiny_qwen2_vl, dtype="bfloat16")
    prompt = self_check.check_prompt()
    ref = reference_trace(pristine, prompt, max_tokens=self_check.TOKENS)
    report = compare_topk(ref, engine_trace(engine, prompt, ref.tokens), k=5)
    assert report.close and report.max_abs_diff < self_check.TOL_HALF, report
    assert self_check.compare(engine, ref).ok


def test_strict_flag_and_variable(monkeypatch):
    import argparse

    from inference_worker.cli import add_worker_args, settings_from_args

    def parse(*argv):
        p = argparse.ArgumentParser()
        add_worker_args(p)
        return settings_from_args(p.parse_args(list(argv)))

    assert parse().strict is False
    assert parse("--strict").strict is True
    monkeypatch.setenv("VLMQ_STRICT", "1")
    assert parse().strict is True
