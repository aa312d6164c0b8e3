"""The layer namespace the model is built from.

ComfyUI injects ``comfy.ops.manual_cast`` (same attribute names) so that its ModelPatcher can stream
weights for low-VRAM loading; the core never imports ComfyUI itself.
"""
from torch import nn


class TorchOps:
    Linear = nn.Linear
    LayerNorm = nn.LayerNorm
    Embedding = nn.Embedding
    Conv2d = nn.Conv2d
    GroupNorm = nn.GroupNorm


def resolve_ops(ops=None):
    """Return ``ops`` or the plain torch namespace."""
    return TorchOps if ops is None else ops
