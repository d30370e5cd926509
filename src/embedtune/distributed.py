"""Who this process is among the torchrun ranks, and the few collectives the library needs.

- `world_and_rank()`: the one answer to "how many ranks, and which am I" once the process group is set up
  (one process without one); `launched()`: what torchrun's variables say, before any group exists (how many
  processes, per node). `progress.rank` reads the same `RANK` variable without torch, for the steps that
  never load it (convert, split).
- `init_ranks()`: a process group for a step that has no Trainer to make one (mine): nccl on GPUs, else gloo.
- `gather_over_ranks(compute, n)`: items split across ranks, computed, all-gathered in order (eval metrics
  during training, mining).
- `max_over_ranks(n)`: the largest `n` of any rank (one all_reduce).

**Every rank runs the same number of forward passes.** Under ZeRO-3 each forward pass gathers the parameters
collectively and DDP synchronizes buffers, so a rank that runs one pass more than the others waits forever.
Three places keep the count equal, each the way its inputs allow: `gather_over_ranks` pads every rank's share
to ceil(n / W) items (n is known to all); the gradient cache plans `max_over_ranks(chunks)` chunks and runs
stand-ins where a rank has fewer texts (`gradcache.plan`); length buckets always run exactly k passes, with
stand-ins when a batch has fewer than k texts (`speed.encode_in_buckets`).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from embedtune.launch import inside_torchrun


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_and_rank() -> tuple[int, int]:
    """(world size, global rank) of the process group; (1, 0) without one."""
    if initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def launched() -> tuple[int, int]:
    """(processes in all, processes on this node) as torchrun's `WORLD_SIZE` / `LOCAL_WORLD_SIZE` say
    ((1, 1) outside torchrun): what the process group will be, before it exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("LOCAL_WORLD_SIZE", world))


def init_ranks() -> tuple[int, str]:
    """(world size, device) of this process: under torchrun, a process group (nccl on GPUs, else gloo) and this
    rank's GPU; outside it, (1, the GPU if there is one, else the CPU)."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not inside_torchrun():
        return 1, device
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_world_size(), device


def max_over_ranks(n: int, device: torch.device | str = "cpu") -> int:
    """The largest `n` over the ranks (`n` itself in one process). `device`: where the all_reduce's tensor
    lives (CUDA under NCCL)."""
    if not initialized() or dist.get_world_size() == 1:
        return n
    t = torch.tensor([n], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_over_ranks(compute, n: int) -> np.ndarray:
    """`scoring.measure`'s `shard` under torchrun: rank r computes items r, r + W, r + 2W, ... and every rank
    gets all n outputs back, in order.

    Every rank computes the same number of items, ceil(n / W), its share padded with item 0 (the same number
    of forward passes on every rank: see the module docstring). `compute(idx)` returns a (len(idx), ...) array.
    """
    world, rank = world_and_rank()
    if world == 1:
        return compute(np.arange(n))
    per = -(-n // world)
    mine = np.arange(rank, n, world)
    idx = np.concatenate([mine, np.zeros(per - len(mine), dtype=mine.dtype)])
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    mine_out = np.ascontiguousarray(compute(idx))  # (per, ...): embeddings (per, H) or reranker logits (per,)
    local = torch.from_numpy(mine_out).to(device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    out = np.empty((n, *mine_out.shape[1:]), dtype=mine_out.dtype)
    for r, part in enumerate(parts):
        rows = np.arange(r, n, world)
        out[rows] = part[: len(rows)].cpu().numpy()
    return out
