"""What agreeing on an interrupt costs multi-process training (torchrun) per update.

Under torchrun, :func:`~tdmpc_opt.trainer.train_offline` asks after every update whether any
process was sent Ctrl-C / SIGTERM (:func:`~tdmpc_opt.distributed.any_rank`: a one-element
all-reduce), so that all of them checkpoint the same update and stop. This starts two gloo
processes on the CPU (one thread each) and times, interleaved in rounds, that question alone
and one distributed update of a published model size (MT30 dimensions, random global batch of
``--batch`` rows split over the processes), so the cost reads as a fraction of an update.

    python benchmarks/bench_ddp_stop.py --size 1 --batch 256 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

from tdmpc_opt import distributed
from tdmpc_opt.config import model_config_for
from tdmpc_opt.tasks import TASK_SETS
from tdmpc_opt.training import Batch, TDMPC2Learner, TrainConfig
from tdmpc_opt.world_model import WorldModel

WORLD = 2


def _worker(rank: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    distributed.init(distributed.detect(), "cpu")
    try:
        mc, rows = model_config_for(TASK_SETS["mt30"], args.size), args.batch // WORLD
        g = torch.Generator().manual_seed(rank)
        batch = Batch(torch.randn(4, rows, mc.obs_dim, generator=g),
                      torch.rand(3, rows, mc.action_dim, generator=g) * 2 - 1,
                      torch.rand(3, rows, 1, generator=g), torch.zeros(3, rows, 1),
                      torch.randint(0, 30, (rows,), generator=g))
        torch.manual_seed(0)
        learner = TDMPC2Learner(WorldModel(mc), TrainConfig(batch_size=args.batch))
        for _ in range(2):
            learner.update(batch)
        for _ in range(args.rounds):
            distributed.barrier()
            t = time.perf_counter()
            for _ in range(args.asks):
                distributed.any_rank(False)
            ask_us = (time.perf_counter() - t) / args.asks * 1e6
            distributed.barrier()
            t = time.perf_counter()
            for _ in range(args.updates):
                learner.update(batch)
            update_ms = (time.perf_counter() - t) / args.updates * 1e3
            if rank == 0:
                results.append((ask_us, update_ms))
    finally:
        distributed.destroy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1, help="model size in millions (default 1)")
    p.add_argument("--batch", type=int, default=256, help="global batch (default 256)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--asks", type=int, default=2000, help="questions timed per round")
    p.add_argument("--updates", type=int, default=10, help="updates timed per round")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.list()
        mp.spawn(_worker, args=(port, args, results), nprocs=WORLD, join=True)
        rows = list(results)
    print(f"{WORLD} gloo processes, 1 thread each, {args.size}M model, global batch {args.batch}")
    print("| round | any_rank us | update ms | share of an update |")
    print("| ---: | ---: | ---: | ---: |")
    for i, (ask, upd) in enumerate(rows, 1):
        print(f"| {i} | {ask:.1f} | {upd:.1f} | {ask / 1e3 / upd:.3%} |")
    ask, upd = (statistics.median(c) for c in zip(*rows, strict=True))
    print(f"| median | {ask:.1f} | {upd:.1f} | {ask / 1e3 / upd:.3%} |")


if __name__ == "__main__":
    main()
