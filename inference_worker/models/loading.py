"""`load_vlm`: any local Hugging Face folder of a Qwen-VL model -> model, processor, tokenizer.

The same path serves a folder written by `make_model` and a real downloaded checkpoint
(nothing is fetched: `local_files_only`). The processor is assembled from the folder's
image processor, tokenizer and chat template as an image-only processor (see
processor.py), so loading works on machines without torchvision. Every way a folder can
be wrong raises `ModelLoadError` naming the folder and what is missing, so a worker
fails at start, not at its first request.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from inference_worker.models.architectures import MODEL_TYPES, classes
from inference_worker.models.errors import ModelLoadError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

QUANTIZE_CHOICES = ("nf4",)


@dataclass
class LoadedVLM:
    model: PreTrainedModel  # Qwen2VLForConditionalGeneration / Qwen3VLForConditionalGeneration, eval mode
    processor: Any  # the (image-only) processor: apply_chat_template + images -> model inputs
    tokenizer: Any
    arch: str  # "qwen2-vl" | "qwen3-vl" | "qwen2.5-vl"
    device: torch.device
    dtype: torch.dtype
    path: str = ""


def read_arch(path: str) -> str:
    """The arch of a model folder, from its config.json (no torch needed)."""
    check_folder(path)
    with open(os.path.join(path, "config.json")) as f:
        try:
            model_type = json.load(f).get("model_type")
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{path}/config.json is not valid JSON: {exc}") from None
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(
            f"{path}: model_type {model_type!r} is not served by vlmq; supported: {', '.join(MODEL_TYPES)}"
        )
    return MODEL_TYPES[model_type]


def check_folder(path: Optional[str]) -> None:
    if not path:
        raise ModelLoadError(
            "no model folder given (--model DIR or VLMQ_MODEL); make one with `vlmq make-model`"
        )
    if not os.path.exists(path):
        raise ModelLoadError(f"model folder {path!r} does not exist")
    if not os.path.isdir(path):
        raise ModelLoadError(f"model path {path!r} is not a folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"{path!r} has no config.json: not a Hugging Face model folder")
    if not glob.glob(os.path.join(path, "*.safetensors")) and not glob.glob(os.path.join(path, "*.bin")):
        raise ModelLoadError(f"{path!r} has no weights (*.safetensors or *.bin)")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json")):
        raise ModelLoadError(f"{path!r} has no tokenizer (tokenizer.json or vocab.json)")
    if not any(
        os.path.isfile(os.path.join(path, f)) for f in ("preprocessor_config.json", "processor_config.json")
    ):
        raise ModelLoadError(f"{path!r} has no image processor (preprocessor_config.json)")


def resolve_device(device: str) -> torch.device:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that has it (float16 otherwise), float32 on CPU."""
    import torch

    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    table.update({"float16": torch.float16, "fp16": torch.float16})
    try:
        return table[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16") from None


def _quantization_config(quantize: Optional[str], device: torch.device, dtype: torch.dtype):
    if not quantize:
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise ModelLoadError(f"unknown quantization {quantize!r}; choose from {', '.join(QUANTIZE_CHOICES)}")
    if device.type != "cuda":
        raise ModelLoadError(f"--quantize {quantize} needs a CUDA device (bitsandbytes); got {device}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            f"--quantize {quantize} needs bitsandbytes: pip install 'vlmq[gpu]' (or bitsandbytes)"
        ) from None
    from transformers import BitsAndBytesConfig

    # bitsandbytes kernels fail on layers narrower than 64 inputs, and the vision tower and
    # lm_head are a small share of the weights: they stay in `dtype`.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=["visual", "lm_head"],
    )


def _chat_template(path: str, tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return template
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja) as f:
            return f.read()
    js = os.path.join(path, "chat_template.json")
    if os.path.isfile(js):
        with open(js) as f:
            return json.load(f)["chat_template"]
    raise ModelLoadError(f"{path!r} has no chat template (chat_template.jinja or tokenizer_config.json)")


def load_processor(path: str, arch: str) -> Any:
    """The folder's image-only processor (processor.py): chat template, tokenizer (left
    padding) and image processor, no model."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from inference_worker.models.processor import image_only_processor

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # the PIL backend wherever torchvision is installed too: engines/pixels.py (and the
        # frames vLLM gets) resize as PIL does; transformers' torchvision resize differs
        # from it by up to ~0.015 in a normalised pixel, enough to change a model's answers
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil")
    except Exception as exc:
        raise ModelLoadError(f"{path!r}: tokenizer or image processor failed to load: {exc}") from exc
    tokenizer.padding_side = "left"
    return image_only_processor(arch, image_processor, tokenizer, _chat_template(path, tokenizer))


def load_vlm(
    path: str, *, device: str = "cpu", dtype: str = "auto", quantize: Optional[str] = None
) -> LoadedVLM:
    """Load a local Qwen-VL folder for serving; raises ModelLoadError with the reason."""
    arch = read_arch(path)
    quiet_transformers()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    quant = _quantization_config(quantize, dev, dt)

    processor = load_processor(path, arch)
    tokenizer = processor.tokenizer

    _, model_cls = classes(arch)
    kwargs: dict = {"dtype": dt, "local_files_only": True}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": dev})
    elif dev.type == "cuda" and _has_accelerate():
        kwargs["device_map"] = {"": dev}  # weights go straight to the GPU
    try:
        model = model_cls.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"{path!r}: weights failed to load: {type(exc).__name__}: {exc}") from exc
    if quant is None and "device_map" not in kwargs:
        model = model.to(dev)
    model.eval()
    return LoadedVLM(model, processor, tokenizer, arch, dev, dt, path)


def _has_accelerate() -> bool:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


def quiet_transformers() -> None:
    """No progress bars from transformers: a worker's log is for requests and errors."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
