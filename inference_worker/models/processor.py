"""Image-only processors: the stock Qwen processors without their video processor.

The stock `Qwen2VLProcessor` / `Qwen3VLProcessor` need a video processor, which needs
torchvision; CPU machines here don't have it (its PyPI build is CUDA-only and breaks
transformers' image imports). vlmq serves images only, so these subclasses take the
image processor, the tokenizer and the chat template, and keep everything else of the
stock class: placeholder expansion, `mm_token_type_ids`, decoding.
"""

from __future__ import annotations

from typing import Any, Optional

from transformers import Qwen2VLProcessor, Qwen3VLProcessor


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def image_only_processor(arch: str, image_processor: Any, tokenizer: Any, chat_template: Optional[str]):
    cls = Qwen3VLImageOnlyProcessor if arch == "qwen3-vl" else Qwen2VLImageOnlyProcessor
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def new_image_processor(arch: str, **settings: Any):
    """The release's image processor class on the backend this machine has (PIL here)."""
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl

    try:
        import torchvision  # noqa: F401
    except ImportError:
        return image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil(**settings)
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(**settings)
