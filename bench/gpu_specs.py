"""Datasheet figures of the GPUs the GPU check runs on, for "% of the hardware's limit" columns.

Dense bf16 tensor-core peak (no sparsity) and HBM bandwidth from NVIDIA's datasheets. Matched on the name
``torch.cuda.get_device_name()`` reports; an unknown card gives None (the bench prints the raw figures only).
"""
from __future__ import annotations

# (name fragment, dense bf16 TFLOP/s, memory TB/s); the first fragment found in the device name wins
CARDS = (
    ("H200 NVL", 835.0, 4.8),
    ("H200", 989.4, 4.8),           # H200 SXM
    ("H100 NVL", 835.0, 3.9),
    ("H100 PCIe", 756.0, 2.0),
    ("H100", 989.4, 3.35),          # H100 SXM5 (reports "NVIDIA H100 80GB HBM3")
    ("A100-SXM4-80GB", 312.0, 2.039),
    ("A100 80GB PCIe", 312.0, 1.935),
    ("A100", 312.0, 1.555),         # 40 GB
)


def card(name: str | None) -> dict | None:
    """{"card", "bf16_tflops", "bandwidth_tbs"} for a device name, or None."""
    for frag, tflops, tbs in CARDS:
        if name and frag in name:
            return dict(card=frag, bf16_tflops=tflops, bandwidth_tbs=tbs)
    return None
