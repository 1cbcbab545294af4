"""Multi-process training launched by ``torchrun``: environment, process group, collectives.

``torchrun --nproc_per_node N tdmpc-opt train --data DIR ...`` starts N copies of the command;
each finds its place from torchrun's environment variables (:func:`detect`) and joins the
process group (:func:`init`: NCCL for CUDA devices, gloo on the CPU). Every helper below is the
identity (or a no-op) in a plain single process, so the training code calls them
unconditionally and a single-process run does exactly what it did before.

How a run stays identical on every rank (see ``docs/scaling.md``):

* each rank samples its own ``batch_size / world_size`` subsequences with its own seed
  (:func:`local_batch`, :func:`rank_seed`);
* gradients are averaged (:func:`all_reduce_grads`) before clipping and every optimizer step,
  so clipping sees the global-batch gradient and Adam's state is the same everywhere;
* the policy's running value scale is updated from the whole global batch (:func:`gather_rows`)
  and task embeddings are renormalised for the union of the ranks' tasks (:func:`union_ids`);
* the Polyak target update is a function of the (identical) parameters.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from tdmpc_opt.errors import ConfigError

DEFAULT_TIMEOUT_S = 2 * 3600
"""Collective timeout (the others wait while rank 0 writes a checkpoint, for instance)."""
MAIN_WORK_TIMEOUT_S = 7 * 24 * 3600
"""How long :func:`wait_for_main` waits: work rank 0 does alone may take hours (building a large
teacher's cache, evaluating a large model on MT30); a rank 0 that dies ends the job through
torchrun long before."""
_main_work_group = None  # a gloo group with MAIN_WORK_TIMEOUT_S, made by init()
_BUCKET = 1 << 24
"""Gradient elements all-reduced per collective call."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a torchrun job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int


def detect(environ: Mapping[str, str] | None = None) -> DistEnv | None:
    """The torchrun environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), or None when this
    is a plain single process (no ``WORLD_SIZE``, or a world of one)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        raise ConfigError("WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE must be whole "
                          "numbers (start multi-process training with torchrun)") from None
    if world < 1:
        raise ConfigError(f"WORLD_SIZE must be at least 1, got {world}")
    if world == 1:
        return None
    if not (0 <= rank < world and 0 <= local < local_world <= world):
        raise ConfigError(f"inconsistent torchrun environment: RANK={rank} LOCAL_RANK={local} "
                          f"WORLD_SIZE={world} LOCAL_WORLD_SIZE={local_world}")
    return DistEnv(rank, local, world, local_world)


def init(env: DistEnv, device: str | torch.device,
         timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the process group; returns this rank's device.

    An accelerator device becomes ``<type>:LOCAL_RANK`` (one device per process, any index given
    is replaced) and the group uses that device's default backend (NCCL for CUDA); on the CPU
    the backend is gloo. The rendezvous address comes from torchrun (``MASTER_ADDR``/``PORT``).
    """
    device = torch.device(device)
    if device.type != "cpu":
        count = torch.accelerator.device_count() if torch.accelerator.is_available() else 0
        if env.local_rank >= count:
            raise ConfigError(f"local rank {env.local_rank} needs a {device.type} device of its "
                              f"own, this node has {count}: start at most {count} processes "
                              "per node (--nproc_per_node)")
        device = torch.device(device.type, env.local_rank)
        torch.accelerator.set_device_index(device.index)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ConfigError(f"{var} is not set: start multi-process training with torchrun")
    print(f"rank {env.rank} of {env.world_size}: waiting for all {env.world_size} processes at "
          f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} (up to {timeout_s:.0f} s)",
          file=sys.stderr, flush=True)
    dist.init_process_group(dist.get_default_backend_for_device(device),
                            init_method="env://", rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s))
    global _main_work_group
    _main_work_group = dist.new_group(backend="gloo",
                                      timeout=timedelta(seconds=MAIN_WORK_TIMEOUT_S))
    return device


def is_active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """True on rank 0, the one that writes files and prints."""
    return rank() == 0


def describe() -> dict:
    """World size and backend of the process group (for a run's config.json)."""
    return {"world_size": world_size(),
            "backend": str(dist.get_backend()) if is_active() else None}


def local_batch(batch_size: int, world: int | None = None) -> int:
    """This rank's share of the global ``batch_size``; refuses sizes that do not divide."""
    world = world_size() if world is None else world
    if batch_size % world:
        raise ConfigError(f"batch_size={batch_size} does not split evenly over {world} "
                          f"processes: use a multiple of {world}")
    return batch_size // world


def rank_seed(seed: int, rank_: int | None = None, world: int | None = None) -> int:
    """Seed of a rank's sampler and torch generator: ``seed`` itself in a single process,
    otherwise an independent stream derived from ``(seed, rank)``."""
    world = world_size() if world is None else world
    if world == 1:
        return seed
    rank_ = rank() if rank_ is None else rank_
    return int(np.random.SeedSequence([seed, rank_]).generate_state(1, np.uint32)[0])


def cpu_share(env: DistEnv) -> int:
    """torch threads per process when the node's cores are split among its processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    return max(1, cores // env.local_world_size)


# ------------------------------------------------------------------------- collectives
@torch.no_grad()
def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each existing ``.grad`` by its mean over ranks (in flat buckets).

    Every rank must call this with the same parameters, and the same ones must have a
    gradient (true here: all ranks run the same code on same-shaped batches).
    """
    if not is_active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    for g in [*grads, None]:
        if bucket and (g is None or g.dtype != bucket[0].dtype
                       or sum(b.numel() for b in bucket) + g.numel() > _BUCKET):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            flat.div_(dist.get_world_size())
            for b, part in zip(bucket, flat.split([b.numel() for b in bucket]), strict=True):
                b.copy_(part.view_as(b))
            bucket = []
        if g is not None:
            bucket.append(g)


@torch.no_grad()
def average(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (``x`` itself in a single process)."""
    if not is_active():
        return x
    out = x.clone()
    dist.all_reduce(out)
    return out.div_(dist.get_world_size())


@torch.no_grad()
def any_rank(flag: bool, device: str | torch.device = "cpu") -> bool:
    """True when ``flag`` is true on any rank (``flag`` itself in a single process). Every rank
    calls it at the same point; ``device`` is this rank's (NCCL reduces on the accelerator)."""
    if not is_active():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@torch.no_grad()
def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (same shapes) concatenated along dim 0, in rank order."""
    if not is_active():
        return x
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


@torch.no_grad()
def union_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted ids in ``[0, n)`` present in any rank's ``ids`` (``ids`` in a single process)."""
    if not is_active():
        return ids
    seen = torch.zeros(n, device=ids.device)
    seen[ids] = 1
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    return seen.nonzero().flatten()


@torch.no_grad()
def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if not is_active():
        return
    for t in module.state_dict().values():
        dist.broadcast(t, src=0)


def broadcast_object(obj):
    """Rank 0's ``obj`` (any picklable value) on every rank."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_active():
        dist.barrier()


def wait_for_main() -> None:
    """Wait until every rank is here, however long rank 0 takes (up to
    :data:`MAIN_WORK_TIMEOUT_S`, not the collectives' timeout): for work rank 0 does alone while
    the others wait for its result (collecting data, building a teacher cache, the periodic
    evaluation). No-op in a single process."""
    if is_active():
        dist.barrier(group=_main_work_group)


def destroy() -> None:
    """Leave the process group, if this process joined one."""
    global _main_work_group
    _main_work_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
