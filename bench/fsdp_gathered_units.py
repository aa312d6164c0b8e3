"""How many FSDP2 units of the student are gathered (unsharded) while backward runs, and how many cast tensors
are alive while forward makes them, for docs/TRAINING.md.

    python3 bench/fsdp_gathered_units.py --model DIR [--checkpointing] [--no-anchor]

Two gloo processes, one thread each, TSCD loss on one item, all generation-expert keys, ``--shard full``.
Whenever backward reaches one of the student's casts it counts the units FSDP2 holds gathered (its private
per-unit state, torch 2.13); whenever forward makes a cast, the casts alive. ``--checkpointing``: the layers'
casts are made just in time inside their checkpointed regions (``Casts.deferred``). ``--no-anchor`` replaces ``_Cast`` by a plain cast that does not consume the anchor, to show what
the anchor is for: without it FSDP2 runs every unit's post-backward (reduce-scatter, reshard) only at the end
of backward, so all layers' fp32 masters and gradients are gathered at once.
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _PlainCast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, master, dtype):
        ctx.master_dtype = master.dtype
        return master.to(dtype, copy=True)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.master_dtype), None


def _rank(rank, port, model_dir, no_anchor, checkpointing):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from hyperbagel_core.pipeline import BagelPipeline
    from hyperbagel_core.training import tscd
    from hyperbagel_core.training.distributed import init_distributed
    from hyperbagel_core.training.loop import accumulate
    from hyperbagel_core.training.student import Student, _Cast, frozen, train_keys
    from hyperbagel_core.training.teacher import Teacher
    dist_ = init_distributed(True, "full")
    pipe = BagelPipeline.from_pretrained(model_dir, device="cpu", dtype=torch.float32)
    model = pipe.model
    st = Student.fresh(model, train_keys(model, "all"), nfe=6, stages=())
    job = tscd.TSCD(pipe, Teacher(pipe, (64, 64)), st, ["a red circle"], segments=(6,), pool=1)
    dist_.wrap(st)
    import weakref
    units, seen, alive, casts = st.shard_units(), [], [], weakref.WeakSet()

    def made(out):
        casts.add(out)
        alive.append(len(casts))
        return out

    def gathered():
        return sum(u._get_fsdp_state()._fsdp_param_group.is_unsharded for u in units)

    if no_anchor:
        class Counted(_PlainCast):
            @staticmethod
            def backward(ctx, grad):
                seen.append(gathered())
                return _PlainCast.backward(ctx, grad)
        _Cast.apply = lambda anchor, master, dtype: made(Counted.apply(master, dtype))
    else:
        backward = _Cast.backward

        def counting(ctx, grad):
            seen.append(gathered())
            return backward(ctx, grad)
        forward = _Cast.forward
        _Cast.backward = staticmethod(counting)
        _Cast.forward = staticmethod(lambda ctx, anchor, master, dtype: made(forward(ctx, anchor, master, dtype)))
    with frozen(model):
        accumulate(st, model, [job.loss_fn(job.draw(random.Random(0), 0))], dist_, 2, checkpointing)
    if rank == 0:
        sizes = {n: len(u.keys) for n, u in st.master.items()}
        print(f"{'no anchor' if no_anchor else 'with the anchor'}, checkpointing {checkpointing}: units (casts "
              f"each) {sizes}; gathered when backward reaches each cast: max {max(seen)}, sequence {seen}; after "
              f"backward: {gathered()}; casts alive when forward makes one: max {max(alive)}, sequence {alive}")
    import torch.distributed as dist
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder (e.g. a make_tiny_checkpoint one)")
    ap.add_argument("--no-anchor", action="store_true")
    ap.add_argument("--checkpointing", action="store_true")
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(port, a.model, a.no_anchor, a.checkpointing), nprocs=2, start_method="spawn")


if __name__ == "__main__":
    main()
