"""One weight matrix for the q, k and v projections and one for gate and up, per layer.

Decoding at batch 128 reads the weights once per step, and the k and v projections of a
2B model are 256 columns wide: as separate GEMMs they run well below the card's
bandwidth. Concatenated (as vLLM's QKV and merged MLP layers do), each layer makes two
wide GEMMs instead of five. The model's own modules are rebound to row slices of the
fused tensors, so transformers' forward keeps working and no weight is held twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

ATTR = "_vlmq_fused"


@dataclass
class FusedLayer:
    qkv_weight: Any
    qkv_bias: Optional[Any]
    qkv_sizes: List[int]
    gate_up_weight: Optional[Any]  # None where the MLP is not gate/up/down


def fuse_layer(layer: Any) -> Optional[FusedLayer]:
    """The layer's fused weights (made once, kept on the layer); None if its projections are
    not plain floating-point nn.Linear (quantized layers keep their own kernels)."""
    done = getattr(layer, ATTR, None)
    if done is not None:
        return done
    attn, mlp = layer.self_attn, layer.mlp
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    if not _plain(qkv):
        return None
    gate_up = [getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)]
    weight, bias = _concat(qkv)
    fused = FusedLayer(weight, bias, [m.out_features for m in qkv], None)
    if _plain(gate_up):
        fused.gate_up_weight, _ = _concat(gate_up)
    setattr(layer, ATTR, fused)
    return fused


def _plain(mods: Sequence[Any]) -> bool:
    from torch import nn

    if any(type(m) is not nn.Linear for m in mods):
        return False
    w = [m.weight for m in mods]
    if not all(x.is_floating_point() and x.dtype == w[0].dtype and x.device == w[0].device for x in w):
        return False
    biases = [m.bias is not None for m in mods]
    return all(biases) or not any(biases)


def _concat(mods: Sequence[Any]):
    import torch
    from torch import nn

    with torch.no_grad():
        weight = torch.cat([m.weight for m in mods], dim=0)
        bias = torch.cat([m.bias for m in mods], dim=0) if mods[0].bias is not None else None
    start = 0
    for m in mods:
        n = m.out_features
        m.weight = nn.Parameter(weight[start : start + n], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[start : start + n], requires_grad=False)
        start += n
    return weight, bias
