"""The distributed flag of every trainer: process group, DDP / ZeRO-1 / FSDP2 wrapping, sharded tensors.

``--distributed`` initialises ``torch.distributed`` from the launcher's environment (torchrun: gloo on CPU,
NCCL on CUDA) and wraps the trainable module in DDP. Each step draws one global batch (the same on every
rank) and rank r runs items ``r::world``; each rank scales its loss by ``world / global_batch`` so DDP's
gradient average equals the 1-process mean over the global batch. ``--shard optimizer`` shards the AdamW
state over the ranks (ZeroRedundancyOptimizer, ZeRO-1); ``--shard full`` shards the fp32 masters, their
gradients and so the AdamW state with FSDP2 (``fully_shard`` per decoder layer's trained tensors, then the
rest): each unit is all-gathered when the student casts it for a pass and its gradient is reduce-scattered
(a mean, like DDP's) in backward; with ``--checkpointing`` too, each layer's unit is gathered and cast just in
time inside its checkpointed region (``student``). docs/TRAINING.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


SHARD_MODES = ("none", "optimizer", "full")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    enabled: bool = False
    shard: str = "none"      # SHARD_MODES: replicated (DDP), ZeRO-1 AdamW state, or FSDP2 masters + grads + state

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's items of a global batch."""
        if self.shard == "full" and len(items) % self.world:
            # every pass gathers the sharded masters collectively: all ranks must run the same number of passes
            raise ValueError(f"--shard full needs a global batch divisible by the {self.world} processes "
                             f"(got {len(items)}): pass --batch {self.world * max(1, len(items) // self.world)}")
        return items[self.rank::self.world]

    def loss_scale(self, global_batch: int) -> float:
        return self.world / global_batch

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP, or with ``shard="full"`` FSDP2 in place: each of ``module.shard_units()`` (one decoder layer's
        masters) is its own all-gather / reduce-scatter unit, the root holds the rest."""
        if not self.enabled:
            return module
        if self.shard == "full":
            from torch.distributed.fsdp import fully_shard
            for unit in module.shard_units():
                fully_shard(unit)
            return fully_shard(module)
        from torch.nn.parallel import DistributedDataParallel as DDP
        dev = next(module.parameters()).device
        return DDP(module, device_ids=[dev.index] if dev.type == "cuda" else None)

    def mean(self, value: float) -> float:
        """Mean of a scalar over the ranks (for the logged loss)."""
        if not self.enabled:
            return value
        import torch.distributed as dist
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world

    def average_grads(self, params) -> None:
        """All-reduce-mean of gradients (a module trained outside DDP's forward, e.g. discriminators)."""
        if not self.enabled:
            return
        import torch.distributed as dist
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()


def init_distributed(enabled: bool, shard: str = "none") -> Dist:
    """``enabled``: join the process group the launcher (torchrun) describes in the environment."""
    if shard not in SHARD_MODES:
        raise ValueError(f"unknown --shard {shard!r}; valid: {', '.join(SHARD_MODES)}")
    if not enabled:
        if shard != "none":
            raise SystemExit(f"--shard {shard} splits state over processes: add --distributed and launch with "
                             "torchrun --nproc_per_node N")
        return Dist()
    import torch.distributed as dist
    if "RANK" not in os.environ:
        raise SystemExit("--distributed needs a launcher: torchrun --nproc_per_node N -m hyperbagel_core.training...")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return Dist(dist.get_rank(), dist.get_world_size(), True, shard)


def make_optimizer(params, lr: float, dist_: Dist, weight_decay: float = 0.0):
    """AdamW over fp32 masters; ``--shard optimizer`` splits its state over the ranks (ZeRO-1). Under
    ``--shard full`` the masters of a wrapped module are already shards, and so is the state AdamW keeps."""
    params = [p for p in params if p.requires_grad]
    if dist_.shard == "optimizer" and dist_.enabled:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's whole value (a collective: every rank must call it in the same order); any other
    tensor as it is."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``like``: this rank's shard when ``like`` is sharded (no communication: every
    rank holds ``full``), else ``full`` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def local_bytes(tensors) -> int:
    """Bytes this rank holds of ``tensors`` (a shard's local part for sharded ones)."""
    from torch.distributed.tensor import DTensor
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def shard_report(module: nn.Module, opt, dist_: Dist) -> dict:
    """Per rank: bytes of the module's trainable fp32 masters and of the optimizer's state tensors it holds
    (the evidence that ``--shard full`` splits them), next to the unsharded totals."""
    params = [p for p in module.parameters() if p.requires_grad]
    local = getattr(opt, "optim", opt)   # ZeRO-1: the optimizer over this rank's partition
    state = [v for st in local.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    mine = {"rank": dist_.rank, "master_bytes": local_bytes(params), "optimizer_bytes": local_bytes(state)}
    if dist_.enabled:
        import torch.distributed as dist
        ranks = [None] * dist_.world
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    return {"ranks": ranks, "master_bytes_total": sum(p.numel() * p.element_size() for p in params)}
