"""Two one-thread plans at once against one two-thread plan: an inter-op split's headroom.

The planner parallelises inside each operation (every product and kernel splits its rows over
the intra-op threads, ~700 fork/joins per batch-1 plan). The alternative on a 2-core CPU is to
give each core its own work and synchronise rarely. This measures the best such a split could
do: two independent batch-1 plans in two Python threads with one intra-op thread each (the
compiled graphs and PyTorch ops release the GIL), against the same plans one after another with
two intra-op threads. Prints milliseconds per plan of each, for ``--rounds`` rounds.

    python benchmarks/bench_interop.py --precision fp32+compile --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

from tdmpc_opt.agent import load_agent
from tdmpc_opt.allocator import keep_freed_memory
from tdmpc_opt.cli.bench import _plan_inputs
from tdmpc_opt.fast_model import FastWorldModel
from tdmpc_opt.planner import plan

DEFAULT_CKPT = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / \
    "tdmpc-opt-mt30-1M-fp16.pt"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    p.add_argument("--precision", default="fp32+compile")
    p.add_argument("--plans", type=int, default=10, help="plans per measurement (even)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    keep_freed_memory()  # as the command line does (tdmpc_opt.allocator)
    agent = load_agent(args.checkpoint)
    _, z, task, prev, t0, noise, gamma = _plan_inputs(agent, 1)
    fm = FastWorldModel(agent.model, args.precision)

    def one_plan():
        plan(fm, agent.planner, z, task, prev, t0, True, noise, gamma)

    for threads in (2, 1):  # warm up (and compile) for both thread counts
        torch.set_num_threads(threads)
        one_plan()
        one_plan()
    n = args.plans - args.plans % 2
    print("| round | one plan, 2 threads: ms/plan | two plans at once, 1 thread each: ms/plan |")
    print("| ---: | ---: | ---: |")
    for r in range(1, args.rounds + 1):
        torch.set_num_threads(2)
        start = time.perf_counter()
        for _ in range(n):
            one_plan()
        sequential = (time.perf_counter() - start) / n
        torch.set_num_threads(1)

        def half():
            for _ in range(n // 2):
                one_plan()
        workers = [threading.Thread(target=half) for _ in range(2)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        concurrent = (time.perf_counter() - start) / n
        print(f"| {r} | {1e3 * sequential:.1f} | {1e3 * concurrent:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
