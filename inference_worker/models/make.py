"""`make_model`: a Hugging Face folder of a real Qwen-VL architecture with random weights.

No machine here reaches a model hub, so vlmq builds its own checkpoints: the config class
of the release, a tokenizer trained locally, the release's image processor settings and
chat template, random weights from `--seed`, all written with `save_pretrained`. The
folder loads through exactly the path a downloaded checkpoint takes (`load_vlm`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

from inference_worker.models.architectures import classes
from inference_worker.models.loading import quiet_transformers
from inference_worker.models.presets import IMAGE_PROCESSOR, config_kwargs
from inference_worker.models.processor import image_only_processor, new_image_processor
from inference_worker.models.tokenizer import train_tokenizer

# The releases initialise with std 0.02; a tiny model initialised so gently answers every
# prompt with one repeated token, which would make batch-invariance tests vacuous. A wider
# init makes its greedy output depend on the image and the text.
TINY_INIT_STD = 0.5
PROVENANCE_FILE = "vlmq_model.json"


def _token_ids(tok) -> Dict[str, int]:
    names = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    return {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}


def build_config(arch: str, preset: str, tok) -> Any:
    config_cls, _ = classes(arch)
    kw = config_kwargs(arch, preset, vocab_size=(len(tok) + 63) // 64 * 64)
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    kw["text_config"].update(bos_token_id=None, eos_token_id=eos[0], pad_token_id=tok.pad_token_id)
    if preset == "tiny":
        for part in ("text_config", "vision_config"):
            kw[part]["initializer_range"] = TINY_INIT_STD
    return config_cls(**kw, **_token_ids(tok))


def make_model(arch: str, out_dir: str, *, preset: str = "tiny", seed: int = 0, device: str = "cpu") -> str:
    """Write a random-weight checkpoint of `arch` to `out_dir`; returns the folder.

    `device` is where the weights are initialised (a 2B model takes minutes on CPU and
    seconds on a GPU); the folder is the same either way, up to the device's RNG.
    """
    import torch

    quiet_transformers()
    tok = train_tokenizer(arch)
    config = build_config(arch, preset, tok)
    _, model_cls = classes(arch)
    dtype = torch.float32 if preset == "tiny" else torch.bfloat16
    torch.manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.manual_seed_all(seed)
    with torch.device(device):
        model = model_cls._from_config(config, dtype=dtype)
    model.eval()
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False

    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    image_processor = new_image_processor(arch, **IMAGE_PROCESSOR[arch])
    processor = image_only_processor(arch, image_processor, tok, tok.chat_template)
    processor.save_pretrained(out_dir)
    # the releases also ship the image processor's settings on their own: stock
    # processors (vLLM's included) build their video processor from this file
    image_processor.to_json_file(os.path.join(out_dir, "preprocessor_config.json"))
    tok.save_pretrained(out_dir)
    with open(os.path.join(out_dir, PROVENANCE_FILE), "w") as f:
        json.dump(
            {
                "made_by": "vlmq make-model",
                "arch": arch,
                "preset": preset,
                "seed": seed,
                "weights": "random (not a trained model)",
                "parameters": sum(p.numel() for p in model.parameters()),
            },
            f,
            indent=2,
        )
    readable_by_umask(out_dir)
    return out_dir


def readable_by_umask(folder: str) -> None:
    """Give every file the mode a plain `open()` would (0666 less the umask): transformers
    writes model.safetensors 0600 through a temporary file, and a checkpoint is read by
    other users, such as the containers' uid 10001 mounting the folder."""
    mask = os.umask(0)
    os.umask(mask)
    for root, _dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
