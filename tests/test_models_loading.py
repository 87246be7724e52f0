"""make-model and load_vlm: real architectures, random weights, loaded offline like a download."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from inference_worker.models import ModelLoadError, load_vlm, make_model
from inference_worker.models.loading import read_arch

torch = pytest.importorskip("torch")


def _digest(folder: str) -> str:
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize(
    "fixture, arch, model_cls",
    [
        ("tiny_qwen2_vl", "qwen2-vl", "Qwen2VLForConditionalGeneration"),
        ("tiny_qwen3_vl", "qwen3-vl", "Qwen3VLForConditionalGeneration"),
    ],
)
def test_tiny_checkpoint_loads_offline(request, monkeypatch, fixture, arch, model_cls):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = request.getfixturevalue(fixture)
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "processor_config.json",
        "chat_template.jinja",
    ):
        assert os.path.isfile(os.path.join(folder, name)), name
    with open(os.path.join(folder, "vlmq_model.json")) as f:
        assert json.load(f)["arch"] == arch
    vlm = load_vlm(folder)
    assert vlm.arch == arch == read_arch(folder)
    assert type(vlm.model).__name__ == model_cls and not vlm.model.training
    assert vlm.dtype == torch.float32 and vlm.device.type == "cpu"
    assert vlm.tokenizer.padding_side == "left"
    assert vlm.processor.image_token_id == vlm.model.config.image_token_id
    assert "<|im_start|>assistant" in vlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )


def test_make_model_is_reproducible_and_seeded(tiny_qwen2_vl, tmp_path):
    again = make_model("qwen2-vl", str(tmp_path / "same"), seed=0)
    other = make_model("qwen2-vl", str(tmp_path / "other"), seed=1)
    assert _digest(again) == _digest(tiny_qwen2_vl)
    assert _digest(other) != _digest(tiny_qwen2_vl)


def test_qwen2_5_vl_builds_loads_and_generates(tmp_path):
    vlm = load_vlm(make_model("qwen2.5-vl", str(tmp_path / "m")))
    assert vlm.arch == "qwen2.5-vl"
    ids = vlm.tokenizer(["hello"], return_tensors="pt")
    out = vlm.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3


def test_make_model_cli(tmp_path, capsys):
    from ops.cli import main

    assert main(["make-model", "--arch", "qwen3-vl", "--out", str(tmp_path / "cli"), "--seed", "3"]) == 0
    assert "wrote qwen3-vl" in capsys.readouterr().out
    assert read_arch(str(tmp_path / "cli")) == "qwen3-vl"


def _folder_without(src: str, dst, *drop: str) -> str:
    import shutil

    shutil.copytree(src, dst)
    for name in drop:
        os.remove(os.path.join(dst, name))
    return str(dst)


def test_load_errors_name_the_problem(tiny_qwen2_vl, tmp_path):
    cases = {
        "": "no model folder given",
        str(tmp_path / "missing"): "does not exist",
        os.path.join(tiny_qwen2_vl, "config.json"): "is not a folder",
        str(tmp_path): "has no config.json",
        _folder_without(tiny_qwen2_vl, tmp_path / "noweights", "model.safetensors"): "has no weights",
        _folder_without(tiny_qwen2_vl, tmp_path / "notok", "tokenizer.json"): "has no tokenizer",
    }
    other = _folder_without(tiny_qwen2_vl, tmp_path / "llama")
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    cases[other] = "model_type 'llama' is not served"
    for path, message in cases.items():
        with pytest.raises(ModelLoadError, match=message):
            load_vlm(path)


def test_quantize_and_device_errors(tiny_qwen2_vl):
    with pytest.raises(ModelLoadError, match="needs a CUDA device"):
        load_vlm(tiny_qwen2_vl, quantize="nf4")
    with pytest.raises(ModelLoadError, match="unknown quantization"):
        load_vlm(tiny_qwen2_vl, quantize="int3")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_vlm(tiny_qwen2_vl, dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            load_vlm(tiny_qwen2_vl, device="cuda")


def test_vllm_backend_without_vllm_is_a_clear_error(tiny_qwen2_vl):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    from inference_worker.engines.vllm_engine import VLLMChatEngine
    from inference_worker.settings import WorkerSettings

    with pytest.raises(ModelLoadError, match="needs vLLM"):
        VLLMChatEngine.from_settings(WorkerSettings(backend="vllm", model_path=tiny_qwen2_vl))
