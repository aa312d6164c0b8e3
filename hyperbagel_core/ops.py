"""The layer namespace the model is built from.

ComfyUI injects its ``comfy.ops`` namespaces (same attribute names) so that its ModelPatcher can stream
weights for low-VRAM loading; the core never imports ComfyUI itself.
"""
from torch import nn


class TorchOps:
    Linear = nn.Linear
    LayerNorm = nn.LayerNorm
    Embedding = nn.Embedding
    Conv2d = nn.Conv2d
    GroupNorm = nn.GroupNorm


LAYER_NAMES = ("Linear", "LayerNorm", "Embedding", "Conv2d", "GroupNorm")


def resolve_ops(ops=None):
    """Return ``ops`` or the plain torch namespace."""
    return TorchOps if ops is None else ops


def adopt_ops(root: nn.Module, ops=None) -> nn.Module:
    """Re-class every plain torch layer under ``root`` as the matching ``ops`` layer, keeping its tensors.

    For layers built by other libraries (diffusers' VAE) or outside a constructor that takes ``ops``: a model
    manager that streams weights (ComfyUI's partial loading) only streams layers of its own classes, and
    leaves a plain layer that does not fit on the offload device. The ``ops`` classes subclass the torch
    ones without adding state, so only ``__class__`` changes: same parameters, same forward numerics.
    """
    ops = resolve_ops(ops)
    for module in root.modules():
        for name in LAYER_NAMES:
            base, target = getattr(nn, name), getattr(ops, name)
            if type(module) is base and target is not base:
                if not issubclass(target, base):
                    raise TypeError(f"ops.{name} ({target!r}) does not subclass torch.nn.{name}")
                module.__class__ = target
    return root
