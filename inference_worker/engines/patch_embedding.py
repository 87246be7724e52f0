"""The vision tower's patch embedding as one matrix product.

Qwen-VL embeds each flattened (channels x 2 frames x 14 x 14) patch with a Conv3d whose
kernel equals its stride: a linear map written as a convolution. cuDNN runs that 3-D
convolution slowly (on an H100 the 2B vision tower took ~210 ms for 128 frames, most of
it here); the same weights as a (embed_dim, C*T*P*P) matrix give the same numbers with
one GEMM.
"""

from __future__ import annotations

from typing import Any


def use_linear_patch_embedding(model: Any) -> bool:
    """Replace the patch embedding's forward; False if the model has no such Conv3d."""
    import torch.nn.functional as F
    from torch import nn

    visual = getattr(getattr(model, "model", model), "visual", None)
    embed = getattr(visual, "patch_embed", None)
    conv = getattr(embed, "proj", None)
    if not isinstance(conv, nn.Conv3d) or tuple(conv.kernel_size) != tuple(conv.stride) or any(conv.padding):
        return False

    def forward(hidden_states):
        weight = conv.weight
        flat = weight.view(weight.shape[0], -1)  # (embed, C*T*P*P), the pixel_values column order
        return F.linear(hidden_states.reshape(-1, flat.shape[1]).to(weight.dtype), flat, conv.bias)

    embed.forward = forward
    return True
