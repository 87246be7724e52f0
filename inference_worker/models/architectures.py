"""Which transformers classes implement each architecture vlmq serves."""

from __future__ import annotations

from typing import Any, Dict, Tuple

# model_type in config.json -> vlmq's arch name
MODEL_TYPES: Dict[str, str] = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl", "qwen3_vl": "qwen3-vl"}


def classes(arch: str) -> Tuple[Any, Any]:
    """(config class, model class) of an arch."""
    import transformers as tf

    table = {
        "qwen2-vl": (tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration),
        "qwen2.5-vl": (tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration),
        "qwen3-vl": (tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration),
    }
    try:
        return table[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(table)}") from None
