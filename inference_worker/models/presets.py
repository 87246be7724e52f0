"""Architecture shapes: `tiny` (seconds on CPU, for tests) and `2b` (the published 2B shapes).

The 2B numbers are those of the released Qwen2-VL-2B-Instruct and Qwen3-VL-2B-Instruct
configs; `tiny` keeps every structural feature (GQA, M-RoPE sections, patch merging,
Qwen3's deepstack and learned position grid) at a few hundred thousand parameters.
Token ids are filled in from the tokenizer by make_model.
"""

from __future__ import annotations

from typing import Any, Dict

ARCHES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
PRESETS = ("tiny", "2b")

# Image processor settings of the releases: Qwen2/2.5-VL use 14-px patches and CLIP's
# normalisation; Qwen3-VL 16-px patches, mean/std 0.5, and a 256x256 minimum.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_PROCESSOR: Dict[str, Dict[str, Any]] = {
    "qwen2-vl": {
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": _CLIP_MEAN,
        "image_std": _CLIP_STD,
        "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
    },
    "qwen3-vl": {
        "patch_size": 16,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    },
}
IMAGE_PROCESSOR["qwen2.5-vl"] = IMAGE_PROCESSOR["qwen2-vl"]


def _qwen2_vl(preset: str, vocab_size: int) -> Dict[str, Any]:
    if preset == "2b":
        text = dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        )
        vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4)
    else:
        text = dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            # head_dim 32 (2 query heads over 1 KV head, still grouped-query): vLLM's CPU
            # attention kernels take head sizes from 32 up, not 16
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        )
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    text.update(sliding_window=None, use_sliding_window=False, tie_word_embeddings=True)
    return {"text_config": text, "vision_config": vision, "tie_word_embeddings": True}


def _qwen3_vl(preset: str, vocab_size: int) -> Dict[str, Any]:
    if preset == "2b":
        text = dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=262144,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        )
        vision = dict(
            depth=24,
            hidden_size=1024,
            intermediate_size=4096,
            num_heads=16,
            out_hidden_size=2048,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[5, 11, 17],
        )
    else:
        text = dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=4096,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        )
        # num_position_embeddings must be a square (a learned grid, interpolated per image);
        # deepstack indexes must be below the depth.
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            num_position_embeddings=64,
            deepstack_visual_indexes=[1],
        )
    vision.update(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, hidden_act="gelu_pytorch_tanh")
    text.update(rms_norm_eps=1e-6, attention_bias=False, tie_word_embeddings=True)
    return {"text_config": text, "vision_config": vision, "tie_word_embeddings": True}


def config_kwargs(arch: str, preset: str, vocab_size: int) -> Dict[str, Any]:
    """Keyword arguments for the arch's config class (token ids are added by the caller)."""
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if arch == "qwen3-vl":
        return _qwen3_vl(preset, vocab_size)
    cfg = _qwen2_vl(preset, vocab_size)
    if arch == "qwen2.5-vl":
        # Qwen2.5-VL's vision tower: SwiGLU MLP, window attention with a few full layers.
        v = cfg["vision_config"]
        depth = v["depth"]
        cfg["vision_config"] = dict(
            depth=depth,
            hidden_size=v["embed_dim"],
            intermediate_size=v["embed_dim"] * 2 if preset == "tiny" else 3420,
            num_heads=v["num_heads"],
            out_hidden_size=v["hidden_size"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[depth - 1] if preset == "tiny" else [7, 15, 23, 31],
            hidden_act="silu",
        )
    return cfg
